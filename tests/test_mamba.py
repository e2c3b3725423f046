"""Mamba-2 hybrids (issue 23): `layer_types` entries "mamba" put a Mamba-2 (SSD) mixer where attention would be
(hfllm/models/mamba2_hfllm.py). What the mixer computes: the chunked SSD scan against its own recurrence, chunk
boundaries that change nothing, and transformers' own `Mamba2Mixer` (transformers.models.mamba2.modeling_mamba2) on the
same weights, alone and as the mixers of the whole model (prefill and cached decode). Then what every variant shows:
cached greedy generation equals uncached (alone and left-padded), save / from_pretrained / remote code without hfllm,
`hfllm plan`'s counts against the real tensors and a measured forward, `hfllm export`'s one-line refusal, the kernel
dispatch, the refusals, and the shipped recipe trains (`hfllm doctor` behind slow)."""

import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import (assert_cached_generation_equals_uncached, assert_export_refused, left_padded,
                     measured_flops_per_token, perturbed_tiny, run_without_hfllm, train_shrunk)
from transformers import AutoModelForCausalLM

from hfllm import HfllmConfig, HfllmForCausalLM
from hfllm.errors import HfllmError
from hfllm.models import HfllmConfigError, parameter_counts
from hfllm.models import mamba2_hfllm
from hfllm.models.mamba2_hfllm import HfllmMamba2Mixer, ssd_chunk_scan, ssd_step
from hfllm.training.mfu import flops_per_token

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "variants" / "mamba-hybrid-tiny.yaml"
HYBRID = ["mamba", "mamba", "mamba", "full_attention"]

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(attn: str = "eager", **overrides) -> HfllmForCausalLM:
    """A random 4-layer hybrid (three Mamba-2 layers, then attention; 4 SSD heads of 16, state 8, 2 groups, chunks of
    8), every weight perturbed."""
    mamba = dict(layer_types=HYBRID, mamba_d_state=8, mamba_d_head=16, mamba_n_groups=2, mamba_chunk_size=8)
    return perturbed_tiny(attn, **{**mamba, **overrides})


# ----------------------------------------------------------------------------- config


def test_mamba_layers_are_stored_under_transformers_cache_name_and_heads_derived():
    """"mamba" is transformers' legacy name of "linear_attention" (the layer type whose cache holds conv and SSM
    states); the head count follows from the inner width."""
    config = HfllmConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=4, layer_types=HYBRID,
                         mamba_d_head=16)
    assert config.layer_types == ["linear_attention"] * 3 + ["full_attention"] and config.mamba_n_heads == 4
    assert HfllmConfig(**config.to_dict()).layer_types == config.layer_types  # config.json reads back
    assert HfllmConfig(num_hidden_layers=2).mamba_n_heads is None  # no mamba layers: nothing derived or saved


@pytest.mark.parametrize("fields, words", [
    ({"layer_types": ["mamba", "linear"]}, "layer_types has unknown entries ['linear']; allowed: full_attention, "
                                           "sliding_attention, mamba"),
    ({"mamba_n_heads": 3, "mamba_d_head": 16}, "mamba_n_heads * mamba_d_head (3 * 16) must equal mamba_expand * "
                                               "hidden_size (64)"),
    ({"mamba_n_heads": 4, "mamba_n_groups": 3}, "mamba_n_heads (4) must be divisible by mamba_n_groups (3)"),
    ({"mamba_d_state": 0}, "mamba_d_state (0) must be a positive integer"),
    ({"layer_types": ["mamba", "mamba"]}, "layer_types has only 'mamba' layers; a hybrid needs at least one attention"),
    ({"position_embedding": "alibi"}, "layer_types with 'mamba' layers does not support position_embedding: alibi"),
    ({"value_embeddings": 2}, "layer_types with 'mamba' layers does not support value_embeddings"),
])
def test_bad_mamba_fields_are_refused_naming_the_field(fields, words):
    with pytest.raises(HfllmConfigError, match="^" + words.replace("(", r"\(").replace(")", r"\)")
                       .replace("*", r"\*").replace("[", r"\[").replace("]", r"\]")):
        HfllmConfig(**{"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2,
                       "layer_types": ["mamba", "full_attention"], **fields})


# ----------------------------------------------------------------------------- what the mixer computes


