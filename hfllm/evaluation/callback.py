"""Evaluate during training: lm-eval tasks and regression prompts every N steps, logged like the loss.

    trainer = Trainer(...)  # or any TRL trainer
    trainer.add_callback(EvalCallback(trainer, tasks=["hfllm_shakespeare_ppl"], every_n_steps=500, limit=20,
                                      regression_prompts=[{"prompt": "What is 2 + 2?", "pattern": r"\\b4\\b"}]))

Scores go through `trainer.log`, so they reach every logger in `report_to` (tensorboard, wandb, trackio) and
`trainer.state.log_history`, as `eval/<task>/<metric>` and `eval/regression/pass_rate`.
"""

import re

from transformers import TrainerCallback

from ..generation import generate_texts
from .harness import evaluate_model, load_tasks, scores


class EvalCallback(TrainerCallback):
    def __init__(
        self,
        trainer,
        tasks: list[str] | None = None,
        every_n_steps: int = 500,
        limit: float | None = 20,
        batch_size: int = 1,
        apply_chat_template: bool = False,
        regression_prompts: list[dict] | None = None,
        max_new_tokens: int = 32,
    ):
        """`regression_prompts`: [{"prompt": str, "pattern": regex}]; a prompt passes when a greedy generation
        (chat template applied when `apply_chat_template`) matches its pattern."""
        self.trainer = trainer
        self.tasks = load_tasks(tasks) if tasks else []  # resolved and checked now, not at step N
        self.every_n_steps = every_n_steps
        self.limit, self.batch_size, self.apply_chat_template = limit, batch_size, apply_chat_template
        self.regression_prompts = [(p["prompt"], re.compile(p["pattern"])) for p in regression_prompts or []]
        self.max_new_tokens = max_new_tokens

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every_n_steps == 0 and state.is_world_process_zero:
            self.trainer.log(self.evaluate(model))

    def evaluate(self, model) -> dict[str, float]:
        tokenizer = self.trainer.processing_class
        logs = {}
        if self.tasks:
            results = evaluate_model(model, tokenizer, self.tasks, self.limit, self.batch_size, self.apply_chat_template)
            for task, metrics in scores(results).items():
                logs.update({f"eval/{task}/{metric}": value for metric, value in metrics.items() if metric != "sample_len"})
        if self.regression_prompts:
            outputs = self.generate(model, tokenizer, [prompt for prompt, _ in self.regression_prompts])
            passed = [bool(pattern.search(text)) for (_, pattern), text in zip(self.regression_prompts, outputs)]
            logs["eval/regression/pass_rate"] = sum(passed) / len(passed)
        return logs

    def generate(self, model, tokenizer, prompts: list[str]) -> list[str]:
        """Greedy completions of each prompt, one at a time (no padding to get wrong)."""
        return generate_texts(model, tokenizer, prompts, chat=self.apply_chat_template,
                              max_new_tokens=self.max_new_tokens, do_sample=False)
