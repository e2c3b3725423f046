"""Text metrics as local `evaluate` modules that load offline: bleu, chrf (sacrebleu), rouge (rouge_score),
exact_match. `evaluate.load("bleu")` needs the Hub; `evaluate.load(<folder here>)` does not.

    from hfllm.evaluation.metrics import load_metric
    load_metric("bleu").compute(predictions=["the cat sat"], references=[["the cat sat"]])  # {"bleu": 100.0, ...}
"""

from functools import cache
from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent
METRICS = ("bleu", "chrf", "rouge", "exact_match")


def metric_path(name: str) -> str:
    """The folder `evaluate.load` takes for one of `METRICS`."""
    from ...errors import HfllmError

    if name not in METRICS:
        raise HfllmError(f"unknown metric '{name}'; choose from: {', '.join(METRICS)}")
    return str(METRICS_DIR / name)


@cache
def load_metric(name: str):
    """`evaluate.load` on the local module (cached: loading copies the script into evaluate's module cache)."""
    import evaluate

    return evaluate.load(metric_path(name))
