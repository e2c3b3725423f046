"""hfllm's model family on tiny random configs: masks, caches, backends, losses, MoE routing, save/load."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import run_without_hfllm
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from hfllm import HfllmConfig, HfllmForCausalLM, get_preset
from hfllm.models.convert import to_hfllm
from hfllm.errors import HfllmError
from hfllm.models import HfllmConfigError
from hfllm.models.modeling_hfllm import CACHE_NAME, load_balancing_loss, router_z_loss

VOCAB = 101
VARIANTS = {
    "dense": dict(),
    "mqa-qknorm-bias": dict(num_key_value_heads=1, qk_norm=True, attention_bias=True),
    "sliding": dict(sliding_window=6),
    "interleaved": dict(sliding_window=6, layer_types=["sliding_attention", "full_attention"] * 2),
    "moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, num_shared_experts=1,
                output_router_logits=True),
}


def tiny(variant: str = "dense", **overrides) -> HfllmForCausalLM:
    torch.manual_seed(0)
    fields = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    config = get_preset("llama-tiny", **{**fields, **VARIANTS[variant], **overrides})
    return HfllmForCausalLM(config).eval()


def batch(length: int = 16, pad: int = 5):
    ids = torch.randint(3, VOCAB, (3, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("padded", [False, True])
def test_attention_backends_agree(variant, padded):
    model = tiny(variant)
    ids, mask = batch()
    if not padded:
        mask = torch.ones_like(mask)
    logits = {}
    for implementation in ("eager", "sdpa", "flex_attention"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits[implementation] = model(ids, attention_mask=mask).logits
    real = mask.bool()
    for implementation in ("sdpa", "flex_attention"):
        assert (logits[implementation] - logits["eager"])[real].abs().max().item() < 1e-5, implementation


def test_fused_experts_kernels_agree_with_the_eager_loop():
    model = tiny("moe")
    ids, mask = batch()
    logits = {}
    for implementation in ("eager", "batched_mm", "grouped_mm"):
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            logits[implementation] = model(ids, attention_mask=mask).logits
    for implementation in ("batched_mm", "grouped_mm"):
        assert (logits[implementation] - logits["eager"]).abs().max().item() < 1e-5, implementation


@pytest.mark.parametrize("variant", ["dense", "sliding", "interleaved", "moe"])
def test_cached_generation_equals_uncached(variant):
    model = tiny(variant)
    ids, mask = batch(length=12, pad=3)
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)  # 32 tokens >> window 6
    cached = model.generate(ids, attention_mask=mask, **kwargs)
    uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kwargs)
    static = model.generate(ids, attention_mask=mask, cache_implementation="static", **kwargs)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, static)


@pytest.mark.parametrize("variant", ["sliding", "interleaved"])
def test_sliding_layers_cache_only_the_window(variant):
    """Decoding far past the window (12 prompt + 32 new tokens, window 6): the cache of each sliding layer holds at
    most `sliding_window` positions, a full-attention layer's holds all 44, and the last cached step still gives the
    logits of a full forward pass."""
    model = tiny(variant)
    window, kinds = model.config.sliding_window, model.config.layer_types
    ids, _ = batch(length=12, pad=0)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        tokens = ids
        for _ in range(32):
            next_token = out.logits[:, -1:].argmax(-1)  # (B, 1)
            tokens = torch.cat([tokens, next_token], dim=1)
            out = model(next_token, use_cache=True, **{CACHE_NAME: getattr(out, CACHE_NAME)})
        full = model(tokens).logits[:, -1]  # (B, V)
    cache = getattr(out, CACHE_NAME)
    assert tokens.shape[1] == 44 and len(cache.layers) == len(kinds) and "sliding_attention" in kinds
    for kind, layer in zip(kinds, cache.layers):
        assert layer.keys.shape[-2] == layer.values.shape[-2]
        if kind == "sliding_attention":
            assert layer.keys.shape[-2] <= window, (kind, layer.keys.shape)
        else:
            assert layer.keys.shape[-2] == 44, (kind, layer.keys.shape)
    assert (out.logits[:, -1] - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("variant", ["dense", "sliding", "moe"])
def test_left_padded_row_equals_prompt_alone(variant):
    model = tiny(variant)
    ids, mask = batch(length=12, pad=4)
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    together = model.generate(ids, attention_mask=mask, **kwargs)
    alone = model.generate(ids[1:2, 4:], **kwargs)
    assert torch.equal(together[1, 4:], alone[0])
    with torch.no_grad():
        padded_logits = model(ids, attention_mask=mask).logits[1, 4:]
        alone_logits = model(ids[1:2, 4:]).logits[0]
    assert (padded_logits - alone_logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_causal_mask_does_not_leak_the_future(variant):
    model = tiny(variant)
    ids, _ = batch(length=16)
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids).logits, model(changed).logits
    # No earlier position sees token 10 (MoE differs only by float rounding: experts batch other token sets).
    assert (before[:, :10] - after[:, :10]).abs().max().item() < 1e-6
    assert (before[:, 10:] - after[:, 10:]).abs().max().item() > 1e-3  # the change is visible from position 10 on


def test_initial_loss_is_ln_vocab():
    model = tiny("dense", vocab_size=1000)
    ids = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert abs(loss - math.log(1000)) < 0.1


def test_labels_are_shifted_once_inside_the_model():
    model = tiny("dense")
    ids, _ = batch()
    with torch.no_grad():
        out = model(ids, labels=ids)
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, manual, atol=1e-6)


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_overfits_one_batch(variant):
    model = tiny(variant).train()
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        model.eval()
        final = model(ids, labels=ids, output_router_logits=False).loss.item()
    assert final < 0.05


def test_moe_aux_loss_equals_transformers_load_balancing_loss():
    model = tiny("moe", router_z_loss_coef=0.001, num_shared_experts=0)
    ids, mask = batch()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=ids)
        lm_loss = model(ids, attention_mask=mask, labels=ids, output_router_logits=False).loss
    assert len(out.router_logits) == 4 and out.router_logits[0].shape == (ids.numel(), 4)
    for token_mask in (None, mask):
        ours = load_balancing_loss(out.router_logits, 4, 2, token_mask)
        theirs = load_balancing_loss_func(out.router_logits, 4, 2, token_mask)
        assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(out.aux_loss, load_balancing_loss_func(out.router_logits, 4, 2, mask), atol=1e-6)
    assert torch.allclose(out.z_loss, router_z_loss(out.router_logits, mask))
    expected = lm_loss + 0.01 * out.aux_loss + 0.001 * out.z_loss
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_aux_loss_free_bias_moves_load_toward_balance():
    model = tiny("moe", num_experts_per_tok=1, router_bias_update_rate=0.01, num_shared_experts=0,
                 output_router_logits=False).train()
    ids = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(4))
    # Skew every router towards expert 0: add the mean router input to its row, so most tokens pick it.
    mean_inputs = {}
    hooks = [r.register_forward_hook(lambda router, args, _: mean_inputs.__setitem__(router, args[0].mean(0)))
             for r in model.routers()]
    with torch.no_grad():
        model(ids)
        for router, mean_input in mean_inputs.items():
            router.weight[0] += 4 * mean_input / mean_input.norm() ** 2
    for hook in hooks:
        hook.remove()
    model.update_router_bias()  # discard the counts of the skewing pass

    def imbalance() -> float:  # max / mean expert load, averaged over layers; 1 is perfect balance, 4 the worst
        with torch.no_grad():
            model(ids)
        load = model.update_router_bias()  # (layers, experts) fractions since the last call; moves the biases
        return (load.max(dim=-1).values / load.mean(dim=-1)).mean().item()

    first = imbalance()
    for _ in range(60):
        last = imbalance()
    assert first > 3.0  # routing started skewed
    assert last < 0.6 * first
    assert all(router.expert_bias[0] < 0 for router in model.routers())  # the overloaded expert was pushed down


@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_activation_checkpointing_gives_identical_gradients(variant):
    ids, mask = batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny(variant).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-7), name


@pytest.mark.parametrize("variant", ["dense", "interleaved", "moe"])
def test_save_load_round_trip_is_exact(variant, tmp_path):
    model = tiny(variant)
    if variant == "moe":
        model.routers()[1].expert_bias[2] = 0.25  # trained routing biases are part of the checkpoint
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, HfllmForCausalLM)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert torch.equal(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)


def test_remote_code_loads_in_a_fresh_process_without_hfllm(tmp_path):
    model = tiny("moe")
    model.save_pretrained(tmp_path / "ckpt")
    ids, _ = batch()
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["hfllm"] = None  # importing hfllm now fails: only the checkpoint's own code can be used
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(expected["ids"]).logits
        assert torch.equal(logits, expected["logits"])
        print("remote code OK", type(model).__name__)
    """)
    result = run_without_hfllm(script, tmp_path)  # the same thread count as here: float sums depend on it
    assert result.returncode == 0, result.stderr[-2000:]
    assert "remote code OK HfllmForCausalLM" in result.stdout


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_rope_scaling_matches_llama(rope):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         rope_parameters=rope)
    llama = LlamaForCausalLM(config).eval()
    ours = to_hfllm(llama).eval()
    ids = torch.randint(0, VOCAB, (1, 48))  # longer than max_position_embeddings: dynamic NTK kicks in
    with torch.no_grad():
        assert (ours(ids).logits - llama(ids).logits).abs().max().item() < 1e-5


