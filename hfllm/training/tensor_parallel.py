"""Tensor parallelism (`tp_size` recipe key): the model's layers split over `tp_size` processes by transformers' own
tensor-parallel plan (`HfllmConfig.base_model_tp_plan`, `HfllmForCausalLM._tp_plan`; docs/scaling.md).

    check_tensor_parallel(config, args)         one line naming what tp_size does not fit
    shard_model(model, tp_size)                  the same weights, split: every parameter of the plan a DTensor
    trainer_parallelism(args)                    Trainer's accelerate ParallelismConfig, also on CPU (gloo)
    full_state_dict(model)                       the whole weights again on every rank (tests, comparisons)

The model is built whole on every rank first (a preset's new weights, or a folder's), then rank 0's weights are
broadcast and each rank keeps its slices: `from_pretrained(None, state_dict=..., distributed_config=...)` is the path
on which transformers applies a plan (`from_config` takes no `distributed_config`).
"""

import torch
import torch.distributed as dist
from accelerate import ParallelismConfig
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.distributed import DistributedConfig

from ..errors import HfllmError


def check_tensor_parallel(config: PreTrainedConfig, args) -> None:
    """Raise one line when `args.tp_size` cannot split this model over the launched processes, or the run asks for
    what transformers does not do with a tensor-parallel model (optimizer checkpoints)."""
    tp_size, world_size = args.tp_size, args.world_size
    if tp_size < 1:
        raise HfllmError(f"tp_size must be 1 or more (got {tp_size})")
    if tp_size == 1:
        return
    if world_size != tp_size:
        raise HfllmError(
            f"tp_size {tp_size} needs exactly {tp_size} processes, got {world_size}: launch {tp_size} (torchrun "
            f"--nproc_per_node / accelerate launch --num_processes {tp_size}); tensor x data parallel is not supported"
        )
    if args.own_optimizer:  # muon, soap
        raise HfllmError(f"optim: {args.own_optimizer} transforms whole matrices, not tensor-parallel shards: use "
                         "optim: adamw_torch_fused with tp_size > 1")
    if args.save_strategy != "no" and not args.save_only_model:
        raise HfllmError(
            "tp_size > 1: transformers cannot checkpoint the optimizer of a tensor-parallel model; set "
            "save_only_model: true (checkpoints of the weights only, not resumable) or save_strategy: no"
        )
    plan = getattr(config, "base_model_tp_plan", None)
    if not plan:
        raise HfllmError(f"model type '{config.model_type}' has no tensor-parallel plan: remove tp_size")
    if getattr(config, "has_mamba_layers", False):  # the plan has no rules for the mixers: they would stay whole
        raise HfllmError(f"tp_size {tp_size}: tensor parallel does not split layer_types 'mamba' layers (untested); "
                         "train a Mamba-2 hybrid with data parallel or FSDP")
    # the widths the plan splits; experts are split inside (each rank a slice of every expert), so their count is free
    widths = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    }
    if any(key.endswith(".mlp.gate_proj") for key in plan):
        widths["intermediate_size"] = config.intermediate_size
    if any(key.endswith(".mlp.experts") for key in plan):
        widths["moe_intermediate_size"] = config.moe_intermediate_size
    if any(".mlp.shared_experts." in key for key in plan):
        widths["num_shared_experts * moe_intermediate_size"] = config.num_shared_experts * config.moe_intermediate_size
    for name, width in widths.items():
        if width % tp_size:
            raise HfllmError(f"tp_size {tp_size} does not divide {name} ({width}): choose a tp_size that divides it")


def shard_model(model: PreTrainedModel, tp_size: int) -> PreTrainedModel:
    """The model's weights split over the `tp_size` ranks of the running process group (gloo on CPU, NCCL on GPUs).
    Rank 0's weights win: they are broadcast first, so a preset's random initialisation is the same on every rank."""
    if not dist.is_initialized():
        raise HfllmError(f"tp_size {tp_size} needs {tp_size} processes: start them with torchrun or accelerate launch")
    state_dict = model.state_dict()
    for tensor in state_dict.values():
        dist.broadcast(tensor, src=0)
    sharded = type(model).from_pretrained(
        None, config=model.config, state_dict=state_dict, dtype=model.dtype,
        attn_implementation=model.config._attn_implementation, distributed_config=DistributedConfig(tp_size=tp_size),
    )
    # A row slice of a whole tensor is a view into it: give each shard its own storage, so the whole weights are
    # freed (the point of splitting) and the whole model's parameters are not updated along with the shards.
    with torch.no_grad():
        for param in sharded.parameters():  # tied weights once; swap_tensors keeps every module's reference
            if isinstance(param, DTensor):
                own = DTensor.from_local(param.to_local().clone(), param.device_mesh, param.placements,
                                         run_check=False, shape=param.shape, stride=param.stride())
                torch.utils.swap_tensors(param, torch.nn.Parameter(own, requires_grad=param.requires_grad))
    return sharded.train(model.training)


class CpuTensorParallelism(ParallelismConfig):
    """accelerate's `ParallelismConfig` for a model that transformers already split, accepted on CPU processes too.

    accelerate refuses a parallelism config under MULTI_CPU (gloo) although what it does with one for a
    tensor-parallel model works there: a device mesh, and the same batch for the ranks of a group. Only that one
    check is left out, and only on CPU."""

    def _validate_accelerator(self, accelerator) -> None:
        if accelerator.distributed_type != DistributedType.MULTI_CPU:
            return super()._validate_accelerator(accelerator)
        if self.total_size != accelerator.num_processes:
            raise HfllmError(f"tensor parallel over {self.total_size} processes, but {accelerator.num_processes} "
                             "were launched")


def trainer_parallelism(args) -> None:
    """Give Trainer the parallelism config of a `tp_size` model on CPU (on GPUs Trainer makes the plain one)."""
    if args.tp_size > 1 and args.parallelism_config is None and args.device.type == "cpu":
        args.parallelism_config = CpuTensorParallelism(tp_size=args.tp_size)


def full_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """Every parameter and buffer whole (sharded ones gathered; a collective: call it on every rank)."""
    return {name: tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            for name, tensor in model.state_dict().items()}
