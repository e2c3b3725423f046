"""What a run reports while it trains, for every training command (`hfllm pretrain`, `hfllm sft|dpo|...`):

- evaluation from the recipe: `eval_tasks:` (lm-eval tasks, e.g. `hfllm_offline`) and `regression_prompts:` are
  scored by `EvalCallback` (hfllm/evaluation/callback.py) every `eval_steps` and at the last step, logged as
  `eval_tasks/<task>/<metric>` next to the loss, and saved in eval_results.json at the end (docs/evaluation.md);
- the trackers of `report_to: tensorboard | trackio | wandb` (transformers' own integrations) get the run's
  run_info.json facts beside the config Trainer records (`RunInfoCallback`; docs/evaluation.md#tracking).
"""

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..errors import HfllmError

# report_to names hfllm tests, and the package each needs
TRACKERS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}


@dataclass
class EvalArguments:
    """Recipe keys for evaluation during training (every command's)."""

    eval_tasks: list[str] | None = field(
        default=None,
        metadata={"help": "lm-eval tasks scored every eval_steps and at the last step, e.g. [hfllm_offline] or "
                          "[hfllm_synth, arc_easy] (cached tasks); logged as eval_tasks/<task>/<metric>"},
    )
    eval_tasks_limit: float | None = field(
        default=20, metadata={"help": "documents per task at each evaluation (a fraction below 1; null: all)"}
    )
    regression_prompts: list[dict[str, str]] | None = field(
        default=None,
        metadata={"help": "[{prompt: ..., pattern: regex}, ...]: greedy answers checked every eval_steps; the share "
                          "that matches is logged as eval_tasks/regression_prompts/pass_rate"},
    )
    eval_tasks_chat_template: bool | None = field(
        default=None,
        metadata={"help": "render eval_tasks and regression_prompts with the chat template (default: when the "
                          "tokenizer has one and the command fine-tunes)"},
    )


def check_eval_arguments(eval_args: EvalArguments) -> None:
    """Bad `regression_prompts` entries fail before any work (the tasks are resolved by `eval_callback`)."""
    import re

    for number, entry in enumerate(eval_args.regression_prompts or [], 1):
        if not isinstance(entry, dict) or set(entry) != {"prompt", "pattern"}:
            raise HfllmError(f"regression_prompts entry {number} is {entry!r}; give each as "
                             "{prompt: <text>, pattern: <regex>}")
        try:
            re.compile(entry["pattern"])
        except re.error as error:
            raise HfllmError(f"regression_prompts entry {number}: pattern {entry['pattern']!r} is not a regex "
                             f"({error}); fix the pattern") from None


def eval_callback(eval_args: EvalArguments, trainer, every: float | None, chat: bool) -> TrainerCallback | None:
    """The `EvalCallback` a recipe's `eval_tasks` / `regression_prompts` ask for (None without either), run every
    `every` steps (a fraction below 1: of max_steps). Its tasks are resolved now, so a wrong name fails before
    training. `chat`: the command's default for `eval_tasks_chat_template`."""
    if not eval_args.eval_tasks and not eval_args.regression_prompts:
        return None
    # the one place training reaches up to evaluation for a recipe (tests/test_layers.py KNOWN): at call time only
    from ..evaluation.callback import EvalCallback

    check_eval_arguments(eval_args)
    template = eval_args.eval_tasks_chat_template
    return EvalCallback(trainer, tasks=eval_args.eval_tasks, every_n_steps=every or 500, limit=eval_args.eval_tasks_limit,
                        apply_chat_template=chat if template is None else template,
                        regression_prompts=eval_args.regression_prompts)


def add_tracking(eval_args: EvalArguments, trainer, every: float | None, chat: bool) -> TrainerCallback | None:
    """Add to `trainer` what every training command reports while it trains: the recipe's `EvalCallback`
    (`eval_callback`) and `RunInfoCallback`. Returns the EvalCallback (None without one), whose scores the command
    saves at the end (`save_scores`)."""
    evaluator = eval_callback(eval_args, trainer, every, chat)
    for callback in (evaluator, RunInfoCallback(trainer)):
        if callback is not None:
            trainer.add_callback(callback)
    return evaluator


def check_report_to(report_to: list[str] | str | None) -> None:
    """Every tracker named in `report_to` is installed (transformers would fail later, inside Trainer)."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        package = TRACKERS.get(name)
        if package and importlib.util.find_spec(package) is None:
            extra = " (or pip install 'hfllm[track]')" if name != "tensorboard" else ""
            raise HfllmError(f"report_to {name} needs the {package} package: pip install {package}{extra}, "
                             "or report_to: tensorboard")


def run_info_facts(output_dir: str) -> dict[str, Any]:
    """run_info.json of the run (written before training starts), flattened to `run_info/<key>` scalars and
    strings; {} when the command writes none."""
    path = Path(output_dir) / "run_info.json"
    if not path.is_file():
        return {}
    facts: dict[str, Any] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                flatten(f"{prefix}/{key}", inner)
        else:
            facts[prefix] = value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)

    flatten("run_info", json.loads(path.read_text(encoding="utf-8")))
    return facts


class RunInfoCallback(TrainerCallback):
    """Give the trackers of `report_to` the run_info.json facts (hashes, parameters, plan, versions, commit) at the
    start of training, next to the config transformers' integrations record themselves (TrainingArguments and the
    model config). Added after the trackers' own callbacks, so their runs are open; through the trackers' public
    module APIs (`trackio.config`, `wandb.config`) and TensorBoardCallback's writer."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        facts = run_info_facts(args.output_dir)
        if not facts:
            return
        for callback in self.trainer.callback_handler.callbacks:
            if type(callback).__name__ == "TensorBoardCallback" and callback.tb_writer is not None:
                rows = "\n".join(f"| {key} | {value} |" for key, value in facts.items())
                callback.tb_writer.add_text("run_info", f"| fact | value |\n|---|---|\n{rows}")
                callback.tb_writer.flush()
        names = [args.report_to] if isinstance(args.report_to, str) else args.report_to or []
        if "trackio" in names:
            import trackio

            trackio.config.update(facts, allow_val_change=True)
        if "wandb" in names:
            import wandb

            if wandb.run is not None:
                wandb.config.update(facts, allow_val_change=True)
