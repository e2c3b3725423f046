"""`PretrainTrainer`: transformers' Trainer with Muon/SOAP, sequence-length warmup and pretraining metrics in its logs.

Every training log gets tokens/s (all devices), MFU and (for MoE models) router load; every evaluation log gets the
validation perplexity; both get the wall time since this session's `train()` began. The first training log (step 1
with `logging_first_step`) gets `seconds_to_first_step`: from the process start (the command) to the end of that
step, imports, data, model and compilation included. With `sequence_length_schedule`, training logs get the
`sequence_length` of the step. The metrics go through `Trainer.log`, so the progress bar, tensorboard/wandb/trackio and
`trainer_state.json` all see them. `HealthTrainerMixin` adds the training-health hooks (hfllm/training/health.py),
`AtomicSavingMixin` checkpoints and a final model complete or absent (saving.py), `StrategyTrainerMixin` the strategy's
CPU workarounds and its check (hfllm/training/distributed.py).
"""

import math
import time
from dataclasses import dataclass

import psutil
from transformers import Trainer

from ..data.packing import cut_blocks
from .callbacks import RouterLoadCallback
from .distributed import StrategyTrainerMixin
from .health import HealthTrainerMixin
from .optim import build_optimizer
from .saving import AtomicSavingMixin


@dataclass
class ThroughputWindow:
    """Tokens/s and MFU between two training logs, the time spent evaluating left out."""

    tokens_per_step: int  # over all devices
    flops_per_token: float
    peak_flops: float  # over all devices
    start: tuple[float, int] | None = None  # (time, global step) of the previous training log
    eval_seconds: float = 0.0  # spent evaluating since that log: not training throughput

    def add_evaluation(self, seconds: float) -> None:
        self.eval_seconds += seconds

    def close(self, now: float, step: int) -> dict[str, float]:
        """The metrics of the window that ends at this training log (none at the first log, or at the same step);
        the next window starts here."""
        metrics = {}
        if self.start is not None and step > self.start[1]:
            tokens_per_second = (step - self.start[1]) * self.tokens_per_step / (now - self.start[0] - self.eval_seconds)
            metrics = {"tokens_per_second": round(tokens_per_second, 1),
                       "mfu": round(tokens_per_second * self.flops_per_token / self.peak_flops, 4)}
        self.start, self.eval_seconds = (now, step), 0.0
        return metrics


class PretrainTrainer(StrategyTrainerMixin, HealthTrainerMixin, AtomicSavingMixin, Trainer):
    def __init__(self, *args, flops_per_token: float, peak_flops: float, tokens_per_step: int,
                 router_load: RouterLoadCallback | None = None, sequence_lengths: dict[int, int] | None = None,
                 **kwargs):
        """`router_load`: the MoE callback (also in `callbacks`) whose router load goes into the training logs;
        `sequence_lengths`: {first step: row length} (`arguments.sequence_lengths`), None for whole blocks."""
        super().__init__(*args, **kwargs)
        self.sequence_lengths = sequence_lengths
        self._sequence_length: int | None = None  # of the step being trained
        self._first_step_logged = False
        self.router_load = router_load
        self.flops_per_token = flops_per_token
        # `peak_flops` per device, `tokens_per_step` over all devices
        self.throughput = ThroughputWindow(tokens_per_step, flops_per_token, peak_flops * self.args.world_size)
        self._train_start = time.perf_counter()

    def train(self, *args, **kwargs):
        self._train_start = time.perf_counter()
        return super().train(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.args.own_optimizer and self.optimizer is None:
            opt_model = self.model if model is None else model
            decay_names = set(self.get_decay_parameter_names(opt_model))
            self.optimizer = build_optimizer(self.args.own_optimizer, opt_model, self.args, decay_names)
            return self.optimizer
        return super().create_optimizer(model)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device):
        """The batches of one optimizer step; with a sequence-length schedule, their blocks cut into rows of the
        step's length before Trainer counts the predicted tokens (the loss is averaged over those)."""
        if self.sequence_lengths is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        step = self.state.global_step  # optimizer steps done so far: this is step `step` counted from 0
        length = next(length for start, length in reversed(self.sequence_lengths.items()) if start <= step)
        batches, num_items = super().get_batch_samples(
            (cut_blocks(batch, length) for batch in epoch_iterator), num_batches, device
        )
        if batches:
            self._sequence_length = batches[0]["input_ids"].shape[1]  # (rows, length): what the model is given
        return batches, num_items

    def floating_point_ops(self, inputs: dict) -> float:
        """FLOPs of one forward + backward on `inputs` (for `total_flos`): from the FLOPs per token computed once at
        start, instead of Trainer's count of the parameters at every step."""
        return self.flops_per_token * inputs["input_ids"].numel()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.throughput.close(time.perf_counter(), self.state.global_step))
            if self.router_load is not None:
                logs.update(self.router_load.pop_metrics())
            if self.sequence_lengths is not None:
                logs["sequence_length"] = self._sequence_length
            if not self._first_step_logged:  # the command's start-up: imports, data, model, compilation, step 1
                logs["seconds_to_first_step"] = round(time.time() - psutil.Process().create_time(), 2)
                self._first_step_logged = True
        if "eval_loss" in logs:
            logs["eval_perplexity"] = round(math.exp(min(logs["eval_loss"], 50.0)), 4)
        if "loss" in logs or "eval_loss" in logs:
            logs["elapsed_seconds"] = round(time.perf_counter() - self._train_start, 2)  # wall time of this session
        super().log(logs, start_time)

    def _evaluate(self, *args, **kwargs):
        start = time.perf_counter()
        metrics = super()._evaluate(*args, **kwargs)
        self.throughput.add_evaluation(time.perf_counter() - start)
        return metrics
