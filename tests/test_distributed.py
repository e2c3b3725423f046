"""Every strategy on two CPU processes (`accelerate launch --config_file accelerate_configs/<strategy>.yaml`, gloo):
it trains, what runs is the strategy asked for (distributed type, parameter shards, different data per rank), a
checkpoint resumes with the uninterrupted run's losses, and the final model loads in one process with the same loss
as a single-process run of the same global batch. Also: `hfllm plan`'s per-device parameter bytes against the
shards measured on those runs, and the silent fallbacks hfllm turns into errors.

Each shipped config also runs a shipped recipe launched as a user launches it (its own mixed_precision, the recipe's
cosine_with_min_lr schedule). The default suite runs pretraining on DDP and FSDP2 and the shipped recipe on ZeRO-2;
the other DeepSpeed strategies and SFT are slow (DeepSpeed builds its
shared-memory extension on first use, ~20 s idle, cached in ~/.cache/torch_extensions)."""

import os
import re
import subprocess
from pathlib import Path

import psutil
import pytest
import torch
from helpers import CORPUS, TINY, adaptation_recipe, data_args, free_port, losses, series, write_recipe

from hfllm.checkpoint import load
from hfllm.checkpoint.provenance import verify
from hfllm.run_pretrain import main as pretrain_main
from hfllm.run_sft import main as sft_main
from hfllm.training.distributed import STRATEGIES, SHARDED
from hfllm.training.plan import plan_recipe

ROOT = Path(__file__).resolve().parents[1]
PRETRAINING_BY_DEFAULT = ("ddp", "fsdp2")  # the rest are slow
# not anchored: two processes writing to one pipe may run their lines together
REPORT = re.compile(r"process (\d): strategy (\S+) \((\w+), (\d) processes, (\w+)\), parameter bytes (\d+) of (\d+)")
DISTRIBUTED_TYPE = {"ddp": "MULTI_CPU", "fsdp2": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED",
                    "zero3_offload": "DEEPSPEED"}

pytestmark = pytest.mark.usefixtures("single_thread")


def strategies(by_default: tuple[str, ...] = ()) -> list:
    return [pytest.param(strategy, marks=() if strategy in by_default else pytest.mark.slow) for strategy in STRATEGIES]


