"""hfllm's decoder-only transformer: one family, read top to bottom.

    RMSNorm -> rotary embedding / ALiBi slopes -> attention (GQA, optional QK-norm, sliding window, value
    embeddings) -> SwiGLU or ReLU² MLP -> MoE (router, fused experts, shared experts) -> Mixture-of-Depths router ->
    decoder layer (attention or a Mamba-2 mixer, `mamba2_hfllm.py`) -> Mixture-of-Recursions router -> model
    (optional U-net skips, optional recursions) -> causal-LM head (+ optional logit soft-capping, MoE and recursion
    losses)

Llama, Mistral (sliding window) and MoE variants, ALiBi / NoPE positions, modded-nanogpt's speedrun options, Mixture
of Depths, Mixture-of-Recursions and Mamba-2 hybrids differ only by config fields (see `configuration_hfllm.py`).
Attention kernels (eager / sdpa / flash_attention_2 / flex_attention) are swapped through transformers'
`ALL_ATTENTION_FUNCTIONS`, KV caches through its `Cache` classes, experts kernels through `use_experts_implementation`.
Shapes: B batch, T new tokens, S key length (cache included), H hidden, nh / nkv heads, hd head dim, E experts.

This file is copied next to saved checkpoints (`trust_remote_code=True`): it imports only torch and transformers.
It checks the transformers it runs under by the upstream contracts it relies on, not by version number (see
`check_upstream_contracts`): older than the oldest tested release it refuses; newer than the newest tested release it
runs, with one warning, unless one of the contracts is missing.
"""

import dataclasses
import importlib.util
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import transformers

# The transformers releases this file was tested on: the oldest and the newest (minor versions). Below the oldest the
# model refuses to load; above the newest it loads after `check_upstream_contracts`, and warns once.
TESTED_TRANSFORMERS = ((5, 23), (5, 25))
TRANSFORMERS_VERSION = tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", transformers.__version__).groups())
_FIX = "pip install 'transformers>={}.{},<{}.{}'".format(*TESTED_TRANSFORMERS[0], TESTED_TRANSFORMERS[1][0],
                                                          TESTED_TRANSFORMERS[1][1] + 1)
if TRANSFORMERS_VERSION < TESTED_TRANSFORMERS[0]:
    raise ImportError(f"this hfllm model code needs transformers>={TESTED_TRANSFORMERS[0][0]}.{TESTED_TRANSFORMERS[0][1]}"
                      f", but transformers {transformers.__version__} is installed: {_FIX}")

try:
    from transformers import cache_utils
    from transformers import initialization as init
    from transformers.activations import ACT2FN
    from transformers.cache_utils import Cache, DynamicCache, StaticCache
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, TensorParallelLayer
    from transformers.generation import GenerationMixin
    from transformers.integrations import use_experts_implementation
    from transformers.masking_utils import (create_causal_mask, create_recurrent_attention_mask,
                                            create_sliding_window_causal_mask)
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
    from transformers.processing_utils import Unpack
    from transformers.utils import TransformersKwargs, can_return_tuple, logging
    from transformers.utils.generic import merge_with_config_defaults
    from transformers.utils.output_capturing import OutputRecorder, capture_outputs
except ImportError as error:  # a name this file imports was moved or removed upstream
    raise ImportError(f"this hfllm model code cannot run on transformers {transformers.__version__} "
                      f"({str(error).split(' (')[0]}): {_FIX}") from None

from .configuration_hfllm import MAMBA, HfllmConfig
from .mamba2_hfllm import HfllmMamba2Mixer, init_mamba_weights

# under transformers' own logger, so that TRANSFORMERS_VERBOSITY governs this file's warning as it does transformers'
logger = logging.get_logger("transformers.hfllm")

# transformers 5.24 renamed the KV cache `past_key_values` -> `cache`: generate() passes it under that name, the mask
# functions take it, and model outputs carry it. This file uses `cache` inside and speaks the installed version's name
# at those boundaries.
CACHE_NAMES = ("cache", "past_key_values")


def _fields(output_class: type) -> set[str]:
    return {field.name for field in dataclasses.fields(output_class)}


def _parameters(function: Callable) -> set[str]:
    return set(inspect.signature(function).parameters)


def upstream_contracts() -> tuple[str | None, dict[str, bool]]:
    """The installed transformers' name for the KV cache (None when it has neither known name), and every upstream
    contract this file relies on, described in words, with whether it holds."""
    cache_name = next((name for name in CACHE_NAMES if name in _fields(MoeModelOutputWithPast)), None)
    name = cache_name or "cache"
    mask_arguments = {"config", "inputs_embeds", "attention_mask", name, "position_ids"}
    return cache_name, {
        "model outputs carry the KV cache as `cache` or `past_key_values` (MoeModelOutputWithPast)": cache_name is not None,
        f"generate() passes the KV cache as `{name}` (GenerationMixin.prepare_inputs_for_generation)":
            name in _parameters(GenerationMixin.prepare_inputs_for_generation),
        f"the mask functions take {', '.join(sorted(mask_arguments))} (create_causal_mask)":
            mask_arguments <= _parameters(create_causal_mask),
        f"the mask functions take {', '.join(sorted(mask_arguments))} (create_sliding_window_causal_mask)":
            mask_arguments <= _parameters(create_sliding_window_causal_mask),
        f"MoeModelOutputWithPast has last_hidden_state, {name}, hidden_states, attentions, router_logits":
            {"last_hidden_state", name, "hidden_states", "attentions", "router_logits"} <= _fields(MoeModelOutputWithPast),
        f"MoeCausalLMOutputWithPast has loss, aux_loss, logits, {name}, hidden_states, attentions, router_logits":
            {"loss", "aux_loss", "logits", name, "hidden_states", "attentions", "router_logits"}
            <= _fields(MoeCausalLMOutputWithPast),
        "attention kernels are looked up by name (ALL_ATTENTION_FUNCTIONS has 'sdpa')": "sdpa" in ALL_ATTENTION_FUNCTIONS,
        "KV caches update by layer (Cache.update(key_states, value_states, layer_idx, ...))":
            {"key_states", "value_states", "layer_idx"} <= _parameters(Cache.update),
        "tensor-parallel styles install a forward (TensorParallelLayer.install_forward(module, mesh, ...))":
            {"module", "mesh"} <= _parameters(TensorParallelLayer.install_forward),
        "Mamba-2 states are cached by layer (Cache.get_conv_state, update_conv_state, get_recurrent_state, "
        "update_recurrent_state take layer_idx)": all("layer_idx" in _parameters(getattr(Cache, method)) for method in (
            "get_conv_state", "update_conv_state", "get_recurrent_state", "update_recurrent_state")),
        f"DynamicCache(config=...) builds a conv / recurrent state layer for layer type '{MAMBA}' "
        "(cache_utils.DYNAMIC_LAYER_TYPE_MAPPING)": hasattr(getattr(cache_utils, "DYNAMIC_LAYER_TYPE_MAPPING", {})
                                                              .get(MAMBA), "update_recurrent_state"),
        f"the recurrent mask function takes config, inputs_embeds, attention_mask, {name} "
        "(create_recurrent_attention_mask)":
            {"config", "inputs_embeds", "attention_mask", name} <= _parameters(create_recurrent_attention_mask),
    }


