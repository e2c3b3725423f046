"""Runs that survive (hfllm/training/health.py, docs/reliability.md): non-finite losses and spikes are caught, nothing
non-finite is saved, SIGTERM leaves a checkpoint that resumes exactly, and half-written checkpoints are never used."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY, adaptation_recipe, data_args, log_history
from safetensors.torch import load_file

from hfllm.checkpoint import checkpoint_problem
from hfllm.errors import HfllmError, TrainingHalted
from hfllm.run_pretrain import main
from hfllm.run_dpo import main as dpo_main
from hfllm.run_sft import main as sft_main
from hfllm.training.callbacks import StopAtStepCallback
from hfllm.training.preemption import PreemptionCallback, resume_command

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# the CLI with every micro-batch slowed down, so a signal sent after a few steps lands mid-run
SLOW_CLI = ("import sys, time, torch, transformers\ntorch.set_num_threads(1)\nstep = transformers.Trainer.training_step\n"
            "transformers.Trainer.training_step = lambda self, *a, **k: (time.sleep(0.1), step(self, *a, **k))[1]\n"
            "from hfllm.cli import main\nsys.exit(main(sys.argv[1:]))")


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


@pytest.fixture
def recipe(tmp_path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text("model: llama-tiny\nlearning_rate: 3e-3\nwarmup_steps: 2\nlogging_steps: 1\nseed: 7\n"
                    "eval_steps: 100\nnum_samples: 0\n")
    return str(path)


def run(recipe: str, tmp_path: Path, *extra: str, out: str = "out", callbacks=()) -> Path:
    """`hfllm pretrain` in process; `callbacks` go in through its seam (they replace the default of their class)."""
    output_dir = tmp_path / out
    assert main([recipe, *TINY, *data_args(tmp_path), "--output_dir", str(output_dir), *extra], callbacks=callbacks) == 0
    return output_dir


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(tensor).all() for tensor in load_file(path).values())


class Fault(StopAtStepCallback):
    """Test-only fault at optimizer step `step`: `nan` makes the loss NaN, `lr` multiplies the learning rate by 1000
    for that step, `poison` writes a NaN into a weight after the step (past every check but the save)."""

    def __init__(self, step: int, kind: str):
        self.step, self.kind, self.hook = step, kind, None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.global_step + 1 == self.step and self.kind == "nan":
            self.hook = model.lm_head.register_forward_hook(lambda module, inputs, output: output * float("nan"))
        if state.global_step + 1 == self.step and self.kind == "lr":
            for group in optimizer.param_groups:
                group["lr"] *= 1000

    def on_step_end(self, args, state, control, model=None, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        if state.global_step == self.step and self.kind == "poison":
            with torch.no_grad():
                model.model.norm.weight[0] = float("nan")


def same_losses(a: Path, b: Path) -> None:
    x = [e for e in log_history(a) if "loss" in e]
    y = [e for e in log_history(b) if "loss" in e]
    assert [e["step"] for e in x] == [e["step"] for e in y]
    for first, second in zip(x, y):
        assert abs(first["loss"] - second["loss"]) < 1e-6 and abs(first["grad_norm"] - second["grad_norm"]) < 1e-5


# ----------------------------------------------------------------------------- numerical health


def test_divergence_stops_with_a_report_and_exit_code_3(recipe, tmp_path):
    """learning_rate 1e4 without clipping: stopped at the first non-finite step, nothing non-finite on disk."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "hfllm", "pretrain", recipe, *TINY, *data_args(tmp_path), "--output_dir", str(out),
         "--learning_rate", "1e4", "--max_grad_norm", "0", "--max_steps", "30", "--save_steps", "2"],
        capture_output=True, text=True, cwd=ROOT, env=ENV,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    step = int(re.search(r"^hfllm: training stopped at step (\d+) of 30: non-finite ", result.stderr, re.M).group(1))
    good = max(s for s in range(2, step, 2))
    assert f"last good checkpoint: {out}/checkpoint-{good} (resume with --resume_from_checkpoint {out}/checkpoint-{good})" in result.stderr
    assert "learning rate too high" in result.stderr and "max_grad_norm 0 (no clipping)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"hfllm pretrain: error: training stopped at step {step}: ")
    assert "Traceback" not in result.stderr
    assert not (out / "model.safetensors").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted(f"checkpoint-{s}" for s in range(2, step, 2))
    assert weight_files(out) and all(all_finite(path) for path in weight_files(out))


