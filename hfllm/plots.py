"""The loss curve of a run, drawn by pretraining at its end, by `hfllm push` for the model card and by the speedrun
report."""

from pathlib import Path


def plot_loss_curve(log_history: list[dict], path: Path) -> None:
    """Training and validation loss against the optimizer step, as a PNG."""
    import matplotlib.pyplot as plt

    figure = loss_figure(log_history)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def loss_figure(log_history: list[dict]):
    """Training and validation loss against the optimizer step: a matplotlib figure (inline in a notebook)."""
    import matplotlib.pyplot as plt

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    validation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    if train:
        axis.plot(*zip(*train), label="train")
    if validation:
        axis.plot(*zip(*validation), "o-", label="validation")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure
