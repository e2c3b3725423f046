"""TrainingArguments fitted to this machine before they are built: without a GPU, the defaults that assume one (bf16,
activation checkpointing, pinned memory) are off; an explicit `bf16: true` trains on a CPU with bf16 instructions and
otherwise falls back to float32 with a warning; processes of `accelerate launch` get gloo for every strategy
(distributed.py). Every training command's recipe goes through `apply_hardware` (`load_recipe`'s
`fit_training_arguments`)."""

import sys
from typing import Any

import torch

from .distributed import cpu_training_arguments


def apply_hardware(kwargs: dict[str, Any], explicit: set[str]) -> None:
    """Fit a TrainingArguments' keyword arguments (`explicit`: the keys the recipe or command line set) in place."""
    if torch.cuda.is_available():
        return
    kwargs["dataloader_pin_memory"] = False  # nothing to pin for, and torch warns about it
    if not explicit & {"bf16", "fp16"}:
        kwargs["bf16"] = False
    if not explicit & {"activation_checkpointing", "gradient_checkpointing"}:  # the second: its pre-5.24 alias
        kwargs["activation_checkpointing"] = False
    if kwargs.get("bf16") and torch.cpu._is_avx512_bf16_supported():
        kwargs["use_cpu"] = True  # bf16 autocast on a CPU with bf16 instructions
    elif kwargs.get("bf16") or kwargs.get("fp16"):
        name = "bf16" if kwargs.get("bf16") else "fp16"
        print(f"warning: {name} needs a GPU or a CPU with bf16 instructions; training in float32", file=sys.stderr)
        kwargs["bf16"] = kwargs["fp16"] = False
    cpu_training_arguments(kwargs)  # `accelerate launch` on CPU processes: gloo for every strategy
