"""Conversion between native transformers architectures (and GGUF files) and hfllm checkpoints.

    hfllm convert SRC OUT                      SRC: a transformers checkpoint folder or a .gguf file
    hfllm export SRC OUT --to transformers     an hfllm checkpoint back to the closest native architecture
    hfllm export SRC OUT --to gguf [--quant Q] the same as one GGUF file for llama.cpp / Ollama (gguf_export.py)

hfllm uses the same parameter names as Llama / Mistral / Qwen2 / Qwen3 / Mixtral / Qwen3-MoE in transformers 5.x
(experts fused as `gate_up_proj (E, 2I, H)` and `down_proj (E, H, I)`), so converting is a config translation plus a
state-dict copy; hfllm's only extra tensor is the MoE routing bias (`mlp.gate.expert_bias`, zero for a converted
model). Every copy is checked: a missing or unexpected tensor is an error, never a silently random weight.
"""

import copy
import json
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from ..checkpoint import atomic_output, check_gguf, check_output_dir, load, read_config
from ..errors import ArgumentParser, HfllmError
from .configuration_hfllm import HfllmConfig, HfllmConfigError
from .modeling_hfllm import HfllmForCausalLM

SUPPORTED_SOURCES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)
HFLLM_ONLY_KEYS = ("mlp.gate.expert_bias",)  # buffers hfllm has and native architectures lack
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- configs: native -> hfllm


def _common_fields(src: PreTrainedConfig) -> dict:
    return dict(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads,
        head_dim=getattr(src, "head_dim", None) or src.hidden_size // src.num_attention_heads,
        hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings,
        initializer_range=src.initializer_range,
        rms_norm_eps=src.rms_norm_eps,
        tie_word_embeddings=src.tie_word_embeddings,
        rope_parameters=dict(src.rope_parameters),
        attention_dropout=src.attention_dropout,
        pad_token_id=src.pad_token_id,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
    )


def _sliding_fields(src: PreTrainedConfig) -> dict:
    layer_types = getattr(src, "layer_types", None)
    if layer_types is None:  # Mistral / Mixtral: one window for every layer, or none
        kind = "sliding_attention" if src.sliding_window else "full_attention"
        layer_types = [kind] * src.num_hidden_layers
    return dict(sliding_window=src.sliding_window, layer_types=list(layer_types))


def hfllm_config_from(src: PreTrainedConfig) -> HfllmConfig:
    """Translate a native config (one of SUPPORTED_SOURCES) into an equivalent HfllmConfig."""
    architecture = (src.architectures or [""])[0] or f"{type(src).__name__.removesuffix('Config')}ForCausalLM"
    fields = _common_fields(src)
    if isinstance(src, LlamaConfig):
        fields.update(intermediate_size=src.intermediate_size, attention_bias=src.attention_bias,
                      attention_out_bias=src.attention_bias, mlp_bias=src.mlp_bias)
    elif isinstance(src, MistralConfig):
        fields.update(intermediate_size=src.intermediate_size, **_sliding_fields(src))
    elif isinstance(src, Qwen2Config):  # bias on q/k/v only
        fields.update(intermediate_size=src.intermediate_size, attention_bias=True, **_sliding_fields(src))
    elif isinstance(src, Qwen3Config):
        fields.update(intermediate_size=src.intermediate_size, attention_bias=src.attention_bias,
                      attention_out_bias=src.attention_bias, qk_norm=True, **_sliding_fields(src))
    elif isinstance(src, MixtralConfig):  # every layer MoE, top-k weights renormalised
        fields.update(intermediate_size=src.intermediate_size, moe_intermediate_size=src.intermediate_size,
                      num_experts=src.num_local_experts, num_experts_per_tok=src.num_experts_per_tok,
                      norm_topk_prob=True, router_aux_loss_coef=src.router_aux_loss_coef, **_sliding_fields(src))
    elif isinstance(src, Qwen3MoeConfig):
        dense_layers = [i for i in range(src.num_hidden_layers)
                        if i in src.mlp_only_layers or (i + 1) % src.decoder_sparse_step != 0]
        fields.update(intermediate_size=src.intermediate_size, moe_intermediate_size=src.moe_intermediate_size,
                      num_experts=src.num_experts, num_experts_per_tok=src.num_experts_per_tok,
                      norm_topk_prob=src.norm_topk_prob, router_aux_loss_coef=src.router_aux_loss_coef,
                      mlp_only_layers=dense_layers, attention_bias=src.attention_bias,
                      attention_out_bias=src.attention_bias, qk_norm=True, **_sliding_fields(src))
    else:
        raise HfllmError(
            f"cannot convert architecture '{architecture}'; supported: {', '.join(SUPPORTED_SOURCES)}"
        )
    try:
        return HfllmConfig(**fields)
    except HfllmConfigError as error:
        raise HfllmError(f"the {architecture} config has no hfllm equivalent: {error}") from None


