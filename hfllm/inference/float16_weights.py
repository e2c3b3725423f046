"""`--float16_weights`: CPU decoding with every Linear weight (the LM head included) stored as float16 and packed for
fbgemm's float16 GEMM (`torch.ops.quantized.linear_prepack_fp16` / `linear_dynamic_fp16`), activations in float32.
With `--compile` the rest of the decode step is compiled around them (the GEMM is an opaque custom op).

A batch-1 decode step reads every weight once, so it is bound by memory bandwidth: float16 weights halve the bytes per
token, and fbgemm's packed kernel widens them to float32 in registers (AVX2 + F16C), so the arithmetic stays float32.
The weights are rounded to float16 once (relative error <= 2^-11): greedy tokens can differ from float32 ones, rarely
(measured in benchmarks/RESULTS.md). The input embedding stays float32 (a lookup reads one row per token).

    model, tokenizer = load_for_inference("runs/sft", "float32", float16_weights=True)
"""

import itertools
import weakref

import torch
from transformers import PreTrainedModel

from ..errors import HfllmError

_PACKED: dict[int, torch.ScriptObject] = {}  # key -> fbgemm's packed weight; an entry lives as long as its module
_keys = itertools.count()


@torch.library.custom_op("hfllm::linear_float16_packed", mutates_args=())
def linear_float16_packed(hidden: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    """(..., in) float32 -> (..., out) float32 with the packed float16 weight `key`: an opaque op for torch.compile
    (a packed weight is not a tensor, so the op takes its key)."""
    return torch.ops.quantized.linear_dynamic_fp16(hidden, _PACKED[key])


@linear_float16_packed.register_fake
def _(hidden: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return hidden.new_empty((*hidden.shape[:-1], out_features))


class Float16PackedLinear(torch.nn.Module):
    """`nn.Linear` with its weight (and bias) held by fbgemm's packed float16 format: y = x W^T + b, in float32."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        bias = None if linear.bias is None else linear.bias.detach()
        self.key = next(_keys)
        _PACKED[self.key] = torch.ops.quantized.linear_prepack_fp16(linear.weight.detach(), bias)  # (out, in) float16
        weakref.finalize(self, _PACKED.pop, self.key, None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return linear_float16_packed(hidden, self.key, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=float16 (fbgemm packed)"


def use_float16_weights(model: PreTrainedModel) -> int:
    """Replace every `nn.Linear` of `model` (in place) by a `Float16PackedLinear`; the number replaced. One line when
    the model is not a float32 model on the CPU or this torch has no fbgemm."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise HfllmError("--float16_weights needs torch's fbgemm kernels (x86 CPUs); drop --float16_weights")
    parameter = next(model.parameters())
    if parameter.device.type != "cpu":
        raise HfllmError(f"--float16_weights is for CPU decoding (the model is on {parameter.device}); on a GPU use "
                         "--dtype bfloat16 or float16")
    if parameter.dtype != torch.float32 or getattr(model, "hf_quantizer", None) is not None:
        raise HfllmError(f"--float16_weights packs float32 weights (the model is {parameter.dtype} or quantized); "
                         "use --dtype float32 without --load_in_4bit/--load_in_8bit")
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, Float16PackedLinear(child))
                replaced += 1
    return replaced
