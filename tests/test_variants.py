"""The architecture variants of issue 23 that are config fields of hfllm's one family: ALiBi and NoPE positions
(`position_embedding`) and modded-nanogpt's speedrun options (`mlp_activation: relu2`, `final_logit_softcapping`,
`value_embeddings`, `unet_skips`, `zero_init_output_projections`). For every variant: what it computes (against a
hand-written reference or the option switched off), cached greedy generation equals uncached (alone and in a
left-padded batch), save / from_pretrained / remote code without hfllm, `hfllm plan`'s counts against the real
tensors and a measured forward pass, `hfllm export`'s one-line refusals, and its shipped recipe trains (the rest of
the recipes and `hfllm doctor` behind slow)."""

import importlib.machinery
import math
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import yaml
from helpers import (CORPUS, TINY, assert_cached_generation_equals_uncached, assert_export_refused, left_padded,
                     measured_flops_per_token, perturbed_tiny, run_without_hfllm, train_shrunk)
from transformers import AutoModelForCausalLM

from hfllm import HfllmConfig, HfllmForCausalLM
from hfllm.models import HfllmConfigError, parameter_counts
from hfllm.models.convert import export
from hfllm.models.modeling_hfllm import alibi_slopes
from hfllm.training.mfu import flops_per_token

ROOT = Path(__file__).resolve().parents[1]
SPEEDRUN = {"mlp_activation": "relu2", "final_logit_softcapping": 5.0, "value_embeddings": 2, "unet_skips": True,
            "zero_init_output_projections": True}
VARIANTS = {
    "alibi": {"position_embedding": "alibi"},
    "nope": {"position_embedding": "none"},
    "relu2": {"mlp_activation": "relu2"},
    "softcap": {"final_logit_softcapping": 5.0},
    "value_embeddings": {"value_embeddings": 2},
    "unet_skips": {"unet_skips": True},
    "zero_init": {"zero_init_output_projections": True},
    "speedrun": SPEEDRUN,
    "alibi+speedrun": {"position_embedding": "alibi", **SPEEDRUN},
}
RECIPES = {path.stem: path for path in sorted((ROOT / "recipes" / "variants").glob("*.yaml"))}
# hfllm-only variants and the words of their one-line export refusal
HFLLM_ONLY = {"alibi": "position_embedding: alibi", "nope": "position_embedding: none", "relu2": "mlp_activation: relu2",
              "softcap": "final_logit_softcapping: 5", "value_embeddings": "value_embeddings: 2",
              "unet_skips": "unet_skips: true"}

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(variant: str, attn: str = "eager", **overrides) -> HfllmForCausalLM:
    """A random 4-layer model of `variant` (GQA: 4 query heads, 2 key/value heads), every weight perturbed so that a
    zero-initialised projection or a unit skip weight still carries signal."""
    return perturbed_tiny(attn, **{**VARIANTS[variant], **overrides})


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("fields, words", [
    ({"position_embedding": "learned"}, "unknown position_embedding 'learned'; allowed: rope, alibi, none"),
    ({"mlp_activation": "gelu"}, "unknown mlp_activation 'gelu'; allowed: gated, relu2"),
    ({"mlp_activation": "relu2", "num_experts": 4}, "mlp_activation relu2 is for dense models"),
    ({"final_logit_softcapping": 0}, "final_logit_softcapping (0) must be positive"),
    ({"value_embeddings": -1}, "value_embeddings (-1) must be 0 or more"),
    ({"unet_skips": True, "num_hidden_layers": 1}, "unet_skips needs at least 2 layers"),
])
def test_bad_variant_fields_are_refused_naming_the_field(fields, words):
    with pytest.raises(HfllmConfigError, match="^" + words.replace("(", r"\(").replace(")", r"\)")):
        HfllmConfig(**{"num_hidden_layers": 4, **fields})