def launch(strategy: str, entry: str, argv: list[str], timeout: int = 1800, **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of hfllm/run_<entry>.py with the shipped config of `strategy` as a user launches it (its
    mixed_precision bf16 included: the recipe's precision on this machine wins, hardware.py) on 2 CPU processes, from
    the repository root (zero3_offload's config names its DeepSpeed JSON relative to it)."""
    command = ["accelerate", "launch", "--config_file", f"accelerate_configs/{strategy}.yaml", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port())]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    process = subprocess.Popen([*command, f"hfllm/run_{entry}.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={k: v for k, v in environment.items() if v != ""})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # a hung run is killed whole, not left beside the rest of the suite: the workers are accelerate's children,
        # each in a session of its own (torch elastic), so a process group would miss them
        for child in [*psutil.Process(process.pid).children(recursive=True), process]:
            child.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"{strategy} run still going after {timeout} s; killed\n{stdout[-2000:]}{stderr[-4000:]}")
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def strategy_reports(stdout: str) -> dict[int, tuple]:
    """rank -> (strategy, distributed type, processes, backend, parameter bytes held, parameter bytes in all)."""
    return {int(m[0]): (m[1], m[2], int(m[3]), m[4], int(m[5]), int(m[6])) for m in REPORT.findall(stdout)}


def assert_strategy_ran(stdout: str, strategy: str) -> tuple[int, int]:
    """Both ranks report the strategy asked for; sharded strategies hold half the parameters each. Returns (held, whole)
    of rank 0. (That the ranks' batches differ is checked inside the run: a repeated batch fails it.)"""
    reports = strategy_reports(stdout)
    assert sorted(reports) == [0, 1], stdout[-2000:]
    for name, kind, processes, backend, held, whole in reports.values():
        assert (name, kind, processes, backend) == (strategy, DISTRIBUTED_TYPE[strategy], 2, "gloo")
        if strategy in SHARDED:
            assert abs(held - whole / 2) <= 0.02 * whole, (held, whole)  # half, up to padding of uneven shards
        else:
            assert held == whole
    if strategy == "fsdp2":
        assert reports[0][4] + reports[1][4] == reports[0][5]  # DTensor shards: together exactly the model
    return reports[0][4], reports[0][5]


def fixed_data_loss(folder: Path) -> float:
    """The loss of the model saved in `folder`, loaded in this one process, on a fixed text."""
    model, tokenizer = load(str(folder))
    input_ids = tokenizer(CORPUS, return_tensors="pt")["input_ids"][:, :64]  # (1, 64)
    with torch.no_grad():
        return model.eval()(input_ids=input_ids, labels=input_ids).loss.item()


# ----------------------------------------------------------------------------- pretraining


def pretraining_argv(tmp_path: Path) -> list[str]:
    """4 steps of 4 sequences (2 per process, or 2 x 2 accumulated in one process), a checkpoint at step 2; the
    shipped recipes' schedule (cosine_with_min_lr, min_lr as shakespeare-char gives it)."""
    recipe = write_recipe(tmp_path / "recipe.yaml", {"model": "llama-tiny", "learning_rate": 3e-3, "warmup_steps": 1,
                                                     "lr_scheduler_type": "cosine_with_min_lr",
                                                     "lr_scheduler_kwargs": {"min_lr": 3e-4},
                                                     "logging_steps": 1, "seed": 7})
    tiny = list(TINY)
    tiny[tiny.index("--global_batch_size") + 1] = "4"
    return [str(recipe), *tiny, *data_args(tmp_path), "--max_steps", "4", "--save_steps", "2", "--eval_steps", "100"]


def initial_model(argv: list[str], folder: Path) -> Path:
    """The model the pretraining recipe `argv` starts from (its preset, overrides and seed), saved in `folder` with a
    char tokenizer of the corpus: a run given `--model FOLDER --tokenizer FOLDER` continues pretraining from it."""
    from transformers import set_seed

    from hfllm.data.tokenizer import train_tokenizer
    from hfllm.training.arguments import parse_recipe
    from hfllm.training.pretrain import build_model, resolve_config

    recipe = parse_recipe([*argv, "--output_dir", str(folder)], "test")
    model_args, data_args, args = recipe.args
    tokenizer = train_tokenizer("char", [CORPUS], data_args.vocab_size)
    set_seed(args.seed)
    config = resolve_config(model_args.model, recipe.free, data_args.block_size)
    model = build_model(model_args.model, config, tokenizer, model_args.attn_implementation)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("strategy", strategies(PRETRAINING_BY_DEFAULT))
def test_pretraining(strategy, tmp_path):
    argv = pretraining_argv(tmp_path)
    single, uninterrupted, resumed = tmp_path / "single", tmp_path / "uninterrupted", tmp_path / "resumed"
    assert pretrain_main([*argv, "--output_dir", str(single)]) == 0
    if strategy.startswith("zero3"):
        # under ZeRO-3 transformers creates a preset's model inside deepspeed.zero.Init (the DeepSpeed config is known
        # when the arguments are), whose random init draws other numbers than one process: both start from one folder
        # holding the preset's own init, which one process continues with the preset run's very losses
        init = initial_model(argv, tmp_path / "init")
        argv += ["--model", str(init), "--tokenizer", str(init)]
        from_preset, single = single, tmp_path / "single_from_init"
        assert pretrain_main([*argv, "--output_dir", str(single)]) == 0
        assert losses(single) == losses(from_preset)

    run = launch(strategy, "pretrain", [*argv, "--output_dir", str(uninterrupted)])
    held, whole = assert_strategy_ran(run.stdout, strategy)
    # plan (issue 13 part 3): the parameters a device holds, predicted from the recipe alone
    # (the trained tokenizer gives the plan the run's exact vocabulary; for `char` it assumes 128)
    plan = plan_recipe([*argv, "--tokenizer", str(uninterrupted / "tokenizer")], strategy=strategy, device="cpu",
                       devices=2, mfu=0.4)
    assert plan.counts["total"] * 4 == whole
    assert abs(plan.parameters_held - held) <= 0.02 * whole
    assert (plan.parameters_held == whole / 2) if strategy in SHARDED else (plan.parameters_held == whole)

    launch(strategy, "pretrain", [*argv, "--output_dir", str(resumed),
                                "--resume_from_checkpoint", str(uninterrupted / "checkpoint-2")])
    assert len(losses(uninterrupted)) == 4
    assert losses(resumed) == losses(uninterrupted)  # exactly
    assert verify(uninterrupted).ok and verify(resumed).ok  # run_info.json's weights hashes, written by the main process

    final_loss = fixed_data_loss(uninterrupted)  # the saved model loads in one process
    assert final_loss == pytest.approx(losses(uninterrupted)[-1], abs=0.5)
    assert losses(uninterrupted) == pytest.approx(losses(single), rel=1e-4)
    assert final_loss == pytest.approx(fixed_data_loss(single), rel=1e-4)


SHIPPED_RECIPE = "recipes/shakespeare-char.yaml"  # cosine_with_min_lr with {min_lr: 1e-4}, as tiny, 125m... with a ratio


@pytest.mark.parametrize("strategy", strategies(by_default=("zero2",)))
def test_shipped_config_with_a_shipped_recipe(strategy, tmp_path):
    """A shipped config and a shipped recipe launched as a new user would (the config's mixed_precision bf16, the
    recipe's schedule and model; the data: a small local file), at tiny size: the launcher's bf16 follows the machine's precision (DeepSpeed failed with
    "ds bf16.enabled=True vs hf bf16=False"), and cosine_with_min_lr builds on DeepSpeed's optimizer (it failed with
    "'DeepSpeedZeroOptimizer' object has no attribute 'defaults'"), with the schedule's very numbers."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    out = tmp_path / "out"
    run = launch(strategy, "pretrain", [SHIPPED_RECIPE, "--output_dir", str(out), "--per_device_train_batch_size", "6",
                                        "--max_steps", "3", "--warmup_steps", "1", "--logging_steps", "1",
                                        "--eval_steps", "3", "--max_eval_samples", "12", "--save_steps", "100",
                                        "--torch_compile", "false", "--num_samples", "0", *data_args(tmp_path)],
                 timeout=600)
    assert_strategy_ran(run.stdout, strategy)
    if strategy != "zero3_offload":  # its yaml leaves precision to the DeepSpeed JSON ("auto")
        assert run.stderr.count("mixed precision: no, not the launcher's bf16") == 1  # one line, from rank 0
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 1, 3, min_lr=1e-4)
    expected = []
    for _ in range(3):
        expected.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert series(out, "learning_rate") == pytest.approx(expected, rel=1e-6)  # 0, 1e-3, 5.5e-4: down to min_lr
    provenance = verify(out)  # run_info.json's weights hashes (ZeRO-3 also a checkpoint's per-rank model states)
    assert (out / "model.safetensors").is_file() and provenance.ok and "model.safetensors" in provenance.matched


def test_samples_at_eval_with_sharded_weights(tmp_path):
    """samples_at_eval under FSDP2: each process holds half of the weights, so every process takes part in generating
    (a sample from the main process alone waited forever for the other's shards); only the main one writes them."""
    argv = pretraining_argv(tmp_path)
    for flag, value in (("--max_steps", "2"), ("--eval_steps", "2")):
        argv[argv.index(flag) + 1] = value
    out = tmp_path / "out"
    launch("fsdp2", "pretrain", [*argv, "--output_dir", str(out), "--samples_at_eval", "true", "--num_samples", "1",
                                 "--sample_max_new_tokens", "4"], timeout=600)
    titles = re.findall(r"^----- sample 1 \((.+)\) -----$", (out / "samples.txt").read_text(), flags=re.MULTILINE)
    assert titles == ["step 2", "end of training"]


# ----------------------------------------------------------------------------- SFT (LoRA and full)


@pytest.mark.slow
@pytest.mark.parametrize("peft", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sft(strategy, peft, tmp_path, tiny_llama_chat_dir, synth_dir):
    recipe = adaptation_recipe(tmp_path, tiny_llama_chat_dir, synth_dir / "sft.jsonl", use_peft=peft,
                               per_device_train_batch_size=2, max_steps=4, save_strategy="steps", save_steps=2,
                               logging_steps=1, lr_scheduler_type="constant")
    single, uninterrupted, resumed = tmp_path / "single", tmp_path / "uninterrupted", tmp_path / "resumed"
    assert sft_main([str(recipe), "--output_dir", str(single), "--gradient_accumulation_steps", "2"]) == 0

    run = launch(strategy, "sft", [str(recipe), "--output_dir", str(uninterrupted)])
    assert_strategy_ran(run.stdout, strategy)  # LoRA: the frozen base is sharded too
    launch(strategy, "sft", [str(recipe), "--output_dir", str(resumed),
                           "--resume_from_checkpoint", str(uninterrupted / "checkpoint-2")])
    assert len(losses(uninterrupted)) == 4
    assert losses(resumed) == losses(uninterrupted)

    # padded chat rows: the token-weighted mean over 2 processes and over 2 accumulated micro-batches round apart
    # (2.3e-4 relative at step 3 measured with fsdp2 + LoRA)
    assert losses(uninterrupted) == pytest.approx(losses(single), rel=1e-3)
    assert fixed_data_loss(uninterrupted) == pytest.approx(fixed_data_loss(single), rel=1e-3)


# ----------------------------------------------------------------------------- silent fallbacks are errors
# What each process runs, faked: accelerate's state and the model as the trainer holds them after `prepare`.

FSDP2_ENV = {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
ZERO3_ENV = {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}


def fake_trainer(kind: str, processes: int = 2, fsdp2: bool = False, zero_stage: int | None = None):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    state = SimpleNamespace(distributed_type=DistributedType[kind], is_fsdp2=fsdp2, backend="gloo", process_index=0)
    wrapped = SimpleNamespace(zero_optimization_stage=lambda: zero_stage, zero_offload_param=lambda: None,
                              zero_cpu_offload=lambda: False)
    return SimpleNamespace(accelerator=SimpleNamespace(num_processes=processes, state=state),
                           model=torch.nn.Linear(4, 4), model_wrapped=wrapped)


@pytest.mark.parametrize("env, trainer, message", [
    (FSDP2_ENV, dict(kind="MULTI_CPU"), "fsdp2 was asked for but accelerate runs MULTI_CPU"),
    ({"WORLD_SIZE": "2"}, dict(kind="NO", processes=1), "ddp was launched on 2 processes but this one trains as a world of 1"),
    (FSDP2_ENV, dict(kind="FSDP", fsdp2=True), "fsdp2 was asked for but the parameters are not FSDP2 DTensor shards"),
    (ZERO3_ENV, dict(kind="MULTI_CPU"), "zero3 was asked for but accelerate runs MULTI_CPU"),
    (ZERO3_ENV, dict(kind="DEEPSPEED", zero_stage=2), "zero3 was asked for but DeepSpeed runs ZeRO stage 2"),
    (ZERO3_ENV, dict(kind="DEEPSPEED", zero_stage=3), "zero3 was asked for but the parameters are not partitioned"),
    ({**ZERO3_ENV, "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "cpu"}, dict(kind="DEEPSPEED", zero_stage=3),
     "zero3_offload was asked for but DeepSpeed offloads neither parameters nor optimizer"),
], ids=["fsdp-as-ddp", "world-of-one", "fsdp2-unsharded", "deepspeed-skipped", "zero-stage", "zero3-unpartitioned",
        "offload-missing"])
def test_a_silent_fallback_is_an_error(env, trainer, message, monkeypatch):
    from hfllm.training.distributed import StrategyMismatch, verify_strategy

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(StrategyMismatch, match=re.escape(message)):
        verify_strategy(fake_trainer(**trainer), {"input_ids": torch.zeros(2, 4, dtype=torch.long)})


def test_ranks_with_the_same_batch_are_an_error(monkeypatch):
    from hfllm.training.distributed import StrategyMismatch, _check_ranks_see_different_data

    def gather(digests, digest):  # every rank got this batch
        digests[:] = [digest] * len(digests)

    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_gather_object", gather)
    with pytest.raises(StrategyMismatch, match="ranks received the same first batch"):
        _check_ranks_see_different_data({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, "ddp")


@pytest.mark.parametrize("config, strategy", [("ddp", "ddp"), ("fsdp2", "fsdp2"), ("zero2", "zero2"),
                                            ("zero3", "zero3"), ("zero3_offload", "zero3_offload"),
                                            ("two_nodes", "fsdp2")])
def test_each_config_asks_for_its_strategy(config, strategy, monkeypatch):
    """The variables `accelerate launch` sets from each shipped config name the strategy of the config's name."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    monkeypatch.chdir(ROOT)
    args = launch_command_parser().parse_args(["--config_file", f"accelerate_configs/{config}.yaml",
                                               "--num_processes", "2", "--main_process_port", str(free_port()), "x.py"])
    args, *_ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ""  # set by accelerate's deepspeed_launcher; names only
    _, env = prepare_deepspeed_cmd_env(args) if args.use_deepspeed else (None, prepare_multi_gpu_env(args))
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    for key, value in {**env, "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    from hfllm.training.distributed import requested_strategy

    assert requested_strategy() == strategy


@pytest.mark.parametrize("env, use_cpu, backend", [
    ({"WORLD_SIZE": "2"}, True, None),  # DDP: gloo through accelerate's CPU mode
    (FSDP2_ENV, True, None),
    ({**ZERO3_ENV, "ACCELERATE_USE_CPU": "true"}, False, "gloo"),  # DeepSpeed: not CPU mode (it would be skipped)
    ({"WORLD_SIZE": "1"}, None, None),  # one process: nothing to do
])
def test_training_arguments_for_cpu_processes(env, use_cpu, backend, monkeypatch):
    from hfllm.training.distributed import cpu_training_arguments

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    kwargs = {}
    cpu_training_arguments(kwargs)
    assert (kwargs.get("use_cpu"), kwargs.get("ddp_backend")) == (use_cpu, backend)
    if backend:
        assert "ACCELERATE_USE_CPU" not in os.environ


@pytest.mark.parametrize("gpu, recipe, launched, precision", [
    (False, {}, "bf16", "no"),  # no GPU: bf16 off unless the recipe asks; DeepSpeed's bf16.enabled must follow
    (False, {"fp16": True}, "bf16", "no"),  # fp16 asked for on a CPU: float32, and the launcher too
    (True, {}, "bf16", "bf16"),  # a GPU and a recipe that leaves precision open: the launcher's config decides
    (True, {"bf16": False}, "bf16", "no"),  # a GPU and a recipe that turns bf16 off: the recipe wins
], ids=["cpu", "cpu-fp16", "gpu-open", "gpu-recipe-off"])
def test_the_launchers_mixed_precision_agrees_with_the_arguments(gpu, recipe, launched, precision, monkeypatch,
                                                                  capsys):
    """accelerate builds autocast and DeepSpeed's bf16/fp16 sections from ACCELERATE_MIXED_PRECISION, transformers
    checks them against TrainingArguments' bf16/fp16: after apply_hardware both say the same."""
    from hfllm.training.hardware import apply_hardware

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    kwargs = dict(recipe)
    apply_hardware(kwargs, set(recipe))
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == precision
    assert ("bf16" if kwargs.get("bf16") else "fp16" if kwargs.get("fp16") else "no") == precision
    said = f"mixed precision: {precision}, not the launcher's {launched}" in capsys.readouterr().err
    assert said == (precision != launched)


def test_min_lr_schedule_builds_on_an_optimizer_without_defaults():
    """cosine_with_min_lr with {min_lr: X} on an optimizer that has no `defaults['lr']` (DeepSpeed's ZeRO optimizer,
    MuonWithAdamW): the recipe's kwargs, fitted, build the schedule of a plain optimizer, number for number."""
    from transformers import get_scheduler

    from hfllm.training.hardware import apply_hardware

    kwargs = {"learning_rate": 1e-3, "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": 1e-4}}
    apply_hardware(kwargs, set(kwargs))

    def learning_rates(defaults: bool, scheduler_kwargs: dict) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        if not defaults:
            del optimizer.defaults["lr"]  # as MuonWithAdamW's; DeepSpeedZeroOptimizer has no `defaults` at all
        schedule = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=2, num_training_steps=10,
                                 scheduler_specific_kwargs=scheduler_kwargs)
        rates = []
        for _ in range(10):
            rates.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
        return rates

    assert learning_rates(False, kwargs["lr_scheduler_kwargs"]) == learning_rates(True, {"min_lr": 1e-4})
