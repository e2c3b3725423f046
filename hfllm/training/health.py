"""Runs that survive, numerically: non-finite losses and spikes caught, non-finite weights never saved
(docs/reliability.md).

One component for `hfllm pretrain` and every TRL method (`hfllm sft|dpo|orpo|kto|grpo`), built on transformers'
Trainer machinery (TRL's trainers subclass `transformers.Trainer`):

    HealthArguments      the recipe keys nan_action, spike_zscore, spike_window, spike_action, health_log_steps
    HealthCallback       per optimizer step: ok, drop the update (skip) or stop with a report; per-layer-group
                         gradient norms, update/weight ratios and decoder-layer activation RMS for the logs
    HealthTrainerMixin   the Trainer hooks: hands the loss and gradient norm to HealthCallback, adds its metrics to
                         the training logs, refuses to save non-finite weights, saves no checkpoint after a stop
    with_health(cls)     a TRL trainer class with the mixin and AtomicSavingMixin (saving.py: checkpoints and the
                         final model complete or absent)

Preemption is preemption.py; the lifecycle that runs them all is lifecycle.py:

    trainer = with_health(SFTTrainer)(..., callbacks=[HealthCallback(args), PreemptionCallback()])
    trainer.train()                      # raises TrainingHalted (exit code 3) when the health checks stop the run
"""

import collections
import math
import sys
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from ..checkpoint import find_checkpoint
from ..errors import HfllmError, TrainingHalted
from .saving import AtomicSavingMixin

GROUPS = ("embeddings", "attention", "mlp", "norms", "head", "other")
MIN_SPIKE_HISTORY = 10  # losses in the window before spikes are judged (or spike_window, if smaller)
HEALTH_KEYS = frozenset({"nan_action", "spike_zscore", "spike_window", "spike_action", "health_log_steps"})


@dataclass
class HealthArguments:
    """Recipe keys of the training-health checks (pretraining and every TRL method; docs/reliability.md)."""

    nan_action: Literal["stop", "skip"] = field(
        default="stop",
        metadata={"help": "a non-finite loss or gradient norm: stop (with a report, exit code 3) or skip (drop that "
                          "optimizer update and go on)"},
    )
    spike_zscore: float = field(
        default=6.0, metadata={"help": "a loss this many standard deviations above the mean of the last spike_window "
                                       "losses is a spike"}
    )
    spike_window: int = field(default=50, metadata={"help": "optimizer steps in the running loss statistics"})
    spike_action: Literal["warn", "skip", "stop"] = field(
        default="warn", metadata={"help": "a loss spike: warn, skip (drop that update) or stop (with a report)"}
    )
    health_log_steps: int | None = field(
        default=None,
        metadata={"help": "every this many steps, log per-layer-group gradient norms, update/weight ratios and "
                          "activation RMS (default: logging_steps)"},
    )


def check_health_arguments(args) -> None:
    """One line for values out of range (the choices are checked by the recipe parser)."""
    if not args.spike_zscore > 0:
        raise HfllmError(f"spike_zscore must be positive, got {args.spike_zscore}")
    if args.spike_window < 2:
        raise HfllmError(f"spike_window must be at least 2 steps, got {args.spike_window}")
    if args.health_log_steps is not None and args.health_log_steps < 1:
        raise HfllmError(f"health_log_steps must be at least 1 (or null for logging_steps), got {args.health_log_steps}")