def test_nan_step_is_skipped_and_health_metrics_are_logged(recipe, tmp_path, capsys):
    out = run(recipe, tmp_path, "--nan_action", "skip", "--max_steps", "8", "--save_steps", "4",
              "--health_log_steps", "2", "--tie_word_embeddings", "false", callbacks=[Fault(5, "nan")])
    assert "warning: step 5: non-finite loss (nan)" in capsys.readouterr().err
    assert (out / "model.safetensors").is_file()
    assert all(all_finite(path) for path in weight_files(out)) and len(weight_files(out)) == 3
    logs = {e["step"]: e for e in log_history(out) if "loss" in e}
    assert [logs[s].get("skipped_steps") for s in range(1, 9)] == [None] * 4 + [1] * 4
    for step in (1, 2, 4, 6, 8):  # logging_first_step, then every health_log_steps
        groups = {k.split("/")[1] for k in logs[step] if k.startswith("grad_norm/")}
        assert groups == {"embeddings", "attention", "mlp", "norms", "head"}, step
        assert logs[step]["activation_rms/mean"] > 0 and logs[step]["activation_rms/max"] >= logs[step]["activation_rms/mean"]
        assert "update_ratio/attention" in logs[step]
    assert all(logs[s]["update_ratio"] > 0 for s in (2, 4, 6, 8)) and "grad_norm/mlp" not in logs[3]


def test_nan_stops_and_the_reported_checkpoint_resumes_exactly(recipe, tmp_path, capsys):
    common = ["--max_steps", "10", "--save_steps", "4"]
    straight = run(recipe, tmp_path, *common, out="straight")
    with pytest.raises(TrainingHalted) as error:
        run(recipe, tmp_path, *common, callbacks=[Fault(7, "nan")])
    out = tmp_path / "out"
    assert str(error.value).startswith(f"training stopped at step 7: non-finite loss (nan) and gradient norm (nan); "
                                       f"last good checkpoint: {out}/checkpoint-4; likely causes: ")
    assert "\n" not in str(error.value)
    assert f"--resume_from_checkpoint {out}/checkpoint-4" in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"] and not (out / "model.safetensors").exists()
    run(recipe, tmp_path, *common, "--resume_from_checkpoint", str(out / "checkpoint-4"))  # the bad data is gone
    same_losses(straight, out)


def test_learning_rate_jump_is_reported_as_a_spike(recipe, tmp_path, capsys):
    with pytest.raises(TrainingHalted, match=r"^training stopped at step 13: loss spike \("):
        run(recipe, tmp_path, "--max_steps", "20", "--save_steps", "5", "--spike_action", "stop",
            "--lr_scheduler_type", "constant", callbacks=[Fault(12, "lr")])
    assert "last good checkpoint: " + str(tmp_path / "out" / "checkpoint-10") in capsys.readouterr().err
    # warn (the default): reported, logged, training goes on
    out = run(recipe, tmp_path, "--max_steps", "14", "--save_steps", "100", "--lr_scheduler_type", "constant", out="warn",
              callbacks=[Fault(12, "lr")])
    assert re.search(r"warning: step 13: loss spike \([\d.]+, z-score [\d.]+ over the last 12 steps", capsys.readouterr().err)
    assert [e.get("loss_spikes") for e in log_history(out) if "loss" in e][11:] == [None, 1, 1]


