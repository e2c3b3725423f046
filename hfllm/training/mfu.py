"""FLOPs per token and the peak FLOP/s used for model FLOPs utilisation (MFU).

FLOPs per trained token (forward + backward, PaLM appendix B / nanoGPT):
    6 * N_matmul + 12 * n_attention_layers * n_head * head_dim * T_attn + 3 * n_mamba_layers * SSD
N_matmul is `parameter_counts(model)["active_matmul"]` (hfllm.models): the weights that multiply activations per
token, MoE experts counted for the top-k only, less any other lookup table (modded-nanogpt's value embeddings are read,
not multiplied). T_attn is the context each query sees: the block size, or the sliding window when smaller.
Mixture-of-Recursions (`num_recursions`) runs its shared stack N_r times over every token: n_attention_layers
counts the unrolled depth and N_matmul adds the stack's weights N_r - 1 more times, less the keys/values that only the
first recursion computes (recursive KV sharing).
A Mamba-2 layer has no attention term: its projections and depthwise conv are in N_matmul (a conv weight multiplies
each token once), and SSD is the forward FLOPs per token of its chunked scan (`ssd_flops_per_token`).
Mixture of Depths (`mod_capacity`): a routed layer processes k = ceil(capacity * T) of a sequence's T tokens, so its
block's weights count for k / T of the tokens and its attention for (k / T)^2 (k queries over k keys); the router and
its predictor run on every token and count in full.
Elementwise work (norms, ALiBi's bias, soft-capping, U-net and value-embedding mixing, SSD's decays) is left out, as
in PaLM.

Peak FLOP/s: the dense bf16 tensor-core figure of known GPUs (times the number of GPUs). On a CPU there is no
datasheet number, so the peak is *measured* with a large matmul in the training dtype at start; CPU MFU is an estimate
relative to that.
"""

import time

import torch
from torch import nn

from ..models import parameter_counts
from ..models.configuration_hfllm import MAMBA
from ..models.modeling_hfllm import routed_token_count

# dense bf16 peak per device (FLOP/s), matched against torch.cuda.get_device_name()
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    window = getattr(config, "sliding_window", None)
    context = min(seq_len, window) if window else seq_len
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
    mamba_layers = layer_types.count(MAMBA)  # MoR and MoD refuse mamba layers: none is repeated or routed
    routed_layers, skipped, fraction = getattr(config, "mod_routed_layers", []), 0.0, 1.0
    if routed_layers:
        fraction = routed_token_count(config.mod_capacity, seq_len) / seq_len
        layers = model.base_model.layers
        block = [p for i in routed_layers for p in layers[i].parameters()]
        skipped = (1 - fraction) * sum(getattr(p, "ds_numel", None) or p.numel() for p in block)  # ZeRO-3: ds_numel
    attention_layers = (getattr(config, "unrolled_num_layers", config.num_hidden_layers) - mamba_layers
                        - len(routed_layers) + len(routed_layers) * fraction**2)
    attention = 12 * attention_layers * config.num_attention_heads * head_dim * context
    ssd = 3 * mamba_layers * ssd_flops_per_token(config, seq_len) if mamba_layers else 0
    matmul = (parameter_counts(model)["active_matmul"] - extra_lookup_parameters(model) - skipped
              + recursion_repeat_parameters(model))
    return 6 * matmul + attention + ssd


def recursion_repeat_parameters(model: nn.Module) -> int:
    """Mixture-of-Recursions: the weights the shared stack multiplies again in recursions 2..N_r (every token, masked
    dense compute), without the key/value projections (and key norms) that reuse the first recursion's keys/values."""
    config = model.config
    recursions = getattr(config, "num_recursions", 0) or 0
    if recursions < 2:
        return 0
    layers = model.get_decoder().layers
    kv_only = ("self_attn.k_proj.", "self_attn.v_proj.", "self_attn.k_norm.")
    per_recursion = sum(parameter.numel() for i in config.recursion_layout()[1]
                        for name, parameter in layers[i].named_parameters() if not name.startswith(kv_only))
    return (recursions - 1) * per_recursion


def ssd_flops_per_token(config, seq_len: int) -> float:
    """Forward FLOPs per token of one Mamba-2 layer's chunked SSD scan (`mamba2_hfllm.ssd_chunk_scan`, Dao & Gu 2024
    section 6) on sequences of `seq_len`: c chunks of l = min(chunk_size, seq_len) tokens (the last one padded); per
    head and chunk the contractions C.B and scores.x (2 l^2 (N + P)), the chunk's state and its read-out (2 * 2 l N P);
    per head the recurrence over the c + 1 chunk states (2 (c + 1)^2 N P)."""
    heads, state, head_dim = config.mamba_n_heads, config.mamba_d_state, config.mamba_d_head
    chunk = min(config.mamba_chunk_size, seq_len)
    chunks = -(-seq_len // chunk)
    per_chunk = 2 * chunk**2 * (state + head_dim) + 4 * chunk * state * head_dim
    return heads * (chunks * per_chunk + 2 * (chunks + 1) ** 2 * state * head_dim) / seq_len


def extra_lookup_parameters(model: nn.Module) -> int:
    """Parameters of embedding tables other than the input embedding (hfllm's value embeddings): looked up per token,
    never multiplied, so they cost no matmul FLOPs."""
    tables = [module for module in model.modules() if isinstance(module, nn.Embedding)]
    return sum(table.weight.numel() for table in tables if table is not model.get_input_embeddings())


def peak_flops(dtype: torch.dtype) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops, f"{name} datasheet bf16"
        return measure_matmul_flops("cuda", dtype), f"{name} measured matmul"
    return measure_matmul_flops("cpu", dtype), "CPU measured matmul (estimate)"


def measure_matmul_flops(device: str, dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)
