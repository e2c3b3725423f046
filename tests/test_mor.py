"""Mixture-of-Recursions (Bae et al. 2025, arXiv 2507.10524) as config fields of hfllm's one family: `num_recursions`,
`recursion_sharing`, `recursion_balance_loss_coef`. What it computes against a written-out reference (token-choice
routing, recursive KV sharing, the router weight on the last recursion), full depth and depth 1 for every token,
the balancing loss, parameters against the unrolled dense model, cached greedy generation equals uncached (alone and
left-padded), save / from_pretrained / remote code without hfllm, `hfllm plan`'s counts against the real tensors and a
measured forward pass, `hfllm export`'s one-line refusal, and the shipped recipe trains (`hfllm doctor` behind slow)."""

import math
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (assert_cached_generation_equals_uncached, assert_export_refused, left_padded,
                     measured_flops_per_token, perturbed_tiny, run_without_hfllm, train_shrunk)
from transformers import AutoModelForCausalLM

from hfllm import HfllmConfig, HfllmForCausalLM
from hfllm.models import HfllmConfigError, parameter_counts
from hfllm.models.modeling_hfllm import CACHE_NAME, apply_rotary_pos_emb
from hfllm.training.mfu import flops_per_token

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "variants" / "mor-tiny.yaml"
SHAPE = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, pad_token_id=0)

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(attn: str = "eager", **overrides) -> HfllmForCausalLM:
    """A random Middle-Cycle MoR model (4 unique layers: 0 | 1, 2 shared, applied up to 3 times | 3), every weight
    perturbed so that the router's choices spread over the depths."""
    model = perturbed_tiny(attn, **{"num_recursions": 3, **overrides})
    with torch.no_grad():
        if model.model.recursion_router is not None:  # confident choices: a flip needs more than rounding noise
            model.model.recursion_router.weight.mul_(10)
    return model.eval()


def force_depth(model: HfllmForCausalLM, depth: int) -> None:
    """Route every token to `depth` (1..N_r) with router weight 1."""
    router = model.model.recursion_router

    def forward(hidden_states):
        logits = F.linear(hidden_states, router.weight)
        return logits, torch.full(hidden_states.shape[:2], depth - 1), torch.ones(hidden_states.shape[:2])

    router.forward = forward


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("fields, words", [
    ({"num_recursions": -1}, "num_recursions (-1) must be 0 or more (0 or 1: off)"),
    ({"recursion_sharing": "sequence"}, "unknown recursion_sharing 'sequence'; allowed: middle_cycle, cycle"),
    ({"num_hidden_layers": 2}, "recursion_sharing middle_cycle needs at least 3 layers"),
    ({"recursion_balance_loss_coef": -0.1}, "recursion_balance_loss_coef (-0.1) must be 0 or more"),
    ({"num_experts": 4}, "num_recursions (3) does not support num_experts > 0"),
    ({"value_embeddings": 2}, "num_recursions (3) does not support value_embeddings"),
    ({"unet_skips": True}, "num_recursions (3) does not support unet_skips"),
    ({"sliding_window": 8}, "num_recursions (3) does not support sliding_attention layers"),
])
def test_bad_recursion_fields_are_refused_in_one_line(fields, words):
    with pytest.raises(HfllmConfigError, match="^" + words.replace("(", r"\(").replace(")", r"\)")) as error:
        HfllmConfig(**{"num_hidden_layers": 4, "num_recursions": 3, **fields})
    assert "\n" not in str(error.value)


def test_layouts_and_unrolled_depth():
    """num_hidden_layers counts unique layers; the unrolled depth is 2 + N_r (L - 2) (Middle-Cycle) or N_r L (Cycle)."""
    middle = HfllmConfig(num_hidden_layers=4, num_recursions=3)
    assert middle.recursion_layout() == ([0], [1, 2], [3]) and middle.unrolled_num_layers == 8
    cycle = HfllmConfig(num_hidden_layers=2, num_recursions=3, recursion_sharing="cycle")
    assert cycle.recursion_layout() == ([], [0, 1], []) and cycle.unrolled_num_layers == 6
    for off in (0, 1):
        plain = HfllmConfig(num_hidden_layers=4, num_recursions=off)
        assert plain.recursion_layout() == ([0, 1, 2, 3], [], []) and plain.unrolled_num_layers == 4
    assert HfllmForCausalLM(HfllmConfig(**SHAPE, num_hidden_layers=2, num_recursions=1)).model.recursion_router is None