def test_non_finite_weights_are_never_saved(recipe, tmp_path):
    with pytest.raises(TrainingHalted, match=r"^refusing to save .*checkpoint-6: model.norm.weight holds non-finite "
                                             r"values \(nothing was written\); last good checkpoint: .*checkpoint-3;"):
        run(recipe, tmp_path, "--max_steps", "8", "--save_steps", "3", callbacks=[Fault(6, "poison")])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]


@pytest.mark.parametrize("key, value, message", [
    ("nan_action", "maybe", "key 'nan_action': invalid choice: 'maybe'"),
    ("spike_window", "1", "spike_window must be at least 2 steps, got 1"),
    ("spike_zscore", "0", "spike_zscore must be positive, got 0.0"),
])
def test_bad_health_keys_are_one_line(recipe, tmp_path, key, value, message):
    with pytest.raises(HfllmError) as error:
        main([recipe, *TINY, "--output_dir", str(tmp_path / "out"), "--max_steps", "2", f"--{key}", value])
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- preemption


def interrupt(command: list[str], cwd: Path, after_logs: int = 3, sig=signal.SIGTERM) -> tuple[int, str, str]:
    """Run `command`, send `sig` once `after_logs` training logs are out; (exit code, stdout, stderr)."""
    with open(cwd / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=cwd, env=ENV)
        lines, seen = [], 0
        for line in process.stdout:
            lines.append(line)
            seen += line.startswith("{") and "'loss'" in line
            if seen == after_logs:
                process.send_signal(sig)
        lines.append(process.stdout.read())
        code = process.wait(timeout=120)
    return code, "".join(lines), (cwd / "stderr.txt").read_text()


def test_sigterm_saves_a_checkpoint_that_resumes_exactly(recipe, tmp_path):
    common = ["--max_steps", "30", "--save_steps", "1000", "--save_total_limit", "null"]
    straight = run(recipe, tmp_path, *common, out="straight")
    argv = [recipe, *TINY, *data_args(tmp_path), "--output_dir", str(tmp_path / "out"), *common]
    code, stdout, stderr = interrupt([sys.executable, "-c", SLOW_CLI, "pretrain", *argv], tmp_path)
    assert code == 143, stderr[-2000:]
    assert "hfllm: SIGTERM received: finishing the current optimizer step, then saving a checkpoint" in stderr
    step = int(re.search(r"^interrupted at step (\d+) of 30; checkpoint saved; resume with:$", stdout, re.M).group(1))
    assert 3 <= step < 30
    command = stdout.strip().splitlines()[-1]
    assert command == resume_command("hfllm pretrain", argv)
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == [f"checkpoint-{step}"]
    assert shlex.split(command)[:2] == ["hfllm", "pretrain"]
    assert main(shlex.split(command)[2:]) == 0
    same_losses(straight, tmp_path / "out")