def check_upstream_contracts() -> str:
    """The KV cache's name in the installed transformers, once every contract of `upstream_contracts` holds. A broken
    one raises ImportError naming it and the fix; a release newer than the newest tested one warns once."""
    cache_name, contracts = upstream_contracts()
    broken = [contract for contract, holds in contracts.items() if not holds]
    if broken:
        raise ImportError(f"this hfllm model code needs an upstream contract that transformers {transformers.__version__}"
                          f" breaks: {broken[0]}; {_FIX}")
    if TRANSFORMERS_VERSION > TESTED_TRANSFORMERS[1]:
        logger.warning_once(
            f"hfllm model code: transformers {transformers.__version__} is newer than the releases it was tested on "
            "({}.{} to {}.{}); the upstream contracts it needs hold, so it runs".format(*TESTED_TRANSFORMERS[0],
                                                                                       *TESTED_TRANSFORMERS[1]))
    return cache_name


CACHE_NAME = check_upstream_contracts()


def _cache_argument(cache: Cache | None, kwargs: dict) -> Cache | None:
    """The KV cache from `cache=` or its pre-5.24 name `past_key_values=` (transformers 5.23's generate(), peft's
    prefix tuning), removed from kwargs so that it is not passed on twice."""
    legacy = kwargs.pop("past_key_values", None)
    if legacy is not None and cache is not None:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return cache if legacy is None else legacy


class HfllmGradSumParallel(TensorParallelLayer):
    """Tensor-parallel style `hfllm_grad_sum`: a weight kept whole on every rank whose gradient each rank only
    partly computes (QK-norm sees this rank's heads only). Each backward's gradient is summed over the ranks before
    it is accumulated. transformers' `replicated_with_grad_allreduce` sums the accumulated `.grad` after every
    backward instead, which counts earlier micro-batches tp_size times under gradient accumulation."""

    def install_forward(self, module: nn.Module, mesh, **_) -> nn.Module:  # 5.25 added config=, mesh_manager=
        original_forward, hooked = module.forward, {}

        def sum_over_ranks(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            dist.all_reduce(grad, group=mesh.get_group())
            return grad

        def forward(*args, **kwargs):
            if torch.is_grad_enabled():  # hooked at the first forward: loading replaces the parameters
                for name, param in module.named_parameters(recurse=False):
                    if param.requires_grad and hooked.get(name) is not param:
                        param.register_hook(sum_over_ranks)
                        hooked[name] = param
            return original_forward(*args, **kwargs)

        module.forward = forward
        return module


if dist.is_available():
    ALL_PARALLEL_STYLES.register("hfllm_grad_sum", HfllmGradSumParallel())


class HfllmRMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class HfllmRotaryEmbedding(nn.Module):
    """Rotary position embedding; scaling types (linear, dynamic NTK, YaRN, llama3) come from transformers."""

    def __init__(self, config: HfllmConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config)
        # Not saved in checkpoints: `_init_weights` recomputes both after loading on the meta device.
        self.inv_freq = nn.Buffer(inv_freq, persistent=False)  # (hd/2,)
        self.original_inv_freq = nn.Buffer(inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: HfllmConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update  # recomputes inv_freq for "dynamic" rope when sequences outgrow the original length
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, nh, T, hd), k (B, nkv, T, hd), cos/sin (B, T, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd): broadcast over heads
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def alibi_slopes(num_heads: int, device: torch.device | None = None) -> torch.Tensor:
    """ALiBi's per-head slopes m_h (Press et al. 2022, arXiv 2108.12409, section 3): for n heads a power of 2, the
    geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8); otherwise the slopes of the closest smaller power of 2, c,
    followed by every other slope of 2c (the paper's rule, from its reference code). Returns (nh,) float32."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def alibi_attention_mask(
    attention_mask: torch.Tensor | None, slopes: torch.Tensor, query_length: int, key_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """The causal / padding mask as an additive float mask with ALiBi's bias: -m_h * (i - j) where query i may see key
    j, the dtype's minimum elsewhere. Keys are the last `key_length` positions and the queries the last
    `query_length` of them (a dynamic KV cache, full or sliding), so i - j is the distance in tokens; left padding
    shifts both alike. attention_mask: None (causal only), boolean (True = attend) or additive float, (B, 1, T, S).
    Returns (B or 1, nh, T, S)."""
    device = slopes.device
    query_positions = torch.arange(key_length - query_length, key_length, device=device)  # (T,)
    distance = query_positions[:, None] - torch.arange(key_length, device=device)[None, :]  # (T, S): i - j
    if attention_mask is None:
        allowed = (distance >= 0)[None, None]  # (1, 1, T, S)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask[..., :key_length]
    else:
        allowed = attention_mask[..., :key_length] == 0
    bias = -slopes[None, :, None, None] * distance[None, None].to(torch.float32)  # (1, nh, T, S)
    return torch.where(allowed, bias, torch.finfo(torch.float32).min).to(dtype)


def check_alibi_support(attn_implementation: str, cache: Cache | None) -> None:
    """ALiBi's refusals, each in one line: FlashAttention-2 runs through flash-attn's own functions
    (`flash_alibi_attention`), so flash-attn must be installed, and other flash kernels have no `alibi_slopes` wired;
    a flex attention without `position_bias` would drop the bias silently; a static cache holds empty slots, so the
    distances of a dynamic cache do not apply."""
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("position_embedding 'alibi' under flash_attention_2 calls flash-attn's own kernels with "
                         "alibi_slopes, and flash-attn is not installed: pip install flash-attn, or use attn_implementation "
                         "sdpa")
    if "flash" in attn_implementation and attn_implementation != "flash_attention_2":
        raise ValueError(f"position_embedding 'alibi' is not wired to {attn_implementation} (its call does not pass "
                         "alibi_slopes); use attn_implementation flash_attention_2, sdpa or flex_attention")
    if attn_implementation == "flex_attention" and "position_bias" not in _parameters(
            ALL_ATTENTION_FUNCTIONS["flex_attention"]):
        raise ValueError(f"position_embedding 'alibi' needs transformers' flex attention to take a position_bias, "
                         f"which transformers {transformers.__version__}'s does not; use attn_implementation sdpa")
    if getattr(cache, "is_compileable", False):
        raise ValueError("position_embedding 'alibi' measures distances in the dynamic KV cache; a static cache "
                         "(cache_implementation='static', compiled generation) is not supported")


def flash_alibi_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    alibi_slopes: torch.Tensor,
    scaling: float,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **_,
) -> tuple[torch.Tensor, None]:
    """ALiBi under FlashAttention-2, through flash-attn's own `alibi_slopes` (transformers' FlashAttention call does not
    pass them). flash-attn adds -m_h |i + S - T - j| to the score of query i on key j, its causal mask aligned to the
    bottom right (the T queries are the last of the S keys): ALiBi's -m_h (i - j) in token distance. A (B, S) padding
    mask (transformers' FlashAttention mask) is unpadded into flash-attn's varlen call, so each row counts distances
    over its real tokens, as a row alone would. query (B, nh, T, hd), key / value (B, nkv, S, hd) -> (B, T, nh, hd);
    GQA is flash-attn's own (nkv divides nh)."""
    try:  # inside try: transformers' remote-code loader then does not require flash-attn of every reader
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError as error:  # check_alibi_support refuses first; this is for a direct call
        raise ValueError("position_embedding 'alibi' under flash_attention_2 needs flash-attn: pip install flash-attn") from error

    query, key, value = (states.transpose(1, 2) for states in (query, key, value))  # (B, T | S, n, hd)
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    options = dict(dropout_p=dropout, softmax_scale=scaling, causal=True, window_size=window, alibi_slopes=alibi_slopes)
    if attention_mask is None:  # no padding
        return flash_attn_func(query, key, value, **options), None
    keys_kept = attention_mask[:, -key.shape[1]:].bool()  # (B, S): the real tokens among the keys
    queries_kept = keys_kept[:, -query.shape[1]:]  # (B, T)
    key_lengths, query_lengths = keys_kept.sum(dim=1), queries_kept.sum(dim=1)  # (B,)
    output = flash_attn_varlen_func(
        query[queries_kept], key[keys_kept], value[keys_kept],  # (N_q, nh, hd), (N_k, nkv, hd)
        F.pad(query_lengths.cumsum(0, dtype=torch.int32), (1, 0)), F.pad(key_lengths.cumsum(0, dtype=torch.int32), (1, 0)),
        int(query_lengths.max()), int(key_lengths.max()), **options,
    )  # (N_q, nh, hd)
    padded = query.new_zeros(query.shape)  # (B, T, nh, hd): padded queries attend to nothing
    padded[queries_kept] = output
    return padded, None


def check_mamba_support(attn_implementation: str, cache: Cache | None) -> None:
    """Mamba layers' refusals, each in one line: a static cache (its positions are slots, not the tokens the states
    have seen), a cache that records past states to roll them back (assisted / speculative generation: the mixer
    keeps only the last SSM state) and flex attention in the attention layers are untested with them."""
    if isinstance(cache, StaticCache):
        raise ValueError("layer_types 'mamba' keeps its conv / SSM states in the dynamic cache; a static cache "
                         "(cache_implementation='static', compiled generation) is not supported")
    if any(getattr(layer, "record_past", False) for layer in getattr(cache, "layers", ())):
        raise ValueError("layer_types 'mamba' keeps only the last SSM state, which assisted / speculative generation "
                         "cannot roll back; generate without assistant_model or prompt_lookup_num_tokens")
    if attn_implementation == "flex_attention":
        raise ValueError("layer_types 'mamba' is not tested with flex_attention in its attention layers; use "
                         "attn_implementation sdpa, eager or flash_attention_2")


class HfllmMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); or, with `mlp_activation: relu2`, the non-gated ReLU² MLP of modded-nanogpt's
    records: down(relu(up(x))^2) (Primer, So et al. 2021, arXiv 2109.08668)."""

    def __init__(self, config: HfllmConfig, intermediate_size: int | None = None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gated = config.mlp_activation == "gated"
        if self.gated:
            self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=config.mlp_bias)
        if config.zero_init_output_projections:
            self.down_proj.zero_init = True  # `_init_weights` starts it at zero (modded-nanogpt)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gated:
            return self.down_proj(F.relu(self.up_proj(x)).square())
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, nkv, S, hd) -> (B, nkv * n_rep, S, hd): each key/value head serves n_rep query heads."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention in plain torch; the mask (causal, padding, sliding window) is additive."""
    key_states = repeat_kv(key, module.num_key_value_groups)  # (B, nh, S, hd)
    value_states = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling  # (B, nh, T, S)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)  # (B, nh, T, hd)
    return attn_output.transpose(1, 2).contiguous(), attn_weights  # (B, T, nh, hd)


