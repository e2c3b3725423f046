"""One run lifecycle for every training command: `hfllm pretrain` and `hfllm sft|dpo|orpo|kto|grpo`.

Each command is parse -> build -> run:

    parts = build(recipe)                # model, tokenizer, datasets, trainer, callbacks; no file written yet
    result = run(parts, prog, argv)      # output folder, recipe, train, preemption, final save and evaluation

The command line returns `result.exit_code`; the Python API (`hfllm.pretrain`, `hfllm.sft`, ...) returns the
`RunResult` itself: the same path, the same errors (`HfllmError`, with the CLI's line).

`run` owns everything a run does on disk and at its end, the same for every command: the output folder is cleared
(overwrite) and the resolved recipe saved; SIGTERM / SIGINT saves the trainer state and a checkpoint, prints the
resume command and exits 143 / 130; a run stopped early (stop_at_step) saves its state; the final model is written
atomically (HealthTrainerMixin.save_model) with its trainer state and tokenizer; the final evaluation reuses the one
run at the last step. Callbacks passed to `build` replace the command's default callback of the same class
(`with_defaults`): this is how tests put faults and signals in.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from ..checkpoint import check_output_dir, clear_output_dir
from ..recipe import Recipe
from .callbacks import reached_eval_loss
from .health import HEALTH_KEYS
from .preemption import PreemptionCallback, resume_command

# Recipe keys that may change between a run and its resumption, for every command (each adds its own)
SESSION_KEYS = frozenset({"resume_from_checkpoint", "overwrite_output_dir", "report_to", "logging_steps",
                          "disable_tqdm", "dataloader_num_workers", "eval_steps", "save_steps", "save_total_limit",
                          "run_name", *HEALTH_KEYS})


@dataclass
class Parts:
    """What a command's `build` returns. The trainer holds the model, the datasets and the callbacks."""

    recipe: Recipe
    trainer: Trainer  # with HealthTrainerMixin: checks, atomic checkpoints and final model
    tokenizer: Any
    preemption: PreemptionCallback  # among the trainer's callbacks
    resume: str | None  # the checkpoint to resume from (check_output_dir)
    overwrite: bool  # overwrite_output_dir: an earlier run in the folder is cleared before anything is written
    leave_out: tuple[str, ...]  # recipe keys not saved with the run (they belong to one session)
    final_eval_logged: bool  # True: the final evaluation goes into the log history before the save (pretraining's
    # loss curve); False: into eval_results.json after it (TRL methods)
    write_outputs: Callable[[], None] = lambda: None  # the command's own files beside recipe.yaml (main process)
    finish: Callable[[], None] = lambda: None  # the command's own work after the final save (samples, scores)
    output_opened: bool = False  # the folder was opened during build (several processes share a tokenizer there)


def output_policy(recipe: Recipe, args, overwrite: bool, session_keys: frozenset[str]) -> str | None:
    """The output folder checked before any work (read only): the checkpoint to resume from, or None."""
    return check_output_dir(args.output_dir, run=recipe, resume=args.resume_from_checkpoint, overwrite=overwrite,
                            session_keys=session_keys)


def open_output_dir(recipe: Recipe, output_dir: str, resume: str | None, overwrite: bool,
                    leave_out: tuple[str, ...]) -> None:
    """Everything is checked: clear an earlier run (overwrite, not resuming) and save the resolved recipe."""
    if overwrite and resume is None:
        clear_output_dir(output_dir)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    recipe.save(output_dir, leave_out=leave_out)


def with_defaults(defaults: Sequence[TrainerCallback], given: Sequence[TrainerCallback]) -> list[TrainerCallback]:
    """`defaults` with each one replaced by a `given` callback of its class (or a subclass); the other `given`
    callbacks after them."""
    used: list[TrainerCallback] = []
    chosen = []
    for default in defaults:
        match = next((cb for cb in given if isinstance(cb, type(default)) and cb not in used), None)
        used += [match] if match is not None else []
        chosen.append(match or default)
    return chosen + [cb for cb in given if cb not in used]


def final_metrics(trainer: Trainer) -> dict | None:
    """The evaluation at the end of training: the one logged at the last step if there is one, else run now
    (None without evaluation)."""
    if trainer.args.eval_strategy == "no" or trainer.eval_dataset is None:
        return None
    step = trainer.state.global_step
    done = [log for log in trainer.state.log_history if "eval_loss" in log and log.get("step") == step]
    return {k: v for k, v in done[-1].items() if k != "step"} if done else trainer.evaluate()