def test_second_signal_exits_at_once(recipe, tmp_path):
    slow = SLOW_CLI.replace("time.sleep(0.1)", "time.sleep(3)")
    argv = [recipe, *TINY, *data_args(tmp_path), "--output_dir", str(tmp_path / "out"), "--max_steps", "30"]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([sys.executable, "-c", slow, "pretrain", *argv], stdout=subprocess.PIPE,
                                   stderr=stderr, text=True, cwd=tmp_path, env=ENV)
        for line in process.stdout:
            if line.startswith("{") and "'loss'" in line:  # step 1 is logged; step 2 sleeps 3 s
                break
        try:
            process.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 2
            while "SIGINT received" not in (tmp_path / "stderr.txt").read_text() and time.monotonic() < deadline:
                time.sleep(0.05)  # Python coalesces signals not yet handled: send the second after the first
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=2)  # before step 2 could end
        finally:
            process.kill()
    assert code == 130
    assert "hfllm: second SIGINT: exiting now, without a checkpoint" in (tmp_path / "stderr.txt").read_text()
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_sigterm_during_sft_saves_a_checkpoint_that_resumes(tmp_path, tiny_llama_chat_dir, synth_dir):
    """The same for a TRL method: LoRA SFT on a tiny Llama, interrupted, resumed, equal to an uninterrupted run."""
    keys = dict(
        model_name_or_path=str(tiny_llama_chat_dir), use_peft=True, lora_r=8, chat_template="smollm2",
        assistant_only_loss=True, datasets=[{"path": str(synth_dir / "sft.jsonl")}], max_steps=20,
        per_device_train_batch_size=4, learning_rate=5e-3, logging_steps=1, report_to="none", disable_tqdm=True,
        save_strategy="steps", save_steps=20, max_length=128, seed=0, dataloader_num_workers=0,
    )
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump(keys))
    assert sft_main([str(recipe), "--output_dir", str(tmp_path / "straight")]) == 0
    argv = [str(recipe), "--output_dir", str(tmp_path / "out")]
    code, stdout, stderr = interrupt([sys.executable, "-c", SLOW_CLI, "sft", *argv], tmp_path)
    assert code == 143, stderr[-2000:]
    step = int(re.search(r"^interrupted at step (\d+) of 20; checkpoint saved; resume with:$", stdout, re.M).group(1))
    assert stdout.strip().splitlines()[-1] == resume_command("hfllm sft", argv)
    assert (tmp_path / "out" / f"checkpoint-{step}" / "adapter_model.safetensors").is_file()
    assert sft_main([*argv, "--resume_from_checkpoint", "true"]) == 0
    same_losses(tmp_path / "straight" / "checkpoint-20", tmp_path / "out" / "checkpoint-20")


# a rank of `accelerate launch`: writes its pid, slows every micro-batch (HFLLM_TEST_STEP_SLEEP) and records its exit code
LAUNCHED_RANK = ("import os, sys, time, torch, transformers\nfrom pathlib import Path\ntorch.set_num_threads(1)\n"
                 "rank = os.environ['RANK']\nPath(f'pid-{rank}').write_text(str(os.getpid()))\n"
                 "step = transformers.Trainer.training_step\nnap = float(os.environ.get('HFLLM_TEST_STEP_SLEEP', 0))\n"
                 "transformers.Trainer.training_step = lambda self, *a, **k: (time.sleep(nap), step(self, *a, **k))[1]\n"
                 "from hfllm.cli import main\ncode = main(sys.argv[1:])\nPath(f'exit-{rank}').write_text(str(code))\n"
                 "sys.exit(code)\n")


def launch_two(argv: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """`accelerate launch` of `hfllm pretrain ARGV` with 2 CPU processes (`--multi_gpu` is torchrun underneath;
    ACCELERATE_USE_CPU makes it gloo on CPU, where `--cpu` would silently start one process)."""
    (cwd / "rank.py").write_text(LAUNCHED_RANK)
    for stale in [*cwd.glob("pid-*"), *cwd.glob("exit-*")]:  # of an earlier launch
        stale.unlink()
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(cwd / "rank.py"), "pretrain", *argv]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env={**ENV, "ACCELERATE_USE_CPU": "true", **env}, start_new_session=True)


