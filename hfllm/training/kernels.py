"""The GPU speed path of a recipe: Liger's fused kernels, FP8 linear layers, FlashAttention on packed documents.

    use_liger_kernel: true   Liger's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy on hfllm models
    fp8: true                nn.Linear layers of the decoder trained in float8 through torchao (H100-class GPUs)
    attn_implementation: flash_attention_2 | flash_attention_3 | kernels-community/flash-attn3
                             packed documents go to the varlen kernels (hfllm/data/packing.py: collate_flat_blocks)

`check_kernel_options` refuses each option with one line where its GPU or package is missing, before any work.

Liger: `use_liger_kernel` is transformers' own TrainingArguments key; Trainer then calls Liger's
`_apply_liger_kernel_to_instance`, which looks the model type up in Liger's table of patch functions. hfllm's classes
are not in it, so `register_liger` adds `apply_liger_kernel_to_hfllm` under "hfllm"; every Trainer-based command
(pretrain, sft, dpo, ...) then patches hfllm models the way it patches Llama. The patch uses Liger's own pieces:
its instance patchers for RMSNorm and SwiGLU (they rebind `forward`: the modules keep their class, parameters and
state-dict keys, and report Liger's class name), `liger_rotary_pos_emb` in place of the model file's
`apply_rotary_pos_emb`, and `LigerForCausalLMLoss` (the fused linear cross-entropy: no (B, T, V) logits in training)
in place of the model's `logits_and_loss`. MoE routed experts keep their own kernel.
"""

import importlib.util
import sys
from types import MethodType

import torch
from torch import nn

from ..errors import HfllmError

FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper and later have float8 tensor cores
GPU_EXTRA = "pip install 'hfllm[gpu]'"


def is_flash_attention(attn_implementation: str | None) -> bool:
    """FlashAttention through transformers: its flash_attention_2/3 or a Hub kernel such as kernels-community/flash-attn3."""
    name = (attn_implementation or "").lower()
    return name.startswith("flash_attention") or ("/" in name and "flash" in name)


def check_kernel_options(use_liger_kernel: bool, fp8: bool, attn_implementation: str | None) -> None:
    """One line and no work when an option's GPU or package is missing; registers hfllm with Liger when asked for."""
    gpu = torch.cuda.is_available()
    if use_liger_kernel:
        if not gpu:
            raise HfllmError("use_liger_kernel: true needs an NVIDIA GPU (Liger's kernels are Triton GPU kernels) and "
                             "none is visible; remove the key to train without them")
        if importlib.util.find_spec("liger_kernel") is None:
            raise HfllmError(f"use_liger_kernel: true needs the liger-kernel package: {GPU_EXTRA}")
        register_liger()
    if fp8:
        if not gpu:
            raise HfllmError("fp8: true needs a GPU with float8 tensor cores (compute capability 8.9+: L4, L40S, H100, "
                             "H200, B200) and none is visible; remove the key")
        capability = torch.cuda.get_device_capability()
        if capability < FP8_MIN_CAPABILITY:
            raise HfllmError(f"fp8: true needs compute capability 8.9+ (L4, L40S, H100 or later); "
                             f"{torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}; remove the key")
        if importlib.util.find_spec("torchao") is None:
            raise HfllmError(f"fp8: true needs the torchao package: {GPU_EXTRA}")
    if is_flash_attention(attn_implementation):
        if not gpu:
            raise HfllmError(f"attn_implementation: {attn_implementation} needs an NVIDIA GPU and none is visible; "
                             "use sdpa (it keeps documents apart with a block-diagonal mask)")
        package = FLASH_PACKAGES.get(attn_implementation, "kernels")
        if importlib.util.find_spec(package) is None:
            hint = {"flash_attn": "pip install flash-attn --no-build-isolation (or a prebuilt wheel)",
                    "flash_attn_interface": "build flash-attention's hopper/ folder (FlashAttention-3)",
                    "kernels": GPU_EXTRA}[package]
            raise HfllmError(f"attn_implementation: {attn_implementation} needs the {package} package: {hint}; "
                             "or use sdpa")


