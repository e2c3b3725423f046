"""bitsandbytes 4/8-bit loading: transformers' `BitsAndBytesConfig` from the flags of the same names, checked."""

import importlib.util

import torch

from ..errors import HfllmError

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def quantization_config(
    *,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: str | None = None,
    bnb_4bit_use_double_quant: bool = False,
    bnb_4bit_compute_dtype: str | None = None,
    dtype: str = "auto",
):
    """bitsandbytes 4/8-bit loading (transformers' `BitsAndBytesConfig`) from the flags of the same names, checked:
    one line on a bad combination. None when neither 4 nor 8 bits is asked for. The 4-bit compute dtype defaults
    to `dtype` (float32 for "auto")."""
    four_bit_flags = [name for name, given in (("bnb_4bit_quant_type", bnb_4bit_quant_type),
                                               ("bnb_4bit_use_double_quant", bnb_4bit_use_double_quant),
                                               ("bnb_4bit_compute_dtype", bnb_4bit_compute_dtype)) if given]
    if load_in_4bit and load_in_8bit:
        raise HfllmError("--load_in_4bit and --load_in_8bit exclude each other; choose one")
    if four_bit_flags and not load_in_4bit:
        raise HfllmError(f"--{four_bit_flags[0]} applies to 4-bit loading; add --load_in_4bit or drop it")
    if not (load_in_4bit or load_in_8bit):
        return None
    if bnb_4bit_quant_type is not None and bnb_4bit_quant_type not in QUANT_TYPES:
        raise HfllmError(f"--bnb_4bit_quant_type must be one of {', '.join(QUANT_TYPES)} (got {bnb_4bit_quant_type!r})")
    compute = bnb_4bit_compute_dtype or (dtype if dtype in COMPUTE_DTYPES else "float32")
    if compute not in COMPUTE_DTYPES:
        raise HfllmError(f"--bnb_4bit_compute_dtype must be one of {', '.join(COMPUTE_DTYPES)} (got {compute!r})")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise HfllmError("--load_in_4bit/--load_in_8bit need bitsandbytes, which is not installed; run "
                         "`pip install 'hfllm[qlora]'` or drop the flag")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=bnb_4bit_quant_type or "nf4",
                              bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, compute))
