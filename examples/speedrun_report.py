"""The speedrun's report card: RUN/report.md from the files examples/speedrun_cpu.sh's steps wrote.

    python3 examples/speedrun_report.py RUN

One table of every stage's metrics (BASE / SFT / DPO columns, hfllm.evaluation.report.markdown_table), the loss
curves, samples of each stage, per-stage wall-clock and CPU seconds, and sha256 hashes of the data and artifacts.
"""

import json
import os
import sys
from pathlib import Path

from hfllm.evaluation.report import markdown_table
from hfllm.files import sha256
from hfllm.plots import plot_loss_curve

STAGES = {"BASE": "base", "SFT": "sft", "DPO": "dpo"}  # report column -> run folder


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def log_history(folder: Path) -> list[dict]:
    return read_json(folder / "trainer_state.json").get("log_history", [])


def stage_scores(run: Path, folder: str) -> dict[str, dict[str, float]]:
    """The training-side metrics of one stage, as markdown_table's {task: {metric: value}}."""
    stage = run / folder
    scores: dict[str, dict[str, float]] = {}
    evals = [entry for entry in log_history(stage) if "eval_loss" in entry]
    if folder == "base" and evals:
        scores["1 pretrain: Shakespeare validation"] = {"eval_loss": evals[-1]["eval_loss"]}
    held_out = read_json(stage / "eval_results.json")  # SFT / DPO: their held-out split of the training data
    if held_out:
        keys = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
        scores[f"{2 if folder == 'sft' else 3} {folder}: held-out split"] = {key: held_out[key] for key in keys if key in held_out}
    chat = read_json(stage / "chat_exact_match.json")  # hfllm score: greedy answers through the chat template
    if chat:
        scores[f"4 hfllm score: chat (n={chat['n']})"] = {
            key: chat[key] for key in ("chat_exact_match", "preference_accuracy", "logp_margin") if key in chat
        }
    return scores


def metrics_table(run: Path) -> str:
    """Every stage's metrics in one table: training metrics and `hfllm eval`'s offline suite, BASE / SFT / DPO."""
    harness = {model["model"].rstrip("/").rsplit("/", 1)[-1]: model for model in read_json(run / "eval" / "results.json").get("models", [])}
    runs = []
    for name, folder in STAGES.items():
        evaluated = harness.get(folder, {})
        scores = {f"5 hfllm eval: {task}": metrics for task, metrics in evaluated.get("scores", {}).items()}
        runs.append({"name": name, "chat_template_applied": evaluated.get("chat_template_applied", False),
                     "scores": {**stage_scores(run, folder), **scores}})
    return markdown_table(runs)


def loss_curves(run: Path) -> list[str]:
    """Each stage's loss curve (pretraining writes its own; SFT / DPO are drawn here from trainer_state.json)."""
    lines = []
    for name, folder in STAGES.items():
        image = run / folder / "loss_curve.png"
        if not image.is_file() and log_history(run / folder):
            plot_loss_curve(log_history(run / folder), image)
        if image.is_file():
            lines.append(f"![{name} loss]({folder}/loss_curve.png)")
    return lines


def samples(run: Path) -> list[str]:
    lines = ["| stage | prompt | completion |", "|---|---|---|"]
    for name, folder in STAGES.items():
        for row in read_jsonl(run / f"samples_{folder}.jsonl"):
            lines.append(f"| {name} | {cell(row['prompt'])} | {cell(row['text'])} |")
    for row in read_jsonl(run / "chat.jsonl"):
        lines.append(f"| DPO, GGUF q8_0 (the chat turn) | {cell(row['prompt'])} | {cell(row['text'])} |")
    text = (run / "base" / "samples.txt").read_text() if (run / "base" / "samples.txt").is_file() else ""
    if text:
        last = text[text.find("----- sample 1 (end of training)") :] if "(end of training)" in text else text
        lines += ["", "BASE after pretraining (base/samples.txt, last section):", "", "```", last.strip()[:1200], "```"]
    return lines


def cell(text: str) -> str:
    """One table cell: newlines and other escapes shown as JSON writes them (a run of blank lines stays visible)."""
    return json.dumps(text, ensure_ascii=False)[1:-1].replace("|", "\\|")[:120]


def timings(run: Path) -> list[str]:
    rows = [line.split("\t") for line in (run / "timings.tsv").read_text().splitlines()[1:] if line.strip()]
    lines = ["| stage | wall s | CPU s (user + sys) |", "|---|---|---|"]
    lines += [f"| {name} | {float(wall):.1f} | {float(user) + float(system):.1f} |" for name, wall, user, system in rows]
    total_wall = sum(float(row[1]) for row in rows)
    total_cpu = sum(float(row[2]) + float(row[3]) for row in rows)
    lines.append(f"| **total** | **{total_wall:.1f}** ({total_wall / 60:.1f} min) | **{total_cpu:.1f}** ({total_cpu / 60:.1f} min) |")
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    lines += ["", f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
              f"load average (1, 5, 15 min) when the report was written: {load}. CPU seconds above wall seconds "
              "mean more than one core was busy; wall well above CPU means the cores were shared."]
    return lines


def hashes(run: Path) -> list[str]:
    info = read_json(run / "base" / "run_info.json")
    lines = ["| what | bytes | sha256 |", "|---|---|---|"]
    for split, digest in (info.get("data_sha256") or {}).items():
        lines.append(f"| pretraining data, {split} token ids (run_info.json) | | `{digest}` |")
    if info.get("tokenizer_sha256"):
        lines.append(f"| tokenizer (run_info.json) | | `{info['tokenizer_sha256']}` |")
    files = [*sorted((run / "data").glob("*.jsonl")), run / "tokenizer" / "tokenizer.json"]
    files += [path for folder in STAGES.values() for path in sorted((run / folder).glob("*.safetensors"))]
    files += [*sorted((run / "gguf").glob("*.gguf")), run / "gguf" / "Modelfile"]
    for path in files:
        if path.is_file():
            lines.append(f"| `{path.relative_to(run)}` | {path.stat().st_size:,} | `{sha256(path)}` |")
    commit = info.get("git", {})
    if commit.get("commit"):
        lines.append(f"\nhfllm commit `{commit['commit']}`{' (uncommitted changes)' if commit.get('dirty') else ''}.")
    return lines


def write(run: Path) -> Path:
    parts = [
        f"# hfllm speedrun report card ({run})", "",
        "tokenizer → pretrain → SFT → DPO → eval → GGUF → chat, each step one hfllm command "
        "(examples/speedrun_cpu.sh).", "",
        "## Metrics", "", metrics_table(run),
        "## Loss curves", "", *loss_curves(run), "",
        "## Samples (greedy, chat template)", "", *samples(run), "",
        "## Timings", "", *timings(run), "",
        "## Hashes", "", *hashes(run), "",
    ]
    report = run / "report.md"
    report.write_text("\n".join(parts))
    return report


if __name__ == "__main__":
    print(f"wrote {write(Path(sys.argv[1]))}")