class HfllmAttention(nn.Module):
    """Multi-head attention with grouped key/value heads, rotary / ALiBi / no positions, an optional sliding window
    and optional value embeddings (modded-nanogpt: v = lambda_0 * v + lambda_1 * value_embedding(token))."""

    def __init__(self, config: HfllmConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None

        q_width, kv_width = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=config.attention_out_bias)
        if config.zero_init_output_projections:
            self.o_proj.zero_init = True  # `_init_weights` starts it at zero (modded-nanogpt)
        if config.qk_norm:
            self.q_norm = HfllmRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = HfllmRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        if config.value_embedding_index(layer_idx) is not None:
            self.value_lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # (2,): weights of v and the value embedding

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        value_embedding: torch.Tensor | None = None,
        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        reuse_kv: bool = False,
        key_routed: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """value_embedding: (B, T, nkv * hd) this layer's value-embedding lookup, or None.
        shared_kv: Mixture-of-Recursions' recursive KV sharing, {layer_idx: (keys, values)} of the first recursion
            (cache included, (B, nkv, S, hd)); this call records its keys/values there, or with `reuse_kv` (a deeper
            recursion) computes queries only and attends to the recorded ones, writing nothing to the cache.
        key_routed: (B, T) bool, Mixture of Depths under a KV cache: which of these tokens may serve as keys
            (`add_routing_channel`)."""
        input_shape = hidden_states.shape[:-1]  # (B, T)
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape)  # (B, T, nh, hd)
        if self.config.qk_norm:
            query_states = self.q_norm(query_states)
        query_states = query_states.transpose(1, 2)  # (B, nh, T, hd)
        if reuse_kv:
            key_states, value_states = shared_kv[self.layer_idx]  # (B, nkv, S, hd): the first recursion's
            if position_embeddings is not None:
                query_states, _ = apply_rotary_pos_emb(query_states, query_states, *position_embeddings)
        else:
            key_states = self.k_proj(hidden_states).view(hidden_shape)  # (B, T, nkv, hd)
            value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # (B, nkv, T, hd)
            if value_embedding is not None:
                value_embedding = value_embedding.view(hidden_shape).transpose(1, 2)  # (B, nkv, T, hd)
                value_states = self.value_lambdas[0] * value_states + self.value_lambdas[1] * value_embedding
            if self.config.qk_norm:
                key_states = self.k_norm(key_states)
            key_states = key_states.transpose(1, 2)  # (B, nkv, T, hd)

            if position_embeddings is not None:  # rope; ALiBi biases the scores below, NoPE has no positions
                cos, sin = position_embeddings
                query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
            if key_routed is not None:
                query_states, key_states = add_routing_channel(query_states, key_states, key_routed)

            if cache is not None:  # append this step's keys/values; returns the whole cache (B, nkv, S, hd)
                key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
            if shared_kv is not None:
                shared_kv[self.layer_idx] = (key_states, value_states)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        if self.config.position_embedding == "alibi":
            attention_interface, attention_mask, kwargs = self.alibi(
                attention_interface, attention_mask, query_states, key_states, kwargs
            )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            **kwargs,
        )  # (B, T, nh, hd)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (B, T, nh * hd)
        return self.o_proj(attn_output), attn_weights

    def alibi(
        self, attention_interface: Callable, attention_mask, query_states: torch.Tensor, key_states: torch.Tensor,
        kwargs: dict,
    ) -> tuple[Callable, torch.Tensor | object, dict]:
        """ALiBi in the attention kernel's own terms: eager and SDPA take the bias inside an additive float mask;
        flex attention adds it in its `score_mod` (transformers' `position_bias`) next to the block mask;
        FlashAttention-2 takes the slopes themselves (`flash_alibi_attention`). Other kernels are refused before any
        work (`check_alibi_support`)."""
        implementation = self.config._attn_implementation
        slopes = alibi_slopes(query_states.shape[1], query_states.device)  # (nh,)
        query_length, key_length = query_states.shape[-2], key_states.shape[-2]
        if implementation == "flash_attention_2":  # the mask is None or the (B, S) padding mask
            return flash_alibi_attention, attention_mask, {**kwargs, "alibi_slopes": slopes}
        if implementation == "flex_attention":  # the mask is a BlockMask: causal and padding stay in it
            bias = alibi_attention_mask(None, slopes, query_length, key_length, torch.float32)  # (1, nh, T, S)
            kwargs = {**kwargs, "position_bias": bias.expand(query_states.shape[0], -1, -1, -1)}
            return attention_interface, attention_mask, kwargs
        mask = alibi_attention_mask(attention_mask, slopes, query_length, key_length, query_states.dtype)
        return attention_interface, mask, kwargs