# --------------------------------------------------------------------------- configs: hfllm -> native


def hfllm_only_variants(config: HfllmConfig) -> list[str]:
    """The variants of `config` that no native Llama-family architecture (nor llama.cpp's) computes, each named
    with its config field: ALiBi and NoPE positions, modded-nanogpt's options, Mixture of Depths,
    Mixture-of-Recursions and Mamba-2 layers. Zero-initialised output projections change only the initialisation, so
    they export."""
    variants = []
    if getattr(config, "has_mamba_layers", False):
        variants.append("layer_types: mamba")
    if config.position_embedding != "rope":
        variants.append(f"position_embedding: {config.position_embedding}")
    if config.mlp_activation != "gated":
        variants.append(f"mlp_activation: {config.mlp_activation}")
    if config.final_logit_softcapping is not None:
        variants.append(f"final_logit_softcapping: {config.final_logit_softcapping:g}")
    if config.value_embeddings:
        variants.append(f"value_embeddings: {config.value_embeddings}")
    if config.unet_skips:
        variants.append("unet_skips: true")
    if config.num_recursions > 1:
        variants.append(f"num_recursions: {config.num_recursions} (Mixture-of-Recursions)")
    if config.mod_capacity is not None:  # Mixture of Depths: routed layers and their routers
        variants.append(f"mod_capacity: {config.mod_capacity:g}")
    return variants