@pytest.mark.slow
def test_sigterm_under_accelerate_launch_with_two_processes(recipe, tmp_path):
    """SIGTERM to every process of a 2-process run, as SLURM sends it (the launcher also forwards it to its ranks):
    both ranks finish the step, write their parts of one complete checkpoint and exit 143; resumed with 2 processes,
    the losses equal an uninterrupted 2-process run."""
    common = [*TINY, *data_args(tmp_path), "--max_steps", "12", "--save_steps", "1000", "--save_total_limit", "null"]
    straight = launch_two([recipe, *common, "--output_dir", "straight"], tmp_path)
    stdout, stderr = straight.communicate(timeout=600)
    assert straight.returncode == 0, stderr[-3000:]
    argv = [recipe, *common, "--output_dir", "out"]
    launcher = launch_two(argv, tmp_path, HFLLM_TEST_STEP_SLEEP="0.3")
    seen, lines = 0, []
    for line in launcher.stdout:
        lines.append(line)
        seen += line.startswith("{") and "'loss'" in line
        if seen == 3:
            os.killpg(launcher.pid, signal.SIGTERM)  # the launcher's group (the ranks run in sessions of their own)
            for rank in (0, 1):
                os.kill(int((tmp_path / f"pid-{rank}").read_text()), signal.SIGTERM)
            break
    stdout, stderr = launcher.communicate(timeout=300)
    stdout = "".join(lines) + stdout
    assert launcher.returncode != 0  # accelerate's launcher re-raises the signal it got (documented)
    codes = [path.read_text() if path.exists() else "no exit code" for path in (tmp_path / "exit-0", tmp_path / "exit-1")]
    assert codes == ["143", "143"], stderr[-3000:]
    assert stderr.count("hfllm: SIGTERM received") == 2 and "second SIGTERM" not in stderr
    step = int(re.search(r"^interrupted at step (\d+) of 12; checkpoint saved; resume with:$", stdout, re.M).group(1))
    checkpoint = tmp_path / "out" / f"checkpoint-{step}"
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == [checkpoint.name]
    assert checkpoint_problem(checkpoint) is None and not list((tmp_path / "out").glob(".*.partial"))
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()  # each rank's part
    resumed = launch_two([*argv, "--resume_from_checkpoint", "true"], tmp_path)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr[-3000:]
    same_losses(tmp_path / "straight", tmp_path / "out")


# ----------------------------------------------------------------------------- fine-tuning (TRL methods)


class SignalAt(PreemptionCallback):
    """Test-only: the process sends itself SIGTERM as optimizer step `step` begins (a real signal, handled by the real
    PreemptionCallback); `trained` lists the steps this session ran."""

    def __init__(self, step: int | None = None):
        super().__init__()
        self.step, self.trained = step, []

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_step_end(self, args, state, control, **kwargs):
        self.trained.append(state.global_step)
        super().on_step_end(args, state, control, **kwargs)


FINE_TUNING = {"sft": (sft_main, "sft.jsonl", {"assistant_only_loss": True}),
               "dpo": (dpo_main, "preference.jsonl", {})}


@pytest.mark.parametrize("peft", ["lora", "full"])
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_fine_tuning_resumes_exactly_after_sigterm(method, peft, tmp_path, tiny_llama_chat_dir, synth_dir):
    """SFT and DPO, LoRA and full: SIGTERM at step 3 of 6 saves checkpoint-3 and exits 143; resuming gives the logged
    losses and the final weights of an uninterrupted run, bit for bit."""
    entry, data, extra = FINE_TUNING[method]
    recipe = adaptation_recipe(tmp_path, tiny_llama_chat_dir, synth_dir / data, use_peft=peft == "lora", max_steps=6,
                               save_strategy="steps", save_steps=6, logging_steps=1, max_length=128, disable_tqdm=True,
                               dataloader_num_workers=0, **extra)
    assert entry([str(recipe), "--output_dir", str(tmp_path / "straight")]) == 0
    argv = [str(recipe), "--output_dir", str(tmp_path / "out")]
    interrupted, resumed = SignalAt(3), SignalAt()
    assert entry(argv, callbacks=[interrupted]) == 143 and interrupted.trained == [1, 2, 3]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (out / "config.json").exists() and not (out / "adapter_config.json").exists()  # no final model yet
    assert entry([*argv, "--resume_from_checkpoint", "true"], callbacks=[resumed]) == 0 and resumed.trained == [4, 5, 6]
    expected = [e["loss"] for e in log_history(tmp_path / "straight" / "checkpoint-6") if "loss" in e]
    assert [e["loss"] for e in log_history(out / "checkpoint-6") if "loss" in e] == expected and len(expected) == 6
    weights = "adapter_model.safetensors" if peft == "lora" else "model.safetensors"
    final, expected = load_file(out / weights), load_file(tmp_path / "straight" / weights)
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in expected)
    assert not (out / ".model.partial").exists()


