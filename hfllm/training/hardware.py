"""TrainingArguments fitted to this machine before they are built: without a GPU, the defaults that assume one (bf16,
activation checkpointing, pinned memory) are off; an explicit `bf16: true` trains on a CPU with bf16 instructions and
otherwise falls back to float32 with a warning; processes of `accelerate launch` get gloo for every strategy
(distributed.py) and the launcher's `mixed_precision` (which builds DeepSpeed's `bf16` / `fp16` sections) made to
agree with the precision decided here; a `min_lr` schedule becomes a ratio that a wrapped optimizer can use
(optim.py). Every training command's recipe goes through `apply_hardware` (`load_recipe`'s
`fit_training_arguments`)."""

import os
import sys
from typing import Any

import torch

from .distributed import cpu_training_arguments
from .optim import min_lr_as_rate

LAUNCHER_PRECISION = "ACCELERATE_MIXED_PRECISION"  # set by `accelerate launch` from its config or --mixed_precision


def apply_hardware(kwargs: dict[str, Any], explicit: set[str]) -> None:
    """Fit a TrainingArguments' keyword arguments (`explicit`: the keys the recipe or command line set) in place."""
    min_lr_as_rate(kwargs)
    if torch.cuda.is_available():
        if not explicit & {"bf16", "fp16"} and os.environ.get(LAUNCHER_PRECISION) in ("bf16", "fp16"):
            kwargs[os.environ[LAUNCHER_PRECISION]] = True  # the recipe leaves precision to the launcher's config
        agree_with_launcher(kwargs)
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
    agree_with_launcher(kwargs)
    cpu_training_arguments(kwargs)  # `accelerate launch` on CPU processes: gloo for every strategy


def agree_with_launcher(kwargs: dict[str, Any]) -> None:
    """`accelerate launch`'s mixed_precision set to the precision of these arguments (bf16, fp16 or no). Accelerate
    autocasts, and builds the DeepSpeed config's `bf16.enabled` / `fp16.enabled`, from the launcher's value, while
    transformers checks the DeepSpeed config against `bf16` / `fp16` ("ds bf16.enabled=True vs hf bf16=False")."""
    launched = os.environ.get(LAUNCHER_PRECISION)
    decided = "bf16" if kwargs.get("bf16") else "fp16" if kwargs.get("fp16") else "no"
    if launched is None or launched.lower() == decided:
        return
    os.environ[LAUNCHER_PRECISION] = decided
    if os.environ.get("RANK", "0") == "0":  # one line per launch, not one per process
        print(f"mixed precision: {decided}, not the launcher's {launched} (the recipe's bf16/fp16 on this machine; "
          "DeepSpeed's config follows)", file=sys.stderr)