# ----------------------------------------------------------------------------- Liger


def register_liger() -> None:
    """Put hfllm in Liger's table of model types, so Trainer's `use_liger_kernel` patches hfllm models."""
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    MODEL_TYPE_TO_APPLY_LIGER_FN["hfllm"] = apply_liger_kernel_to_hfllm


def apply_liger_kernel_to_hfllm(
    rope: bool = True,
    cross_entropy: bool = False,
    fused_linear_cross_entropy: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    model: nn.Module | None = None,
) -> None:
    """Liger's kernels on an hfllm model instance (the signature of Liger's `apply_liger_kernel_to_llama`, so
    `liger_kernel_config` keys apply). `rope` patches the model file's module: every hfllm model of this process.
    `cross_entropy` (Liger's unfused loss) is not offered: the fused one supersedes it."""
    from liger_kernel.transformers import LigerSwiGLUMLP, liger_rotary_pos_emb
    from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module, _patch_swiglu_module

    if model is None:
        raise ValueError("apply_liger_kernel_to_hfllm patches a model instance: pass model=")
    if cross_entropy:
        raise ValueError("hfllm models take Liger's fused_linear_cross_entropy, not cross_entropy")
    modeling = sys.modules[type(model).__module__]  # hfllm's file, or its copy loaded with trust_remote_code
    if rope:
        modeling.apply_rotary_pos_emb = liger_rotary_pos_emb  # same arguments: q, k, cos (B, T, hd), sin
    for module in model.modules():
        name = type(module).__name__
        if rms_norm and name == "HfllmRMSNorm":
            _patch_rms_norm_module(module, eps=module.variance_epsilon)  # casting "llama": hfllm's float32 rule
        elif swiglu and name == "HfllmMLP" and module.gated and model.config.hidden_act in ("silu", "swish"):
            _patch_swiglu_module(module, LigerSwiGLUMLP)
    if fused_linear_cross_entropy:
        model.logits_and_loss = MethodType(_fused_logits_and_loss, model)


def _fused_logits_and_loss(self, hidden_states: torch.Tensor, labels: torch.LongTensor | None = None,
                           skip_logits: bool | None = None, **kwargs):
    """`logits_and_loss` with Liger's fused linear cross-entropy: in training with labels, the loss comes from the
    hidden states (B, T, H) and the head's weight in chunks and no logits are returned (Liger's rule for Llama;
    Trainer passes skip_logits=True for loss-only evaluation)."""
    from liger_kernel.transformers.model.loss_utils import LigerForCausalLMLoss

    if skip_logits is None:
        skip_logits = self.training and labels is not None
    if not skip_logits or labels is None:
        return type(self).logits_and_loss(self, hidden_states, labels, **kwargs)
    loss = LigerForCausalLMLoss(hidden_states=hidden_states, lm_head_weight=self.lm_head.weight, labels=labels,
                                hidden_size=self.config.hidden_size,
                                final_logit_softcapping=self.config.final_logit_softcapping, **kwargs)
    return None, loss


# ----------------------------------------------------------------------------- FP8


def fp8_module_filter(module: nn.Module, fqn: str) -> bool:
    """The linear layers trained in float8: the decoder's projections. Left in bf16: the LM head (its output feeds the
    softmax directly, the usual exclusion for accuracy) and layers whose sizes are not multiples of 16 (float8
    matmuls need them). Embeddings, norms and MoE routers (not nn.Linear) are never converted."""
    if not isinstance(module, nn.Linear) or fqn.split(".")[-1] == "lm_head":
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_to_fp8(model: nn.Module) -> nn.Module:
    """torchao's `convert_to_float8_training` on the decoder's linear layers (tensorwise scaling), in place."""
    from torchao.float8 import convert_to_float8_training

    return convert_to_float8_training(model, module_filter_fn=fp8_module_filter)