@pytest.mark.parametrize("command", ["pretrain", "sft"])
def test_preemption_is_the_same_for_pretraining_and_sft(command, recipe, tmp_path, tiny_llama_chat_dir, synth_dir,
                                                        capsys):
    """One lifecycle (hfllm/training/lifecycle.py): SIGTERM at step 3 of 6 saves the trainer state and checkpoint-3,
    writes no final model, prints the resume command and exits 143, for pretraining as for SFT."""
    out = tmp_path / "out"
    if command == "pretrain":
        entry, prog = main, "hfllm pretrain"
        argv = [recipe, *TINY, *data_args(tmp_path), "--max_steps", "6", "--save_steps", "100"]
    else:
        (tmp_path / "sft").mkdir()
        entry, prog = sft_main, "hfllm sft"
        argv = [str(adaptation_recipe(tmp_path / "sft", tiny_llama_chat_dir, synth_dir / "sft.jsonl", max_steps=6,
                                      save_strategy="steps", save_steps=100, max_length=128, disable_tqdm=True,
                                      dataloader_num_workers=0))]
    argv += ["--output_dir", str(out)]
    assert entry(argv, callbacks=[SignalAt(3)]) == 143
    state = json.loads((out / "trainer_state.json").read_text())  # save_state: the run's state, as the checkpoint's
    assert state["global_step"] == 3 and state["log_history"][:-1] == log_history(out / "checkpoint-3")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    assert capsys.readouterr().out.endswith(
        f"interrupted at step 3 of 6; checkpoint saved; resume with:\n{resume_command(prog, argv)}\n")


# ----------------------------------------------------------------------------- checkpoints complete or absent


@pytest.mark.parametrize("damage", ["truncate weights", "delete trainer_state.json"])
def test_resume_skips_a_corrupt_newest_checkpoint(recipe, tmp_path, capsys, damage):
    common = ["--max_steps", "8", "--save_steps", "2", "--save_total_limit", "null"]
    straight = run(recipe, tmp_path, *common, out="straight")
    out = run(recipe, tmp_path, *common, "--stop_at_step", "6")
    newest = out / "checkpoint-6"
    if damage == "truncate weights":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        (newest / "trainer_state.json").unlink()
    with pytest.raises(HfllmError, match=r"^checkpoint '.*checkpoint-6' is incomplete or corrupt \("):
        run(recipe, tmp_path, *common, "--resume_from_checkpoint", str(newest))
    capsys.readouterr()
    run(recipe, tmp_path, *common, "--resume_from_checkpoint", "true")
    assert f"warning: skipping {newest}: incomplete or corrupt (" in capsys.readouterr().err
    same_losses(straight, out)  # resumed from checkpoint-4: steps 5-8 as in one uninterrupted run
    assert (newest / "trainer_state.json").is_file() and all_finite(newest / "model.safetensors")  # rewritten whole


