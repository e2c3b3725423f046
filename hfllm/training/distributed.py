"""Distributed strategies: which one `accelerate launch` asked for, the workarounds that make it really run on CPU
processes, and the check that the strategy asked for is the one running (docs/scaling.md#strategies).

On a machine without a GPU, accelerate falls back silently (../shared/notes/distributed-on-cpu.md):
- DDP / FSDP launched without `use_cpu`: each process trains alone on all the data, as a world of one;
- FSDP under MULTI_CPU: accelerate enables FSDP for GPU modes only, so it runs as plain DDP;
- DeepSpeed with `use_cpu`: accelerate skips DeepSpeed; without it accelerate finds no backend and counts one process
  while DeepSpeed counts two ("train_batch_size is not equal to ...").
The workarounds, all here: `cpu_training_arguments` (gloo through `use_cpu` for DDP/FSDP, through `ddp_backend` for
DeepSpeed; applied to every training command's TrainingArguments by hardware.py) and `StrategyTrainerMixin` (FSDP
switched on under MULTI_CPU). `StrategyTrainerMixin` checks at the first training step, on every process, what really
runs: the distributed type, the world size, the parameter shards (FSDP2: DTensor shards; ZeRO-3: partitioned;
ZeRO-2: partitioned optimizer; offload: the strategy's own offload settings) and that the ranks' batches differ. A
mismatch is an error (`StrategyMismatch`), never a warning.
"""

import hashlib
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import HfllmError

STRATEGIES = ("ddp", "fsdp2", "zero2", "zero3", "zero3_offload")
SHARDED = ("fsdp2", "zero3", "zero3_offload")  # each process holds a part of the parameters


class StrategyMismatch(HfllmError):
    """The strategy that runs is not the one `accelerate launch` was asked for (a silent fallback)."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def requested_strategy() -> str | None:
    """The strategy `accelerate launch` was asked for, from the variables it sets in each process: ddp, fsdp2, fsdp1,
    zero0..zero3, zero3_offload (parameters or optimizer offloaded); None for a single process without DeepSpeed."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        offload = {os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"),
                   os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none")}
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if config_file and config_file != "None":
            with open(config_file) as file:
                zero = json.load(file).get("zero_optimization", {})
            stage = zero.get("stage", stage)
            offload |= {zero.get(key, {}).get("device", "none") for key in ("offload_optimizer", "offload_param")}
        offloaded = bool(offload - {"none", "None", None})
        return f"zero{stage}" + ("_offload" if offloaded else "")
    if _world_size() <= 1:
        return None
    if _flag("ACCELERATE_USE_FSDP"):
        return f"fsdp{os.environ.get('FSDP_VERSION', '1')}"
    return "ddp"


def parameters_sharded() -> bool:
    """Each process holds only a part of the parameters: a forward pass (generation too) needs every process."""
    return requested_strategy() in SHARDED


def cpu_training_arguments(kwargs: dict) -> None:
    """TrainingArguments' keyword arguments fitted to `accelerate launch` on CPU processes (called by
    `hfllm.training.hardware.apply_hardware` on a machine without a GPU, before the arguments set up the process
    group)."""
    strategy = requested_strategy()
    if strategy is None:
        return
    if strategy.startswith("zero"):
        # accelerate's CPU mode skips DeepSpeed; without it accelerate needs a backend to count the processes
        os.environ.pop("ACCELERATE_USE_CPU", None)
        kwargs["use_cpu"] = False
        kwargs["ddp_backend"] = kwargs.get("ddp_backend") or "gloo"
    else:
        kwargs["use_cpu"] = True  # gloo and MULTI_CPU; without it every process trains alone


class StrategyTrainerMixin:
    """Trainer hooks of the strategy: FSDP switched on under MULTI_CPU when it was asked for, and the strategy checked
    at the first training step (`verify_strategy`). Put it before the Trainer class (`with_strategy(SFTTrainer)`)."""

    strategy_report: "StrategyReport | None" = None  # what runs, after the first training step of a launched run
    _strategy_checked = False

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if requested_strategy() in ("fsdp1", "fsdp2"):
            enable_fsdp_on_cpu(self)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._strategy_checked:
            self.strategy_report = verify_strategy(self, inputs)
            self._strategy_checked = True
        return super().training_step(model, inputs, num_items_in_batch)

    def _save(self, output_dir=None, state_dict=None):
        with _original_class(self.model):
            return super()._save(output_dir, state_dict)


def with_strategy(trainer_class: type) -> type:
    """`trainer_class` (a transformers.Trainer subclass such as TRL's SFTTrainer) with StrategyTrainerMixin."""
    return type(trainer_class.__name__, (StrategyTrainerMixin, trainer_class), {"__module__": trainer_class.__module__})