@dataclass
class RunResult:
    """What a training run left: its folder, how far it went, its final evaluation and its log history.

        result = hfllm.pretrain("recipes/tiny.yaml", max_steps=50)
        result.metrics["eval_loss"]; result.losses()[-1]; model, tokenizer = result.load()

    In a notebook, the result shows as a summary with its loss curve."""

    output_dir: Path
    exit_code: int  # 0: finished (or stopped before max_steps, resumable); 130 / 143: interrupted, checkpoint saved
    step: int  # the optimizer steps done
    max_steps: int
    metrics: dict[str, float]  # the final evaluation (eval_loss, ...); empty without an evaluation set
    log_history: list[dict]  # Trainer's log: one entry per logging or evaluation step

    @property
    def finished(self) -> bool:
        return self.exit_code == 0 and self.step >= self.max_steps

    def losses(self, key: str = "loss") -> list[tuple[int, float]]:
        """(step, value) of a logged quantity: "loss" (training), "eval_loss", "learning_rate", "grad_norm", ..."""
        return [(entry["step"], entry[key]) for entry in self.log_history if key in entry]

    def load(self, **kwargs) -> tuple[Any, Any]:
        """The saved model and tokenizer (hfllm.checkpoint.load: hfllm, native and adapter folders alike)."""
        from ..checkpoint import load

        return load(self.output_dir, **kwargs)

    def plot(self):
        """The training and validation loss against the step, as a matplotlib figure (shown inline in a notebook)."""
        from ..plots import loss_figure

        return loss_figure(self.log_history)

    def __repr__(self) -> str:
        state = "finished" if self.finished else f"stopped (exit code {self.exit_code})"
        shown = ", ".join(f"{key} {value:.4g}" for key, value in self.metrics.items()
                          if key in ("eval_loss", "eval_perplexity", "eval_rewards/accuracies"))
        return (f"RunResult({state} at step {self.step}/{self.max_steps}{', ' + shown if shown else ''}; "
                f"output_dir '{self.output_dir}')")

    def _repr_html_(self) -> str:
        """The notebook view: the summary line and the loss curve."""
        import base64
        import html
        import io

        import matplotlib.pyplot as plt

        figure = self.plot()
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=80)
        plt.close(figure)
        image = base64.b64encode(png.getvalue()).decode()
        return f"<p><code>{html.escape(repr(self))}</code></p><img src='data:image/png;base64,{image}'/>"


def run(parts: Parts, prog: str, argv: list) -> RunResult:
    """Train the built parts to the end, a preemption or a stop (TrainingHalted, exit code 3, is raised when the
    health checks stop the run)."""
    trainer = parts.trainer
    args = trainer.args

    def result(exit_code: int, metrics: dict | None = None) -> RunResult:
        return RunResult(Path(args.output_dir), exit_code, trainer.state.global_step, trainer.state.max_steps,
                         dict(metrics or {}), list(trainer.state.log_history))

    if args.should_save:
        if not parts.output_opened:
            open_output_dir(parts.recipe, args.output_dir, parts.resume, parts.overwrite, parts.leave_out)
        parts.write_outputs()
    trainer.train(resume_from_checkpoint=parts.resume)
    step, max_steps = trainer.state.global_step, trainer.state.max_steps

    # ---- preemption (SIGTERM / SIGINT): Trainer saved its checkpoint at this step
    if parts.preemption.received and step < max_steps:
        trainer.save_state()
        trainer.accelerator.wait_for_everyone()  # no process exits before every part is written
        if args.should_save:
            print(f"interrupted at step {step} of {max_steps}; checkpoint saved; resume with:\n"
                  f"{resume_command(prog, argv)}", flush=True)
        return result(parts.preemption.exit_code)

    # ---- stopped before max_steps: the eval-loss target (a pretraining key) or stop_at_step
    reached = reached_eval_loss(args, trainer.state.log_history) if hasattr(args, "stop_at_eval_loss") else None
    if reached is not None and args.should_save:
        print(f"eval_loss {reached['eval_loss']:.4f} <= stop_at_eval_loss {args.stop_at_eval_loss} at step "
              f"{reached['step']}: training ends here", flush=True)
    if step < max_steps and reached is None:
        trainer.save_state()
        print(f"stopped at step {step} of {max_steps}; continue with --resume_from_checkpoint true")
        return result(0)

    # ---- the final model (written aside, moved in when complete), its state and tokenizer, the final evaluation
    metrics = final_metrics(trainer) if parts.final_eval_logged else None  # before the save: trainer_state.json
    trainer.save_model(args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history (loss curve) next to the model
    if not (Path(args.output_dir) / "tokenizer_config.json").exists():  # not every trainer saves it
        parts.tokenizer.save_pretrained(args.output_dir)
    if not parts.final_eval_logged and (metrics := final_metrics(trainer)) is not None:
        trainer.log_metrics("eval", metrics)  # DPO: eval_rewards/accuracies and /margins: preference accuracy, margin
        trainer.save_metrics("eval", metrics)
    parts.finish()
    return result(0, metrics)