def test_a_checkpoint_that_fails_midway_never_appears(recipe, tmp_path, monkeypatch):
    """A crash while writing checkpoint-4 leaves checkpoint-2 (save_total_limit 1 keeps it) and no checkpoint-4."""
    from transformers import Trainer

    save_rng = Trainer._save_rng_state

    def crash_at_4(self, output_dir):
        if output_dir.endswith("checkpoint-4"):
            raise OSError("disk full")
        return save_rng(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", crash_at_4)
    with pytest.raises(OSError, match="disk full"):
        run(recipe, tmp_path, "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "1")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    monkeypatch.setattr(Trainer, "_save_rng_state", save_rng)
    run(recipe, tmp_path, "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "1",
        "--resume_from_checkpoint", "true")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-6"]


def test_a_final_model_that_fails_midway_never_appears(recipe, tmp_path, monkeypatch):
    """A crash while writing the final model (after its weights) leaves no loadable model in output_dir; resuming
    from the last checkpoint writes it whole."""
    from transformers import Trainer

    from hfllm.checkpoint import spec_kind

    save = Trainer._save

    def crash_after_weights(self, output_dir=None, state_dict=None):
        save(self, output_dir, state_dict)
        if "checkpoint-" not in str(output_dir):  # the final save, not a checkpoint's
            raise OSError("disk full")

    monkeypatch.setattr(Trainer, "_save", crash_after_weights)
    with pytest.raises(OSError, match="disk full"):
        run(recipe, tmp_path, "--max_steps", "4", "--save_steps", "4")
    out = tmp_path / "out"
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert not (out / ".model.partial").exists() and (out / "checkpoint-4").is_dir()
    with pytest.raises(HfllmError, match="is not a model checkpoint"):
        spec_kind(out)
    monkeypatch.setattr(Trainer, "_save", save)
    run(recipe, tmp_path, "--max_steps", "4", "--save_steps", "4", "--resume_from_checkpoint", "true")
    assert spec_kind(out) == "folder" and not (out / ".model.partial").exists()
    final, checkpoint = load_file(out / "model.safetensors"), load_file(out / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(final[k], checkpoint[k]) for k in checkpoint)


def test_merged_output_is_a_model_only_once_every_file_is_in(tmp_path, monkeypatch):
    """atomic_output(merge=True) into a run's folder: the earlier config.json goes first, the new one comes last, the
    checkpoints and other files stay, the staging folder is gone; an error in the block leaves the folder as it was."""
    from hfllm import checkpoint

    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "config.json").write_text("old")
    (out / "model.safetensors").write_text("old")
    with pytest.raises(OSError, match="disk full"), checkpoint.atomic_output(out, merge=True, staging=out / ".s") as tmp:
        (tmp / "model.safetensors").write_text("half")
        raise OSError("disk full")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_text() == "old"
    moves, replace = [], os.replace
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: (moves.append((Path(b).name, sorted(
        p.name for p in out.iterdir() if not p.name.startswith(".")))), replace(a, b)))
    with checkpoint.atomic_output(out, merge=True, staging=out / ".s") as tmp:
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            (tmp / name).write_text("new")
    assert [name for name, _ in moves] == ["generation_config.json", "model.safetensors", "config.json"]
    assert all("config.json" not in present for _, present in moves)  # the old one was gone before the first move
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "config.json", "generation_config.json",
                                                     "model.safetensors"]
    assert all((out / name).read_text() == "new" for name in ("config.json", "model.safetensors"))


# ----------------------------------------------------------------------------- a full disk
# The disk fills at the write boundary: transformers' safetensors writer writes half a file and fails as safetensors
# does on a full disk (its Rust I/O error, as text), or with the OSError ENOSPC that Python's own writes raise.

FREE = 1_234_567  # the bytes `shutil.disk_usage` reports free, "1.2 MB"


@pytest.fixture
def full_disk(monkeypatch):
    """`full_disk(where, error)`: every safetensors write whose path contains `where` writes half and raises `error`
    (a SafetensorError's text or an OSError); the file system reports FREE bytes free. Returns the undo."""
    import shutil
    from collections import namedtuple

    import transformers.modeling_utils as modeling_utils

    real_save = modeling_utils.safe_save_file
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(10 * FREE, 9 * FREE,
                                                                                                FREE))

    def fill(where: str, error: Exception):
        def save_file(tensors, filename, metadata=None):
            if where not in str(filename):
                return real_save(tensors, filename, metadata=metadata)
            Path(filename).write_bytes(b"\0" * 1000)  # half a file, then the disk is full
            raise error

        monkeypatch.setattr(modeling_utils, "safe_save_file", save_file)
        return lambda: monkeypatch.setattr(modeling_utils, "safe_save_file", real_save)

    return fill


