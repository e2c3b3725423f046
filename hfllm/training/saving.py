"""Checkpoints and the final model that are complete or absent (docs/reliability.md).

`AtomicSavingMixin` (before the Trainer class; `with_health` and `PretrainTrainer` put it there) writes checkpoint-N
under a hidden name and renames it once verified (hfllm.checkpoint.checkpoint_problem), and writes the final model
aside and moves it in with its config last (`atomic_output(merge=True)`); after each move the sha256 of its weights
files go into run_info.json (`record_weights`). A full disk is `DiskFull`: the folder, the bytes it needs, the bytes
free.
"""

import os
import shutil
from contextlib import nullcontext
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..checkpoint import atomic_output, checkpoint_problem, weights_problem
from ..errors import DiskFull, TrainingHalted, is_disk_full
from .run_info import record_weights


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
        writer = (atomic_output(target, merge=True, staging=staging, needs=weights_bytes(self.model))
                  if self.args.should_save else nullcontext(staging))
        with writer as folder:
            self.accelerator.wait_for_everyone()  # the staging folder exists (and is empty) before anyone writes
            super().save_model(str(folder), _internal_call=True)  # True: no Hub push of the staging folder
            self.accelerator.wait_for_everyone()
            problem = weights_problem(folder) if self.args.should_save else None
            if problem is not None:
                raise TrainingHalted(f"the final model failed its check after writing ({problem}); it was not "
                                     f"kept in {target}")
        if self.args.should_save and Path(target) == Path(self.args.output_dir):
            record_weights(target, target)  # the run's provenance: sha256 of the weights now in place
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
        except BaseException as error:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if is_disk_full(error) and not isinstance(error, DiskFull):
                raise DiskFull(run_dir / name, checkpoint_bytes(self)) from error
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
        record_weights(final.parent, final)  # after the move and the rotation: the checkpoints that remain


def weights_bytes(model) -> int:
    """The bytes of a model's parameters as saved (a ZeRO-3 partition counts whole: `ds_numel`)."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in model.parameters())


def checkpoint_bytes(trainer) -> int:
    """About the bytes of one checkpoint: the weights and the optimizer's state tensors (AdamW: two per weight; a
    wrapped optimizer without a readable state counts as AdamW)."""
    weights = weights_bytes(trainer.model)
    state = getattr(trainer.optimizer, "state", None)
    if not isinstance(state, dict) or not state:
        return 3 * weights
    optimizer = sum(t.numel() * t.element_size() for values in state.values() for t in values.values()
                    if hasattr(t, "numel"))
    return weights + optimizer
