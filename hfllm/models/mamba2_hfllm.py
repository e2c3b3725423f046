"""The Mamba-2 mixer of hfllm's hybrid models: state space duality (SSD), read top to bottom.

    in_proj -> causal depthwise conv1d + SiLU -> selective SSM (chunked SSD scan, or one recurrent step when decoding)
    -> gated RMSNorm -> out_proj

Mamba-2 / SSD: Dao & Gu 2024, "Transformers are SSMs", arXiv 2405.21060. Each head h keeps a state (P, N) and reads
h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,   y_t = h_t C_t + D x_t,
with a scalar A per head (SSD's scalar-times-identity A) and dt, B, C computed from the input. The chunked scan
(section 6, the paper's minimal reference `ssd_minimal_discrete`) computes the same thing blockwise: quadratic
attention-like work inside each chunk, a recurrence over the chunks' final states between them.
Hybrids of such mixers with attention: Jamba (arXiv 2403.19887) and Nemotron-H (arXiv 2504.03624) put them in place
of most attention layers, as hfllm does (`layer_types` entries "mamba"); Falcon-H1 (arXiv 2507.22448) runs them beside
attention in every layer, which hfllm does not build.

Parameters are named as transformers' `Mamba2Mixer` names them (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj), so
the same weights load into either. The conv and SSM states live in transformers' cache (`LinearAttentionLayer`, through
`Cache.update_conv_state` / `update_recurrent_state`) beside the attention layers' keys and values.
On a GPU the mamba-ssm and causal-conv1d kernels are used when both are installed; otherwise the pure-torch path runs
(with one warning on a GPU). Shapes: B batch, T new tokens, H hidden, I inner width, nh heads, P head dim, N state,
G groups, K conv width.

This file travels with checkpoints next to `modeling_hfllm.py` (`trust_remote_code=True`): it imports only torch and
transformers.
"""

import functools
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.utils import logging

logger = logging.get_logger("transformers.hfllm")


@functools.cache
def mamba_kernels() -> SimpleNamespace | None:
    """The fused CUDA kernels of mamba-ssm and causal-conv1d when both are installed, else None."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    return SimpleNamespace(conv1d=causal_conv1d_fn, chunk_scan=mamba_chunk_scan_combined, step=selective_state_update)


def kernels_for(hidden_states: torch.Tensor) -> SimpleNamespace | None:
    """The fused kernels for a CUDA tensor when installed; None on other devices. A GPU without them warns once and
    runs the pure-torch path."""
    if not hidden_states.is_cuda:
        return None
    kernels = mamba_kernels()
    if kernels is None:
        logger.warning_once("hfllm Mamba-2 mixer: mamba-ssm / causal-conv1d are not installed; running the pure-torch "
                            "scan on the GPU (slower): pip install mamba-ssm causal-conv1d")
    return kernels


class HfllmRMSNormGated(nn.Module):
    """Mamba-2's output norm (section 7): x * silu(gate), then RMSNorm within each of G groups, times a weight."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.group_size = group_size

    def forward(self, hidden_states: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.float() * F.silu(gate.float())  # (B, T, I)
        grouped = hidden_states.view(*hidden_states.shape[:-1], -1, self.group_size)  # (B, T, G, I/G)
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * grouped.view_as(hidden_states).to(input_dtype)


def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """(..., L) -> (..., L, L): out[i, j] = x[j+1] + ... + x[i] for j <= i, -inf above the diagonal, so that
    exp(out) is the decay from position j to position i (the paper's `segsum`, stable form)."""
    length = x.shape[-1]
    x = x[..., None].expand(*x.shape, length)  # (..., L, L): x[..., i, j] = x_i
    strictly_lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=-1)
    sums = torch.cumsum(x.masked_fill(~strictly_lower, 0), dim=-2)
    lower = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device))
    return sums.masked_fill(~lower, -torch.inf)