def scan_inputs(length: int = 12, heads: int = 4, head_dim: int = 3, state: int = 5):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, length, heads, head_dim, generator=generator)
    dt = F.softplus(torch.randn(2, length, heads, generator=generator))
    A = -torch.rand(heads, generator=generator) - 0.5
    B, C = (torch.randn(2, length, heads, state, generator=generator) for _ in range(2))
    return x, dt, A, B, C


def test_chunked_scan_equals_the_recurrence_whatever_the_chunks():
    """SSD's chunked form (section 6) computes the recurrence h_t = exp(dt A) h_{t-1} + dt x B^T, y = h C: chunks of
    4 (three chunks), 5 (a padded last chunk) and 64 (one chunk) on 12 tokens, from zero and from a given state."""
    x, dt, A, B, C = scan_inputs()
    initial = torch.randn(2, 4, 3, 5)
    for start in (None, initial):
        state, expected = torch.zeros(2, 4, 3, 5) if start is None else start, []
        for t in range(x.shape[1]):
            y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t])
            expected.append(y)
        expected = torch.stack(expected, dim=1)
        for chunk in (4, 5, 64):
            y, final = ssd_chunk_scan(x, dt, A, B, C, chunk, start)
            torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(final, state, atol=1e-5, rtol=1e-5)


def transformers_mixer(mixer: HfllmMamba2Mixer, config: HfllmConfig):
    """transformers' own Mamba2Mixer (transformers.models.mamba2.modeling_mamba2) holding `mixer`'s weights."""
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    theirs = Mamba2Config(
        hidden_size=config.hidden_size, num_heads=config.mamba_n_heads, head_dim=config.mamba_d_head,
        state_size=config.mamba_d_state, expand=config.mamba_expand, n_groups=config.mamba_n_groups,
        conv_kernel=config.mamba_d_conv, chunk_size=config.mamba_chunk_size, use_bias=config.mamba_proj_bias,
        use_conv_bias=config.mamba_conv_bias, layer_norm_epsilon=config.rms_norm_eps, hidden_act="silu",
        num_hidden_layers=config.num_hidden_layers)
    reference = Mamba2Mixer(theirs, layer_idx=mixer.layer_idx)
    missing, unexpected = reference.load_state_dict(mixer.state_dict(), strict=True)
    assert not missing and not unexpected
    return reference.eval()


def test_mixer_equals_transformers_mamba2_mixer_on_the_same_weights():
    """Mamba2Mixer of transformers.models.mamba2.modeling_mamba2, same weights (strict load, 1:1 names): the same
    outputs on a left-padded batch, whatever the chunk size."""
    model = tiny()
    mixer = model.model.layers[0].mamba
    reference = transformers_mixer(mixer, model.config)
    _, mask = left_padded()
    hidden = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(hidden, attention_mask=mask)
        torch.testing.assert_close(mixer(hidden, attention_mask=mask), expected, atol=1e-5, rtol=1e-5)
        mixer.chunk_size = 5  # a padded last chunk; transformers' stays at 8
        torch.testing.assert_close(mixer(hidden, attention_mask=mask), expected, atol=1e-5, rtol=1e-5)


def test_model_logits_equal_those_with_transformers_mixers_prefill_and_cached_decode():
    """The whole hybrid with its three mixers swapped for transformers' Mamba2Mixer holding the same weights: equal
    logits on a left-padded prefill and on three cached decoding steps (conv and SSM states in the cache)."""
    from transformers import DynamicCache

    ours, theirs = tiny("sdpa"), tiny("sdpa")
    for layer in theirs.model.layers[:3]:
        layer.mamba = transformers_mixer(layer.mamba, theirs.config)
    ids, mask = left_padded()
    caches = [DynamicCache(config=ours.config), DynamicCache(config=theirs.config)]
    with torch.no_grad():
        logits = [model(ids, attention_mask=mask, cache=cache, use_cache=True).logits
                  for model, cache in zip((ours, theirs), caches)]
        torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
        for step in range(3):
            token = logits[0][:, -1:].argmax(-1)  # (2, 1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            logits = [model(token, attention_mask=mask, cache=cache, use_cache=True).logits
                      for model, cache in zip((ours, theirs), caches)]
            torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-5)
    assert caches[0].get_recurrent_state(0).shape == (2, 4, 16, 8)  # (B, nh, P, N)


# ----------------------------------------------------------------------------- as every variant


