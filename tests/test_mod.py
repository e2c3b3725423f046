"""Mixture of Depths (Raposo et al. 2024, arXiv 2404.02258), config fields `mod_capacity`, `mod_layers`,
`mod_predictor_loss_coef`: what training computes (top-k routing, against a written-out reference), that the
predictor's loss reaches the predictor alone, that evaluation and generation route causally (cached greedy generation
equals uncached, alone, in a left-padded batch and under beam search), the training/inference routing agreement,
save / from_pretrained / remote code without hfllm, `hfllm plan`'s counts against the real tensors and a measured
training forward, `hfllm export`'s one-line refusals, and the shipped recipe trains (its `hfllm doctor` run is
tests/test_variants.py::test_doctor_passes_on_each_variant_recipe[mod-tiny], behind slow)."""

import math
import re
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import (assert_cached_generation_equals_uncached, assert_export_refused, left_padded, log_history,
                     measured_flops_per_token, perturbed_tiny, run_without_hfllm, train_shrunk)
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DynamicCache

from hfllm import HfllmConfig, HfllmForCausalLM
from hfllm.diagnostics.subjects import shrink
from hfllm.models import HfllmConfigError, parameter_counts
from hfllm.training.mfu import flops_per_token

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "variants" / "mod-tiny.yaml"
VARIANTS = {
    "half": {"mod_capacity": 0.5},  # layers 1 and 3 routed
    "eighth-layers-0-2": {"mod_capacity": 0.125, "mod_layers": [0, 2]},
    "half-nope": {"mod_capacity": 0.5, "position_embedding": "none"},
}

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny(variant: str = "half", attn: str = "eager", **overrides) -> HfllmForCausalLM:
    """A random 4-layer model (GQA: 4 query heads, 2 key/value heads), every weight perturbed so that the routers and
    predictors route some tokens and not others."""
    return perturbed_tiny(attn, **{**VARIANTS[variant], **overrides})


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("fields, words", [
    ({"mod_capacity": 1.5}, "mod_capacity (1.5) must be in (0, 1], or null to disable it"),
    ({"mod_capacity": -0.1}, "mod_capacity (-0.1) must be in (0, 1]"),
    ({"mod_layers": [1]}, "mod_layers needs mod_capacity"),
    ({"mod_capacity": 0.5, "mod_layers": [4]}, "mod_layers [4] out of range 0..3"),
    ({"mod_capacity": 0.5, "mod_layers": []}, "mod_capacity needs at least one routed layer"),
    ({"mod_capacity": 0.5, "mod_layers": [1, 1]}, "mod_layers [1, 1] has repeated entries"),
    ({"mod_capacity": 0.5, "mod_predictor_loss_coef": -1}, "mod_predictor_loss_coef (-1) must be 0 or more"),
    ({"mod_capacity": 0.5, "num_experts": 4}, "mod_capacity (Mixture of Depths) does not support num_experts;"),
    ({"mod_capacity": 0.5, "sliding_window": 8}, "mod_capacity (Mixture of Depths) does not support sliding_window;"),
    ({"mod_capacity": 0.5, "position_embedding": "alibi"},
     "mod_capacity (Mixture of Depths) does not support position_embedding: alibi;"),
    ({"mod_capacity": 0.5, "value_embeddings": 2, "unet_skips": True},
     "mod_capacity (Mixture of Depths) does not support value_embeddings, unet_skips;"),
])
def test_bad_mod_fields_are_refused_in_one_line_naming_the_field(fields, words):
    with pytest.raises(HfllmConfigError, match="^" + re.escape(words)) as error:
        HfllmConfig(**{"num_hidden_layers": 4, **fields})
    assert "\n" not in str(error.value)


def test_routed_layers_default_to_every_other_layer_and_zero_capacity_is_off():
    config = HfllmConfig(num_hidden_layers=6, mod_capacity=0.125)
    assert config.mod_layers is None and config.mod_routed_layers == [1, 3, 5]  # the paper's interleaving
    assert HfllmConfig(num_hidden_layers=2, mod_capacity=0.125).mod_routed_layers == [1]  # e.g. hfllm doctor's copy
    off = HfllmConfig(num_hidden_layers=4, mod_capacity=0)
    assert off.mod_capacity is None and off.mod_routed_layers == []
    # hfllm doctor's 2-layer copy keeps the routed layers it can
    assert shrink(HfllmConfig(num_hidden_layers=4, mod_capacity=0.5, mod_layers=[1, 3]))["mod_layers"] == [1]
    assert shrink(HfllmConfig(num_hidden_layers=4, mod_capacity=0.5, mod_layers=[3]))["mod_layers"] is None
    assert HfllmForCausalLM(HfllmConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                        vocab_size=61)).model.depth_routers is None


