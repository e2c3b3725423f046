"""Evaluate during training: lm-eval tasks and regression prompts every N steps and at the last step, logged like
the loss. Recipes ask for it with `eval_tasks:` / `regression_prompts:` (hfllm/training/tracking.py); in Python:

    trainer = Trainer(...)  # or any TRL trainer
    trainer.add_callback(EvalCallback(trainer, tasks=["hfllm_shakespeare_ppl"], every_n_steps=500, limit=20,
                                      regression_prompts=[{"prompt": "What is 2 + 2?", "pattern": r"\\b4\\b"}]))

Scores are logged with Trainer's own `log`, so they reach every tracker in `report_to` and
`trainer.state.log_history`, as `eval_tasks/<task>/<metric>` and `eval_tasks/regression_prompts/pass_rate`
(the trackers show them under `eval/tasks/...`, beside `eval/loss`). `save_scores` adds the last ones to
eval_results.json.
"""

import json
import math
import re
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback

from ..generation import generate_texts
from .harness import evaluate_model, load_tasks, scores


PREFIX = "eval_tasks/"  # "eval_" makes the trackers file them under eval/, as eval_loss
REGRESSION = "regression_prompts"


class EvalCallback(TrainerCallback):
    def __init__(
        self,
        trainer,
        tasks: list[str] | None = None,
        every_n_steps: float = 500,
        limit: float | None = 20,
        batch_size: int = 1,
        apply_chat_template: bool = False,
        regression_prompts: list[dict] | None = None,
        max_new_tokens: int = 32,
    ):
        """`regression_prompts`: [{"prompt": str, "pattern": regex}]; a prompt passes when a greedy generation
        (chat template applied when `apply_chat_template`) matches its pattern. `every_n_steps` below 1 is a fraction
        of max_steps (as Trainer reads eval_steps)."""
        self.trainer = trainer
        self.tasks = load_tasks(tasks) if tasks else []  # resolved and checked now, not at step N
        self.every_n_steps = every_n_steps
        self.limit, self.batch_size, self.apply_chat_template = limit, batch_size, apply_chat_template
        self.regression_prompts = [(p["prompt"], re.compile(p["pattern"])) for p in regression_prompts or []]
        self.max_new_tokens = max_new_tokens
        self.latest: dict[str, float] = {}  # the last scores logged, and their step
        self.latest_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        if self.every_n_steps < 1:
            self.every_n_steps = max(1, math.ceil(self.every_n_steps * state.max_steps))
        self.every_n_steps = int(self.every_n_steps)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if (step % self.every_n_steps == 0 or step == state.max_steps) and state.is_world_process_zero:
            start = time.perf_counter()
            logs = self.evaluate(model)
            if hasattr(self.trainer, "throughput"):  # PretrainTrainer: evaluation time is not training tokens/s
                self.trainer.throughput.add_evaluation(time.perf_counter() - start)
            # Trainer's own log: TRL's `log` would fold (and clear) its running training metrics into this entry.
            # Logging clears should_log, which would drop this step's training log (loss, grad norm): kept
            due = control.should_log
            Trainer.log(self.trainer, dict(logs))  # (it adds the epoch to the dict it is given)
            control.should_log = self.trainer.control.should_log = due
            self.latest, self.latest_step = logs, step

    def save_scores(self, output_dir: str) -> dict[str, float]:
        """Add the last scores to output_dir/eval_results.json (the final report, beside the final eval loss), print
        them, and return them ({} when none were logged)."""
        if not self.latest or not self.trainer.is_world_process_zero():
            return {}
        path = Path(output_dir) / "eval_results.json"
        existing = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        self.trainer.save_metrics("eval", {**existing, **self.latest, f"{PREFIX}step": self.latest_step})
        self.trainer.log_metrics(f"eval_tasks at step {self.latest_step}", self.latest)
        return self.latest

    def evaluate(self, model) -> dict[str, float]:
        tokenizer = self.trainer.processing_class
        logs = {}
        if self.tasks:
            results = evaluate_model(model, tokenizer, self.tasks, self.limit, self.batch_size, self.apply_chat_template)
            for task, metrics in scores(results).items():
                logs.update({f"{PREFIX}{task}/{metric}": value for metric, value in metrics.items() if metric != "sample_len"})
        if self.regression_prompts:
            outputs = self.generate(model, tokenizer, [prompt for prompt, _ in self.regression_prompts])
            passed = [bool(pattern.search(text)) for (_, pattern), text in zip(self.regression_prompts, outputs)]
            logs[f"{PREFIX}{REGRESSION}/pass_rate"] = sum(passed) / len(passed)
        return logs

    def generate(self, model, tokenizer, prompts: list[str]) -> list[str]:
        """Greedy completions of each prompt, one at a time (no padding to get wrong)."""
        return generate_texts(model, tokenizer, prompts, chat=self.apply_chat_template,
                              max_new_tokens=self.max_new_tokens, do_sample=False)