UNROUTED_KEY = -1e4  # the routing channel of a key that is not routed: its scores drop by 1e4 * scaling


def add_routing_channel(
    query_states: torch.Tensor, key_states: torch.Tensor, key_routed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixture of Depths under a KV cache: only routed tokens may serve as keys, also in later cached steps. Each
    query gains a channel 1, each key a channel 0 (routed) or UNROUTED_KEY, so an unrouted key's score drops by
    1e4 * scaling and its softmax weight is 0, while a routed key's score is unchanged. The flag travels inside the
    cached keys: the cache's own update, reorder, select and crop keep it with its token. q (B, nh, T, hd),
    k (B, nkv, T, hd), key_routed (B, T) -> q (B, nh, T, hd + 1), k (B, nkv, T, hd + 1)."""
    query_states = torch.cat([query_states, query_states.new_ones(*query_states.shape[:-1], 1)], dim=-1)
    flag = torch.where(key_routed, 0.0, UNROUTED_KEY).to(key_states.dtype)  # (B, T)
    flag = flag[:, None, :, None].expand(-1, key_states.shape[1], -1, 1)  # (B, nkv, T, 1)
    return query_states, torch.cat([key_states, flag], dim=-1)


class HfllmRouter(nn.Module):
    """Top-k softmax router.

    With aux-loss-free balancing (DeepSeek-V3), a per-expert bias is added to the scores used to *choose* experts
    but not to the weights that mix them; `HfllmForCausalLM.update_router_bias` moves it after each optimizer step.
    In training mode the router counts how many tokens each expert received (`tokens_per_expert`), for that update
    and for logging.
    """

    def __init__(self, config: HfllmConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))  # (E, H)
        self.expert_bias = nn.Buffer(torch.zeros(config.num_experts))  # (E,) saved with the checkpoint
        self.tokens_per_expert = nn.Buffer(torch.zeros(config.num_experts), persistent=False)  # (E,)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states (N, H) -> router_logits (N, E), top_k_weights (N, k), top_k_index (N, k)."""
        router_logits = F.linear(hidden_states, self.weight)  # (N, E)
        router_probs = F.softmax(router_logits, dim=-1, dtype=torch.float)  # (N, E)
        _, top_k_index = torch.topk(router_probs + self.expert_bias, self.top_k, dim=-1)  # (N, k)
        top_k_weights = router_probs.gather(-1, top_k_index)  # (N, k)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        if self.training:
            with torch.no_grad():
                ones = torch.ones_like(top_k_index, dtype=self.tokens_per_expert.dtype).flatten()
                self.tokens_per_expert.scatter_add_(0, top_k_index.flatten(), ones)
        return router_logits, top_k_weights.to(router_logits.dtype), top_k_index


@use_experts_implementation
class HfllmExperts(nn.Module):
    """E SwiGLU experts in fused 3-D weights, so transformers' batched / grouped-GEMM experts kernels apply."""

    def __init__(self, config: HfllmConfig):
        super().__init__()
        self.num_experts = config.num_experts
        intermediate, hidden = config.moe_intermediate_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * intermediate, hidden))  # (E, 2I, H)
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, intermediate))  # (E, H, I)
        self.zero_init = config.zero_init_output_projections  # `_init_weights` starts down_proj at zero
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Eager path: loop over the experts that received tokens. hidden_states (N, H) -> (N, H)."""
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # (E, k, N)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])  # which tokens, in which top-k slot
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])  # (n, H)
            expert_out = expert_out * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, expert_out.to(final_hidden_states.dtype))
        return final_hidden_states


class HfllmSparseMoeBlock(nn.Module):
    """Routed experts plus optional always-on shared experts."""

    def __init__(self, config: HfllmConfig):
        super().__init__()
        self.gate = HfllmRouter(config)
        self.experts = HfllmExperts(config)
        self.shared_experts = None
        if config.num_shared_experts > 0:
            self.shared_experts = HfllmMLP(config, config.num_shared_experts * config.moe_intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, seq_len, hidden_dim = hidden_states.shape
        flat = hidden_states.view(-1, hidden_dim)  # (N = B*T, H)
        _, top_k_weights, top_k_index = self.gate(flat)
        out = self.experts(flat, top_k_index, top_k_weights)  # (N, H)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(batch_size, seq_len, hidden_dim)


def routed_token_count(capacity: float, tokens: int | torch.Tensor) -> int | torch.Tensor:
    """k = ceil(capacity * tokens): how many of a sequence's tokens a routed layer processes (the epsilon keeps
    0.1 * 30 at 3 despite rounding)."""
    if isinstance(tokens, torch.Tensor):
        return torch.ceil(capacity * tokens.float() - 1e-6).long()
    return math.ceil(capacity * tokens - 1e-6)


class HfllmDepthRouter(nn.Module):
    """Mixture of Depths' router for one layer (Raposo et al. 2024, "Mixture-of-Depths", arXiv 2404.02258).

    A scalar score per token, r = w^T x (section 3.2). In training the layer processes each sequence's top-k tokens by
    r, k = ceil(capacity * real tokens) (expert-choice routing, sections 3.2-3.3); the others ride the residual stream.
    The top-k depends on later tokens, so a small MLP predictor, on stop-gradient inputs, learns by binary
    cross-entropy which tokens it picks (section 3.5, the auxiliary predictor); evaluation and generation route a
    token iff the predictor says so, causally. A routed token adds sigmoid(r) times the block's output (section 3.4
    multiplies by r itself; the sigmoid bounds the weight and keeps the order, hence the top-k).
    """

    def __init__(self, config: HfllmConfig):
        super().__init__()
        self.capacity = config.mod_capacity
        width = max(1, config.hidden_size // 4)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)
        self.predictor = nn.Sequential(nn.Linear(config.hidden_size, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states (B, T, H), token_mask (B, T) bool, True for real tokens -> router weights sigmoid(r) (B, T),
        top-k membership (B, T) bool (padding never), predictor logits (B, T) (> 0: routed)."""
        scores = self.score(hidden_states).squeeze(-1)  # (B, T)
        length = scores.shape[1]
        k = routed_token_count(self.capacity, token_mask.sum(dim=1))  # (B,) per sequence, over its real tokens
        ranked = scores.detach().masked_fill(~token_mask, float("-inf"))
        top = ranked.topk(routed_token_count(self.capacity, length), dim=1).indices  # (B, k_max), best first
        slots = torch.arange(top.shape[1], device=top.device)[None] < k[:, None]  # (B, k_max): within each row's k
        top_k = torch.zeros_like(token_mask).scatter(1, top, slots)
        predictor_logits = self.predictor(hidden_states.detach()).squeeze(-1)  # (B, T): stop-gradient inputs
        return torch.sigmoid(scores), top_k, predictor_logits


class HfllmDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); the MLP is dense or MoE. In a "mamba" layer a
    Mamba-2 mixer (`mamba2_hfllm.py`) takes attention's place and the MLP stays, as in Jamba (arXiv 2403.19887),
    Bamba and Nemotron-H (arXiv 2504.03624); its attention_mask is the (B, T) padding mask, or None. A layer that
    Mixture of Depths routes computes this for its routed tokens only and adds it weighted (`routed_forward`)."""

    def __init__(self, config: HfllmConfig, layer_idx: int):
        super().__init__()
        if config.layer_types[layer_idx] == MAMBA:
            self.mamba = HfllmMamba2Mixer(config, layer_idx)
        else:
            self.self_attn = HfllmAttention(config, layer_idx)
        self.mlp = HfllmSparseMoeBlock(config) if config.is_moe_layer(layer_idx) else HfllmMLP(config)
        self.input_layernorm = HfllmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = HfllmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        router_weights: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        value_embedding: torch.Tensor | None = None,
        routed: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        """router_weights (B, T) and routed (B, T) bool: Mixture of Depths' weights and decisions (`HfllmDepthRouter`),
        None in a layer that processes every token. router_weights is positional so that gradient checkpointing
        passes its gradient on."""
        if routed is not None:
            return self.routed_forward(hidden_states, router_weights, routed, attention_mask=attention_mask,
                                       position_ids=position_ids, cache=cache, use_cache=use_cache,
                                       position_embeddings=position_embeddings, **kwargs)
        residual = hidden_states  # (B, T, H)
        if hasattr(self, "mamba"):
            hidden_states = residual + self.mamba(self.input_layernorm(hidden_states), cache, attention_mask)
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            value_embedding=value_embedding,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))

    def block_output(self, hidden_states: torch.Tensor, **attention_kwargs) -> torch.Tensor:
        """f(x), what the block adds to the residual stream: attention's output plus the MLP's.
        (B, T, H) -> (B, T, H)."""
        attention, _ = self.self_attn(self.input_layernorm(hidden_states), **attention_kwargs)
        return attention + self.mlp(self.post_attention_layernorm(hidden_states + attention))

    def routed_forward(
        self,
        hidden_states: torch.Tensor,
        router_weights: torch.Tensor,
        routed: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        cache: Cache | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        **kwargs,
    ) -> torch.Tensor:
        """Mixture of Depths (arXiv 2404.02258): routed tokens get x + w * f(x), the others keep x, and only routed
        tokens serve as keys. Without a KV cache the routed tokens are gathered, in their order, and only they are
        computed (the training-time saving): causal attention among them, within their document when position_ids
        restart per packed document, RoPE at their own positions. Under a KV cache every token is computed densely,
        the keys carry their routing (`add_routing_channel`), and only the routed tokens' outputs are added."""
        weights = router_weights[..., None].to(hidden_states.dtype)  # (B, T, 1)
        if cache is not None:
            update = self.block_output(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                       cache=cache, position_embeddings=position_embeddings, key_routed=routed,
                                       **kwargs)
            return hidden_states + torch.where(routed[..., None], weights * update, 0.0)
        batch, _, hidden = hidden_states.shape
        count = int(routed.sum(dim=1).max())  # K: the most tokens any row routes
        if count == 0:
            return hidden_states
        # (B, K): each row's routed tokens first, in their order; rows with fewer fill up with unrouted ones, which
        # come after them (so the causal mask alone hides them) and add nothing
        index = torch.argsort((~routed).to(torch.int8), dim=1, stable=True)[:, :count]
        valid = routed.gather(1, index)  # (B, K)

        def take(tensor: torch.Tensor) -> torch.Tensor:  # (B or 1, T, D) -> (B, K, D)
            tensor = tensor.expand(batch, *tensor.shape[1:])
            return tensor.gather(1, index[..., None].expand(-1, -1, tensor.shape[-1]))

        selected = take(hidden_states)  # (B, K, H)
        positions = take(position_ids[..., None]).squeeze(-1)  # (B, K)
        # Packed documents (position_ids restarting, transformers' find_packed_sequence_indices): the mask function
        # reads them from positions that count 0, 1, 2, ... through each document's gathered tokens
        documents = position_ids.diff(dim=-1, prepend=position_ids[:, :1] - 1).ne(1).cumsum(dim=-1)  # (B or 1, T)
        documents = take(documents[..., None]).squeeze(-1)  # (B, K)
        slots = torch.arange(count, device=index.device).expand(batch, -1)  # (B, K)
        starts = torch.where(documents.diff(dim=-1, prepend=documents[:, :1] - 1) != 0, slots, 0).cummax(dim=-1).values
        mask = create_causal_mask(config=self.self_attn.config, inputs_embeds=selected, attention_mask=None,
                                  position_ids=slots - starts, **{CACHE_NAME: None})
        update = self.block_output(
            selected, attention_mask=mask, position_ids=positions,
            position_embeddings=None if position_embeddings is None else tuple(map(take, position_embeddings)),
            **kwargs,
        )  # (B, K, H)
        update = torch.where(valid[..., None], take(weights) * update, 0.0)
        return hidden_states.scatter_add(1, index[..., None].expand(-1, -1, hidden), update)


