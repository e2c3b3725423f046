"""Reports: results.json, a Markdown table with one column per model, and a bar chart PNG when models are compared."""

import json
from pathlib import Path

# a metric whose name contains one of these is lower-is-better; all others are higher-is-better
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "loss")


def markdown_table(runs: list[dict]) -> str:
    """One row per (task, metric), one column per model; the header notes whether the chat template was applied."""
    header = ["task", "metric"] + [
        f"{run['name']}{' (chat template)' if run['chat_template_applied'] else ''}" for run in runs
    ]
    rows = []
    for task in sorted({task for run in runs for task in run["scores"]}):
        metrics = sorted({m for run in runs for m in run["scores"].get(task, {}) if m != "sample_len"})
        for metric in metrics:
            cells = [_format(run["scores"].get(task, {}).get(metric)) for run in runs]
            arrow = "↓" if any(word in metric for word in LOWER_IS_BETTER) else "↑"
            rows.append([task, f"{metric} {arrow}"] + cells)
    samples = {run["scores"][t].get("sample_len") for run in runs for t in run["scores"]}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = f"\nSamples per task: {', '.join(str(int(s)) for s in sorted(s for s in samples if s is not None))}."
    return "\n".join(lines) + "\n" + note + "\n"


def _format(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.4e}"


def bar_chart(runs: list[dict], path: Path) -> None:
    """One panel per (task, metric), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (task, metric)
        for task in sorted({task for run in runs for task in run["scores"]})
        for metric in sorted({m for run in runs for m in run["scores"].get(task, {}) if m != "sample_len"})
    ]
    columns = min(3, len(panels))
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    names = [run["name"] for run in runs]
    for axis, (task, metric) in zip(axes.flat, panels):
        values = [run["scores"].get(task, {}).get(metric, 0.0) for run in runs]
        axis.bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
        axis.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
        axis.set_title(f"{task}\n{metric}", fontsize=9)
        if "perplexity" in metric:
            axis.set_yscale("log")
    for axis in axes.flat[len(panels) :]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(runs: list[dict], config: dict, output_path: str | Path) -> list[Path]:
    """Write results.json, results.md and (for more than one model) results.png; returns the written paths."""
    out = Path(output_path)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps({"config": config, "models": runs}, indent=2) + "\n", encoding="utf-8")
    written[1].write_text(markdown_table(runs), encoding="utf-8")
    if len(runs) > 1:
        written.append(out / "results.png")
        bar_chart(runs, written[-1])
    return written


def write_sample_logs(samples: dict[str, list[dict]], name: str, output_path: str | Path) -> list[Path]:
    """lm-eval's per-sample logs (`log_samples`) as samples_<model>_<task>.jsonl."""
    from lm_eval.utils import handle_non_serializable

    written = []
    for task, rows in samples.items():
        path = Path(output_path) / f"samples_{name}_{task}.jsonl"
        lines = [json.dumps(row, default=handle_non_serializable, ensure_ascii=False) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return written