def _whole(value: torch.Tensor) -> torch.Tensor:
    """A sum over a sharded parameter (a DTensor of tensor parallel or FSDP2, partial on each rank) summed over the
    ranks; a plain tensor as it is. A collective for a DTensor: every rank calls it."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def parameter_group(name: str) -> str:
    """The layer group of a parameter name: embeddings, attention, mlp, norms, head or other."""
    lowered = name.lower()
    if "lm_head" in lowered or "score." in lowered:
        return "head"
    if "embed" in lowered or ".wte." in lowered or ".wpe." in lowered:
        return "embeddings"
    if "norm" in lowered or ".ln_" in lowered:
        return "norms"
    if "attn" in lowered or "attention" in lowered:
        return "attention"
    if "mlp" in lowered or "expert" in lowered or "feed_forward" in lowered or "ffn" in lowered:
        return "mlp"
    return "other"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of a causal LM (also under a PEFT wrapper): the first ModuleList named layers, h or blocks."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            return list(module)
    return []


def any_rank(flag: int) -> int:
    """The largest `flag` over all processes (every process must take the same decision)."""
    if dist.is_available() and dist.is_initialized():
        device = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
        tensor = torch.tensor([flag], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())
    return flag


class HealthCallback(TrainerCallback):
    """Numerical health of every optimizer step. `HealthTrainerMixin` hands it the step's loss (sum over the
    micro-batches, as Trainer logs it) and the gradient norm before clipping; at `on_pre_optimizer_step` it decides:

    - non-finite loss or gradient norm: `nan_action` (stop | skip);
    - loss spike (z-score of the loss against the last `spike_window` accepted losses above `spike_zscore`, judged
      once MIN_SPIKE_HISTORY losses are in): `spike_action` (warn | skip | stop).

    Skip drops the update: every gradient is set to None, so the optimizer leaves the weights and its moments as they
    are (the learning-rate schedule still advances). Stop drops the update too, ends training after this step
    without saving, prints a report (step, last good checkpoint, likely causes) and `HealthTrainerMixin.train`
    raises TrainingHalted. With fp16, non-finite gradients under a finite loss are left to the loss scaler.
    """

    def __init__(self, args=None):
        args = args or HealthArguments()
        check_health_arguments(args)
        self.nan_action, self.spike_action = args.nan_action, args.spike_action
        self.spike_zscore, self.health_log_steps = args.spike_zscore, args.health_log_steps
        self.window: collections.deque[float] = collections.deque(maxlen=args.spike_window)
        self.skipped: list[int] = []  # steps whose update was dropped
        self.spikes: list[int] = []  # steps with a loss spike (any action)
        self.halt: str | None = None  # one-line summary once the run must stop
        self.report: str | None = None
        self.step_loss: torch.Tensor | None = None
        self.grad_norm: float | torch.Tensor | None = None
        self.every = 1
        self.stats_step = False
        self._grad_sq: dict[str, torch.Tensor] | None = None
        self._before: list[tuple[str, torch.nn.Parameter, torch.Tensor]] | None = None
        self._activations: dict[int, list[torch.Tensor]] = collections.defaultdict(list)
        self._hooks: list = []
        self._metrics: dict[str, float] = {}

    # ---- values handed over by HealthTrainerMixin

    def add_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.step_loss = loss if self.step_loss is None else self.step_loss + loss

    def observe_gradients(self, model: torch.nn.Module) -> None:
        """Per-group squared gradient norms, before clipping (on statistics steps only)."""
        if not self.stats_step or self._grad_sq is not None:
            return
        squares: dict[str, torch.Tensor] = {}
        for name, param in model.named_parameters():
            if param.grad is not None:
                group = parameter_group(name)
                value = _whole(param.grad.detach().float().pow(2).sum())
                squares[group] = squares[group] + value if group in squares else value
        self._grad_sq = squares

    # ---- Trainer events

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.every = self.health_log_steps or max(1, int(state.logging_steps or args.logging_steps or 1))
        self.halt = self.report = None
        for index, layer in enumerate(decoder_layers(model)):
            self._hooks.append(layer.register_forward_hook(self._activation_hook(index)))

    def on_train_end(self, args, state, control, **kwargs):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1
        self.stats_step = step % self.every == 0 or (step == 1 and args.logging_first_step)
        self.step_loss, self.grad_norm, self._grad_sq, self._before = None, None, None, None
        self._activations.clear()

    def on_pre_optimizer_step(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        step = state.global_step + 1
        loss = float(self.step_loss) if self.step_loss is not None else None
        norm = float(self.grad_norm) if self.grad_norm is not None else None
        loss_bad = loss is not None and not math.isfinite(loss)
        norm_bad = norm is not None and not math.isfinite(norm) and not (args.fp16 and not loss_bad)
        zscore = None
        if not (loss_bad or norm_bad) and loss is not None and len(self.window) >= min(MIN_SPIKE_HISTORY, self.window.maxlen):
            mean = sum(self.window) / len(self.window)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.window) / len(self.window))
            zscore = (loss - mean) / max(std, 0.01 * abs(mean), 1e-8)  # a floor: a flat loss is not a spike
        spike = zscore is not None and zscore > self.spike_zscore
        verdict = any_rank(2 if (loss_bad or norm_bad) else 1 if spike else 0)

        if verdict == 2:
            parts = [f"loss ({loss})"] if loss_bad else []
            parts += [f"gradient norm ({norm})"] if norm_bad else []
            what = "non-finite " + " and ".join(parts) if parts else "non-finite values on another process"
            action = self.nan_action
        elif verdict == 1:
            what = (f"loss spike ({loss:.4g}, z-score {zscore:.1f} over the last {len(self.window)} steps, "
                    f"mean {sum(self.window) / len(self.window):.4g})" if spike else "loss spike on another process")
            self.spikes.append(step)
            action = self.spike_action
        else:
            if loss is not None:
                self.window.append(loss)
            self._snapshot(model)
            return
        if action == "warn":
            self.window.append(loss)
            self._say(state, f"warning: step {step}: {what}; training goes on (spike_action: warn)")
            self._snapshot(model)
            return
        model.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient: no update at all
        if action == "skip":
            self.skipped.append(step)
            key = "nan_action" if verdict == 2 else "spike_action"
            self._say(state, f"warning: step {step}: {what}; this update is skipped ({key}: skip)")
            return
        control.should_training_stop = True
        self._stop(args, state, step, what, lr_scheduler)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self._before is not None:
            sums: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
            for name, param, before in self._before:
                group = parameter_group(name)
                sums[group].append(torch.stack([_whole((param.detach().float() - before).pow(2).sum()),
                                                _whole(before.pow(2).sum())]))
            changes = {group: torch.stack(values).sum(0).tolist() for group, values in sums.items()}  # one sync each
            total = [sum(change[i] for change in changes.values()) for i in (0, 1)]
            self._metrics["update_ratio"] = _ratio(*total)
            for group in GROUPS:
                if group in changes:
                    self._metrics[f"update_ratio/{group}"] = _ratio(*changes[group])
            self._before = None
        if self.stats_step:
            if self._grad_sq:
                for group in GROUPS:
                    if group in self._grad_sq:
                        self._metrics[f"grad_norm/{group}"] = round(math.sqrt(float(self._grad_sq[group])), 6)
            if self._activations:
                rms = [float(sum(values)) / len(values) for _, values in sorted(self._activations.items())]
                self._metrics["activation_rms/mean"] = round(sum(rms) / len(rms), 6)
                self._metrics["activation_rms/max"] = round(max(rms), 6)
                self._metrics["activation_rms/last_layer"] = round(rms[-1], 6)
            self._grad_sq = None
            self._activations.clear()

    def on_step_end(self, args, state, control, **kwargs):
        if self.halt is not None:  # nothing after the failure is saved or evaluated
            control.should_save = control.should_evaluate = False
            control.should_training_stop = True

    # ---- the logs

    def pop_metrics(self) -> dict[str, float]:
        """Metrics for the next training log: statistics of the last statistics step, skipped steps and spikes so far."""
        metrics, self._metrics = self._metrics, {}
        if self.skipped:
            metrics["skipped_steps"] = len(self.skipped)
        if self.spikes:
            metrics["loss_spikes"] = len(self.spikes)
        return metrics

    # ---- helpers

    def _activation_hook(self, index: int):
        def hook(module, inputs, output):
            if self.stats_step and module.training:
                hidden = output[0] if isinstance(output, (tuple, list)) else output
                if isinstance(hidden, torch.Tensor):
                    self._activations[index].append(hidden.detach().float().pow(2).mean().sqrt())
        return hook

    def _snapshot(self, model) -> None:
        """Weights before the update, for the update/weight ratio (statistics steps only)."""
        if self.stats_step and model is not None:
            self._before = [(name, param, param.detach().float().clone()) for name, param in model.named_parameters()
                            if param.grad is not None]

    def _say(self, state, line: str) -> None:
        if state.is_world_process_zero:
            print(line, file=sys.stderr, flush=True)

    def _stop(self, args, state, step: int, what: str, lr_scheduler) -> None:
        checkpoint = find_checkpoint(args.output_dir, warn=False)
        lr = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else args.learning_rate
        precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "float32"
        clipping = f"max_grad_norm {args.max_grad_norm}" if args.max_grad_norm else "max_grad_norm 0 (no clipping)"
        recent = ", ".join(f"{x:.4g}" for x in list(self.window)[-5:]) or "none"
        where = (f"last good checkpoint: {checkpoint} (resume with --resume_from_checkpoint {checkpoint})"
                 if checkpoint else "no checkpoint was saved before this step (save_steps "
                 f"{args.save_steps}); nothing to resume from")
        self.halt = (f"training stopped at step {step}: {what}; {where.split(' (')[0]}; likely causes: learning rate "
                     f"too high, bad data in the batch of step {step}" + ("" if precision == "float32" else
                     f", or {precision} overflow") + " (report above; docs/reliability.md)")
        self.report = "\n".join([
            f"hfllm: training stopped at step {step} of {state.max_steps}: {what}",
            f"  {where}",
            f"  recent losses (accepted steps): {recent}",
            f"  learning rate {lr:.4g} at this step, {clipping}, precision {precision}",
            "  likely causes:",
            "    - learning rate too high: lower learning_rate, lengthen warmup_steps, keep max_grad_norm on (1.0)",
            f"    - bad data in the batch of step {step}: nan_action: skip / spike_action: skip drop such updates",
            "    - precision: " + ("unlikely in float32" if precision == "float32" else
                                f"{precision} overflow in the activations or the loss (train in float32 to rule it out)"),
            "  nothing holding non-finite values was saved; this step's update was not applied",
        ])
        self._say(state, self.report)


def _ratio(change_sq: float, weight_sq: float) -> float:
    return round(math.sqrt(change_sq) / max(math.sqrt(weight_sq), 1e-12), 8)


# ----------------------------------------------------------------------------- the Trainer hooks


class HealthTrainerMixin:
    """Trainer hooks of the health component; put it before the Trainer class (`class T(HealthTrainerMixin,
    Trainer)`, or `with_health(SFTTrainer)`). Uses the HealthCallback among the trainer's callbacks (adds a default
    one if there is none)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, HealthCallback)]
        self.health: HealthCallback = found[0] if found else HealthCallback()
        if not found:
            self.add_callback(self.health)

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.health.halt is not None:
            raise TrainingHalted(self.health.halt)
        return output

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.health.add_loss(loss)
        return loss

    def _clip_grad_norm(self, model):
        self.health.observe_gradients(model)  # before clipping
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if grad_norm is None:  # no clipping: the gradients are as the backward pass left them
            self.health.observe_gradients(model)
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.health.grad_norm = grad_norm
        return grad_norm

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self.health.pop_metrics())
        super().log(logs, start_time)

    # ---- saving: never non-finite weights, no checkpoint after a health stop (AtomicSavingMixin: complete or absent)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self._refuse_non_finite(output_dir or self.args.output_dir)
        return super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model, trial) -> None:
        if self.health.halt is None:
            super()._save_checkpoint(model, trial)

    def _refuse_non_finite(self, target: str) -> None:
        model = self.model
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            local = tensor.to_local() if isinstance(tensor, DTensor) else tensor  # this rank's shard (tp_size)
            if local.is_floating_point() and not bool(torch.isfinite(local.detach()).all()):
                checkpoint = find_checkpoint(self.args.output_dir, warn=False)
                raise TrainingHalted(
                    f"refusing to save {target}: {name} holds non-finite values (nothing was written); last good "
                    f"checkpoint: {checkpoint or 'none'}; see docs/reliability.md"
                )


def with_health(trainer_class: type) -> type:
    """`trainer_class` (a transformers.Trainer subclass such as TRL's SFTTrainer) with HealthTrainerMixin and
    AtomicSavingMixin."""
    return type(trainer_class.__name__, (HealthTrainerMixin, AtomicSavingMixin, trainer_class), {"__module__": __name__})