def disk_full_line(err: str, command: str, folder: Path) -> str:
    """The one line a full disk prints: it says so, names the folder, the bytes needed and free, and the fix."""
    lines = [line for line in err.splitlines() if "error" in line]  # not the progress bars
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"hfllm {command}: error: the disk is full: writing {folder} needs "), lines[0]
    assert lines[0].endswith(", 1.2 MB free there; free some disk space or change output_dir (the folder written) "
                             "to a disk with room"), lines[0]
    return lines[0]


def test_a_full_disk_during_a_checkpoint_says_so_and_resumes(recipe, tmp_path, full_disk, capsys):
    """pretrain: the disk fills while checkpoint-4 is written (safetensors' own error): exit 2, the folder, the bytes
    it needs (weights and AdamW state) and the bytes free; no checkpoint-4, no staging folder; the resume finishes."""
    from safetensors import SafetensorError

    from hfllm.cli import main as cli_main
    from hfllm.training.saving import weights_bytes

    undo = full_disk("checkpoint-4", SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"))
    out = tmp_path / "out"
    argv = ["pretrain", recipe, *TINY, *data_args(tmp_path), "--output_dir", str(out), "--max_steps", "6",
            "--save_steps", "2", "--save_total_limit", "1"]
    capsys.readouterr()
    assert cli_main(argv) == 2
    line = disk_full_line(capsys.readouterr().err, "pretrain", out / "checkpoint-4")
    from hfllm.models.modeling_hfllm import HfllmForCausalLM
    model = HfllmForCausalLM.from_pretrained(out / "checkpoint-2")
    needed = 3 * weights_bytes(model)  # the weights and AdamW's two moments, all float32
    assert f"needs about {needed / 1e6:.1f} MB," in line or f"needs about {needed / 1e3:.1f} kB," in line, line
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    undo()
    assert cli_main([*argv, "--resume_from_checkpoint", "true"]) == 0
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-6"]
    assert (out / "model.safetensors").is_file() and not list(out.glob(".*partial"))


@pytest.mark.parametrize("command", ["convert", "export"])
def test_a_full_disk_in_convert_and_export_says_so(command, tmp_path, tiny_llama_chat_dir, full_disk, capsys):
    """convert / export --to transformers: the disk fills while the weights are written (OSError ENOSPC): exit 2, the
    output folder named with the bytes free, nothing left under its name or beside it."""
    import errno

    from hfllm.cli import main as cli_main

    source = tiny_llama_chat_dir
    if command == "export":
        source = tmp_path / "hfllm"
        assert cli_main(["convert", str(tiny_llama_chat_dir), str(source)]) == 0
    out = tmp_path / "out"
    full_disk(str(out.name), OSError(errno.ENOSPC, "No space left on device"))
    capsys.readouterr()
    assert cli_main([command, str(source), str(out)]) == 2
    disk_full_line(capsys.readouterr().err, command, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hfllm"] if command == "export" else [])


def test_fine_tuning_refuses_an_existing_run(tmp_path, tiny_llama_chat_dir, synth_dir):
    """SFT (like every TRL method) keeps pretraining's output-folder protection: a finished run is not overwritten
    unless asked; a folder that holds no hfllm run is refused."""
    recipe = adaptation_recipe(tmp_path, tiny_llama_chat_dir, synth_dir / "sft.jsonl", max_steps=1, max_length=128)
    assert sft_main([str(recipe)]) == 0
    out = tmp_path / "out"
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(HfllmError, match=r"already holds this run; continue it with --resume_from_checkpoint true"):
        sft_main([str(recipe)])
    with pytest.raises(HfllmError, match=r"holds a different run \(learning_rate was 0.005, now 0.001\)"):
        sft_main([str(recipe), "--learning_rate", "1e-3"])
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert sft_main([str(recipe), "--learning_rate", "1e-3", "--overwrite_output_dir", "true"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() != before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(HfllmError, match="is not empty and holds no hfllm run"):
        sft_main([str(recipe), "--output_dir", str(tmp_path / "other")])
