"""The experiments' figures: ablation curves (validation loss against tokens and against training seconds) and the
scaling figure (loss against compute with the fitted frontier, iso-loss contours of the fitted law)."""

from pathlib import Path

import numpy as np

from .fit import Law


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: list[dict], path: Path) -> None:
    """One colour per variant, one line per seed: validation loss against tokens (left) and training seconds."""
    plt = _pyplot()
    figure, (by_tokens, by_seconds) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    variants = list(dict.fromkeys(record["variant"] for record in records))
    colours = plt.get_cmap("tab10")
    for index, variant in enumerate(variants):
        for number, record in enumerate(r for r in records if r["variant"] == variant):
            curve = record["curve"]
            label = variant if number == 0 else None
            by_tokens.plot([p["tokens"] for p in curve], [p["eval_loss"] for p in curve], "o-", ms=3,
                           color=colours(index % 10), label=label, alpha=0.8)
            by_seconds.plot([p["seconds"] for p in curve], [p["eval_loss"] for p in curve], "o-", ms=3,
                            color=colours(index % 10), alpha=0.8)
    by_tokens.set_xlabel("training tokens")
    by_seconds.set_xlabel("training seconds (evaluation left out)")
    by_tokens.set_ylabel("validation loss")
    for axis in (by_tokens, by_seconds):
        axis.grid(alpha=0.3)
    by_tokens.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_scaling(cells: list[dict], law: Law | None, holdout: dict | None, path: Path) -> None:
    """Left: validation loss against compute (6 N D), one line per model size, the fitted compute-optimal frontier
    and the held-out run (predicted and measured). Right: iso-loss contours of the fitted law over compute and
    parameters, with the compute-optimal N_opt(C)."""
    plt = _pyplot()
    figure, (frontier, contours) = plt.subplots(1, 2, figsize=(12, 4.8))
    sizes = list(dict.fromkeys(cell["size"] for cell in cells))
    colours = plt.get_cmap("viridis")
    for index, size in enumerate(sizes):
        mine = sorted((c for c in cells if c["size"] == size and c["loss"] is not None), key=lambda c: c["tokens"])
        frontier.plot([6 * c["parameters"] * c["tokens"] for c in mine], [c["loss"] for c in mine], "o-",
                      color=colours(index / max(1, len(sizes) - 1)), label=f"{size} ({mine[0]['parameters'] / 1e6:.2f}M)"
                      if mine else size)
    computes = [6 * c["parameters"] * c["tokens"] for c in cells]
    low, high = min(computes) / 2, max(computes + [6 * holdout["parameters"] * holdout["tokens"]] if holdout else computes) * 2
    flops = np.logspace(np.log10(low), np.log10(high), 100)
    if law is not None:
        optimal = [law.optimal(c) for c in flops]
        frontier.plot(flops, [law.loss(n, d) for n, d in optimal], "k--", label="fit: compute-optimal frontier")
        sizes_n = [c["parameters"] for c in cells] + ([holdout["parameters"]] if holdout else [])
        parameters = np.logspace(np.log10(min(sizes_n) / 3), np.log10(max(sizes_n) * 3), 100)
        grid_c, grid_n = np.meshgrid(flops, parameters)
        best = [law.loss(n, d) for n, d in optimal]
        worst = max(c["loss"] for c in cells if c["loss"] is not None)
        levels = contours.contour(grid_c, grid_n, law.loss(grid_n, grid_c / (6 * grid_n)), cmap="magma",
                                  levels=np.linspace(min(best), worst + 0.1 * (worst - min(best)), 10))
        contours.clabel(levels, fontsize=7, fmt="%.2f")
        contours.plot(flops, [n for n, _ in optimal], "k--", label="N_opt(C)")
    contours.scatter(computes, [c["parameters"] for c in cells], c="tab:blue", s=15, label="runs")
    if holdout is not None:
        compute = 6 * holdout["parameters"] * holdout["tokens"]
        frontier.plot([compute], [holdout["predicted"]], "x", color="tab:red", ms=10, mew=2, label="held-out: predicted")
        if holdout.get("loss") is not None:
            frontier.plot([compute], [holdout["loss"]], "*", color="tab:red", ms=12, label="held-out: measured")
        contours.scatter([compute], [holdout["parameters"]], marker="*", c="tab:red", s=80, label="held-out run")
    for axis in (frontier, contours):
        axis.set_xscale("log")
        axis.set_xlabel("training compute C = 6 N D (FLOPs)")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7)
    frontier.set_ylabel("final validation loss")
    contours.set_yscale("log")
    contours.set_ylabel("parameters N")
    contours.set_title("iso-loss contours of the fitted L(N, D)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