COMBINATIONS = {
    "hybrid": {},
    "nope": {"position_embedding": "none"},  # Jamba's choice: the mamba layers carry the positions
    "sliding": {"layer_types": ["mamba", "sliding_attention", "mamba", "full_attention"], "sliding_window": 4},
    "moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},  # as in Jamba
    "speedrun": {"mlp_activation": "relu2", "final_logit_softcapping": 5.0, "unet_skips": True,
                 "zero_init_output_projections": True},
}


@pytest.mark.parametrize("combination", list(COMBINATIONS))
def test_cached_greedy_generation_equals_uncached_alone_and_left_padded(combination):
    model = tiny("sdpa", **COMBINATIONS[combination])
    cached = assert_cached_generation_equals_uncached(model)
    assert len(set(cached[0, 12:].tolist())) > 1  # not a degenerate repetition that any bug would also produce


def test_saves_and_loads_with_from_pretrained(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not any(info.values()), info
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    ids, mask = left_padded()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, loaded.eval()(ids, attention_mask=mask).logits)


def test_loads_through_remote_code_without_hfllm(tmp_path):
    """mamba2_hfllm.py travels with the checkpoint: a process where hfllm cannot be imported loads the hybrid from
    the checkpoint's own code and generates with the state cache."""
    model = tiny()
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "mamba2_hfllm.py").exists()
    ids, mask = left_padded()
    with torch.no_grad():
        torch.save({"ids": ids, "mask": mask, "logits": model(ids, attention_mask=mask).logits,
                    "generated": model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                                pad_token_id=0)}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hfllm"] = None  # importing hfllm now fails: only the checkpoint's own code can be used
        import torch
        from transformers import AutoModelForCausalLM
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True,
                                                     attn_implementation="eager").eval()
        mixer = type(model.model.layers[0].mamba)
        assert mixer.__module__.startswith("transformers_modules") and mixer.__module__.endswith("mamba2_hfllm"), mixer
        with torch.no_grad():
            logits = model(expected["ids"], attention_mask=expected["mask"]).logits
        torch.testing.assert_close(logits, expected["logits"], atol=0, rtol=0)
        generated = model.generate(expected["ids"], attention_mask=expected["mask"], max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)
        assert torch.equal(generated, expected["generated"])
        print("remote code OK")
    """)
    result = run_without_hfllm(script, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "remote code OK" in result.stdout


def test_push_stages_the_mixer_file_with_the_model_code(tmp_path):
    """`hfllm push` uploads the model code by pattern: mamba2_hfllm.py goes with modeling_hfllm.py."""
    from hfllm.shipping.push import stage

    tiny().save_pretrained(tmp_path / "model")
    (tmp_path / "out").mkdir()
    names = stage(tmp_path / "model", "me/mamba-tiny", tmp_path / "out", "apache-2.0")
    assert {"modeling_hfllm.py", "configuration_hfllm.py", "mamba2_hfllm.py"} <= set(names), names


@pytest.mark.parametrize("length", [48, 20])  # six chunks of 8; three with a padded last one
def test_parameter_and_flop_counts_match_the_tensors_and_a_measured_forward(length):
    """The SSD scan and the conv are counted, and the attention term only for the one attention layer."""
    model = tiny()
    assert parameter_counts(model)["total"] == sum(p.numel() for p in model.parameters())
    predicted, measured = flops_per_token(model, length), measured_flops_per_token(model, length)
    assert abs(predicted - measured) / measured < 0.03, (predicted, measured)


@pytest.mark.parametrize("to", ["gguf", "transformers"])
def test_export_refuses_in_one_line_naming_mamba_and_writes_nothing(to, tmp_path):
    assert_export_refused(tiny(), tmp_path, to, "layer_types: mamba")


# ----------------------------------------------------------------------------- kernels and refusals


def fake_kernels(calls: list[str]) -> SimpleNamespace:
    """Stand-ins with mamba-ssm's and causal-conv1d's signatures and semantics, in torch, recording their calls."""

    def conv1d(x, weight, bias=None, activation=None):  # causal_conv1d_fn: x (B, C, T), weight (C, K)
        calls.append("conv1d")
        out = F.conv1d(x, weight[:, None], bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., :x.shape[-1]]
        return F.silu(out) if activation == "silu" else out

    def chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, dt_softplus=False,
                   return_final_states=False, **kwargs):  # mamba_chunk_scan_combined: B and C (B, T, G, N)
        calls.append("chunk_scan")
        dt = F.softplus(dt + dt_bias) if dt_softplus else dt + dt_bias
        repeat = x.shape[2] // B.shape[2]
        y, state = ssd_chunk_scan(x, dt, A, B.repeat_interleave(repeat, 2), C.repeat_interleave(repeat, 2),
                                  chunk_size, initial_states)
        return y + D[:, None] * x, state

    def step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):  # selective_state_update
        calls.append("step")  # per-(head, P) dt (B, nh, P), A (nh, P, N), D and dt_bias (nh, P); state updated in place
        dt = F.softplus(dt + dt_bias) if dt_softplus else dt + dt_bias
        repeat = x.shape[1] // B.shape[1]
        B, C = B.repeat_interleave(repeat, 1), C.repeat_interleave(repeat, 1)
        y, new = ssd_step(state, x, dt[..., 0], A[:, 0, 0], B, C)
        state.copy_(new)
        return y + D * x

    return SimpleNamespace(conv1d=conv1d, chunk_scan=chunk_scan, step=step)


def test_fast_kernels_are_dispatched_when_installed_and_give_the_same_tokens(monkeypatch):
    """On CPU, with the kernel loader patched: the prefill goes through causal_conv1d_fn and mamba_chunk_scan_combined,
    decoding through selective_state_update, each with the arguments mamba-ssm documents; the tokens are the pure-torch
    path's."""
    model = tiny("sdpa")
    ids, mask = left_padded()
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **settings)
    calls = []
    monkeypatch.setattr(mamba2_hfllm, "kernels_for", lambda hidden_states: fake_kernels(calls))
    assert torch.equal(model.generate(ids, **settings), expected)
    assert calls.count("conv1d") == 3 and calls.count("chunk_scan") == 3 and calls.count("step") == 9, calls