def ssd_chunk_scan(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, chunk_size: int,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD scan in chunks (Dao & Gu 2024, section 6), in float32 and without the D skip.

    x (B, T, nh, P), dt (B, T, nh) after softplus, A (nh,), B and C (B, T, nh, N) (groups already repeated per head),
    initial_state (B, nh, P, N) or None. Returns y (B, T, nh, P) and the final state (B, nh, P, N). Chunks are
    `min(chunk_size, T)` long; the last is zero-padded (dt = 0 there: no decay, no input)."""
    batch, length, heads, head_dim = x.shape
    chunk = min(chunk_size, length)
    pad = (-length) % chunk

    def chunked(tensor: torch.Tensor) -> torch.Tensor:  # (B, T, ...) -> (B, c, l, ...)
        tensor = F.pad(tensor, (0, 0) * (tensor.dim() - 2) + (0, pad))
        return tensor.reshape(batch, -1, chunk, *tensor.shape[2:])

    x, B, C = chunked(x * dt[..., None]), chunked(B), chunked(C)  # (B, c, l, nh, P|N): x discretised by dt
    a = chunked(A[None, None] * dt).permute(0, 3, 1, 2)  # (B, nh, c, l): log-decay of each step
    a_cumsum = torch.cumsum(a, dim=-1)  # (B, nh, c, l)

    # 1. within each chunk (the diagonal blocks): causal, decayed "attention" C_i . B_j
    scores = torch.einsum("bclhn,bcshn->bchls", C, B)  # (B, c, nh, l, l)
    decay = torch.exp(segment_sum(a)).transpose(1, 2)  # (B, c, nh, l, l)
    y_diag = torch.einsum("bchls,bcshp->bclhp", scores * decay, x)  # (B, c, l, nh, P)

    # 2. each chunk's final state, from its own inputs
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum).permute(0, 2, 3, 1)  # (B, c, l, nh)
    states = torch.einsum("bclhn,bclhp->bchpn", B * decay_to_end[..., None], x)  # (B, c, nh, P, N)

    # 3. the recurrence over chunks: the state entering each chunk, and the final one
    if initial_state is None:
        initial_state = torch.zeros_like(states[:, 0])
    states = torch.cat([initial_state[:, None].float(), states], dim=1)  # (B, c+1, nh, P, N)
    chunk_decay = torch.exp(segment_sum(F.pad(a_cumsum[..., -1], (1, 0))))  # (B, nh, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)  # (B, c+1, nh, P, N)
    states, final_state = states[:, :-1], states[:, -1]

    # 4. each position reads the state entering its chunk, decayed to it
    y_off = torch.einsum("bclhn,bchpn->bclhp", C, states)  # (B, c, l, nh, P)
    y_off = y_off * torch.exp(a_cumsum).permute(0, 2, 3, 1)[..., None]
    y = (y_diag + y_off).reshape(batch, -1, heads, head_dim)[:, :length]  # (B, T, nh, P)
    return y, final_state


def ssd_step(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the recurrence: state (B, nh, P, N), x (B, nh, P), dt (B, nh) after softplus, A (nh,), B and C
    (B, nh, N). Returns y (B, nh, P) without the D skip, and the new state."""
    decay = torch.exp(dt * A)[..., None, None]  # (B, nh, 1, 1)
    state = state.float() * decay + (dt[..., None] * x)[..., None] * B[:, :, None, :]  # (B, nh, P, N)
    return torch.einsum("bhpn,bhn->bhp", state, C), state


class HfllmMamba2Mixer(nn.Module):
    """The Mamba-2 block's mixer (Dao & Gu 2024, section 7, figure 6: parallel projections of x, z, B, C, dt; a
    gated RMSNorm before the output projection). It replaces self-attention in a "mamba" layer; the layer keeps its
    MLP, as Jamba, Bamba and Nemotron-H do."""

    def __init__(self, config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.mamba_n_heads, config.mamba_d_head
        self.n_groups, self.ssm_state_size = config.mamba_n_groups, config.mamba_d_state
        self.intermediate_size = self.num_heads * self.head_dim  # I = mamba_expand * H
        self.chunk_size = config.mamba_chunk_size
        self.conv_kernel_size = config.mamba_d_conv
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.ssm_state_size  # x, B, C go through the conv

        # one projection: z (the gate, I), x B C (conv_dim), dt (nh)
        self.in_proj = nn.Linear(config.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads,
                                 bias=config.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=self.conv_kernel_size, groups=self.conv_dim,
                                padding=self.conv_kernel_size - 1, bias=config.mamba_conv_bias)  # depthwise, causal
        # (nh,) each; `_init_weights` sets them as Mamba-2 does (`init_mamba_weights`)
        self.dt_bias = nn.Parameter(torch.ones(self.num_heads))  # dt = softplus(dt_proj + dt_bias)
        self.A_log = nn.Parameter(torch.zeros(self.num_heads))  # A = -exp(A_log)
        self.D = nn.Parameter(torch.ones(self.num_heads))  # the skip y += D x
        self.norm = HfllmRMSNormGated(self.intermediate_size, self.intermediate_size // self.n_groups,
                                      eps=config.rms_norm_eps)
        self.out_proj = nn.Linear(self.intermediate_size, config.hidden_size, bias=config.mamba_proj_bias)
        if config.zero_init_output_projections:
            self.out_proj.zero_init = True

    def forward(
        self, hidden_states: torch.Tensor, cache: Cache | None = None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """hidden_states (B, T, H); attention_mask (B, T) with 0 at padding, or None. Padding positions enter the conv
        and the scan as zeros (as Bamba does), so a left-padded row computes what its prompt computes alone."""
        batch, length, _ = hidden_states.shape
        kernels = kernels_for(hidden_states)
        projected = self.in_proj(hidden_states)  # (B, T, I + conv_dim + nh)
        gate, xBC, dt = projected.split([self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)

        xBC = self.convolve(zero_padding(xBC, attention_mask), cache, kernels)  # (B, T, conv_dim)
        x, B, C = zero_padding(xBC, attention_mask).split(
            [self.intermediate_size, self.n_groups * self.ssm_state_size, self.n_groups * self.ssm_state_size], dim=-1)
        x = x.view(batch, length, self.num_heads, self.head_dim)  # (B, T, nh, P)
        B = B.view(batch, length, self.n_groups, self.ssm_state_size)  # (B, T, G, N)
        C = C.view(batch, length, self.n_groups, self.ssm_state_size)

        y = self.scan(x, dt, B, C, cache, kernels)  # (B, T, nh, P), D skip included
        y = self.norm(y.reshape(batch, length, -1).to(hidden_states.dtype), gate)  # (B, T, I)
        return self.out_proj(y)  # (B, T, H)

    def convolve(self, xBC: torch.Tensor, cache: Cache | None, kernels: SimpleNamespace | None) -> torch.Tensor:
        """Causal depthwise conv + SiLU over (B, T, conv_dim). With a cache, the last K inputs are kept, and a
        continuation (a decoding step) convolves them together with its own."""
        length = xBC.shape[1]
        xBC = xBC.transpose(1, 2)  # (B, conv_dim, T)
        past = cache.get_conv_state(self.layer_idx) if cache is not None else None  # (B, conv_dim, K) or None
        if cache is not None:
            window = cache.update_conv_state(xBC, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
        if past is not None:  # (B, conv_dim, K + T): the kept inputs, then the new ones
            out = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim)[..., -length:]
            return F.silu(out).transpose(1, 2)
        if kernels is not None:
            out = kernels.conv1d(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
            return out.transpose(1, 2)
        return F.silu(self.conv1d(xBC)[..., :length]).transpose(1, 2)  # (B, T, conv_dim)

    def scan(
        self, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, cache: Cache | None,
        kernels: SimpleNamespace | None,
    ) -> torch.Tensor:
        """The selective SSM: x (B, T, nh, P), dt (B, T, nh) before dt_bias and softplus, B and C (B, T, G, N). One
        recurrent step when decoding from a cached state, else the chunked scan from it (or from zero). Returns
        y + D x (B, T, nh, P); the cache receives the final state."""
        A = -torch.exp(self.A_log.float())  # (nh,)
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None  # (B, nh, P, N) or None
        if kernels is not None:
            y, state = self.scan_with_kernels(x, dt, A, B, C, state, kernels)
        else:
            dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, T, nh)
            repeat = self.num_heads // self.n_groups
            B = B.float().repeat_interleave(repeat, dim=2)  # (B, T, nh, N): each group serves nh / G heads
            C = C.float().repeat_interleave(repeat, dim=2)
            if state is not None and x.shape[1] == 1:
                y, state = ssd_step(state, x[:, 0].float(), dt[:, 0], A, B[:, 0], C[:, 0])
                y = y[:, None]
            else:
                y, state = ssd_chunk_scan(x.float(), dt, A, B, C, self.chunk_size, state)
            y = y + self.D.float()[:, None] * x.float()
        if cache is not None:
            cache.update_recurrent_state(state, self.layer_idx)
        return y.to(x.dtype)

    def scan_with_kernels(
        self, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        state: torch.Tensor | None, kernels: SimpleNamespace,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mamba-ssm's fused scans (the same arguments; dt_bias, softplus and D applied inside). Returns
        y (B, T, nh, P) and the final state (B, nh, P, N)."""
        if state is not None and x.shape[1] == 1:  # selective_state_update takes per-(head, P) parameters
            state = state.clone()  # the kernel updates it in place
            P, N = self.head_dim, self.ssm_state_size
            y = kernels.step(state, x[:, 0], dt[:, 0, :, None].expand(-1, -1, P), A[:, None, None].expand(-1, P, N),
                             B[:, 0], C[:, 0], self.D[:, None].expand(-1, P), z=None,
                             dt_bias=self.dt_bias[:, None].expand(-1, P), dt_softplus=True)  # (B, nh, P)
            return y[:, None], state
        return kernels.chunk_scan(x, dt, A, B, C, chunk_size=self.chunk_size, D=self.D, dt_bias=self.dt_bias,
                                  initial_states=state, dt_softplus=True, return_final_states=True)


def zero_padding(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, D) with the padding positions of attention_mask (B, T) set to zero; unchanged without a mask."""
    if attention_mask is None:
        return hidden_states
    return hidden_states * attention_mask[:, -hidden_states.shape[1]:, None].to(hidden_states.dtype)


@torch.no_grad()
def init_mamba_weights(mixer: HfllmMamba2Mixer, dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4
                       ) -> None:
    """Mamba-2's initialisation (its reference code, as transformers' Mamba2Mixer): A = 1..nh, D = 1, dt log-uniform
    in [dt_min, dt_max] stored as softplus^-1(dt) in dt_bias; the conv as PyTorch initialises it (kaiming-uniform),
    bias zero. The projections are initialised as every other linear layer of the model."""
    heads, device = mixer.num_heads, mixer.dt_bias.device
    log_dt = torch.rand(heads, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt).clamp(min=dt_floor)
    init.copy_(mixer.dt_bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
    init.copy_(mixer.A_log, torch.log(torch.arange(1, heads + 1, dtype=torch.float32, device=device)))
    init.ones_(mixer.D)
    init.kaiming_uniform_(mixer.conv1d.weight, a=math.sqrt(5))
    if mixer.conv1d.bias is not None:
        init.zeros_(mixer.conv1d.bias)


__all__ = ["HfllmMamba2Mixer", "init_mamba_weights", "mamba_kernels", "ssd_chunk_scan", "ssd_step"]