def native_config_from(config: HfllmConfig) -> PreTrainedConfig:
    """The native transformers config that computes exactly what `config` computes, or an HfllmError saying why
    none does. Choice: MoE -> Mixtral (or Qwen3-MoE with QK-norm / dense layers); dense -> Llama, Mistral (sliding
    window), Qwen2 (q/k/v bias only) or Qwen3 (QK-norm)."""
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, rope_parameters=dict(config.rope_parameters),
        attention_dropout=config.attention_dropout, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
    )
    sliding = set(config.layer_types) != {"full_attention"}
    uniform_window = set(config.layer_types) == {"sliding_attention"}
    qwen_sliding = dict(use_sliding_window=sliding, sliding_window=config.sliding_window,
                        layer_types=list(config.layer_types))

    def refuse(reason: str) -> HfllmError:
        return HfllmError(f"no native transformers architecture matches this model: {reason}")

    if variants := hfllm_only_variants(config):
        raise refuse(f"{'; '.join(variants)} (only hfllm's own code computes {'it' if len(variants) == 1 else 'them'}); "
                     "keep the hfllm checkpoint, which loads with trust_remote_code=True")

    if config.mlp_bias and (config.num_experts or sliding or config.qk_norm):
        raise refuse("mlp_bias is only supported by Llama (dense, full attention, no qk_norm)")
    if config.num_experts > 0:
        if config.num_shared_experts > 0:
            raise refuse("shared experts (num_shared_experts > 0) exist in no native architecture with softmax routing")
        if config.attention_bias or config.attention_out_bias:
            raise refuse("attention biases are not supported by Mixtral / Qwen3-MoE exports")
        if sliding and not uniform_window:
            raise refuse("Mixtral / Qwen3-MoE support one sliding window for all layers, not a mix of layer types")
        if config.qk_norm:
            return Qwen3MoeConfig(
                **fields, intermediate_size=config.intermediate_size, moe_intermediate_size=config.moe_intermediate_size,
                num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
                norm_topk_prob=config.norm_topk_prob, router_aux_loss_coef=config.router_aux_loss_coef,
                mlp_only_layers=list(config.mlp_only_layers), decoder_sparse_step=1, attention_bias=False,
                use_sliding_window=sliding, sliding_window=config.sliding_window,
            )
        if config.mlp_only_layers or not config.norm_topk_prob:
            raise refuse("Mixtral has every layer MoE with renormalised top-k weights; dense layers or "
                         "norm_topk_prob=False export to Qwen3-MoE, which needs qk_norm=True")
        return MixtralConfig(
            **fields, intermediate_size=config.moe_intermediate_size, num_local_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok, router_aux_loss_coef=config.router_aux_loss_coef,
            sliding_window=config.sliding_window if sliding else None,
        )
    if config.qk_norm:
        if config.attention_bias != config.attention_out_bias:
            raise refuse("Qwen3 has one attention_bias for q/k/v/o; set attention_bias == attention_out_bias")
        return Qwen3Config(**fields, intermediate_size=config.intermediate_size,
                           attention_bias=config.attention_bias, **qwen_sliding)
    if config.attention_bias and not config.attention_out_bias:  # Qwen2 also carries per-layer sliding windows
        return Qwen2Config(**fields, intermediate_size=config.intermediate_size, **qwen_sliding)
    if config.attention_out_bias and not config.attention_bias:
        raise refuse("a bias on the output projection alone exists in no native architecture")
    if sliding:
        if config.attention_bias:
            raise refuse("sliding-window layers with a bias on every attention projection exist in no native architecture")
        if not uniform_window:
            raise refuse("a mix of full and sliding layers needs q/k/v bias (Qwen2) or qk_norm (Qwen3); Mistral has "
                         "one window for all layers")
        return MistralConfig(**fields, intermediate_size=config.intermediate_size, sliding_window=config.sliding_window)
    return LlamaConfig(**fields, intermediate_size=config.intermediate_size, attention_bias=config.attention_bias,
                       mlp_bias=config.mlp_bias)


# --------------------------------------------------------------------------- weights


