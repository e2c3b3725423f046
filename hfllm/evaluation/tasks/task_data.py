"""Dataset loaders and scorers referenced by the task YAMLs here (`!function task_data.<name>`).

lm-eval calls a `custom_dataset` with the task's metadata (plus `--metadata` / `TaskManager(metadata=...)`) as
keyword arguments; the data is built from the package's assets into hfllm's cache (see hfllm/evaluation/tasks/__init__.py).
"""

from hfllm.evaluation import tasks
from hfllm.evaluation.exact_match import parse_answer
from hfllm.evaluation.metrics import load_metric


def shakespeare_ppl(**metadata):
    return tasks.shakespeare_ppl_data()


def shakespeare_next_line(**metadata):
    return tasks.shakespeare_next_line_data()


def synth(synth_data=None, **metadata):
    return tasks.synth_data(synth_data)


def synth_process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Score one generation with hfllm's local evaluate metrics: exact match of the parsed answer, and chrF."""
    prediction = parse_answer(results[0])
    exact = load_metric("exact_match").compute(predictions=[prediction], references=[doc["answer"]])
    chrf = load_metric("chrf").compute(predictions=[prediction], references=[[doc["answer"]]])
    return {"exact_match": exact["exact_match"], "chrf": chrf["score"]}