def enable_fsdp_on_cpu(trainer) -> None:
    """FSDP on gloo: accelerate builds MULTI_CPU state and drops the FSDP plugin (it enables FSDP for GPU modes
    only). Switch the shared state (AcceleratorState and PartialState, else saving a FULL_STATE_DICT fails with
    "invalid python storage") and the trainer to FSDP with the plugin accelerate would have built from its
    launcher's FSDP_* variables."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


@contextmanager
def _original_class(model):
    """FSDP2 swaps a model's class for a subclass it makes (FSDPHfllmForCausalLM, defined in torch's FSDP module);
    `save_pretrained` would then write that module's files as the model's code and point auto_map at them. The
    model keeps its own class while it is saved."""
    from torch.distributed.fsdp import FSDPModule

    swapped = type(model)
    if isinstance(model, FSDPModule):
        model.__class__ = next(base for base in swapped.__bases__ if not issubclass(base, FSDPModule))
    try:
        yield
    finally:
        model.__class__ = swapped


# ----------------------------------------------------------------------------- what really runs


@dataclass
class StrategyReport:
    """What one process runs: the strategy found, its processes and backend, and the parameter bytes it holds."""

    strategy: str
    distributed_type: str
    world_size: int
    backend: str | None
    rank: int
    local_parameter_bytes: int  # the parameters this process holds between steps (its shards)
    parameter_bytes: int  # the whole model's

    def line(self) -> str:
        return (f"process {self.rank}: strategy {self.strategy} ({self.distributed_type}, {self.world_size} processes, "
                f"{self.backend}), parameter bytes {self.local_parameter_bytes} of {self.parameter_bytes}")


def verify_strategy(trainer, inputs: dict) -> StrategyReport | None:
    """Check that the strategy asked for runs (raises `StrategyMismatch`), print what runs on this process, return it."""
    asked = requested_strategy()
    if asked is None:
        return None
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    kind = state.distributed_type
    world = _world_size()
    if trainer.accelerator.num_processes != world:
        raise StrategyMismatch(
            f"{asked} was launched on {world} processes but this one trains as a world of "
            f"{trainer.accelerator.num_processes} (accelerate found no backend); launch through hfllm's entry points, "
            "which select gloo on CPU (docs/scaling.md#strategies)")
    expected = {"ddp": {DistributedType.MULTI_CPU, DistributedType.MULTI_GPU}, "fsdp1": {DistributedType.FSDP},
                "fsdp2": {DistributedType.FSDP}}.get(asked, {DistributedType.DEEPSPEED})
    if kind not in expected:
        raise StrategyMismatch(f"{asked} was asked for but accelerate runs {kind.value}; see docs/scaling.md#strategies")
    model = trainer.model
    parameters = list(model.parameters())
    local = whole = sum(p.numel() * p.element_size() for p in parameters)  # a DTensor's numel is the whole one
    if asked == "fsdp2":
        if not state.is_fsdp2 or not all(_is_dtensor(p) for p in parameters):
            raise StrategyMismatch("fsdp2 was asked for but the parameters are not FSDP2 DTensor shards")
        local = sum(p.to_local().numel() * p.element_size() for p in parameters)
    elif asked.startswith("zero"):
        deepspeed = trainer.model_wrapped
        stage, running = int(asked[4]), getattr(deepspeed, "zero_optimization_stage", lambda: None)()
        if running != stage:
            raise StrategyMismatch(f"{asked} was asked for but DeepSpeed runs ZeRO stage {running}")
        if asked.endswith("_offload") and not (deepspeed.zero_offload_param() or deepspeed.zero_cpu_offload()):
            raise StrategyMismatch(f"{asked} was asked for but DeepSpeed offloads neither parameters nor optimizer")
        if stage == 3:
            if not all(hasattr(p, "ds_tensor") for p in parameters):
                raise StrategyMismatch("zero3 was asked for but the parameters are not partitioned by DeepSpeed")
            local = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in parameters)
            whole = sum(p.ds_numel * p.ds_tensor.element_size() for p in parameters)
    if asked in SHARDED and world > 1 and local >= whole:
        raise StrategyMismatch(f"{asked} was asked for but this process holds every parameter ({local} bytes)")
    if getattr(trainer.args, "tp_size", 1) == 1:  # the ranks of a tensor-parallel group share their batches
        _check_ranks_see_different_data(inputs, asked)
    report = StrategyReport(asked, kind.value, world, getattr(state, "backend", None), state.process_index, local, whole)
    sys.stdout.write(report.line() + "\n")  # one write: the processes share the launcher's stdout
    sys.stdout.flush()
    return report


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _check_ranks_see_different_data(inputs: dict, strategy: str) -> None:
    """The first micro-batch differs between ranks (a sampler that is not split hands every rank the same data)."""
    digest = hashlib.sha256()
    for key, value in sorted(inputs.items()):
        if isinstance(value, torch.Tensor):
            digest.update(key.encode() + value.detach().cpu().numpy().tobytes())
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) < len(digests):
        raise StrategyMismatch(f"{strategy}: ranks received the same first batch; the data is not split across processes")
