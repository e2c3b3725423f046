"""`hfllm plan`: the memory it predicts is the memory training takes. Weights, gradients and optimizer states are
checked byte for byte against real tensors; the whole peak against the measured peak RSS of CPU training runs at
three sizes (one with activation checkpointing); the command prints a plan or refuses with what would fit; and the
table in docs/scaling.md is what the code computes."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hfllm import HfllmForCausalLM, get_preset
from hfllm.cli import main
from hfllm.errors import HfllmError
from hfllm.training import plan

ROOT = Path(__file__).resolve().parents[1]


def _config(hidden, layers, intermediate, heads, kv_heads, vocab, **extra):
    return get_preset("llama-tiny", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=512, **extra)


@pytest.mark.parametrize("optim", ["adamw_torch", "muon"])
@pytest.mark.parametrize("extra", [{}, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)], ids=["dense", "moe"])
def test_weights_gradients_and_optimizer_bytes_equal_the_real_tensors(optim, extra, single_thread):
    from hfllm.training.optim import build_muon

    torch.manual_seed(0)
    model = HfllmForCausalLM(_config(64, 2, 128, 4, 2, 300, **extra))
    model(input_ids=torch.randint(0, 300, (2, 16)), labels=torch.randint(0, 300, (2, 16))).loss.backward()
    if optim == "muon":
        args = type("Args", (), dict(muon_lr=None, learning_rate=1e-3, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8))
        optimizer = build_muon(model, args, {n for n, _ in model.named_parameters()})
    else:
        optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    optimizer.step()
    states = [*optimizer.muon.state.values(), *optimizer.adamw.state.values()] if optim == "muon" else list(optimizer.state.values())

    weights, gradients, optimizer_bytes, host = plan.state_bytes(model, optim, "fp32", "ddp", 1)
    assert weights == sum(p.nbytes for p in model.parameters())
    assert gradients == sum(p.grad.nbytes for p in model.parameters())
    assert optimizer_bytes == sum(t.nbytes for state in states for t in state.values() if torch.is_tensor(t))
    assert host == 0
    # sharded strategies hold 1/N of what is sharded
    _, gradients2, optimizer2, _ = plan.state_bytes(model, optim, "fp32", "zero2", 2)
    assert (gradients2, optimizer2) == (gradients / 2, optimizer_bytes / 2)


# Trains 3 steps (AdamW, fp32, SDPA) and prints the peak RSS increase over the RSS before the model existed.
TRAIN_SCRIPT = """
import json, sys, torch
torch.set_num_threads(1)
from hfllm import HfllmForCausalLM, get_preset
spec = json.loads(sys.argv[1])
def status(key):  # VmRSS: resident now; VmHWM: this process image's peak (ru_maxrss would include the parent's
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))  # at fork)
ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["block"]))
config = get_preset("llama-tiny", vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["intermediate"],
                    num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                    max_position_embeddings=512)
before = status("VmRSS")
model = HfllmForCausalLM._from_config(config, attn_implementation="sdpa").train()
if spec["checkpointing"]:
    model.gradient_checkpointing_enable()
optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
for _ in range(3):
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
print(json.dumps({"increase": status("VmHWM") - before}))
"""

SIZES = [  # ~0.3, ~0.5 and ~1.1 GB peaks
    dict(hidden=256, layers=4, intermediate=768, heads=4, kv_heads=2, vocab=4096, batch=4, block=256, checkpointing=False),
    dict(hidden=384, layers=6, intermediate=1024, heads=6, kv_heads=2, vocab=8192, batch=8, block=256, checkpointing=True),
    dict(hidden=512, layers=8, intermediate=1536, heads=8, kv_heads=4, vocab=8192, batch=4, block=256, checkpointing=False),
]


@pytest.mark.parametrize("spec", [*SIZES[:2], pytest.param(SIZES[2], marks=pytest.mark.slow)],  # 29M: 11 s, 1.1 GB
                         ids=["4M", "17M-checkpointed", "29M"])
def test_predicted_peak_is_within_25_percent_of_measured_peak_rss(spec, tmp_path):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(TRAIN_SCRIPT), json.dumps(spec)], capture_output=True,
                            text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])["increase"]

    config = _config(spec["hidden"], spec["layers"], spec["intermediate"], spec["heads"], spec["kv_heads"], spec["vocab"])
    with torch.device("meta"):
        model = HfllmForCausalLM(config)
    static = sum(plan.state_bytes(model, "adamw_torch", "fp32", "ddp", 1)[:3])
    per_token = (plan.activation_bytes_per_token(config, "sdpa", spec["block"], "fp32", spec["checkpointing"])
                 + plan.transient_bytes_per_token(config, "sdpa", spec["block"], "fp32"))
    predicted = static + spec["batch"] * spec["block"] * per_token
    print(f"predicted {predicted / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB")
    assert abs(predicted - measured) / measured < 0.25, (predicted / 2**20, measured / 2**20)


def test_plan_prints_size_compute_memory_batch_and_time(capsys):
    assert main(["plan", str(ROOT / "recipes/350m.yaml"), "--gpu", "h100", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    for text in ("360.0M total", "FLOPs/token", "Chinchilla", "optimizer", "largest micro-batch",
                 "global batch 256 sequences = micro-batch", "h at 40% MFU of 989 TFLOP/s"):
        assert text in out, text


def test_a_recipe_that_does_not_fit_is_refused_with_what_would_fit(capsys):
    with pytest.raises(HfllmError, match=r"1b.yaml does not fit 1 x t4 with ddp: .* it fits with --strategy zero3_offload"):
        plan.main([str(ROOT / "recipes/1b.yaml"), "--gpu", "t4"])
    assert main(["plan", str(ROOT / "recipes/1b.yaml"), "--gpu", "t4"]) == 2


@pytest.mark.parametrize("argv, message", [
    (["recipes/350m.yaml", "--gpu", "v100"], "invalid choice: 'v100'"),
    (["recipes/350m.yaml", "--gpus", "0"], "--gpus must be at least 1"),
    (["recipes/350m.yaml", "--gpus", "3"], "global batch 256 cannot be split over 3 devices"),
    (["recipes/missing.yaml"], "recipe 'recipes/missing.yaml' does not exist"),
    (["recipes/350m.yaml", "--learning_rat", "1"], "learning_rat"),
])
def test_bad_input_is_one_line(argv, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(HfllmError, match=message):
        plan.main(argv)


def test_engine_is_a_deprecated_alias_of_strategy(capsys):
    """`--engine` (until the next release) parses as `--strategy` and prints one line naming `--strategy`."""
    new = plan._parser("hfllm plan").parse_args(["r.yaml", "--strategy", "zero3"])
    assert capsys.readouterr().err == ""
    old = plan._parser("hfllm plan").parse_args(["r.yaml", "--engine", "zero3"])
    assert vars(old) == vars(new)
    assert capsys.readouterr().err == ("hfllm plan: --engine is deprecated and will be removed in the next release; "
                                       "use --strategy\n")


def test_docs_table_is_what_the_code_computes():
    text = (ROOT / "docs/scaling.md").read_text()
    assert plan.recipes_table() in text, "regenerate with: python3 -c 'from hfllm.training.plan import recipes_table; print(recipes_table())'"