@dataclass
class HfllmModelOutputWithPast(MoeModelOutputWithPast):
    """`MoeModelOutputWithPast` plus Mixture of Depths' predictor loss (binary cross-entropy; training mode only)."""

    predictor_loss: torch.FloatTensor | None = None


class HfllmRecursionRouter(nn.Module):
    """Mixture-of-Recursions' token-choice router (Bae et al. 2025, arXiv 2507.10524, section 2.2): each token's
    recursion depth is chosen once, from its own hidden state where it enters the shared stack, as the top-1 of a
    softmax over the N_r depths. What a token does depends on no other token, so training and cached generation
    compute the same function, and the causal mask stays the only path between positions."""

    def __init__(self, config: HfllmConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.num_recursions, config.hidden_size))  # (N_r, H)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states (B, T, H) -> router_logits (B, T, N_r), depth (B, T) in 0..N_r-1 (0: one recursion),
        weight (B, T): the chosen depth's probability, which scales the token's last recursion."""
        router_logits = F.linear(hidden_states, self.weight)  # (B, T, N_r)
        weight, depth = F.softmax(router_logits, dim=-1, dtype=torch.float).max(dim=-1)  # (B, T), (B, T)
        return router_logits, depth, weight.to(hidden_states.dtype)


class HfllmPreTrainedModel(PreTrainedModel):
    config: HfllmConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HfllmDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _can_record_outputs = {
        "router_logits": OutputRecorder(HfllmRouter, index=0),
        "hidden_states": HfllmDecoderLayer,
        "attentions": HfllmAttention,
    }

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # Linear / Embedding: normal(0, initializer_range); norms: 1; rotary buffers
        std = self.config.initializer_range
        if isinstance(module, HfllmExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, HfllmRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.expert_bias)
            init.zeros_(module.tokens_per_expert)
        elif isinstance(module, HfllmRecursionRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, HfllmAttention) and hasattr(module, "value_lambdas"):
            init.constant_(module.value_lambdas, 0.5)
        elif isinstance(module, HfllmModel) and module.skip_weights is not None:
            init.ones_(module.skip_weights)
        elif isinstance(module, HfllmMamba2Mixer):
            init_mamba_weights(module)
        if getattr(module, "zero_init", False):  # an output projection under zero_init_output_projections
            init.zeros_(module.down_proj if isinstance(module, HfllmExperts) else module.weight)


class HfllmModel(HfllmPreTrainedModel):
    """The decoder stack without a head: token ids -> final hidden states (B, T, H)."""

    def __init__(self, config: HfllmConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([HfllmDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = HfllmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.position_embedding == "rope":
            self.rotary_emb = HfllmRotaryEmbedding(config=config)
        # modded-nanogpt's value embeddings: (V, nkv * hd) tables, each shared by a layer near each end of the stack
        kv_width = config.num_key_value_heads * config.head_dim
        self.value_embeds = None
        if config.value_embeddings:
            self.value_embeds = nn.ModuleList(
                [nn.Embedding(config.vocab_size, kv_width) for _ in range(config.value_embedding_tables)]
            )
        # U-net skips (modded-nanogpt): layer L - n + i receives the output of layer n - 1 - i, weighted
        self.skip_weights = nn.Parameter(torch.ones(config.num_hidden_layers // 2)) if config.unet_skips else None
        # Mixture-of-Recursions: the shared stack's layers are applied up to num_recursions times, depth per token
        self.recursion_router = HfllmRecursionRouter(config) if config.num_recursions > 1 else None
        # Mixture of Depths: one router per routed layer, kept here (not in the layer) because the model decides
        self.depth_routers = None
        if config.mod_capacity is not None:
            self.depth_routers = nn.ModuleDict({str(i): HfllmDepthRouter(config) for i in config.mod_routed_layers})
        self.has_sliding_layers = "sliding_attention" in config.layer_types
        self.has_mamba_layers = config.has_mamba_layers
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> HfllmModelOutputWithPast:
        cache = _cache_argument(cache, kwargs)
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if self.value_embeds is not None and input_ids is None:
            raise ValueError("value_embeddings look up token ids: pass input_ids, not inputs_embeds")
        if self.config.position_embedding == "alibi":
            check_alibi_support(self.config._attn_implementation, cache)
        if self.has_mamba_layers:
            check_mamba_support(self.config._attn_implementation, cache)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, H)
        routing_in_training = self.depth_routers is not None and self.training
        if use_cache and cache is None and not routing_in_training:  # MoD training gathers its routed tokens: no cache
            cache = DynamicCache(config=self.config)  # sliding layers keep only the last window
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)  # (1, T)
        token_mask = None  # (B, T) bool, real tokens of this call: Mixture of Depths routes among them
        if self.depth_routers is not None:
            token_mask = self.check_routing(attention_mask, cache, position_ids, inputs_embeds.shape[:2], kwargs)

        # One mask per layer type: causal + padding (+ window). generate() may pass the mapping ready-made.
        if not isinstance(mask_mapping := attention_mask, dict):
            mask_kwargs = {
                "config": self.config,
                "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask,
                CACHE_NAME: cache,
                "position_ids": position_ids,
            }
            mask_mapping = {"full_attention": create_causal_mask(**mask_kwargs)}
            if self.has_sliding_layers:
                mask_mapping["sliding_attention"] = create_sliding_window_causal_mask(**mask_kwargs)
            if self.has_mamba_layers:  # (B, T) padding mask; None when there is no padding or when decoding
                mask_mapping[MAMBA] = create_recurrent_attention_mask(**mask_kwargs)

        hidden_states = inputs_embeds
        position_embeddings = None  # ALiBi biases the attention scores in each layer; NoPE has no positions
        if self.config.position_embedding == "rope":
            position_embeddings = self.rotary_emb(hidden_states, position_ids)  # cos, sin: (B, T, hd)
        value_embeddings = [table(input_ids) for table in self.value_embeds or ()]  # each (B, T, nkv * hd)
        if self.recursion_router is not None:
            layer_kwargs = dict(attention_mask=mask_mapping["full_attention"], position_embeddings=position_embeddings,
                                position_ids=position_ids, cache=cache, use_cache=use_cache, **kwargs)
            hidden_states, router_logits = self.recursions(hidden_states, layer_kwargs)
            return HfllmModelOutputWithPast(last_hidden_state=self.norm(hidden_states), router_logits=(router_logits,),
                                            **{CACHE_NAME: cache})
        predictor_losses = []
        skip_count = 0 if self.skip_weights is None else len(self.skip_weights)
        first_decoder, skips = self.config.num_hidden_layers - skip_count, []  # U-net: the encoder's outputs
        for i, decoder_layer in enumerate(self.layers[: self.config.num_hidden_layers]):  # fewer: an early exit
            if skip_count and i >= first_decoder:
                hidden_states = hidden_states + self.skip_weights[i - first_decoder] * skips.pop()
            table = self.config.value_embedding_index(i)
            router_weights = routed = None
            if self.config.is_mod_layer(i):  # training: the top-k; evaluation and generation: the predictor, causal
                router_weights, top_k, predictor_logits = self.depth_routers[str(i)](hidden_states, token_mask)
                routed = top_k if self.training else (predictor_logits > 0) & token_mask
                if self.training:
                    predictor_losses.append(F.binary_cross_entropy_with_logits(
                        predictor_logits[token_mask].float(), top_k[token_mask].float()))
            hidden_states = decoder_layer(
                hidden_states,
                router_weights,
                attention_mask=mask_mapping[self.config.layer_types[i]],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                value_embedding=None if table is None else value_embeddings[table],
                routed=routed,
                **kwargs,
            )
            if i < skip_count:
                skips.append(hidden_states)
        predictor_loss = torch.stack(predictor_losses).mean() if predictor_losses else None
        return HfllmModelOutputWithPast(last_hidden_state=self.norm(hidden_states), predictor_loss=predictor_loss,
                                        **{CACHE_NAME: cache})

    def check_routing(
        self, attention_mask: torch.Tensor | dict | None, cache: Cache | None, position_ids: torch.Tensor,
        shape: tuple[int, int], kwargs: dict,
    ) -> torch.Tensor:
        """Mixture of Depths' refusals, each in one line, then the real tokens of this call (B, T) bool. Under a KV
        cache routing rides in an extra key channel, which eager and SDPA attention take and a static cache cannot
        hold; without one the routed tokens are gathered, and FlashAttention's flattened batch (its cu_seq_lens)
        would describe the tokens before the gathering."""
        token_mask = torch.ones(shape, dtype=torch.bool, device=position_ids.device)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -shape[1]:].bool()
        if cache is not None:
            if self.config._attn_implementation not in ("eager", "sdpa"):
                raise ValueError(f"mod_capacity (Mixture of Depths) generates with a KV cache under eager or sdpa "
                                 f"attention, not {self.config._attn_implementation}; "
                                 "load with attn_implementation='sdpa'")
            if getattr(cache, "is_compileable", False):
                raise ValueError("mod_capacity (Mixture of Depths) keeps each key's routing in the dynamic KV cache; "
                                 "a static cache (cache_implementation='static', compiled generation) is not supported")
        elif "cu_seq_lens_q" in kwargs:
            raise ValueError("mod_capacity (Mixture of Depths) gathers each row's routed tokens; FlashAttention's "
                             "flattened batch (cu_seq_lens) is not supported: use attn_implementation sdpa")
        return token_mask

    def recursions(self, hidden_states: torch.Tensor, layer_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixture-of-Recursions (Bae et al. 2025, arXiv 2507.10524): the unique layers before the shared stack, the
        stack up to N_r times, the unique layers after it. hidden_states (B, T, H) -> (B, T, H) and the recursion
        router's logits (B*T, N_r).

        A token routed to depth d takes recursions 1..d; its last one's update is scaled by its router weight g,
        h <- h + g (stack(h) - h), so that the router is trained by the LM loss (section 2.2); deeper recursions leave
        it unchanged. Recursive KV sharing: every recursion attends to the first recursion's keys/values, which are
        the only ones cached (one cache entry per unique layer). The stack runs over every token (masked, dense), so
        the compute is that of the unrolled depth less the deeper recursions' key/value projections
        (`flops_per_token` counts exactly that)."""
        first, shared, last = self.config.recursion_layout()
        for i in first:
            hidden_states = self.layers[i](hidden_states, **layer_kwargs)
        router_logits, depth, weight = self.recursion_router(hidden_states)  # (B, T, N_r), (B, T), (B, T)
        shared_kv = {}  # {layer_idx: (keys, values)} of the first recursion, (B, nkv, S, hd)
        for recursion in range(self.config.num_recursions):
            out = hidden_states
            for i in shared:
                out = self.layers[i](out, shared_kv=shared_kv, reuse_kv=recursion > 0, **layer_kwargs)
            scale = torch.where(depth == recursion, weight, torch.ones_like(weight))[..., None]  # (B, T, 1)
            active = (depth >= recursion)[..., None]  # (B, T, 1): the token still recurses
            hidden_states = torch.where(active, hidden_states + scale * (out - hidden_states), hidden_states)
        for i in last:
            hidden_states = self.layers[i](hidden_states, **layer_kwargs)
        return hidden_states, router_logits.reshape(-1, router_logits.shape[-1])