def copy_weights(src: PreTrainedModel, dst: PreTrainedModel, allowed_missing: tuple[str, ...] = ()) -> None:
    """Load src's state dict into dst; every tensor must find its place (tied heads and `allowed_missing` aside)."""
    state = {k: v for k, v in src.state_dict().items() if not k.endswith(HFLLM_ONLY_KEYS)}
    result = dst.load_state_dict(state, strict=False)
    tied = set(dst._tied_weights_keys or {}) if dst.config.tie_word_embeddings else set()
    missing = [k for k in result.missing_keys if k not in tied and not k.endswith(allowed_missing)]
    if missing or result.unexpected_keys:
        raise HfllmError(
            f"weights do not match between {type(src).__name__} and {type(dst).__name__}: "
            f"missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )
    if dst.config.tie_word_embeddings:
        dst.tie_weights()


def load_native(src: Path, dtype) -> tuple[PreTrainedModel, object]:
    """Load a transformers folder or a .gguf file (dequantized) as its native model, plus its tokenizer; the
    architecture must be one `convert` supports (checked before any weights are loaded)."""
    if not src.exists():
        raise HfllmError(f"source '{src}' does not exist; give a transformers checkpoint folder or a .gguf file")
    if src.is_file():
        if src.suffix != ".gguf":
            raise HfllmError(f"source file '{src}' is not a .gguf file; give a .gguf file or a checkpoint folder")
        check_gguf(src)
        config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    else:
        architecture = (read_config(src).get("architectures") or ["?"])[0]
        if architecture not in SUPPORTED_SOURCES:
            raise HfllmError(
                f"cannot convert architecture '{architecture}' in {src}; supported: {', '.join(SUPPORTED_SOURCES)}"
            )
        config = AutoConfig.from_pretrained(src)
    hfllm_config_from(config)  # fail on unsupported configs before loading any weights
    return load(src, dtype=dtype)


def _save(model: PreTrainedModel, tokenizer, generation_config: GenerationConfig | None, out: Path) -> None:
    """Model, tokenizer and generation config, written aside and renamed into place when complete."""
    with atomic_output(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)


def to_hfllm(model: PreTrainedModel) -> HfllmForCausalLM:
    """An HfllmForCausalLM computing the same function as a native `model` (same dtype, same weights)."""
    config = hfllm_config_from(model.config)
    with torch.device("meta"):
        hfllm_model = HfllmForCausalLM(config)
    hfllm_model.to_empty(device="cpu")
    copy_weights(model, hfllm_model, allowed_missing=HFLLM_ONLY_KEYS)
    hfllm_model._init_weights(hfllm_model.model.rotary_emb)  # recompute non-persistent rotary buffers
    for router in hfllm_model.routers():
        router.expert_bias.zero_()
        router.tokens_per_expert.zero_()
    hfllm_model.generation_config = model.generation_config
    return hfllm_model.to(model.dtype)


def to_native(model: HfllmForCausalLM) -> PreTrainedModel:
    """The native transformers model computing the same function as an hfllm `model`."""
    biased = [i for i, router in enumerate(model.routers()) if router.expert_bias.abs().sum() > 0]
    if biased:
        raise HfllmError(
            "this MoE model was trained with aux-loss-free routing biases (router_bias_update_rate > 0), which no "
            "native architecture applies; it can only be used as an hfllm checkpoint"
        )
    native_config = native_config_from(model.config)
    native_config.architectures = [f"{type(native_config).__name__.removesuffix('Config')}ForCausalLM"]
    native = AutoModelForCausalLM.from_config(native_config, dtype=model.dtype)
    copy_weights(model, native)
    native.generation_config = model.generation_config
    return native


def exact_native(model: HfllmForCausalLM, batches: int = 3) -> PreTrainedModel:
    """`to_native(model)`, checked exact: the weights are copies and the native model's float32 logits equal the hfllm
    model's bit for bit on a few random inputs (float32, so bf16 kernels' rounding does not count); an HfllmError
    saying why otherwise."""
    native = to_native(model)
    hfllm32 = model if model.dtype == torch.float32 else copy.deepcopy(model).float()
    native32 = native if hfllm32 is model else to_native(hfllm32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for length in range(batches):
            ids = torch.randint(0, model.config.vocab_size, (2, 5 + 7 * length), generator=generator)
            if not torch.equal(hfllm32.eval()(ids).logits, native32.eval()(ids).logits):
                raise HfllmError(f"the native {type(native).__name__} does not compute the same logits as the hfllm "
                                 "model (a feature it lacks)")
    return native


def load_as_native(spec: str | Path, dtype: str | torch.dtype = "auto") -> tuple[PreTrainedModel, Any]:
    """Any model spec (`hfllm.checkpoint.load`, an adapter merged) as a native transformers model, and its
    tokenizer: hfllm's family through `to_native`."""
    model, tokenizer = load(spec, dtype=dtype, merge_adapter=True)
    return (to_native(model) if model.config.model_type == "hfllm" else model), tokenizer


def convert(src: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    """Convert a transformers checkpoint folder or .gguf file into an hfllm checkpoint (`hfllm convert`): the same
    weights in hfllm's own family, which trains with every hfllm recipe and feature.

    Args:
        src: a transformers checkpoint folder (Llama, Mistral, Qwen2, ... that hfllm's family expresses) or a .gguf file.
        out: the new checkpoint folder (new or empty; written whole or not at all).
        dtype: the weights' dtype: "auto" (the source's), "float32", "bfloat16" or "float16".

    Returns:
        `out`. Bad input raises `HfllmError` with the line the command prints.

    Example:
        >>> hfllm.convert("smollm2-135m/", "runs/smollm2-hfllm")
    """
    if dtype not in DTYPES:
        raise HfllmError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    src, out = Path(src), Path(out)
    check_output_dir(out)
    model, tokenizer = load_native(src, DTYPES[dtype])
    hfllm_model = to_hfllm(model)
    _save(hfllm_model, tokenizer, model.generation_config, out)
    return out


def export(src: str | Path, out: str | Path, to: str = "transformers", quant: str | None = None) -> Path:
    """Export an hfllm checkpoint (`hfllm export`): to the native transformers class it maps to (loads without hfllm
    or remote code), or with `to="gguf"` to a GGUF file plus an Ollama `Modelfile` for llama.cpp and Ollama.

    Args:
        src: an hfllm checkpoint folder.
        out: the new folder (new or empty; written whole or not at all).
        to: "transformers" or "gguf".
        quant: the GGUF weights (`to="gguf"` only): f32, f16 (default), bf16, q8_0, q4_0, q4_k_m.

    Returns:
        The folder (`to="transformers"`) or the GGUF file. Bad input raises `HfllmError` with the line the command
        prints.

    Example:
        >>> hfllm.export("runs/sft", "runs/sft-gguf", to="gguf", quant="q8_0")
    """
    from .gguf_export import QUANTS, export_gguf

    src, out = Path(src), Path(out)
    if to not in ("transformers", "gguf"):
        raise HfllmError(f"unknown export target '{to}'; supported: transformers, gguf")
    if quant is not None and (to != "gguf" or quant not in QUANTS):
        raise HfllmError(f"--quant {quant} needs --to gguf and one of: {', '.join(QUANTS)}")
    if read_config(src).get("model_type") != "hfllm":
        raise HfllmError(f"'{src}' is not an hfllm checkpoint (model_type is not 'hfllm'); nothing to export")
    native_config_from(HfllmConfig.from_pretrained(src))  # refuses what no native class computes, before loading
    check_output_dir(out)
    model, tokenizer = load(src, dtype="auto" if to == "transformers" else torch.float32)
    native = to_native(model)
    if to == "gguf":
        return export_gguf(native, tokenizer, out, quant or "f16", src.resolve().name)
    _save(native, tokenizer, model.generation_config, out)
    return out


def convert_main(argv: list[str], prog: str = "hfllm convert") -> None:
    parser = ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("src", help="transformers checkpoint folder or .gguf file")
    parser.add_argument("out", help="new hfllm checkpoint folder")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES), help="weights dtype (auto keeps the source's)")
    args = parser.parse_args(argv)
    out = convert(args.src, args.out, args.dtype)
    print(f"hfllm checkpoint written to {out}")


def export_main(argv: list[str], prog: str = "hfllm export") -> None:
    parser = ArgumentParser(prog=prog, description="Export an hfllm checkpoint to a native architecture.")
    parser.add_argument("src", help="hfllm checkpoint folder")
    parser.add_argument("out", help="new checkpoint folder")
    parser.add_argument("--to", default="transformers", choices=["transformers", "gguf"], help="target format")
    parser.add_argument("--quant", default=None, help="GGUF weights: f32, f16 (default), bf16, q8_0, q4_0, q4_k_m")
    args = parser.parse_args(argv)
    out = export(args.src, args.out, args.to, args.quant)
    if args.to == "gguf":
        print(f"GGUF written to {out} (Ollama: cd {out.parent} && ollama create NAME -f Modelfile)")
        return
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    print(f"{architecture} checkpoint written to {out}")