def test_compiled_forward_with_static_cache_matches_eager():
    model = tiny("dense")
    ids, _ = batch(length=8, pad=0)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    eager = model.generate(ids, **kwargs)
    model.forward = torch.compile(model.forward, fullgraph=True, dynamic=False)
    compiled = model.generate(ids, **kwargs)
    assert torch.equal(eager, compiled)


@pytest.mark.parametrize("fields, message", [
    (dict(hidden_size=65), "hidden_size (65) must be divisible by num_attention_heads (4), or set head_dim explicitly"),
    (dict(num_key_value_heads=3), "num_attention_heads (4) must be divisible by num_key_value_heads (3)"),
    (dict(rope_parameters={"rope_type": "ntk", "rope_theta": 1e4}), "unknown rope_type 'ntk' in rope_parameters; "
                                                                    "allowed: default, dynamic, linear, llama3"),
    (dict(num_experts=4, num_experts_per_tok=6), "num_experts_per_tok (6) must be between 1 and num_experts (4)"),
    (dict(layer_types=["full_attention"] * 3), "layer_types has 3 entries but num_hidden_layers is 4"),
    (dict(layer_types=["sliding_attention"] * 4), "layer_types has 'sliding_attention' layers but sliding_window"),
])
def test_inconsistent_configs_name_the_field(fields, message):
    base = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=4)
    with pytest.raises(HfllmConfigError) as error:
        HfllmConfig(**{**base, **fields})
    assert str(error.value).startswith(message)


def test_unknown_preset_and_field_suggest_the_closest():
    with pytest.raises(HfllmError, match=r"unknown model preset 'llama-tny'; did you mean llama-tiny"):
        get_preset("llama-tny")
    with pytest.raises(HfllmError, match=r"unknown model config field 'hiden_size' \(did you mean 'hidden_size'\?\)"):
        get_preset("llama-tiny", hiden_size=3)
    with pytest.raises(HfllmError, match=r"model 'moe-tiny': num_experts_per_tok \(9\)"):
        get_preset("moe-tiny", num_experts_per_tok=9)


def test_presets_cli_lists_parameter_counts():
    result = subprocess.run([sys.executable, "-m", "hfllm", "presets"], capture_output=True, text=True)
    assert result.returncode == 0
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[1:]}
    assert set(rows) == {f"{v}-{s}" for v in ("llama", "mistral", "moe") for s in ("tiny", "125m", "350m", "1b")}
    assert rows["llama-125m"] == "128.4M"
