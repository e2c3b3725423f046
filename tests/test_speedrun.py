"""examples/speedrun_cpu.sh end to end at SPEEDRUN_SCALE=tiny: every step runs and report.md holds every stage."""

import hashlib
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("tokenizer", "pretrain", "synth", "score_base", "sft", "dpo", "eval", "export_gguf", "chat",
          "samples_base", "samples_sft", "samples_dpo")


@pytest.mark.slow
def test_speedrun_tiny_writes_the_report_card(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "SPEEDRUN_SCALE": "tiny", "RUN": str(run), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "examples/speedrun_cpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    check_run(run, n_test=8)


def check_run(run: Path, n_test: int) -> None:
    """Every artifact of a speedrun exists, and its report.md holds every stage's metrics, timings and hashes."""
    for path in ["tokenizer/tokenizer.json", "base/model.safetensors", "base/loss_curve.png", "data/test.jsonl",
                 "sft/model.safetensors", "dpo/model.safetensors", "eval/results.json", "gguf/Modelfile", "chat.jsonl"]:
        assert (run / path).is_file(), path
    (gguf,) = (run / "gguf").glob("*.gguf")
    assert (run / "sft" / "loss_curve.png").is_file() and (run / "dpo" / "loss_curve.png").is_file()

    report = (run / "report.md").read_text()
    table = report.split("## Metrics")[1].split("## Loss curves")[0]
    assert "| task | metric | BASE | SFT | DPO |" in table
    for row in ["1 pretrain: Shakespeare validation | eval_loss ↓", "2 sft: held-out split | eval_loss ↓",
                "3 dpo: held-out split | eval_rewards/accuracies ↑", f"4 hfllm score: chat (n={n_test}) | chat_exact_match ↑",
                "5 hfllm eval: hfllm_shakespeare_ppl | bits_per_byte ↓", "5 hfllm eval: hfllm_synth | exact_match ↑"]:
        assert f"| {row} |" in table, row
    bits_per_byte = next(line for line in table.splitlines() if "bits_per_byte" in line).split("|")[3:6]
    assert all(re.fullmatch(r" \d+\.\d+ ", cell) for cell in bits_per_byte), bits_per_byte  # a number per stage

    timings = report.split("## Timings")[1].split("## Hashes")[0]
    for stage in STAGES:
        assert re.search(rf"^\| {stage} \| \d+\.\d \| \d+\.\d \|$", timings, re.M), stage
    hashes = report.split("## Hashes")[1]
    for name in ["base/model.safetensors", "sft/model.safetensors", "dpo/model.safetensors", f"gguf/{gguf.name}",
                 "data/sft.jsonl", "tokenizer/tokenizer.json"]:
        assert re.search(rf"`{re.escape(name)}` \| [\d,]+ \| `[0-9a-f]{{64}}` \|", hashes), name
    assert hashlib.sha256(gguf.read_bytes()).hexdigest() in hashes
    assert re.search(r"pretraining data, train token ids \(run_info.json\) \| \| `[0-9a-f]{64}`", hashes)
    assert "| DPO, GGUF q8_0 (the chat turn) | What is 12 + 30? |" in report


def test_speedrun_refuses_a_used_run_folder(tmp_path):
    (tmp_path / "old.txt").write_text("earlier run")
    result = subprocess.run(["bash", "examples/speedrun_cpu.sh"], cwd=ROOT, env={**os.environ, "RUN": str(tmp_path)},
                            capture_output=True, text=True)
    assert result.returncode == 2 and "is not empty" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]
