"""Distributed engines: which one `accelerate launch` asked for, the workarounds that make it really run on CPU
processes, and the check that the engine asked for is the one running (docs/scaling.md#engines).

On a machine without a GPU, accelerate falls back silently (../shared/notes/distributed-on-cpu.md):
- DDP / FSDP launched without `use_cpu`: each process trains alone on all the data, as a world of one;
- FSDP under MULTI_CPU: accelerate enables FSDP for GPU modes only, so it runs as plain DDP;
- DeepSpeed with `use_cpu`: accelerate skips DeepSpeed; without it accelerate finds no backend and counts one process
  while DeepSpeed counts two ("train_batch_size is not equal to ...").
The workarounds, all here: `cpu_training_arguments` (gloo through `use_cpu` for DDP/FSDP, through `ddp_backend` for
DeepSpeed; applied to every training command's TrainingArguments by hardware.py) and `EngineTrainerMixin` (FSDP
switched on under MULTI_CPU). `EngineTrainerMixin` checks at the first training step, on every process, what really
runs: the distributed type, the world size, the parameter shards (FSDP2: DTensor shards; ZeRO-3: partitioned;
ZeRO-2: partitioned optimizer; offload: the engine's own offload settings) and that the ranks' batches differ. A
mismatch is an error (`EngineMismatch`), never a warning.
"""

import hashlib
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import HfllmError

ENGINES = ("ddp", "fsdp2", "zero2", "zero3", "zero3_offload")
SHARDED = ("fsdp2", "zero3", "zero3_offload")  # each process holds a part of the parameters


class EngineMismatch(HfllmError):
    """The engine that runs is not the one `accelerate launch` was asked for (a silent fallback)."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def requested_engine() -> str | None:
    """The engine `accelerate launch` was asked for, from the variables it sets in each process: ddp, fsdp2, fsdp1,
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
    return requested_engine() in SHARDED


def cpu_training_arguments(kwargs: dict) -> None:
    """TrainingArguments' keyword arguments fitted to `accelerate launch` on CPU processes (called by
    `hfllm.training.hardware.apply_hardware` on a machine without a GPU, before the arguments set up the process
    group)."""
    engine = requested_engine()
    if engine is None:
        return
    if engine.startswith("zero"):
        # accelerate's CPU mode skips DeepSpeed; without it accelerate needs a backend to count the processes
        os.environ.pop("ACCELERATE_USE_CPU", None)
        kwargs["use_cpu"] = False
        kwargs["ddp_backend"] = kwargs.get("ddp_backend") or "gloo"
    else:
        kwargs["use_cpu"] = True  # gloo and MULTI_CPU; without it every process trains alone


class EngineTrainerMixin:
    """Trainer hooks of the engine: FSDP switched on under MULTI_CPU when it was asked for, and the engine checked
    at the first training step (`verify_engine`). Put it before the Trainer class (`with_engine(SFTTrainer)`)."""

    engine_report: "EngineReport | None" = None  # what runs, after the first training step of a launched run
    _engine_checked = False

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if requested_engine() in ("fsdp1", "fsdp2"):
            enable_fsdp_on_cpu(self)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not self._engine_checked:
            self.engine_report = verify_engine(self, inputs)
            self._engine_checked = True
        return super().training_step(model, inputs, num_items_in_batch)

    def _save(self, output_dir=None, state_dict=None):
        with _original_class(self.model):
            return super()._save(output_dir, state_dict)


def with_engine(trainer_class: type) -> type:
    """`trainer_class` (a transformers.Trainer subclass such as TRL's SFTTrainer) with EngineTrainerMixin."""
    return type(trainer_class.__name__, (EngineTrainerMixin, trainer_class), {"__module__": trainer_class.__module__})


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
class EngineReport:
    """What one process runs: the engine found, its processes and backend, and the parameter bytes it holds."""

    engine: str
    distributed_type: str
    world_size: int
    backend: str | None
    rank: int
    local_parameter_bytes: int  # the parameters this process holds between steps (its shards)
    parameter_bytes: int  # the whole model's

    def line(self) -> str:
        return (f"process {self.rank}: engine {self.engine} ({self.distributed_type}, {self.world_size} processes, "
                f"{self.backend}), parameter bytes {self.local_parameter_bytes} of {self.parameter_bytes}")


def verify_engine(trainer, inputs: dict) -> EngineReport | None:
    """Check that the engine asked for runs (raises `EngineMismatch`), print what runs on this process, return it."""
    asked = requested_engine()
    if asked is None:
        return None
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    kind = state.distributed_type
    world = _world_size()
    if trainer.accelerator.num_processes != world:
        raise EngineMismatch(
            f"{asked} was launched on {world} processes but this one trains as a world of "
            f"{trainer.accelerator.num_processes} (accelerate found no backend); launch through hfllm's entry points, "
            "which select gloo on CPU (docs/scaling.md#engines)")
    expected = {"ddp": {DistributedType.MULTI_CPU, DistributedType.MULTI_GPU}, "fsdp1": {DistributedType.FSDP},
                "fsdp2": {DistributedType.FSDP}}.get(asked, {DistributedType.DEEPSPEED})
    if kind not in expected:
        raise EngineMismatch(f"{asked} was asked for but accelerate runs {kind.value}; see docs/scaling.md#engines")
    model = trainer.model
    parameters = list(model.parameters())
    local = whole = sum(p.numel() * p.element_size() for p in parameters)  # a DTensor's numel is the whole one
    if asked == "fsdp2":
        if not state.is_fsdp2 or not all(_is_dtensor(p) for p in parameters):
            raise EngineMismatch("fsdp2 was asked for but the parameters are not FSDP2 DTensor shards")
        local = sum(p.to_local().numel() * p.element_size() for p in parameters)
    elif asked.startswith("zero"):
        engine = trainer.model_wrapped
        stage, running = int(asked[4]), getattr(engine, "zero_optimization_stage", lambda: None)()
        if running != stage:
            raise EngineMismatch(f"{asked} was asked for but DeepSpeed runs ZeRO stage {running}")
        if asked.endswith("_offload") and not (engine.zero_offload_param() or engine.zero_cpu_offload()):
            raise EngineMismatch(f"{asked} was asked for but DeepSpeed offloads neither parameters nor optimizer")
        if stage == 3:
            if not all(hasattr(p, "ds_tensor") for p in parameters):
                raise EngineMismatch("zero3 was asked for but the parameters are not partitioned by DeepSpeed")
            local = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in parameters)
            whole = sum(p.ds_numel * p.ds_tensor.element_size() for p in parameters)
    if asked in SHARDED and world > 1 and local >= whole:
        raise EngineMismatch(f"{asked} was asked for but this process holds every parameter ({local} bytes)")
    if getattr(trainer.args, "tp_size", 1) == 1:  # the ranks of a tensor-parallel group share their batches
        _check_ranks_see_different_data(inputs, asked)
    report = EngineReport(asked, kind.value, world, getattr(state, "backend", None), state.process_index, local, whole)
    sys.stdout.write(report.line() + "\n")  # one write: the processes share the launcher's stdout
    sys.stdout.flush()
    return report


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _check_ranks_see_different_data(inputs: dict, engine: str) -> None:
    """The first micro-batch differs between ranks (a sampler that is not split hands every rank the same data)."""
    digest = hashlib.sha256()
    for key, value in sorted(inputs.items()):
        if isinstance(value, torch.Tensor):
            digest.update(key.encode() + value.detach().cpu().numpy().tobytes())
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) < len(digests):
        raise EngineMismatch(f"{engine}: ranks received the same first batch; the data is not split across processes")
