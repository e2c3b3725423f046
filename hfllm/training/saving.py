"""Checkpoints and the final model that are complete or absent (docs/reliability.md).

`AtomicSavingMixin` (before the Trainer class; `with_health` and `PretrainTrainer` put it there) writes checkpoint-N
under a hidden name and renames it once verified (hfllm.checkpoint.checkpoint_problem), and writes the final model
aside and moves it in with its config last (`atomic_output(merge=True)`).
"""

import os
import shutil
from contextlib import nullcontext
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..checkpoint import atomic_output, checkpoint_problem, weights_problem
from ..errors import TrainingHalted


class AtomicSavingMixin:
    """Trainer's saving, made atomic: nothing half-written is ever visible under its final name."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._staging: str | None = None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A checkpoint's model goes where `_save_checkpoint` stages it; the final model (a call from outside) is
        written into `output_dir/.model.partial/` by every process, checked (`weights_problem`) and moved into
        `output_dir` with config.json / adapter_config.json last (`atomic_output(merge=True)`), so a crash or a full
        disk never leaves a loadable half-written model."""
        target = output_dir or self.args.output_dir
        if _internal_call:
            return super().save_model(output_dir, _internal_call)
        staging = Path(target) / ".model.partial"
        self.accelerator.wait_for_everyone()
        writer = atomic_output(target, merge=True, staging=staging) if self.args.should_save else nullcontext(staging)
        with writer as folder:
            self.accelerator.wait_for_everyone()  # the staging folder exists (and is empty) before anyone writes
            super().save_model(str(folder), _internal_call=True)  # True: no Hub push of the staging folder
            self.accelerator.wait_for_everyone()
            problem = weights_problem(folder) if self.args.should_save else None
            if problem is not None:
                raise TrainingHalted(f"the final model failed its check after writing ({problem}); it was not "
                                     f"kept in {target}")
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:  # what Trainer.save_model does after a call from outside
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _get_output_dir(self, trial) -> str:
        return self._staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written under `.checkpoint-N.partial/`, checked (`checkpoint_problem`) and renamed to
        checkpoint-N; only then are old checkpoints rotated out (save_total_limit), so the last complete one stays
        until the new one is complete."""
        if trial is not None or self.hp_search_backend is not None:
            return super()._save_checkpoint(model, trial)
        run_dir = Path(self.args.output_dir)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f".{name}.partial"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self._publish(staging, run_dir / name)
        self.accelerator.wait_for_everyone()

    def _publish(self, staging: Path, final: Path) -> None:
        written = staging / final.name
        problem = checkpoint_problem(written)
        if problem is not None:
            shutil.rmtree(staging, ignore_errors=True)
            raise TrainingHalted(f"checkpoint {final} failed its check after writing ({problem}); it was not kept")
        best = self.state.best_model_checkpoint
        if best is not None and Path(best).parent == staging:  # Trainer named the staged folder as the best one
            self.state.best_model_checkpoint = str(final)
            self.state.save_to_json(str(written / "trainer_state.json"))
        if final.exists():  # an earlier copy of this step (e.g. a corrupt one skipped on resume): swap it out
            old = final.parent / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(written, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(written, final)
        shutil.rmtree(staging, ignore_errors=True)
        rotate_checkpoints(output_dir=str(final.parent), save_total_limit=self.args.save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