# ----------------------------------------------------------------------------- what training computes


def block_output(layer, x: torch.Tensor, positions: torch.Tensor, rope: bool, documents: torch.Tensor) -> torch.Tensor:
    """f(x) of one decoder block written out for n tokens (n, H) at `positions`: causal attention among these tokens
    only, within their document (GQA by repeating key/value heads, RoPE at their own positions), then the MLP."""
    attn, n = layer.self_attn, x.shape[0]
    heads, head_dim, groups = attn.config.num_attention_heads, attn.head_dim, attn.num_key_value_groups
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(n, heads, head_dim).transpose(0, 1)  # (nh, n, hd)
    k = attn.k_proj(h).view(n, -1, head_dim).transpose(0, 1).repeat_interleave(groups, 0)
    v = attn.v_proj(h).view(n, -1, head_dim).transpose(0, 1).repeat_interleave(groups, 0)
    if rope:
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
        angles = torch.cat([positions[:, None] * inv_freq] * 2, dim=-1)  # (n, hd)

        def rotate(t: torch.Tensor) -> torch.Tensor:
            return t * angles.cos() + torch.cat([-t[..., head_dim // 2:], t[..., :head_dim // 2]], -1) * angles.sin()

        q, k = rotate(q), rotate(k)
    allowed = torch.ones(n, n).tril().bool() & (documents[:, None] == documents[None, :])
    scores = (q @ k.transpose(1, 2) / math.sqrt(head_dim)).masked_fill(~allowed, float("-inf"))
    a = attn.o_proj((scores.softmax(-1) @ v).transpose(0, 1).reshape(n, -1))
    return a + layer.mlp(layer.post_attention_layernorm(x + a))


def reference_training_logits(model: HfllmForCausalLM, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The paper's training forward for one unpadded row (1, T): in a routed layer the router's top-k tokens
    (k = ceil(capacity * T)), kept in order, go through the block among themselves and add sigmoid(r) * f(x); every
    other token keeps x. A layer that is not routed is x + f(x) on all tokens. Packed documents (positions restarting
    at 0) attend within themselves; the top-k is the row's."""
    config, inner = model.config, model.model
    length = ids.shape[1]
    documents = (positions == 0).cumsum(0)  # (T,)
    x = inner.embed_tokens(ids)[0]  # (T, H)
    for i, layer in enumerate(inner.layers):
        chosen, weight = torch.arange(length), torch.ones(length, 1)
        if config.is_mod_layer(i):
            scores = inner.depth_routers[str(i)].score(x)[:, 0]  # (T,)
            chosen = scores.topk(math.ceil(config.mod_capacity * length)).indices.sort().values
            weight = torch.sigmoid(scores[chosen])[:, None]
        update = block_output(layer, x[chosen], positions[chosen].float(), config.position_embedding == "rope",
                              documents[chosen])
        x = x.index_add(0, chosen, weight * update)
    return model.lm_head(inner.norm(x))[None]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_processes_the_top_k_tokens_as_the_paper_writes(variant):
    model = tiny(variant).train()
    ids, _ = left_padded(length=16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:1]).logits, reference_training_logits(model, ids[:1], torch.arange(16)),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_training_keeps_packed_documents_apart(attn):
    """Per-document position_ids (hfllm's packing, `per_document_positions`): the gathered tokens attend within their
    document, as the mask of a dense layer does."""
    model = tiny("half", attn).train()
    ids, _ = left_padded(length=16)
    positions = torch.cat([torch.arange(5), torch.arange(7), torch.arange(4)])  # three documents in one row
    with torch.no_grad():
        logits = model(ids[:1], position_ids=positions[None]).logits
        torch.testing.assert_close(logits, reference_training_logits(model, ids[:1], positions), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(logits, model(ids[:1]).logits, atol=1e-3)  # the documents do change the result


def test_training_gathers_what_the_masked_dense_path_computes_and_ignores_padding():
    """Without a cache the routed tokens are gathered; with one every token is computed and the keys carry their
    routing. Both give the same logits, under top-k routing and under the predictor's, and a left-padded row's real
    tokens get what they get alone (per row k = ceil(capacity * real tokens), padding never routed)."""
    model = tiny("half", "sdpa").train()
    ids, mask = left_padded(length=16)
    with torch.no_grad():
        gathered = model(ids, attention_mask=mask).logits
        dense = model(ids, attention_mask=mask, cache=DynamicCache(config=model.config)).logits
        alone = model(ids[1:, 5:]).logits
    torch.testing.assert_close(gathered[:, 5:], dense[:, 5:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gathered[0], dense[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gathered[1, 5:], alone[0], atol=1e-5, rtol=1e-5)
    model.eval()  # the predictor's routing: gathered (no cache) and dense (a cache) agree too
    with torch.no_grad():
        gathered = model(ids, attention_mask=mask, use_cache=False).logits
        dense = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(gathered[0], dense[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gathered[1, 5:], dense[1, 5:], atol=1e-5, rtol=1e-5)
    router = model.model.depth_routers["1"]
    _, top_k, _ = router(torch.randn(2, 16, 32), mask.bool())
    assert top_k.sum(dim=1).tolist() == [8, 6] and not top_k[1, :5].any()  # ceil(0.5 * 16), ceil(0.5 * 11)


def test_predictor_loss_reaches_the_predictor_alone_and_leaves_the_loss_value_the_lm_loss():
    ids, _ = left_padded(length=16)
    grads = {}
    for coef in (0.0, 1.0):
        model = tiny("half", mod_predictor_loss_coef=coef).train()
        output = model(ids, labels=ids)
        lm_loss = model.loss_function(logits=output.logits, labels=ids, vocab_size=model.config.vocab_size)
        torch.testing.assert_close(output.loss, lm_loss)
        assert output.predictor_loss > 0.1  # binary cross-entropy of a random predictor
        output.loss.backward()
        grads[coef] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    predictor = [name for name in grads[1.0] if ".predictor." in name]
    assert len(predictor) == 8 and all(grads[1.0][name].abs().sum() > 0 for name in predictor)
    assert all(not grads[0.0][name].any() for name in predictor)
    for name, grad in grads[0.0].items():  # the LM's gradients do not change with the predictor's loss
        if name not in predictor:
            assert torch.equal(grad, grads[1.0][name]), name
    assert grads[1.0]["model.depth_routers.1.score.weight"].abs().sum() > 0  # the router learns through sigmoid(r)


def test_gradient_checkpointing_keeps_the_routers_gradients():
    ids, _ = left_padded(length=16)
    grads = []
    for checkpointing in (False, True):
        model = tiny("half").train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(ids, labels=ids).loss.backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- causal inference


def test_evaluation_routes_causally_and_training_does_not():
    """Changing the later half of a sequence leaves the earlier logits unchanged in evaluation (the predictor decides
    token by token); under training's top-k it changes them: the reason for the predictor (section 3.5)."""
    model = tiny("half")
    ids, _ = left_padded(length=16)
    changed = ids[:1].clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 61
    with torch.no_grad():
        evaluation = (model(ids[:1]).logits - model(changed).logits)[0, :8].abs().max()
        model.train()
        training = (model(ids[:1]).logits - model(changed).logits)[0, :8].abs().max()
    assert evaluation == 0 and training > 1e-3


def test_routing_agreement_counts_real_tokens_against_the_top_k():
    """A predictor that routes every token agrees on the top-k tokens only: accuracy = precision = k / n, recall 1;
    one that routes none: accuracy 1 - k / n. The left-padded row counts its 11 real tokens (k = 6)."""
    model = tiny("half")
    ids, mask = left_padded(length=16)
    for bias, expected in ((10.0, {"accuracy": 14 / 27, "precision": 14 / 27, "recall": 1.0, "routed": 1.0}),
                           (-10.0, {"accuracy": 13 / 27, "precision": 0.0, "recall": 0.0, "routed": 0.0})):
        with torch.no_grad():
            for router in model.model.depth_routers.values():
                router.predictor[2].weight.zero_()
                router.predictor[2].bias.fill_(bias)
        for causal in (True, False):
            agreement = model.routing_agreement(ids, attention_mask=mask, causal=causal)
            assert list(agreement) == [1, 3]
            for layer in agreement.values():
                assert layer == pytest.approx(expected), (bias, causal)
    assert not model.training


def test_a_trained_predictor_learns_the_top_k():
    """Training the predictor alone (LM frozen) on a few sequences takes its agreement with the top-k well above
    chance: the target is learnable and `routing_agreement` sees it."""
    model = tiny("half").train()
    ids = torch.randint(1, 61, (8, 16), generator=torch.Generator().manual_seed(2))
    predictor = [p for name, p in model.named_parameters() if ".predictor." in name]
    optimizer = torch.optim.Adam(predictor, lr=3e-2)
    before = model.routing_agreement(ids, causal=False)
    for _ in range(60):
        loss = model(ids).predictor_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.routing_agreement(ids, causal=False)
    for i in after:
        assert after[i]["accuracy"] > 0.85 and after[i]["accuracy"] > before[i]["accuracy"], (before, after)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_greedy_generation_equals_uncached_alone_and_left_padded(variant, attn):
    model = tiny(variant, attn)
    ids, mask = left_padded()
    routed = model.routing_agreement(ids, attention_mask=mask)
    assert all(0 < layer["routed"] < 1 for layer in routed.values()), routed  # some tokens skip, some do not
    assert_cached_generation_equals_uncached(model)


def test_beam_search_reorders_the_cached_routing_with_its_keys():
    model = tiny("half", "sdpa")
    ids, mask = left_padded()
    settings = dict(max_new_tokens=6, do_sample=False, num_beams=3, pad_token_id=0)
    cached = model.generate(ids, attention_mask=mask, use_cache=True, **settings)
    assert torch.equal(cached, model.generate(ids, attention_mask=mask, use_cache=False, **settings))


def test_unsupported_kernels_caches_and_packed_positions_are_refused_in_one_line():
    model = tiny("half")
    ids, _ = left_padded()
    with pytest.raises(ValueError, match=r"^mod_capacity .* a static cache .* is not supported$"):
        model.generate(ids[:1], max_new_tokens=2, do_sample=False, cache_implementation="static")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"^mod_capacity .* under eager or sdpa attention, not flex_attention;"):
        model(ids, cache=DynamicCache(config=model.config))
    model.config._attn_implementation = "eager"
    flattened = dict(cu_seq_lens_q=torch.tensor([0, 6, 12]), cu_seq_lens_k=torch.tensor([0, 6, 12]))
    with pytest.raises(ValueError, match=r"^mod_capacity .* FlashAttention's flattened batch .* not supported"):
        model.train()(ids[:1], **flattened)


# ----------------------------------------------------------------------------- checkpoints, counts, export


def test_saves_and_loads_with_from_pretrained(tmp_path):
    model = tiny("eighth-layers-0-2")
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="eager")
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert loaded.config.mod_layers == [0, 2] and loaded.config.mod_capacity == 0.125
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    ids, mask = left_padded()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, loaded.eval()(ids, attention_mask=mask).logits)


@pytest.mark.slow  # a fresh process imports torch and transformers (~8 s); the default suite loads a MoD checkpoint
# through remote code in tests/test_variants.py::test_variants_load_through_remote_code_without_hfllm
def test_loads_and_generates_through_remote_code_without_hfllm(tmp_path):
    ids, mask = left_padded()
    model = tiny("half")
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    torch.save({"ids": ids, "mask": mask, "logits": expected, "generated": generated}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hfllm"] = None  # importing hfllm now fails: only the checkpoint's own code can be used
        import torch
        from transformers import AutoModelForCausalLM
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True,
                                                     attn_implementation="eager")
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model.eval()(expected["ids"], attention_mask=expected["mask"]).logits
        torch.testing.assert_close(logits, expected["logits"], atol=0, rtol=0)
        generated = model.generate(expected["ids"], attention_mask=expected["mask"], max_new_tokens=6,
                                   do_sample=False, pad_token_id=0)
        assert torch.equal(generated, expected["generated"])
        print("remote code OK")
    """)
    result = run_without_hfllm(script, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "remote code OK" in result.stdout


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parameter_and_flop_counts_match_the_tensors_and_a_measured_training_forward(variant):
    """Routed layers process ceil(capacity * T) tokens in training: their blocks count that fraction, the routers and
    predictors all tokens; torch's FLOP counter on a training-mode forward (eager attention) agrees."""
    model = tiny(variant)
    assert parameter_counts(model)["total"] == sum(p.numel() for p in model.parameters())
    dense = tiny(variant, mod_capacity=None, mod_layers=None)
    assert flops_per_token(model, 48) < flops_per_token(dense, 48)
    measured = measured_flops_per_token(model, 48)  # on a training-mode forward: the top-k routing
    predicted = flops_per_token(model, 48)
    assert abs(predicted - measured) / measured < 0.02, (predicted, measured)


@pytest.mark.parametrize("to", ["gguf", "transformers"])
def test_export_refuses_in_one_line_naming_the_variant_and_writes_nothing(to, tmp_path):
    assert_export_refused(tiny("half"), tmp_path, to, "mod_capacity: 0.5")


# ----------------------------------------------------------------------------- the shipped recipe

def test_mod_recipe_trains_saves_and_generates(tmp_path):
    out = train_shrunk(RECIPE, tmp_path)
    history = log_history(out)
    assert any("eval_loss" in entry for entry in history)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.mod_capacity == 0.125 and model.config.mod_routed_layers == [1, 3]
    assert len(model.model.depth_routers) == 2
    ids = torch.tensor([[1, 2, 3]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 7)