def test_kernels_only_on_a_gpu_and_a_gpu_without_them_falls_back_with_one_warning(monkeypatch):
    mamba2_hfllm.mamba_kernels.cache_clear()
    assert mamba2_hfllm.kernels_for(torch.zeros(1)) is None  # CPU: the pure-torch path, kernels or not
    monkeypatch.setattr(mamba2_hfllm, "mamba_kernels", lambda: None)
    warnings = []
    monkeypatch.setattr(mamba2_hfllm.logger, "warning_once", warnings.append)
    assert mamba2_hfllm.kernels_for(SimpleNamespace(is_cuda=True)) is None
    assert len(warnings) == 1 and "pip install mamba-ssm causal-conv1d" in warnings[0] and "\n" not in warnings[0]
    sentinel = SimpleNamespace()
    monkeypatch.setattr(mamba2_hfllm, "mamba_kernels", lambda: sentinel)
    assert mamba2_hfllm.kernels_for(SimpleNamespace(is_cuda=True)) is sentinel


def test_static_cache_speculative_generation_and_flex_attention_are_refused_in_one_line():
    model = tiny()
    ids, _ = left_padded()
    with pytest.raises(ValueError, match="^layer_types 'mamba' .* a static cache .* is not supported$"):
        model.generate(ids[:1], max_new_tokens=2, do_sample=False, cache_implementation="static")
    with pytest.raises(ValueError, match="^layer_types 'mamba' keeps only the last SSM state, which assisted"):
        model.generate(ids[:1], max_new_tokens=4, do_sample=False, prompt_lookup_num_tokens=2)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="^layer_types 'mamba' is not tested with flex_attention"):
        model(ids)


def test_tensor_parallel_is_refused_in_one_line():
    from hfllm.training.tensor_parallel import check_tensor_parallel

    args = SimpleNamespace(tp_size=2, world_size=2, save_strategy="no", save_only_model=False, own_optimizer=None)
    with pytest.raises(HfllmError, match=r"^tp_size 2: tensor parallel does not split layer_types 'mamba' layers"):
        check_tensor_parallel(tiny().config, args)


# ----------------------------------------------------------------------------- the shipped recipe

def test_mamba_recipe_trains_saves_and_generates(tmp_path):
    out = train_shrunk(RECIPE, tmp_path)
    model = AutoModelForCausalLM.from_pretrained(out)
    values = yaml.safe_load(RECIPE.read_text())
    assert model.config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    assert model.config.mamba_d_state == values["mamba_d_state"] and hasattr(model.model.layers[0], "mamba")
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)
