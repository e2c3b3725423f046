"""Run lm-evaluation-harness in process on a model object: resolve tasks, evaluate, collect scores (models come from
`hfllm.checkpoint.load`).

`evaluate_model(model, tokenizer, tasks, ...)` wraps the object in lm-eval's `HFLM(pretrained=model, ...)`, so the
same call scores a checkpoint from disk (`hfllm eval`) and a model in the middle of training (`EvalCallback`).
"""

import difflib
from pathlib import Path

import jinja2
import torch
from transformers import PreTrainedModel

from ..checkpoint import eval_mode
from ..errors import HfllmError
from .tasks import TASKS_DIR


# ---------------------------------------------------------------- tasks


def task_manager(tasks: list[str], include_path: list[str] | None = None, metadata: dict | None = None):
    """An lm-eval TaskManager that knows `tasks`: hfllm's tasks (and `include_path`) are indexed in milliseconds; the
    ~15k built-in tasks are indexed (~15 s) only when a name outside them is asked for. Unknown names raise."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *(include_path or [])]
    for folder in include_path or []:
        if not Path(folder).is_dir():
            raise HfllmError(f"include_path '{folder}' is not a folder; give a folder of task YAMLs")
    manager = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if any(name not in manager.all_tasks and not name.startswith("hfllm_") for name in tasks):
        manager = TaskManager(include_path=paths, metadata=metadata)
    for name in tasks:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "see docs/evaluation.md for the task names"
            raise HfllmError(f"unknown task '{name}'; {hint}")
    return manager


def load_tasks(tasks: list[str], include_path: list[str] | None = None, metadata: dict | None = None) -> list:
    """Task names -> lm-eval Task objects (tags expanded), each checked by rendering its first document."""
    manager = task_manager(tasks, include_path, metadata)
    loaded = []
    for name in tasks:
        try:
            loaded += manager.load([name])["tasks"].values()
        except jinja2.TemplateError as error:
            raise HfllmError(f"task '{name}': a template in its YAML is broken ({type(error).__name__}: {error}); "
                             f"fix the task YAML") from None
    for task in loaded:
        check_templates(task)
    return loaded


def check_templates(task) -> None:
    """Render the prompt, target and choices of the task's first document, so a broken template fails before any
    model runs, with one line naming the task."""
    name = task.config.task
    docs = task.eval_docs
    if len(docs) == 0:
        raise HfllmError(f"task '{name}' has no documents; check its data files")
    doc = docs[0]
    try:
        task.doc_to_text(doc)
        task.doc_to_target(doc)
        if task.OUTPUT_TYPE == "multiple_choice":
            task.doc_to_choice(doc)
    except (jinja2.TemplateError, KeyError, TypeError) as error:
        kind = type(error).__name__
        raise HfllmError(f"task '{name}': its template does not render on the first document ({kind}: {error}); fix the task YAML") from None


# ---------------------------------------------------------------- evaluation


def evaluate_model(
    model: PreTrainedModel,
    tokenizer,
    tasks: list,
    limit: float | None = None,
    batch_size: int = 1,
    apply_chat_template: bool = False,
    log_samples: bool = False,
    max_length: int | None = None,
    gen_kwargs: dict | None = None,
) -> dict:
    """lm-eval's `simple_evaluate` on an in-memory model; `tasks` are names or loaded Task objects.

    Returns lm-eval's result dict ("results", "configs", "n-samples", and "samples" when `log_samples`). The model is
    put in eval mode and back into training mode afterwards if it was training.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if isinstance(tasks[0], str):
        tasks = load_tasks(tasks)
    with eval_mode(model), torch.no_grad():
        device = str(next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=max_length,
                  backend="causal")  # lm-eval guesses from model_type and does not know "hfllm"
        return simple_evaluate(
            model=lm,
            tasks=tasks,
            limit=limit,
            log_samples=log_samples,
            apply_chat_template=apply_chat_template,
            gen_kwargs=gen_kwargs,
            task_manager=task_manager([]),  # the tasks are loaded; without it lm-eval indexes ~15k tasks (~15 s)
            bootstrap_iters=0,
            verbosity="WARNING",
        )


def scores(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's results -> {task: {metric: value}} without stderr entries and the ",none" filter suffix."""
    table = {}
    for task, metrics in results["results"].items():
        table[task] = {}
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if isinstance(value, (int, float)) and "_stderr" not in metric and key != "alias":
                table[task][metric if filter_name in ("", "none") else key] = float(value)
    return table
