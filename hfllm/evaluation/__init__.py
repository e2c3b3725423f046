"""Evaluation with lm-evaluation-harness: `hfllm eval`, hfllm's offline tasks, perplexity, a training callback.

    from hfllm.checkpoint import load
    from hfllm.evaluation import evaluate_model, scores
    model, tokenizer = load("runs/sft", merge_adapter=True)
    print(scores(evaluate_model(model, tokenizer, ["hfllm_offline"], limit=20)))

The training callback is `hfllm.evaluation.callback.EvalCallback` (not imported here: importing transformers'
Trainer machinery is slow and loads bitsandbytes, which prints a warning on CPU machines).
"""

from .harness import evaluate_model, load_tasks, scores
from .perplexity import strided_perplexity, validation_perplexity

__all__ = ["evaluate_model", "load_tasks", "scores", "strided_perplexity", "validation_perplexity"]
