"""hfllm pretrain: outputs, exact resume, optimisers and schedules, global batch, metrics, recipe parsing."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import TINY, data_args, log_history, losses, write_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfllm.errors import HfllmError
from hfllm.models import get_preset
from hfllm.run_pretrain import main
from hfllm.models import parameter_counts
from hfllm.training.arguments import gradient_accumulation, parse_recipe
from hfllm.training.mfu import flops_per_token
from hfllm.training.optim import MuonWithAdamW, build_muon, muon_parameter_names
from hfllm.training.run_info import data_hash, tokenizer_hash
from hfllm.training.trainer import ThroughputWindow

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def recipe(tmp_path) -> str:
    keys = {"model": "llama-tiny", "learning_rate": 3e-3, "warmup_steps": 2, "logging_steps": 1, "seed": 7}
    return str(write_recipe(tmp_path / "recipe.yaml", keys))


def run(recipe: str, tmp_path: Path, *extra: str, out: str = "out") -> Path:
    output_dir = tmp_path / out
    assert main([recipe, *TINY, *data_args(tmp_path), "--output_dir", str(output_dir), *extra]) == 0
    return output_dir


def test_trains_and_writes_a_loadable_model(recipe, tmp_path):
    out = run(recipe, tmp_path, "--max_steps", "40", "--eval_steps", "20", "--lr_scheduler_type", "constant_with_warmup")
    history = losses(out)
    assert len(history) == 40 and all(math.isfinite(x) for x in history)
    assert sum(history[-5:]) / 5 < history[0] - 0.5  # loss falls well below its start
    evals = [e for e in log_history(out) if "eval_loss" in e]
    assert [e["step"] for e in evals] == [20, 40]
    assert evals[-1]["eval_perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]), rel=1e-3)
    train_logs = [e for e in log_history(out) if "loss" in e and e["step"] > 1]
    assert all(e["tokens_per_second"] > 0 and 0 < e["mfu"] for e in train_logs)
    assert all({"learning_rate", "grad_norm"} <= set(e) for e in train_logs)

    for name in ("config.json", "model.safetensors", "tokenizer.json", "recipe.yaml", "run_info.json", "samples.txt"):
        assert (out / name).is_file(), name
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = yaml.safe_load((out / "run_info.json").read_text())
    assert set(info["data_sha256"]) == {"train", "validation"} and len(info["data_sha256"]["train"]) == 64
    assert info["versions"]["transformers"] and "commit" in info["git"]
    assert info["tokens_per_step"] == 2 * 16 and info["tokens_planned"] == 40 * 32

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("All:\n", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 10
    # the resolved recipe re-parses to the same values
    again = parse_recipe([str(out / "recipe.yaml")], "test")
    assert again.resolved["learning_rate"] == 3e-3 and again.free["hidden_size"] == 32



def test_throughput_excludes_evaluations_between_logs():
    """tokens/s over a log window that holds an evaluation: the evaluation's time is left out, the steps before it are
    counted (evaluating every 5 steps and logging every 10 once counted 10 steps in the 5 after the evaluation)."""
    window = ThroughputWindow(tokens_per_step=100, flops_per_token=6.0, peak_flops=1e4)
    assert window.close(100.0, 10) == {}  # step 10: the window starts
    window.add_evaluation(30.0)  # after step 15; steps 11-15 and 16-20 take 5 s each
    assert window.close(140.0, 20) == {"tokens_per_second": 100.0, "mfu": 0.06}  # 10 steps x 100 tokens in 10 s
    window.add_evaluation(30.0)  # after the log at the same step (Trainer's order): counted in the next window only
    assert window.close(174.0, 24) == {"tokens_per_second": 100.0, "mfu": 0.06}
    assert window.close(175.0, 24) == {}  # no step since the last log


def test_resume_continues_exactly(recipe, tmp_path):
    """2N steps straight == N steps, stop, resume, N steps: same losses, learning rates and grad norms."""
    common = ["--max_steps", "6", "--save_steps", "3", "--eval_steps", "100", "--num_samples", "0"]
    straight = run(recipe, tmp_path, *common, out="straight")
    resumed = run(recipe, tmp_path, *common, "--stop_at_step", "3", out="resumed")
    assert len(losses(resumed)) == 3 and not (resumed / "model.safetensors").exists()
    run(recipe, tmp_path, *common, "--resume_from_checkpoint", "true", out="resumed")
    a = [e for e in log_history(straight) if "loss" in e]
    b = [e for e in log_history(resumed) if "loss" in e]
    assert [e["step"] for e in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-6
        assert x["learning_rate"] == pytest.approx(y["learning_rate"], abs=1e-12)
        assert abs(x["grad_norm"] - y["grad_norm"]) < 1e-5


def test_streaming_from_local_files_with_a_capped_tokenizer(recipe, tmp_path):
    """`streaming: true` trains from IterableDatasets; the tokenizer sees only the first tokenizer_train_documents."""
    rows = [{"text": f"All:\nSpeak, speak {i}.\n"} for i in range(30)] + [{"text": "Zounds! Zeal, Zany."}] * 10
    train, validation = tmp_path / "train.jsonl", tmp_path / "validation.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows))
    validation.write_text("".join(json.dumps({"text": f"First Citizen:\nResolved {i}.\n"}) + "\n" for i in range(8)))
    files = ["--dataset", "null", "--train_files", str(train), "--validation_files", str(validation)]
    out = tmp_path / "out"
    assert main([recipe, *TINY, *files, "--output_dir", str(out), "--streaming", "true", "--max_steps", "3",
                 "--tokenizer_train_documents", "30", "--eval_steps", "3", "--num_samples", "0",
                 "--torch_num_threads", "2"]) == 0
    assert torch.get_num_threads() == 2  # the autouse fixture set 1 before the run
    assert len(losses(out)) == 3 and [e["step"] for e in log_history(out) if "eval_loss" in e] == [3]
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert "S" in tokenizer.get_vocab() and "Z" not in tokenizer.get_vocab()  # "Z" only after document 30
    info = json.loads((out / "run_info.json").read_text())
    assert info["train_sequences"] is None and set(info["data_sha256"]) == {"validation"}

    message = _error(recipe, tmp_path, *files, "--streaming", "true", "--output_dir", str(tmp_path / "other"))
    assert message == ("a streamed dataset has no end to train a tokenizer on; set tokenizer_train_documents "
                       "(e.g. 100000) or give a tokenizer folder")


def test_global_batch_gives_the_same_optimisation_with_accumulation(recipe, tmp_path):
    one = run(recipe, tmp_path, "--max_steps", "3", "--per_device_train_batch_size", "4", "--global_batch_size", "4",
              "--eval_steps", "100", "--num_samples", "0", out="one")
    accumulated = run(recipe, tmp_path, "--max_steps", "3", "--per_device_train_batch_size", "2",
                      "--global_batch_size", "4", "--eval_steps", "100", "--num_samples", "0", out="acc")
    assert yaml.safe_load((accumulated / "run_info.json").read_text())["gradient_accumulation_steps"] == 2
    assert losses(one) == pytest.approx(losses(accumulated), abs=1e-5)


@pytest.mark.parametrize(
    "global_batch, per_device, world, tp_size, accumulation",
    [(32, 8, 1, 1, 4), (32, 4, 8, 1, 1), (64, 8, 2, 1, 4), (64, 8, 2, 2, 8), (64, 8, 8, 2, 2)],
)
def test_accumulation_from_global_batch(global_batch, per_device, world, tp_size, accumulation):
    """A tensor-parallel group of tp_size processes shares one batch: only world / tp_size replicas split it."""
    args = SimpleNamespace(global_batch_size=global_batch, global_batch_tokens=None, per_device_train_batch_size=per_device,
                           world_size=world, tp_size=tp_size, gradient_accumulation_steps=1)
    assert gradient_accumulation(args, block_size=128) == accumulation
    args.global_batch_size, args.global_batch_tokens = None, global_batch * 128  # same batch given in tokens
    assert gradient_accumulation(args, block_size=128) == accumulation


def test_global_batch_not_divisible():
    args = SimpleNamespace(global_batch_size=30, global_batch_tokens=None, per_device_train_batch_size=8, world_size=1,
                           tp_size=1)
    with pytest.raises(HfllmError, match=r"^global batch of 30 sequences is not a multiple of per_device_train_batch_size "
                                         r"\(8\) x 1 data-parallel device\(s\); use 24 or 32, or change per_device_train_batch_size$"):
        gradient_accumulation(args, block_size=128)


def test_warmup_stable_decay_schedule(recipe, tmp_path):
    out = run(recipe, tmp_path, "--max_steps", "10", "--warmup_steps", "2", "--lr_scheduler_type",
              "warmup_stable_decay", "--wsd_decay_ratio", "0.3", "--eval_steps", "100", "--num_samples", "0")
    lrs = [e["learning_rate"] for e in log_history(out) if "loss" in e]
    assert lrs[0] == 0 and lrs[1] == pytest.approx(1.5e-3)  # warmup
    assert lrs[2:8] == pytest.approx([3e-3] * 6)  # stable
    assert lrs[8:] == pytest.approx([2.25e-3, 0.75e-3])  # cosine decay over the last 3 steps (to 0 after step 10)


def test_muon_on_hidden_matrices_and_adamw_elsewhere(recipe, tmp_path):
    model = AutoModelForCausalLM.from_config(get_preset("moe-tiny", num_hidden_layers=1, vocab_size=50))
    names = muon_parameter_names(model)
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any("embed" in n or "norm" in n or "mlp.gate.weight" in n or ".experts." in n for n in names)

    out = run(recipe, tmp_path, "--optim", "muon", "--max_steps", "30", "--lr_scheduler_type", "constant",
              "--eval_steps", "100", "--save_steps", "15", "--num_samples", "0")
    history = losses(out)
    assert all(math.isfinite(x) for x in history) and sum(history[-5:]) / 5 < history[0] - 0.5
    assert yaml.safe_load((out / "recipe.yaml").read_text())["optim"] == "muon"


def test_muon_state_round_trip_keeps_scheduler_link():
    model = AutoModelForCausalLM.from_config(get_preset("llama-tiny", num_hidden_layers=1, vocab_size=50))
    args = SimpleNamespace(muon_lr=None, learning_rate=1e-2, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
                           adam_epsilon=1e-8)
    optimizer = build_muon(model, args, decay_names=set())
    assert isinstance(optimizer, MuonWithAdamW) and len(optimizer.param_groups) == 3
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    state = optimizer.state_dict()
    fresh = build_muon(model, args, decay_names=set())
    fresh.load_state_dict(state)
    scheduler = torch.optim.lr_scheduler.LambdaLR(fresh, lambda step: 0.5)
    assert fresh.muon.param_groups[0]["lr"] == fresh.adamw.param_groups[0]["lr"] == 5e-3
    assert scheduler.get_last_lr()[0] == 5e-3


def test_schedule_free_adamw(recipe, tmp_path):
    pytest.importorskip("schedulefree")
    out = run(recipe, tmp_path, "--optim", "schedule_free_adamw", "--lr_scheduler_type", "constant", "--max_steps",
              "20", "--eval_steps", "10", "--num_samples", "1")
    history = losses(out)
    assert all(math.isfinite(x) for x in history) and history[-1] < history[0]
    assert [e["step"] for e in log_history(out) if "eval_loss" in e] == [10, 20]


def test_soap_steps_and_reduces_the_loss(recipe, tmp_path):
    pytest.importorskip("pytorch_optimizer")
    out = run(recipe, tmp_path, "--optim", "soap", "--max_steps", "30", "--lr_scheduler_type", "constant",
              "--soap_precondition_frequency", "5", "--eval_steps", "100", "--num_samples", "0")
    history = losses(out)
    assert all(math.isfinite(x) for x in history) and sum(history[-5:]) / 5 < history[0] - 0.5
    optimizer = torch.load(out / "checkpoint-30" / "optimizer.pt", weights_only=False)
    matrices = [state for state in optimizer["state"].values() if len(state.get("Q", [])) == 2]  # SOAP's eigenbases
    assert matrices and yaml.safe_load((out / "recipe.yaml").read_text())["optim"] == "soap"


def test_sequence_length_schedule_cuts_blocks_at_the_planned_steps(recipe, tmp_path):
    out = run(recipe, tmp_path, "--max_steps", "6", "--sequence_length_schedule", "{2: 4, 4: 8}", "--eval_steps", "3",
              "--num_samples", "0")
    history = log_history(out)
    assert [(e["step"], e["sequence_length"]) for e in history if "loss" in e] == [
        (1, 16), (2, 16), (3, 4), (4, 4), (5, 8), (6, 8)]  # step 3 is the first after 2 steps done, etc.
    assert all(math.isfinite(e["loss"]) for e in history if "loss" in e)
    assert [e["step"] for e in history if "eval_loss" in e] == [3, 6]  # evaluation keeps whole blocks
    with pytest.raises(HfllmError, match="divide block_size 16"):
        run(recipe, tmp_path, "--max_steps", "2", "--sequence_length_schedule", "{0: 5}", out="bad")


def test_stop_at_eval_loss_ends_a_complete_run_and_logs_the_start_up(recipe, tmp_path, capsys):
    out = run(recipe, tmp_path, "--max_steps", "60", "--eval_steps", "4", "--stop_at_eval_loss", "3.4",
              "--num_samples", "0")
    history = log_history(out)
    evals = [e for e in history if "eval_loss" in e]
    assert len(evals) >= 2 and all(e["eval_loss"] > 3.4 for e in evals[:-1])  # stopped at the first one below
    assert evals[-1]["eval_loss"] <= 3.4 and evals[-1]["step"] < 60
    assert (out / "model.safetensors").is_file() and "<= stop_at_eval_loss 3.4 at step" in capsys.readouterr().out
    first = next(e for e in history if "loss" in e)
    assert first["step"] == 1 and first["seconds_to_first_step"] > first["elapsed_seconds"]


def test_moe_router_load_is_logged_and_bias_moves(recipe, tmp_path):
    out = run(recipe, tmp_path, "--model", "moe-tiny", "--moe_intermediate_size", "16", "--router_bias_update_rate",
              "0.01", "--max_steps", "4", "--eval_steps", "100", "--num_samples", "0")
    loads = [e["router_max_load"] for e in log_history(out) if "loss" in e]
    assert len(loads) == 4 and all(1.0 <= x <= 8.0 for x in loads)
    model = AutoModelForCausalLM.from_pretrained(out)
    bias = model.model.layers[0].mlp.gate.expert_bias
    assert bias.abs().sum() > 0  # aux-loss-free balancing updated the routing bias


def test_flops_per_token_and_parameter_counts():
    config = get_preset("llama-tiny", vocab_size=1000)
    model = AutoModelForCausalLM.from_config(config)
    counts = parameter_counts(model)
    layer = 128 * 128 * 2 + 128 * 64 * 2 + 3 * 128 * 384 + 2 * 128  # q,o + k,v (2 kv heads) + mlp + norms
    assert counts["non_embedding"] == 4 * layer + 128
    assert counts["active_matmul"] == counts["non_embedding"] + 1000 * 128  # the tied head multiplies
    assert flops_per_token(model, 256) == 6 * counts["active_matmul"] + 12 * 4 * 4 * 32 * 256

    moe = AutoModelForCausalLM.from_config(get_preset("moe-tiny", vocab_size=1000))
    moe_counts = parameter_counts(moe)
    experts = 4 * 8 * 3 * 128 * 96  # 4 layers x 8 experts x (gate, up, down) x hidden x expert width
    assert moe_counts["active_matmul"] == moe_counts["total"] - experts + experts * 2 // 8
    assert moe_counts["active"] == moe_counts["active_matmul"]  # tied: the table counts once, as the head


# ---- recipe parsing: unknown keys and wrong types stop before any work


@pytest.mark.parametrize(
    "recipe_text, cli, message",
    [
        ("learning_rat: 0.1\n", [], "unknown key 'learning_rat' in recipe '{recipe}' (did you mean 'learning_rate'?)"),
        ("", ["--num_hiden_layers", "2"], "unknown key 'num_hiden_layers' in the command line (did you mean 'num_hidden_layers'?)"),
        ("max_steps: ten\n", [], "key 'max_steps': invalid int value: 'ten'"),
        ("", ["--max_steps", "ten"], "key 'max_steps': invalid int value: 'ten'"),
        ("num_hidden_layers: two\n", [], "key 'num_hidden_layers': expected int, got 'two'"),
        ("lr_scheduler_type: cosin\n", [], "key 'lr_scheduler_type': invalid choice: 'cosin'"),
        ("model: llama-tiyn\nmax_steps: 1\n", [], "unknown model preset 'llama-tiyn'; did you mean llama-tiny"),
        ("- a\n- b\n", [], "recipe '{recipe}' must be a mapping of key: value lines"),
    ],
)
def test_recipe_errors(tmp_path, recipe_text, cli, message):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text)
    with pytest.raises(HfllmError) as error:
        main([str(path), *cli, "--output_dir", str(tmp_path / "out")])
    assert str(error.value).startswith(message.format(recipe=path))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_cli_overrides_yaml_and_dict_keys(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {"max_steps": 5, "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
                                              "num_hidden_layers": 3, "sample_prompts": ["A:\n"]})
    recipe = parse_recipe([str(path), "--max_steps", "7", "--layer_types", "[full_attention, full_attention]",
                           "--num_hidden_layers", "2", "--learning_rate=1e-3"], "test")
    assert recipe.args[2].max_steps == 7 and recipe.args[2].learning_rate == 1e-3
    assert recipe.args[2].lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert recipe.free == {"num_hidden_layers": 2, "layer_types": ["full_attention", "full_attention"]}
    assert recipe.args[2].sample_prompts == ["A:\n"] and recipe.args[1].dataset == "shakespeare"


# ---- bad input: one line naming the problem and the fix, nothing written


def _error(recipe: str, tmp_path: Path, *extra: str) -> str:
    with pytest.raises(HfllmError) as error:
        main([recipe, *TINY, "--output_dir", str(tmp_path / "out"), "--max_steps", "2", *extra])
    assert "\n" not in str(error.value)
    return str(error.value)


def test_bad_data_inputs(recipe, tmp_path):
    missing = tmp_path / "missing.txt"
    assert "does not exist" in _error(recipe, tmp_path, "--dataset", "null", "--train_files", str(missing))
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in _error(recipe, tmp_path, "--dataset", "null", "--train_files", str(tmp_path / "empty.txt"))
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    message = _error(recipe, tmp_path, "--dataset", "null", "--train_files", str(tmp_path / "blank.txt"),
                     "--validation_files", str(tmp_path / "blank.txt"))
    assert "contains no text in the train split" in message
    (tmp_path / "rows.jsonl").write_text('{"content": "hello there"}\n' * 20)
    message = _error(recipe, tmp_path, "--dataset", "null", "--train_files", str(tmp_path / "rows.jsonl"))
    assert message.startswith("text_column 'text' not found in ") and message.endswith("available columns: content")
    assert not (tmp_path / "out").exists()


def test_block_size_above_max_positions(recipe, tmp_path):
    message = _error(recipe, tmp_path, "--block_size", "1024", *data_args(tmp_path))
    assert message == ("block_size 1024 is above the model's max_position_embeddings 512; lower block_size or set "
                       "max_position_embeddings: 1024")
    assert not (tmp_path / "out").exists()


def test_tokenizer_vocab_must_fit_the_model(recipe, tmp_path):
    model_dir = tmp_path / "small-model"
    AutoModelForCausalLM.from_config(get_preset("llama-tiny", num_hidden_layers=1, vocab_size=8)).save_pretrained(model_dir)
    message = _error(recipe, tmp_path, "--model", str(model_dir), "--hidden_size", "128", *data_args(tmp_path))
    assert message.startswith("the tokenizer has ") and "but the model " in message and "vocab_size 8" in message
    assert not (tmp_path / "out").exists()


def test_output_dir_holding_another_run(recipe, tmp_path):
    out = run(recipe, tmp_path, "--max_steps", "2", "--eval_steps", "100", "--num_samples", "0")
    message = _error(recipe, tmp_path, "--learning_rate", "1e-4", *data_args(tmp_path))
    assert message == (f"output_dir {out} holds a different run (learning_rate was 0.003, now 0.0001); choose another "
                       "output_dir, or set overwrite_output_dir: true to replace it")
    message = _error(recipe, tmp_path, "--learning_rate", "3e-3", "--eval_steps", "100", *data_args(tmp_path))
    assert message == (f"output_dir {out} already holds this run; continue it with --resume_from_checkpoint true, or "
                       "start over with --overwrite_output_dir true")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(HfllmError, match="is not empty and holds no hfllm run"):
        main([recipe, *TINY, *data_args(tmp_path), "--output_dir", str(stranger), "--max_steps", "2"])
    assert (stranger / "notes.txt").read_text() == "mine"
    # overwrite replaces an earlier hfllm run
    run(recipe, tmp_path, "--max_steps", "2", "--learning_rate", "1e-4", "--overwrite_output_dir", "true",
        "--eval_steps", "100", "--num_samples", "0")
    assert yaml.safe_load((out / "recipe.yaml").read_text())["learning_rate"] == 1e-4


def test_cli_error_is_one_line_without_traceback(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", {"max_step": 3})
    result = subprocess.run([sys.executable, "-m", "hfllm", "pretrain", str(path)], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"hfllm pretrain: error: unknown key 'max_step' in recipe '{path}' (did you mean 'max_steps'?)"
    )
    assert "Traceback" not in result.stderr


def test_script_runs_directly_with_python(tmp_path):
    """`python hfllm/run_pretrain.py RECIPE` (the form `accelerate launch` runs) works from any directory."""
    write_recipe(tmp_path / "r.yaml", {"model": "llama-tiny", "max_steps": 1})
    result = subprocess.run(
        [sys.executable, str(ROOT / "hfllm" / "run_pretrain.py"), "r.yaml", *TINY, *data_args(tmp_path),
         "--output_dir", "out", "--eval_steps", "100", "--num_samples", "0"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "model llama-tiny: " in result.stdout and "Chinchilla-optimal ~20" in result.stdout


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): the global batch is split over devices, not repeated."""
    write_recipe(tmp_path / "r.yaml", {"model": "llama-tiny", "max_steps": 3, "global_batch_size": 8, "logging_steps": 1})
    tiny = [arg for arg in TINY]
    tiny[tiny.index("--global_batch_size") + 1] = "8"
    result = subprocess.run(
        ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", str(ROOT / "hfllm" / "run_pretrain.py"),
         "r.yaml", *tiny, *data_args(tmp_path), "--output_dir", "out", "--eval_steps", "100"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    info = yaml.safe_load((tmp_path / "out" / "run_info.json").read_text())
    assert (info["world_size"], info["gradient_accumulation_steps"], info["tokens_per_step"]) == (2, 2, 8 * 16)
    assert len(losses(tmp_path / "out")) == 3
    # the main process trained and saved the tokenizer; the other loaded it: both used the identical one
    used = re.findall(r"^process (\d): tokenizer sha256 (\w+) \((.+)\)$", result.stdout, flags=re.MULTILINE)
    saved = tokenizer_hash(AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer"))
    assert sorted(used) == [("0", saved, "trained here"), ("1", saved, "out/tokenizer")]
    assert info["tokenizer_sha256"] == saved


def test_data_hash_is_the_sha256_of_the_token_ids_in_training_order():
    import hashlib

    from datasets import Dataset

    blocks = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]})
    shuffled = blocks.select([2, 0, 3])  # as a shuffle leaves it: an index mapping over the stored rows
    expected = hashlib.sha256(torch.tensor([7, 8, 9, 1, 2, 3, 10, 11, 12], dtype=torch.int64).numpy().tobytes())
    streamed = hashlib.sha256(torch.arange(1, 13, dtype=torch.int64).numpy().tobytes())
    hashes = data_hash({"train": shuffled, "validation": blocks.to_iterable_dataset()})
    assert hashes == {"train": expected.hexdigest(), "validation": streamed.hexdigest()}