def load_balancing_loss(
    router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch Transformer auxiliary loss, E * sum_e f_e * P_e, over all MoE layers together.

    f_e: fraction of (token, slot) assignments routed to expert e; P_e: mean router probability of expert e.
    Both are averaged over every layer's tokens, padding excluded. A perfectly uniform router gives top_k.
    router_logits: one (N, E) tensor per MoE layer, N = B*T; attention_mask: (B, T) with 1 for real tokens.
    """
    logits = torch.stack([layer.float() for layer in router_logits])  # (L, N, E)
    probs = F.softmax(logits, dim=-1)
    _, selected = torch.topk(probs, top_k, dim=-1)  # (L, N, k)
    assignments = F.one_hot(selected, num_experts).sum(dim=-2).float()  # (L, N, E)
    if attention_mask is None:
        weights = torch.ones(logits.shape[1], device=logits.device)
    else:
        weights = attention_mask.reshape(-1).to(logits.device, torch.float)  # (N,)
    total = weights.sum() * logits.shape[0]
    tokens_per_expert = (assignments * weights[None, :, None]).sum(dim=(0, 1)) / total  # (E,) sums to top_k
    prob_per_expert = (probs * weights[None, :, None]).sum(dim=(0, 1)) / total  # (E,) sums to 1
    return num_experts * torch.sum(tokens_per_expert * prob_per_expert)


def router_z_loss(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens (and layers) of logsumexp(router logits)^2; keeps logits small."""
    z = torch.stack([torch.logsumexp(layer.float(), dim=-1) ** 2 for layer in router_logits])  # (L, N)
    if attention_mask is None:
        return z.mean()
    weights = attention_mask.reshape(-1).to(z.device, torch.float)  # (N,)
    return (z * weights).sum() / (weights.sum() * z.shape[0])


@dataclass
class HfllmCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus the router z-loss (`aux_loss` is the load-balancing loss) and Mixture of
    Depths' predictor loss."""

    z_loss: torch.FloatTensor | None = None
    predictor_loss: torch.FloatTensor | None = None


class HfllmForCausalLM(HfllmPreTrainedModel, GenerationMixin):
    """The decoder plus a language-model head; adds the MoE auxiliary losses, Mixture-of-Recursions' balancing loss or
    Mixture of Depths' predictor loss to the LM loss."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: HfllmConfig):
        super().__init__(config)
        self.model = HfllmModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> HfllmCausalLMOutputWithPast:
        r"""
        labels: (B, T) token ids, -100 where no loss is wanted. They are the inputs themselves: the loss shifts them
            by one internally (position t predicts token t+1), so never shift them before calling.
        output_router_logits: return each MoE layer's router logits and add the auxiliary losses to the loss (with
            `num_recursions`: the recursion router's balancing loss); defaults to `config.output_router_logits`.
        """
        cache = _cache_argument(cache, kwargs)
        is_moe = self.config.num_experts > 0
        is_mor = self.config.num_recursions > 1
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        output_router_logits = output_router_logits and (is_moe or is_mor)
        outputs: HfllmModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits and is_moe,  # the recursion router's logits always come back
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)  # (B, T', H)
        logits, loss = self.logits_and_loss(hidden_states, labels, **kwargs)

        aux_loss = z_loss = None
        token_mask = None  # (B, T) over this call's tokens; during cached generation the mask also covers the past
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -outputs.last_hidden_state.shape[1]:]
        if output_router_logits and is_mor:  # the recursion router's balancing loss over its N_r depths (top-1)
            aux_loss = load_balancing_loss(outputs.router_logits, self.config.num_recursions, 1, token_mask)
            if loss is not None:
                loss = loss + self.config.recursion_balance_loss_coef * aux_loss
        elif output_router_logits and outputs.router_logits:
            aux_loss = load_balancing_loss(
                outputs.router_logits, self.config.num_experts, self.config.num_experts_per_tok, token_mask
            )
            z_loss = router_z_loss(outputs.router_logits, token_mask)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss + self.config.router_z_loss_coef * z_loss
        if loss is not None and outputs.predictor_loss is not None:
            # the predictor's loss joins the gradient but not the value: the loss reported stays the LM's (its
            # inputs are detached, so this gradient reaches the predictor alone)
            predictor_loss = outputs.predictor_loss.to(loss.dtype)
            loss = loss + self.config.mod_predictor_loss_coef * (predictor_loss - predictor_loss.detach())

        return HfllmCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            predictor_loss=outputs.predictor_loss,
        )

    def logits_and_loss(
        self, hidden_states: torch.Tensor, labels: torch.LongTensor | None = None, **kwargs
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The head and its loss: hidden_states (B, T, H) -> logits (B, T, V), loss (None without labels). One
        method, so that a kernel fusing the two (Liger's fused linear cross-entropy, hfllm/training/kernels.py) can
        replace it on an instance without touching the rest of `forward`."""
        logits = self.lm_head(hidden_states)  # (B, T, V)
        if (cap := self.config.final_logit_softcapping) is not None:  # Gemma 2 / modded-nanogpt soft cap
            logits = cap * torch.tanh(logits / cap)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return logits, loss

    @torch.no_grad()
    def routing_agreement(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, causal: bool = True
    ) -> dict[int, dict[str, float]]:
        """Mixture of Depths: how the causal routing of evaluation and generation (the predictor) agrees with the
        training-time top-k on a batch. Per routed layer, over real tokens, on the inputs the layer sees in an
        evaluation forward (`causal=False`: in a training-mode forward, routed by the top-k): `accuracy`, the
        fraction of tokens where the predictor's decision equals top-k membership; the predictor's `precision` and
        `recall` for top-k membership; `routed`, the fraction of tokens the predictor routes (top-k routes
        `mod_capacity`)."""
        if self.model.depth_routers is None:
            raise ValueError("routing_agreement needs a Mixture of Depths model (mod_capacity)")
        records = {}

        def record(layer: int) -> Callable:  # the router's token mask (its second input) and its outputs
            return lambda module, args, output: records.__setitem__(layer, (args[1], output))

        hooks = [router.register_forward_hook(record(int(i))) for i, router in self.model.depth_routers.items()]
        was_training = self.training
        try:
            self.train(not causal)
            self.model(input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            self.train(was_training)
            for hook in hooks:
                hook.remove()
        agreement = {}
        for i, (token_mask, (_, top_k, predictor_logits)) in sorted(records.items()):
            top_k, predicted = top_k[token_mask], (predictor_logits > 0)[token_mask]  # (N,) real tokens
            hits = float((predicted & top_k).sum())
            agreement[i] = {"accuracy": float((predicted == top_k).float().mean()),
                            "precision": hits / max(float(predicted.sum()), 1.0),
                            "recall": hits / max(float(top_k.sum()), 1.0),
                            "routed": float(predicted.float().mean())}
        return agreement

    def routers(self) -> list[HfllmRouter]:
        return [module for module in self.modules() if isinstance(module, HfllmRouter)]

    @torch.no_grad()
    def update_router_bias(self) -> torch.Tensor | None:
        """Call after each optimizer step. Returns the per-layer expert load (L_moe, E) since the last call, as
        fractions of the tokens routed; with `router_bias_update_rate > 0`, moves each expert's routing bias by that
        rate towards balance (DeepSeek-V3: overloaded experts down, underloaded up). Resets the counts."""
        routers = self.routers()
        if not routers:
            return None
        load = torch.stack([router.tokens_per_expert.clone() for router in routers])  # (L_moe, E)
        rate = self.config.router_bias_update_rate
        for router, counts in zip(routers, load):
            if rate > 0 and counts.sum() > 0:
                router.expert_bias += rate * torch.sign(counts.mean() - counts)
            router.tokens_per_expert.zero_()
        return load / load.sum(dim=-1, keepdim=True).clamp(min=1)


__all__ = ["HfllmForCausalLM", "HfllmModel", "HfllmPreTrainedModel", "alibi_slopes", "load_balancing_loss",
           "router_z_loss"]