@pytest.mark.parametrize("sharing, layers", [("cycle", 2), ("middle_cycle", 5)])
def test_parameters_are_about_one_over_n_r_of_the_unrolled_dense_model(sharing, layers):
    """The layers' parameters: Cycle exactly 1/N_r of the unrolled dense model's, Middle-Cycle L / (2 + N_r (L - 2));
    everything else (embedding, final norm) is the same, plus the router's N_r x H."""
    mor = HfllmForCausalLM(HfllmConfig(**SHAPE, num_hidden_layers=layers, num_recursions=3, recursion_sharing=sharing))
    unrolled = HfllmForCausalLM(HfllmConfig(**SHAPE, num_hidden_layers=mor.config.unrolled_num_layers))
    per_layer = sum(p.numel() for p in unrolled.model.layers[0].parameters())
    total = {id(p): p.numel() for p in mor.parameters()}
    assert parameter_counts(mor)["total"] == sum(total.values())
    outside = parameter_counts(unrolled)["total"] - per_layer * mor.config.unrolled_num_layers
    assert parameter_counts(mor)["total"] == outside + per_layer * layers + 3 * 32
    layer_share = (parameter_counts(mor)["total"] - outside - 3 * 32) / (parameter_counts(unrolled)["total"] - outside)
    assert layer_share == pytest.approx(1 / 3 if sharing == "cycle" else 5 / 11)


# ----------------------------------------------------------------------------- what it computes


