"""`PretrainTrainer`: transformers' Trainer with Muon and pretraining metrics in its logs.

Every training log gets tokens/s (all devices), MFU and (for MoE models) router load; every evaluation log gets the
validation perplexity; both get the wall time since this session's `train()` began. The metrics go through `Trainer.log`, so the progress bar, tensorboard/wandb/trackio and
`trainer_state.json` all see them. `HealthTrainerMixin` adds the training-health hooks (hfllm/training/health.py), `EngineTrainerMixin` the
engine's CPU workarounds and its check (hfllm/training/distributed.py).
"""

import math
import time

from transformers import Trainer

from .callbacks import RouterLoadCallback
from .distributed import EngineTrainerMixin
from .health import HealthTrainerMixin
from .optim import build_muon


class PretrainTrainer(EngineTrainerMixin, HealthTrainerMixin, Trainer):
    def __init__(self, *args, flops_per_token: float, peak_flops: float, tokens_per_step: int,
                 router_load: RouterLoadCallback | None = None, **kwargs):
        """`router_load`: the MoE callback (also in `callbacks`) whose router load goes into the training logs."""
        super().__init__(*args, **kwargs)
        self.router_load = router_load
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops  # per device
        self.tokens_per_step = tokens_per_step  # over all devices
        self._last_log: tuple[float, int] | None = None  # (time, global step) of the previous training log
        self._train_start = time.perf_counter()

    def train(self, *args, **kwargs):
        self._train_start = time.perf_counter()
        return super().train(*args, **kwargs)

    def create_optimizer(self, model=None):
        if self.args.use_muon and self.optimizer is None:
            opt_model = self.model if model is None else model
            self.optimizer = build_muon(opt_model, self.args, set(self.get_decay_parameter_names(opt_model)))
            return self.optimizer
        return super().create_optimizer(model)

    def floating_point_ops(self, inputs: dict) -> float:
        """FLOPs of one forward + backward on `inputs` (for `total_flos`): from the FLOPs per token computed once at
        start, instead of Trainer's count of the parameters at every step."""
        return self.flops_per_token * inputs["input_ids"].numel()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            now, step = time.perf_counter(), self.state.global_step
            if self._last_log is not None and step > self._last_log[1]:
                tokens_per_second = (step - self._last_log[1]) * self.tokens_per_step / (now - self._last_log[0])
                logs["tokens_per_second"] = round(tokens_per_second, 1)
                logs["mfu"] = round(tokens_per_second * self.flops_per_token / (self.peak_flops * self.args.world_size), 4)
            self._last_log = (now, step)
            if self.router_load is not None:
                logs.update(self.router_load.pop_metrics())
        if "eval_loss" in logs:
            logs["eval_perplexity"] = round(math.exp(min(logs["eval_loss"], 50.0)), 4)
        if "loss" in logs or "eval_loss" in logs:
            logs["elapsed_seconds"] = round(time.perf_counter() - self._train_start, 2)  # wall time of this session
        super().log(logs, start_time)

    def _evaluate(self, *args, **kwargs):
        metrics = super()._evaluate(*args, **kwargs)
        if self._last_log is not None:  # evaluation time is not training throughput
            self._last_log = (time.perf_counter(), self._last_log[1])
        return metrics
