"""Tensor parallel (`tp_size`): transformers' tp_plan over 2 CPU processes (gloo) gives the single-process model's
logits, loss, gradients and updated weights, for the dense family (GQA, sliding window, QK-norm, biases) and the MoE
family (experts, a shared expert, a dense layer). A deliberately wrong plan must not pass the same comparison.

Run as a script under `torchrun --nproc_per_node 2` it is the worker: it writes what it measured to a JSON file.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from hfllm.errors import HfllmError
from hfllm.models import HfllmConfig
from hfllm.training.tensor_parallel import check_tensor_parallel

from helpers import TINY, data_args, losses, write_recipe

pytestmark = pytest.mark.upstream  # transformers' tensor-parallel plan and accelerate's parallelism config
ROOT = Path(__file__).resolve().parents[1]

TOLERANCE = 1e-5  # float32

# tiny configs whose every split width is even: heads 4 / kv heads 2, intermediate 64, 4 experts of width 32
SHAPE = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
VARIANTS = {
    "dense": dict(SHAPE, sliding_window=4, layer_types=["sliding_attention", "full_attention"], qk_norm=True,
                  attention_bias=True, attention_out_bias=True),
    "moe": dict(SHAPE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_shared_experts=1,
                mlp_only_layers=[1], output_router_logits=True),
}
# one wrong rule each: QK-norm gradients left partial (logits still equal), the packed gate|up experts weight split as
# a plain column split (each rank gets gate or up, not half of both)
BROKEN = {
    "dense": {"layers.*.self_attn.q_norm": "replicate"},
    "moe": {"layers.*.mlp.experts.gate_up_proj": "colwise"},
}


# ----------------------------------------------------------------------------- the worker (one per rank)


def compare(kind: str, plan_changes: dict[str, str]) -> dict[str, float]:
    """Max |TP - single process| of logits, loss, gradients and weights after one AdamW step on 2 accumulated
    micro-batches."""
    import torch
    from transformers import AutoModelForCausalLM

    from hfllm.training.tensor_parallel import full_state_dict, shard_model

    torch.manual_seed(0)
    single = AutoModelForCausalLM.from_config(HfllmConfig(**VARIANTS[kind]), attn_implementation="eager").train()
    single.config.base_model_tp_plan = {**single.config.base_model_tp_plan, **plan_changes}
    split = shard_model(single, tp_size=2)
    batches = torch.randint(0, SHAPE["vocab_size"], (2, 2, 12), generator=torch.Generator().manual_seed(1))
    result = {"logits": 0.0, "loss": 0.0}
    optimizers = [torch.optim.AdamW(model.parameters(), lr=1e-3) for model in (single, split)]
    for ids in batches:  # gradient accumulation over 2 micro-batches, then one optimizer step
        one, two = single(ids, labels=ids), split(ids, labels=ids)
        result["logits"] = max(result["logits"], (one.logits - two.logits).abs().max().item())
        result["loss"] = max(result["loss"], abs(one.loss.item() - two.loss.item()))
        (one.loss / 2).backward()
        (two.loss / 2).backward()
    grads = {name: param.grad for name, param in split.named_parameters()}
    grads = {name: grad.full_tensor() if hasattr(grad, "full_tensor") else grad for name, grad in grads.items()}
    result["grad"] = max((grads[name] - param.grad).abs().max().item() for name, param in single.named_parameters())
    for optimizer in optimizers:
        optimizer.step()
    after, reference = full_state_dict(split), single.state_dict()
    result["weights"] = max((after[name] - reference[name]).abs().max().item() for name in reference)
    result["sharded"] = sorted(name for name, param in split.named_parameters() if hasattr(param, "full_tensor"))
    return result


def worker(output: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")  # as accelerate does for `hfllm pretrain`
    results = {f"{kind}{'-broken' if broken else ''}": compare(kind, BROKEN[kind] if broken else {})
               for kind in VARIANTS for broken in (False, True)}
    if dist.get_rank() == 0:
        Path(output).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()  # a clean exit (gloo aborts at exit otherwise, docs: distributed-on-cpu)


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("tp") / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, str(output)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text())


@pytest.mark.parametrize("kind", VARIANTS)
def test_two_processes_match_one(two_process_results, kind):
    """Logits, loss, gradients and the weights after one optimizer step equal the single-process model's."""
    result = two_process_results[kind]
    assert {key: result[key] for key in ("logits", "loss", "grad", "weights")} == pytest.approx(
        {"logits": 0, "loss": 0, "grad": 0, "weights": 0}, abs=TOLERANCE)
    split = {name.split(".", 3)[-1] for name in result["sharded"] if ".layers." in name}
    expected = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
    if kind == "moe":
        expected |= {"mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.shared_experts.gate_proj.weight",
                     "mlp.shared_experts.up_proj.weight", "mlp.shared_experts.down_proj.weight"}
    else:
        expected |= {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias"}
    assert split == expected
    assert "model.embed_tokens.weight" in result["sharded"]


@pytest.mark.parametrize("kind", VARIANTS)
def test_a_wrong_plan_is_caught(two_process_results, kind):
    """The comparison has teeth: one wrong rule leaves the gradients (and for experts the logits) apart."""
    result = two_process_results[f"{kind}-broken"]
    assert result["grad"] > 1e-4
    if kind == "moe":
        assert result["logits"] > 1e-3 and result["weights"] > 1e-3


def test_plan_names_only_modules_the_config_builds():
    plans = {name: set(HfllmConfig(**kw).base_model_tp_plan) for name, kw in VARIANTS.items()}
    assert "layers.*.self_attn.q_norm" in plans["dense"] and "layers.*.mlp.experts" not in plans["dense"]
    assert {"layers.*.mlp.experts", "layers.*.mlp.shared_experts.up_proj", "layers.*.mlp.up_proj"} <= plans["moe"]
    assert "layers.*.self_attn.q_norm" not in plans["moe"]
    all_moe = HfllmConfig(**{**VARIANTS["moe"], "mlp_only_layers": [], "num_shared_experts": 0}).base_model_tp_plan
    assert not any(".mlp.up_proj" in key or "shared" in key for key in all_moe)
    assert "base_model_tp_plan" not in HfllmConfig(**VARIANTS["moe"]).to_json_string()


def run_args(tp_size=2, world_size=2, save_strategy="no", save_only_model=False, own_optimizer=None):
    return SimpleNamespace(tp_size=tp_size, world_size=world_size, save_strategy=save_strategy,
                           save_only_model=save_only_model, own_optimizer=own_optimizer)


@pytest.mark.parametrize("changes, args, message", [
    ({"num_key_value_heads": 1}, run_args(), r"^tp_size 2 does not divide num_key_value_heads \(1\)"),
    ({"num_attention_heads": 3, "num_key_value_heads": 3, "head_dim": 8}, run_args(),
     r"^tp_size 2 does not divide num_attention_heads \(3\)"),
    ({"intermediate_size": 63}, run_args(), r"^tp_size 2 does not divide intermediate_size \(63\)"),
    ({"num_experts": 4, "moe_intermediate_size": 15}, run_args(), r"does not divide moe_intermediate_size \(15\)"),
    ({}, run_args(world_size=1), r"^tp_size 2 needs exactly 2 processes, got 1: launch 2"),
    ({}, run_args(world_size=4), r"^tp_size 2 needs exactly 2 processes, got 4"),
    ({}, run_args(save_strategy="steps"), r"set save_only_model: true .* or save_strategy: no$"),
    ({}, run_args(tp_size=0), r"^tp_size must be 1 or more"),
    ({}, run_args(own_optimizer="muon"), r"^optim: muon .* use optim: adamw_torch_fused with tp_size > 1$"),
    ({}, run_args(own_optimizer="soap"), r"^optim: soap .* use optim: adamw_torch_fused with tp_size > 1$"),
])
def test_refused_in_one_line(changes, args, message):
    with pytest.raises(HfllmError, match=message) as error:
        check_tensor_parallel(HfllmConfig(**{**SHAPE, **changes}), args)
    assert "\n" not in str(error.value)


def test_accepted():
    check_tensor_parallel(HfllmConfig(**{**SHAPE, "num_key_value_heads": 1}), run_args(tp_size=1, world_size=1))
    check_tensor_parallel(HfllmConfig(**SHAPE), run_args(save_strategy="steps", save_only_model=True))
    # each rank holds a slice of every expert: 3 experts split fine; an all-MoE model has no dense width to divide
    check_tensor_parallel(HfllmConfig(**{**VARIANTS["moe"], "num_experts": 3, "intermediate_size": 63,
                                         "moe_intermediate_size": 32, "mlp_only_layers": []}), run_args())


@pytest.mark.slow
def test_pretrain_recipe_with_tp_size(tmp_path):
    """`hfllm pretrain` with `tp_size: 2` under `accelerate launch` (2 CPU processes) logs the single process's losses
    and saves its weights; the saved model loads in one process."""
    import torch
    from safetensors.torch import load_file

    write_recipe(tmp_path / "r.yaml", {"model": "llama-tiny", "max_steps": 3, "logging_steps": 1})
    tiny = list(TINY)
    tiny[tiny.index("--num_key_value_heads") + 1] = "2"
    common = ["r.yaml", *tiny, *data_args(tmp_path), "--eval_steps", "100", "--num_samples", "1", "--sample_max_new_tokens", "4",
              "--learning_rate", "1e-2", "--warmup_steps", "0", "--save_only_model", "true"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    runs = {
        "split": ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", str(ROOT / "hfllm" / "run_pretrain.py"),
                  *common, "--tp_size", "2", "--output_dir", "split"],
        "single": [sys.executable, str(ROOT / "hfllm" / "run_pretrain.py"), *common, "--output_dir", "single"],
    }
    for name, command in runs.items():
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = result.stdout
    assert "x 1 data-parallel device(s), each layer split over 2 processes)" in runs["split"]
    info = yaml.safe_load((tmp_path / "split" / "run_info.json").read_text())
    assert (info["world_size"], info["tp_size"], info["tokens_per_step"]) == (2, 2, 2 * 16)
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "single"), abs=1e-4)
    assert len(losses(tmp_path / "split")) == 3
    split, single = load_file(tmp_path / "split" / "model.safetensors"), load_file(tmp_path / "single" / "model.safetensors")
    assert max((split[name] - single[name]).abs().max().item() for name in single) < TOLERANCE
    assert not torch.equal(single["model.norm.weight"], torch.ones_like(single["model.norm.weight"]))  # it trained


if __name__ == "__main__":
    worker(sys.argv[1])