@pytest.mark.parametrize("fields, words", [
    ({"mod_capacity": 0.125, "num_recursions": 2, "recursion_sharing": "cycle"},
     "mod_capacity (Mixture of Depths) does not support num_recursions"),
    ({"mod_capacity": 0.125, "layer_types": ["mamba", "full_attention", "mamba", "full_attention"]},
     "mod_capacity (Mixture of Depths) does not support layer_types: mamba"),
    ({"num_recursions": 2, "layer_types": ["full_attention", "mamba", "mamba", "full_attention"]},
     "num_recursions (2) does not support mamba layers"),
])
def test_routed_and_recurrent_variants_refuse_each_other_in_one_line(fields, words):
    """Mixture of Depths, Mixture-of-Recursions and Mamba layers each change which layers run on which tokens; no
    combination of two is built, so each is refused by name."""
    with pytest.raises(HfllmConfigError, match="^" + words.replace("(", r"\(").replace(")", r"\)")):
        HfllmConfig(**{"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4, **fields})


def test_value_embeddings_true_means_modded_nanogpts_three_tables_shared_by_both_ends():
    config = HfllmConfig(num_hidden_layers=8, value_embeddings=True)
    assert config.value_embeddings == 3
    assert [config.value_embedding_index(i) for i in range(8)] == [0, 1, 2, None, None, 0, 1, 2]
    shrunk = HfllmConfig(num_hidden_layers=2, value_embeddings=3)  # e.g. hfllm doctor's 2-layer copy of a recipe
    assert shrunk.value_embedding_tables == 2 and [shrunk.value_embedding_index(i) for i in range(2)] == [0, 1]


# ----------------------------------------------------------------------------- what each variant computes


def test_alibi_slopes_follow_the_paper():
    """Press et al. 2022, section 3: 2^(-8/n) geometric for n a power of 2; otherwise the closest power of 2's slopes,
    then every other slope of twice as many heads."""
    assert alibi_slopes(8).tolist() == [2.0 ** -k for k in range(1, 9)]
    assert alibi_slopes(4).tolist() == [2.0 ** -k for k in (2, 4, 6, 8)]
    assert alibi_slopes(6).tolist() == [2.0 ** -k for k in (2, 4, 6, 8, 1, 3)]


def reference_alibi_logits(model: HfllmForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """The ALiBi model's logits written out for one unpadded sequence (1, T): softmax(q k^T / sqrt(d) - m_h (i - j))
    under the causal mask, GQA by repeating key/value heads."""
    config, inner = model.config, model.model
    slopes = alibi_slopes(config.num_attention_heads)
    length, heads, groups = ids.shape[1], config.num_attention_heads, config.num_attention_heads // config.num_key_value_heads
    distance = torch.arange(length)[:, None] - torch.arange(length)[None, :]  # (T, T): i - j
    bias = (-slopes[:, None, None] * distance).masked_fill(distance < 0, float("-inf"))  # (nh, T, T)
    x = inner.embed_tokens(ids)[0]  # (T, H)
    for layer in inner.layers:
        attn, h = layer.self_attn, layer.input_layernorm(x)
        q = attn.q_proj(h).view(length, heads, -1).transpose(0, 1)  # (nh, T, hd)
        k = attn.k_proj(h).view(length, -1, q.shape[-1]).transpose(0, 1).repeat_interleave(groups, 0)
        v = attn.v_proj(h).view(length, -1, q.shape[-1]).transpose(0, 1).repeat_interleave(groups, 0)
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]) + bias, dim=-1)  # (nh, T, T)
        x = x + attn.o_proj((weights @ v).transpose(0, 1).reshape(length, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(inner.norm(x))[None]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_alibi_computes_the_papers_attention_also_left_padded(attn):
    """Each kernel's mask path carries the bias: the batch's rows equal the written-out reference on their own
    tokens, the left-padded row included (ALiBi depends on distances only, so padding shifts nothing)."""
    model = tiny("alibi", attn)
    ids, mask = left_padded()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(logits[:1], reference_alibi_logits(model, ids[:1]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[1:, 5:], reference_alibi_logits(model, ids[1:, 5:]), atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # flex attention compiles its kernel: ~15 s on 2 shared cores
def test_alibi_flex_attention_equals_eager():
    ids, mask = left_padded()
    with torch.no_grad():
        eager = tiny("alibi", "eager")(ids, attention_mask=mask).logits
        flex = tiny("alibi", "flex_attention")(ids, attention_mask=mask).logits
    torch.testing.assert_close(flex[0], eager[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flex[1, 5:], eager[1, 5:], atol=1e-5, rtol=1e-5)


def test_alibi_refuses_missing_flash_attn_other_flash_kernels_and_static_caches_in_one_line():
    """FlashAttention-2 runs through flash-attn's own functions, so without flash-attn it is refused by name, as are
    flash kernels without alibi_slopes wired; a static cache holds empty slots, so the distances of a dynamic cache do
    not apply."""
    model = tiny("alibi")
    ids, _ = left_padded()
    model.config._attn_implementation = "flash_attention_2"  # as loaded on a GPU; this machine has no flash-attn
    with pytest.raises(ValueError, match="^position_embedding 'alibi' under flash_attention_2 .* flash-attn is not "
                                         "installed: pip install flash-attn, or use attn_implementation sdpa$"):
        model(ids)
    model.config._attn_implementation = "flash_attention_3"
    with pytest.raises(ValueError, match="^position_embedding 'alibi' is not wired to flash_attention_3 .*use attn_"):
        model(ids)
    model.config._attn_implementation = "eager"
    with pytest.raises(ValueError, match="^position_embedding 'alibi' .* a static cache .* is not supported$"):
        model.generate(ids[:1], max_new_tokens=2, do_sample=False, cache_implementation="static")


def documented_flash_attn(calls: list) -> types.ModuleType:
    """flash-attn's `flash_attn_func` and `flash_attn_varlen_func` as its documentation defines them, written out in
    torch so that a CPU test can check hfllm's call: per sequence of T queries and S keys, softmax over the keys j <=
    i + S - T (causal, aligned bottom-right) of q k^T * softmax_scale - m_h |i + S - T - j|, each of the nkv key/value
    heads serving nh / nkv query heads. Each call is recorded (kind, alibi_slopes)."""

    def attend(q, k, v, scale, slopes):  # q (T, nh, hd), k / v (S, nkv, hd) -> (T, nh, hd)
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        i = torch.arange(q.shape[0])[:, None] + k.shape[0] - q.shape[0]  # (T, 1): the query's position among the keys
        j = torch.arange(k.shape[0])[None, :]  # (1, S)
        scores = torch.einsum("thd,shd->hts", q, k) * scale - slopes[:, None, None] * (i - j).abs()
        return torch.einsum("hts,shd->thd", scores.masked_fill(j > i, float("-inf")).softmax(dim=-1), v)

    def flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes):
        assert causal and window_size == (-1, -1) and dropout_p == 0.0
        calls.append(("dense", alibi_slopes))
        return torch.stack([attend(q[b], k[b], v[b], softmax_scale, alibi_slopes) for b in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                               softmax_scale, causal, window_size, alibi_slopes):
        assert causal and window_size == (-1, -1) and cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        calls.append(("varlen", alibi_slopes))
        rows = zip(cu_seqlens_q[:-1], cu_seqlens_q[1:], cu_seqlens_k[:-1], cu_seqlens_k[1:])
        return torch.cat([attend(q[a:b], k[c:d], v[c:d], softmax_scale, alibi_slopes) for a, b, c, d in rows])

    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return module


def test_alibi_under_flash_attention_2_gives_flash_attn_its_slopes_and_equals_sdpa(monkeypatch):
    """FlashAttention-2 gets ALiBi as flash-attn's `alibi_slopes` (transformers' call does not pass them): with
    flash-attn's documented semantics standing in for its CUDA kernel, an unpadded row, a left-padded batch (unpadded
    into the varlen call) and cached greedy generation all equal SDPA's additive-bias path."""
    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", documented_flash_attn(calls))
    model = tiny("alibi", "sdpa")
    ids, mask = left_padded()
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected, expected_alone = model(ids, attention_mask=mask).logits, model(ids[:1]).logits
    generated = model.generate(ids, attention_mask=mask, **settings)
    model.config._attn_implementation = "flash_attention_2"
    with torch.no_grad():
        padded, alone = model(ids, attention_mask=mask).logits, model(ids[:1]).logits
    assert [kind for kind, _ in calls] == ["varlen"] * 4 + ["dense"] * 4  # 4 layers, padded batch then one row
    assert all(torch.equal(slopes, alibi_slopes(4)) for _, slopes in calls)
    torch.testing.assert_close(padded[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1, 5:], expected[1, 5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, expected_alone, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.generate(ids, attention_mask=mask, **settings), generated)


def test_alibi_refuses_a_flex_attention_that_would_drop_its_bias(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def flex_without_bias(module, query, key, value, attention_mask, scaling=None, softcap=None, **kwargs):
        raise AssertionError("not reached")

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flex_attention", flex_without_bias)
    model = tiny("alibi")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="^position_embedding 'alibi' needs transformers' flex attention to take"):
        model(left_padded()[0])


def test_positions_matter_only_where_the_variant_says():
    """Without positions, a prefix's last-token logits are those of a NoPE model: RoPE and ALiBi change them."""
    ids, _ = left_padded()
    with torch.no_grad():
        outputs = {position: tiny("alibi", position_embedding=position).model(ids[:1]).last_hidden_state
                   for position in ("rope", "alibi", "none")}
    assert not torch.allclose(outputs["rope"], outputs["none"]) and not torch.allclose(outputs["alibi"], outputs["none"])
    assert not hasattr(tiny("nope").model, "rotary_emb") and not hasattr(tiny("alibi").model, "rotary_emb")


def test_relu2_mlp_is_non_gated_squared_relu():
    mlp = tiny("relu2").model.layers[0].mlp
    assert not hasattr(mlp, "gate_proj")
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), mlp.down_proj(torch.relu(mlp.up_proj(x)) ** 2))


def test_liger_leaves_the_relu2_mlp_alone(monkeypatch):
    """`use_liger_kernel` swaps gated SiLU MLPs for Liger's SwiGLU; a ReLU² MLP has no gate and keeps its own forward."""
    from hfllm.models import modeling_hfllm
    from hfllm.training.kernels import apply_liger_kernel_to_hfllm

    monkeypatch.setattr(modeling_hfllm, "apply_rotary_pos_emb", modeling_hfllm.apply_rotary_pos_emb)  # restored after
    model = tiny("relu2")
    apply_liger_kernel_to_hfllm(model=model)
    assert all(m._get_name() == "HfllmMLP" for m in model.modules() if type(m).__name__ == "HfllmMLP")


def test_softcap_bounds_the_logits_by_tanh():
    capped, plain = tiny("softcap"), tiny("softcap", final_logit_softcapping=None)
    ids, _ = left_padded()
    with torch.no_grad():
        raw, logits = plain(ids).logits, capped(ids).logits
    assert raw.abs().max() > 5 and logits.abs().max() < 5
    torch.testing.assert_close(logits, 5 * torch.tanh(raw / 5))


def test_value_embeddings_and_unet_skips_switched_off_by_their_weights_give_the_plain_model():
    """lambda = (1, 0) removes the value embeddings, zero skip weights remove the U-net skips; each alone is not enough."""
    ids, _ = left_padded()
    plain = tiny("speedrun", value_embeddings=0, unet_skips=False)
    model = tiny("speedrun")
    assert model.model.skip_weights.shape == (2,) and len(model.model.value_embeds) == 2
    assert [hasattr(layer.self_attn, "value_lambdas") for layer in model.model.layers] == [True] * 4
    model.load_state_dict(plain.state_dict(), strict=False)

    def logits(skip_weight: float | None, lambdas: tuple[float, float] | None) -> torch.Tensor:
        with torch.no_grad():
            if skip_weight is not None:
                model.model.skip_weights.fill_(skip_weight)
            for layer in model.model.layers:
                if lambdas is not None:
                    layer.self_attn.value_lambdas.copy_(torch.tensor(lambdas))
            return model(ids).logits

    with torch.no_grad():
        expected = plain(ids).logits
    assert not torch.allclose(logits(0.0, (0.5, 0.5)), expected)  # the value embeddings alone change the output
    assert not torch.allclose(logits(1.0, (1.0, 0.0)), expected)  # the skips alone change the output
    torch.testing.assert_close(logits(0.0, (1.0, 0.0)), expected)


def test_unet_skips_pair_the_first_half_with_the_second_in_reverse():
    """With 4 layers: layer 2's input is layer 1's output plus w0 times it, layer 3's is layer 2's output plus w1
    times layer 0's output."""
    model = tiny("unet_skips")
    with torch.no_grad():
        model.model.skip_weights.copy_(torch.tensor([0.7, -1.3]))
    inputs, outputs = {}, {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda module, args, i=i: inputs.__setitem__(i, args[0]))
        layer.register_forward_hook(lambda module, args, output, i=i: outputs.__setitem__(i, output))
    ids, _ = left_padded()
    with torch.no_grad():
        model(ids)
    torch.testing.assert_close(inputs[1], outputs[0])  # no skip into the first half
    torch.testing.assert_close(inputs[2], outputs[1] + 0.7 * outputs[1])
    torch.testing.assert_close(inputs[3], outputs[2] - 1.3 * outputs[0])


def test_zero_init_output_projections_start_every_block_as_the_identity():
    torch.manual_seed(0)
    model = HfllmForCausalLM(HfllmConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, zero_init_output_projections=True))
    for layer in model.model.layers:
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
        assert layer.self_attn.q_proj.weight.std() > 0.01 and layer.mlp.up_proj.weight.std() > 0.01
    ids, _ = left_padded()
    with torch.no_grad():  # every block adds zero: the output is the head of the normed embedding
        expected = model.lm_head(model.model.norm(model.model.embed_tokens(ids)))
        torch.testing.assert_close(model(ids).logits, expected)


# ----------------------------------------------------------------------------- for every variant


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_greedy_generation_equals_uncached_alone_and_left_padded(variant):
    model = tiny(variant, "sdpa")
    assert_cached_generation_equals_uncached(model)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_saves_and_loads_with_from_pretrained(variant, tmp_path):
    model = tiny(variant)
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    ids, mask = left_padded()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, loaded.eval()(ids, attention_mask=mask).logits)


def test_variants_load_through_remote_code_without_hfllm(tmp_path):
    """One fresh process where hfllm cannot be imported loads ALiBi, NoPE, every speedrun option (together, with
    ALiBi), Mixture of Depths, Mixture-of-Recursions and a Mamba-2 hybrid (its mixer from the mamba2_hfllm.py that
    travels with the checkpoint) from the checkpoints' own code."""
    ids, mask = left_padded()
    rope = {"position_embedding": "rope"}
    models = {"alibi": tiny("alibi"), "nope": tiny("nope"), "alibi+speedrun": tiny("alibi+speedrun"),
              "mod": tiny("nope", **rope, mod_capacity=0.5), "mor": tiny("nope", **rope, num_recursions=3),
              "mamba": tiny("nope", **rope, layer_types=["mamba", "mamba", "mamba", "full_attention"])}
    names = list(models)
    for variant, model in models.items():
        model.save_pretrained(tmp_path / variant)
        with torch.no_grad():
            torch.save(model(ids, attention_mask=mask).logits, tmp_path / variant / "expected.pt")
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hfllm"] = None  # importing hfllm now fails: only the checkpoints' own code can be used
        import torch
        from transformers import AutoModelForCausalLM
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        for variant in {names!r}:
            folder = {str(tmp_path)!r} + "/" + variant
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, attn_implementation="eager")
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                logits = model.eval()(inputs["ids"], attention_mask=inputs["mask"]).logits
            torch.testing.assert_close(logits, torch.load(folder + "/expected.pt"), atol=0, rtol=0)
            if variant == "mamba":
                mixer = type(model.model.layers[0].mamba).__module__
                assert mixer.startswith("transformers_modules") and mixer.endswith("mamba2_hfllm"), mixer
            print("remote code OK", variant)
    """)
    result = run_without_hfllm(script, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("remote code OK") == len(names)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_and_flop_counts_match_the_tensors_and_a_measured_forward(variant):
    model = tiny(variant)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert parameter_counts(model)["total"] == sum(unique.values())
    predicted, measured = flops_per_token(model, 48), measured_flops_per_token(model, 48)
    # the formula counts norm, skip and lambda weights as matmul weights: a few per cent at width 32
    assert abs(predicted - measured) / measured < 0.03, (predicted, measured)


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_hfllm_plan_counts_each_variant_recipe(recipe):
    """`hfllm plan` on the shipped recipe: its parameter count is the real model's, its FLOPs/token a measured
    forward pass's at the recipe's block size."""
    from hfllm.training.plan import plan_recipe

    plan = plan_recipe([str(RECIPES[recipe])], strategy="ddp", device="h100", devices=1, mfu=0.4)
    values = yaml.safe_load(RECIPES[recipe].read_text())
    fields = {key: values[key] for key in set(values) & set(HfllmConfig.__dataclass_fields__)}
    torch.manual_seed(0)
    model = HfllmForCausalLM(HfllmConfig(vocab_size=128, **fields)).eval()  # a char tokenizer plans 128 tokens
    assert plan.counts == parameter_counts(model)
    assert plan.counts["total"] == sum(p.numel() for p in model.parameters())
    measured = measured_flops_per_token(model, values["block_size"])
    assert abs(plan.flops_per_token - measured) / measured < 0.01, (plan.flops_per_token, measured)


@pytest.mark.parametrize("to", ["gguf", "transformers"])
@pytest.mark.parametrize("variant", list(HFLLM_ONLY))
def test_export_refuses_in_one_line_naming_the_variant_and_writes_nothing(variant, to, tmp_path):
    assert_export_refused(tiny(variant), tmp_path, to, HFLLM_ONLY[variant])


def test_zero_init_exports_to_llama_and_gguf(tiny_llama_shakespeare_dir, tmp_path):
    """Zero-initialised projections change only the start: the model is a Llama, exported exactly, and its GGUF
    file reads back with the same logits."""
    from transformers import AutoTokenizer

    from hfllm.models.convert import exact_native

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_shakespeare_dir)
    model = tiny("zero_init", "sdpa", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    assert type(exact_native(model)).__name__ == "LlamaForCausalLM"
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    path = export(tmp_path / "model", tmp_path / "gguf", to="gguf", quant="f32")
    read = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = tokenizer("ROMEO:\nWhat light", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(read.eval()(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # llama.cpp (llama-cpp-python) loads the file: ~10 s
def test_llama_cpp_runs_the_zero_init_export_like_hfllm(tiny_llama_shakespeare_dir, tmp_path):
    from transformers import AutoTokenizer

    from hfllm.assets import llama_cpp

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_shakespeare_dir)
    model = tiny("zero_init", "sdpa", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    path = export(tmp_path / "model", tmp_path / "gguf", to="gguf", quant="f32")
    llama = llama_cpp().Llama(model_path=str(path), n_ctx=128, n_threads=1, n_threads_batch=1, verbose=False)
    ids = tokenizer("ROMEO:\nWhat light", add_special_tokens=False)["input_ids"]
    expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    generated = []
    for token in llama.generate(ids, temp=0.0, top_k=1):
        generated.append(token)
        if len(generated) == len(expected):
            break
    llama.close()
    assert generated == expected


# ----------------------------------------------------------------------------- the shipped recipes

def test_variant_recipes_are_shipped():
    assert {"rope-tiny", "alibi-tiny", "nope-tiny", "speedrun-tricks-tiny"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", [pytest.param(name, marks=[] if name == "speedrun-tricks-tiny" else pytest.mark.slow)
                                    for name in RECIPES])
def test_variant_recipe_trains_saves_and_generates(recipe, tmp_path):
    out = train_shrunk(RECIPES[recipe], tmp_path)
    model = AutoModelForCausalLM.from_pretrained(out)
    values = yaml.safe_load(RECIPES[recipe].read_text())
    for field in set(values) & set(VARIANTS["alibi+speedrun"]):
        assert getattr(model.config, field) == values[field], field
    ids = torch.tensor([[1, 2, 3]])
    assert model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False).shape == (1, 7)


@pytest.mark.slow  # each doctor run trains its shrunk recipe a few times: ~20 s
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_doctor_passes_on_each_variant_recipe(recipe, tmp_path, capsys):
    from hfllm.cli import main as cli

    train, validation = tmp_path / "train.txt", tmp_path / "validation.txt"
    train.write_text(CORPUS * 40, encoding="utf-8")
    validation.write_text("All:\nYou are resolved to speak further.\n\nFirst Citizen:\nRather die than famish.\n\n" * 4)
    argv = [str(RECIPES[recipe]), *TINY, "--num_hidden_layers", "4", "--max_position_embeddings", "64",
            "--intermediate_size", "64", "--dataset", "null", "--train_files", str(train),
            "--validation_files", str(validation)]
    code = cli(["doctor", *argv])
    out = capsys.readouterr().out
    assert "causal mask" in out and "FAIL" not in out[out.index("\ncheck "):], out[-3000:]
    assert code == 0
