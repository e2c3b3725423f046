"""Named model presets, `<variant>-<size>`: variant llama (dense), mistral (sliding window) or moe; size tiny,
125m, 350m or 1b. Recipes and users ask for them by name; any config field can be overridden.

`hfllm presets` prints each one with its parameter count (at the preset's vocab size of 32000; recipes set
`vocab_size` from the tokenizer).
"""

import difflib

import torch

from ..errors import ArgumentParser, HfllmError
from .configuration_hfllm import HfllmConfig, HfllmConfigError

SIZES: dict[str, dict] = {
    # tiny: a few million parameters, for CPUs and tests
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
    "125m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, max_position_embeddings=2048),
    "350m": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=4, max_position_embeddings=2048),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20, num_attention_heads=32,
               num_key_value_heads=8, max_position_embeddings=2048),
}


def _variant(variant: str, size: dict) -> dict:
    if variant == "llama":
        return {}
    if variant == "mistral":  # every layer attends to a window of half the context
        return dict(sliding_window=size["max_position_embeddings"] // 2)
    # moe: 8 experts of a quarter MLP width, top-2 (Mixtral-style, so it exports natively); aux losses on by default
    return dict(num_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=size["intermediate_size"] // 4, output_router_logits=True)


PRESETS: dict[str, dict] = {
    f"{variant}-{size}": dict(vocab_size=32000, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                              **fields, **_variant(variant, fields))
    for variant in ("llama", "mistral", "moe")
    for size, fields in SIZES.items()
}


def get_preset(name: str, **overrides) -> HfllmConfig:
    """The `HfllmConfig` of preset `name`, with `overrides` applied on top."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose from: {', '.join(PRESETS)}"
        raise HfllmError(f"unknown model preset '{name}'; {hint}")
    fields = {**PRESETS[name], **overrides}
    unknown = sorted(set(overrides) - set(HfllmConfig.__dataclass_fields__))
    if unknown:
        close = difflib.get_close_matches(unknown[0], HfllmConfig.__dataclass_fields__, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise HfllmError(f"unknown model config field '{unknown[0]}'{hint}")
    try:
        return HfllmConfig(**fields)
    except HfllmConfigError as error:
        raise HfllmError(f"model '{name}': {error}") from None


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """The parameter counts hfllm reports, each defined once:
      total          unique parameters (a tied head counted once)
      embedding      the input embedding table
      non_embedding  total - embedding
      active         parameters a token uses: MoE fused experts (E, ., .) count for the top-k of E only
      active_matmul  weights that multiply activations per token (FLOPs): active - embedding + a tied head
    """
    embedding_weight = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    experts = getattr(model.config, "num_experts", 0) or 0
    top_k = getattr(model.config, "num_experts_per_tok", 0) or 0
    total = sum(_numel(p) for p in model.parameters())
    active = 0
    for p in model.parameters():
        shape = getattr(p, "ds_shape", p.shape)
        is_experts = experts and len(shape) == 3 and shape[0] == experts
        active += _numel(p) * top_k // experts if is_experts else _numel(p)
    tied_head = head is not None and head.weight is embedding_weight
    embedding = _numel(embedding_weight)
    active_matmul = active - embedding + (_numel(head.weight) if tied_head else 0)
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding,
            "active": active, "active_matmul": active_matmul}


def _numel(parameter: torch.Tensor) -> int:
    """Elements of a parameter, also when DeepSpeed ZeRO-3 partitioned it (its own tensor is then empty)."""
    return getattr(parameter, "ds_numel", None) or parameter.numel()


def preset_parameter_counts(config: HfllmConfig) -> dict[str, int]:
    """`parameter_counts` of a config's model, built on the meta device (no memory used)."""
    from .modeling_hfllm import HfllmForCausalLM

    with torch.device("meta"):
        return parameter_counts(HfllmForCausalLM(config))


def main(argv: list[str], prog: str = "hfllm presets") -> None:
    parser = ArgumentParser(prog=prog, description="List the named model presets.")
    parser.parse_args(argv)
    print(f"{'preset':<14}{'params':>10}{'active':>10}  layers  hidden  heads/kv  experts  window")
    for name in PRESETS:
        config = get_preset(name)
        counts = preset_parameter_counts(config)
        total, active = counts["total"], counts["active"]
        experts = f"{config.num_experts_per_tok}/{config.num_experts}" if config.num_experts else "-"
        print(
            f"{name:<14}{total / 1e6:>9.1f}M{active / 1e6:>9.1f}M  {config.num_hidden_layers:>6}  "
            f"{config.hidden_size:>6}  {config.num_attention_heads:>5}/{config.num_key_value_heads:<2}  "
            f"{experts:>7}  {config.sliding_window or '-':>6}"
        )