def reference_logits(model: HfllmForCausalLM, ids: torch.Tensor, depth: torch.Tensor | None = None,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """MoR written out for one unpadded sequence (1, T): causal softmax attention (GQA by repeating key/value heads,
    RoPE), the first layer, then the shared layers N_r times, each token's recursion r applied while r <= its depth,
    its last one scaled by the router weight, keys/values of every recursion those of the first; then the last
    layer. depth (T,) 1..N_r and weight (T,) default to the router's top-1 choice on the hidden state it sees."""
    config, inner = model.config, model.model
    length, heads = ids.shape[1], config.num_attention_heads
    groups, head_dim = heads // config.num_key_value_heads, config.head_dim
    cos, sin = inner.rotary_emb(inner.embed_tokens.weight, torch.arange(length)[None])  # (1, T, hd)
    causal = torch.ones(length, length, dtype=torch.bool).tril()

    def layer(x, i, shared=None):
        block, attn = inner.layers[i], inner.layers[i].self_attn
        h = block.input_layernorm(x)
        q = attn.q_proj(h).view(length, heads, head_dim).transpose(0, 1)[None]  # (1, nh, T, hd)
        if shared is not None and i in shared:
            k, v = shared[i]
        else:
            k = attn.k_proj(h).view(length, -1, head_dim).transpose(0, 1)[None]
            v = attn.v_proj(h).view(length, -1, head_dim).transpose(0, 1)[None]
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        if shared is not None and i not in shared:
            shared[i] = (k, v)
        k, v = k[0].repeat_interleave(groups, 0), v[0].repeat_interleave(groups, 0)  # (nh, T, hd)
        scores = (q[0] @ k.transpose(1, 2) / math.sqrt(head_dim)).masked_fill(~causal, float("-inf"))
        x = x + attn.o_proj((scores.softmax(-1) @ v).transpose(0, 1).reshape(length, -1))
        return x + block.mlp(block.post_attention_layernorm(x))

    first, middle, last = config.recursion_layout()
    x = inner.embed_tokens(ids)[0]  # (T, H)
    for i in first:
        x = layer(x, i)
    if depth is None:
        weight, index = torch.softmax(x @ inner.recursion_router.weight.T, dim=-1).max(dim=-1)
        depth = index + 1
    shared = {}
    for recursion in range(1, config.num_recursions + 1):
        out = x
        for i in middle:
            out = layer(out, i, shared)
        scale = torch.where(depth == recursion, weight, 1.0)[:, None]
        x = torch.where((depth >= recursion)[:, None], x + scale * (out - x), x)
    for i in last:
        x = layer(x, i)
    return model.lm_head(inner.norm(x))[None], depth


@pytest.mark.parametrize("sharing", ["middle_cycle", "cycle"])
def test_mor_computes_the_written_out_recursions_also_left_padded(sharing):
    """The router's own choices (spread over every depth) and its weights: each row of a left-padded batch equals
    the reference on its own tokens."""
    model = tiny("sdpa", recursion_sharing=sharing)
    ids, mask = left_padded()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        expected, depth = reference_logits(model, ids[:1])
        assert set(depth.tolist()) == {1, 2, 3}, "the test needs tokens at every depth"
        torch.testing.assert_close(logits[:1], expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[1:, 5:], reference_logits(model, ids[1:, 5:])[0], atol=1e-4, rtol=1e-4)


def test_full_depth_is_the_shared_layers_n_r_times_and_depth_one_the_unique_layers_once():
    ids, _ = left_padded()
    model = tiny()
    full = torch.full((ids.shape[1],), 3)
    with torch.no_grad():
        force_depth(model, 3)
        torch.testing.assert_close(model(ids[:1]).logits, reference_logits(model, ids[:1], full, torch.ones(12))[0])
        force_depth(model, 1)
        once = model(ids).logits
        plain = tiny(num_recursions=0)
        plain.load_state_dict(model.state_dict(), strict=False)  # the same layers, no router
        torch.testing.assert_close(once, plain(ids).logits)
        assert not torch.allclose(once, model.__class__(model.config).eval()(ids).logits)  # weights matter


def test_router_weight_gets_gradient_and_balancing_loss_joins_the_lm_loss():
    """The LM loss alone trains the router (its weight scales each token's last recursion); the balancing loss is
    Switch's N_r * sum_j f_j P_j over the depths, added with its coefficient while `output_router_logits` is on (the
    default with num_recursions)."""
    assert HfllmConfig(num_recursions=3).output_router_logits and not HfllmConfig().output_router_logits
    model = tiny(recursion_balance_loss_coef=0.0).train()
    ids, mask = left_padded()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert model.model.recursion_router.weight.grad.abs().sum() > 0
    torch.testing.assert_close(out.loss, model.loss_function(out.logits, labels, vocab_size=61))
    logits = out.router_logits[0].detach().view(2, 12, 3)[mask.bool()]  # (N, N_r) real tokens
    probs = logits.softmax(-1)
    f = torch.bincount(probs.argmax(-1), minlength=3).float() / len(probs)
    torch.testing.assert_close(out.aux_loss.detach(), 3 * (f * probs.mean(0)).sum())
    model.config.recursion_balance_loss_coef = 0.5
    with torch.no_grad():
        weighted = model(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(weighted.loss, out.loss.detach() + 0.5 * out.aux_loss.detach())
    with torch.no_grad():  # router losses off, as for MoE (hfllm doctor's label check): the LM loss alone
        alone = model(ids, attention_mask=mask, labels=labels, output_router_logits=False)
    assert alone.aux_loss is None and torch.equal(alone.loss, out.loss.detach())


def test_a_token_never_depends_on_later_tokens():
    """Changing the last tokens leaves every earlier logit, and every earlier depth, unchanged."""
    model = tiny()
    ids, _ = left_padded()
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 61
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before.logits[:, :8], after.logits[:, :8], atol=0, rtol=0)
    assert not torch.allclose(before.logits[:, 8:], after.logits[:, 8:])


def test_gradient_checkpointing_gives_the_same_gradients():
    """The deeper recursions read the first recursion's keys/values: recomputed layers must still link them."""
    ids, _ = left_padded()
    grads = []
    for checkpointing in (False, True):
        model = tiny().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------- generation, saving, counting, export


@pytest.mark.parametrize("fields", [{}, {"recursion_sharing": "cycle"}, {"position_embedding": "alibi"},
                                    {"position_embedding": "none", "qk_norm": True}], ids=["middle_cycle", "cycle",
                                                                                          "alibi", "nope+qk_norm"])
def test_cached_greedy_generation_equals_uncached_alone_and_left_padded(fields):
    """Recursive KV sharing: deeper recursions read the first recursion's cached keys, whatever the positions."""
    model = tiny("sdpa", **fields)
    assert_cached_generation_equals_uncached(model)


def test_cache_holds_one_entry_per_unique_layer():
    """Recursive KV sharing: the deeper recursions write nothing, so the cache has the unique layers' keys only."""
    model = tiny("sdpa")
    ids, _ = left_padded()
    with torch.no_grad():
        cache = getattr(model(ids[:1], use_cache=True), CACHE_NAME)
    assert len(cache.layers) == 4 and cache.get_seq_length() == 12


def test_saves_loads_and_loads_through_remote_code_without_hfllm(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "mor")
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "mor", output_loading_info=True,
                                                        attn_implementation="eager")
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    ids, mask = left_padded()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        assert torch.equal(loaded.eval()(ids, attention_mask=mask).logits, expected)
    torch.save({"ids": ids, "mask": mask, "expected": expected}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hfllm"] = None  # importing hfllm now fails: only the checkpoint's own code can be used
        import torch
        from transformers import AutoModelForCausalLM
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "mor")!r}, trust_remote_code=True,
                                                     attn_implementation="eager")
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model.eval()(inputs["ids"], attention_mask=inputs["mask"]).logits
        torch.testing.assert_close(logits, inputs["expected"], atol=0, rtol=0)
        print("remote code OK", model.config.num_recursions)
    """)
    result = run_without_hfllm(script, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "remote code OK 3" in result.stdout


@pytest.mark.parametrize("sharing", ["middle_cycle", "cycle"])
def test_parameter_and_flop_counts_match_the_tensors_and_a_measured_forward(sharing):
    """The shared stack runs N_r times over every token (its keys/values once): `flops_per_token` against torch's
    FLOP counter, and far above what the unique layers alone would cost."""
    model = tiny(recursion_sharing=sharing)
    assert parameter_counts(model)["total"] == sum({id(p): p.numel() for p in model.parameters()}.values())
    predicted, measured = flops_per_token(model, 48), measured_flops_per_token(model, 48)
    assert abs(predicted - measured) / measured < 0.03, (predicted, measured)
    plain = tiny(num_recursions=0)
    assert predicted > 1.5 * flops_per_token(plain, 48)


@pytest.mark.parametrize("to", ["gguf", "transformers"])
def test_export_refuses_in_one_line_naming_the_variant_and_writes_nothing(to, tmp_path):
    assert_export_refused(tiny(), tmp_path, to, "num_recursions: 3 (Mixture-of-Recursions)")


# ----------------------------------------------------------------------------- the shipped recipe

def test_mor_recipe_trains_saves_and_generates(tmp_path):
    out = train_shrunk(RECIPE, tmp_path, layers=3)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.num_recursions, model.config.recursion_sharing) == (3, "middle_cycle")
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)
