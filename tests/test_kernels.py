"""The GPU speed path on a CPU (hfllm/training/kernels.py): each option refused with one line without its GPU, Liger's
kernels wired into hfllm models (and matching the plain loss where Triton's CPU interpreter runs them), the FP8
conversion of the right linear layers. FlashAttention's flat varlen batch is tested in test_data.py."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from hfllm import HfllmForCausalLM, get_preset
from hfllm.errors import HfllmError
from hfllm.models import modeling_hfllm
from hfllm.training.kernels import apply_liger_kernel_to_hfllm, check_kernel_options, convert_to_fp8, register_liger
from helpers import ROOT, run_hfllm, write_recipe

gpu = torch.cuda.is_available()


def tiny_model(**overrides) -> HfllmForCausalLM:
    config = get_preset("llama-tiny", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
                        **overrides)
    torch.manual_seed(0)
    return HfllmForCausalLM(config)


@pytest.mark.skipif(gpu, reason="checks the refusals of a machine without a GPU")
@pytest.mark.parametrize(("options", "message"), [
    ((True, False, "sdpa"), "use_liger_kernel: true needs an NVIDIA GPU"),
    ((False, True, "sdpa"), "fp8: true needs a GPU with float8 tensor cores (compute capability 8.9+"),
    ((False, False, "flash_attention_2"), "attn_implementation: flash_attention_2 needs an NVIDIA GPU"),
    ((False, False, "kernels-community/flash-attn3"), "attn_implementation: kernels-community/flash-attn3 needs an"),
])
def test_options_are_refused_without_a_gpu(options, message):
    with pytest.raises(HfllmError, match=message.replace("(", r"\(").replace("+", r"\+")):
        check_kernel_options(*options)
    check_kernel_options(False, False, "sdpa")  # the plain path needs nothing


@pytest.mark.skipif(gpu, reason="checks the refusals of a machine without a GPU")
def test_pretrain_refuses_fp8_in_one_line_before_any_work(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"model": "llama-tiny", "max_steps": 1, "fp8": True,
                                                "output_dir": str(tmp_path / "run")})
    result = run_hfllm("pretrain", str(recipe))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("(compute capability 8.9+: L4, L40S, H100, H200, B200) "
                                                           "and none is visible; remove the key")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("moe", [False, True])
def test_liger_swaps_every_norm_mlp_rope_and_the_loss(monkeypatch, moe):
    """Through Trainer's own path (Liger's `_apply_liger_kernel_to_instance` with hfllm registered): every RMSNorm
    (qk-norm included) and every dense / shared-expert SwiGLU MLP runs Liger's forward, RoPE is Liger's, the head's
    loss is the fused linear cross-entropy; parameters and state-dict keys stay as they were."""
    from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP, liger_rotary_pos_emb
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    monkeypatch.setattr(modeling_hfllm, "apply_rotary_pos_emb", modeling_hfllm.apply_rotary_pos_emb)  # restored after
    monkeypatch.setitem(MODEL_TYPE_TO_APPLY_LIGER_FN, "hfllm", None)
    moe_keys = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "num_shared_experts": 1}
    model = tiny_model(qk_norm=True, **(moe_keys if moe else {}))
    keys = list(model.state_dict())
    register_liger()
    _apply_liger_kernel_to_instance(model=model)

    norms = [m for m in model.modules() if type(m).__name__ == "HfllmRMSNorm"]
    mlps = [m for m in model.modules() if type(m).__name__ == "HfllmMLP"]
    assert len(norms) == 2 * 2 + 1 + 2 * 2  # per layer: 2 norms + q/k norms; the final norm
    assert len(mlps) == 2  # dense MLPs, or the shared experts of each MoE layer
    assert all(m.forward.__func__ is LigerRMSNorm.forward and m._get_name() == "LigerRMSNorm" for m in norms)
    assert all(m.forward.__func__ is LigerSwiGLUMLP.forward and m._get_name() == "LigerSwiGLUMLP" for m in mlps)
    assert modeling_hfllm.apply_rotary_pos_emb is liger_rotary_pos_emb
    assert model.logits_and_loss.__func__.__name__ == "_fused_logits_and_loss"
    assert list(model.state_dict()) == keys


def test_liger_keeps_a_non_swiglu_mlp(monkeypatch):
    monkeypatch.setattr(modeling_hfllm, "apply_rotary_pos_emb", modeling_hfllm.apply_rotary_pos_emb)
    model = tiny_model(hidden_act="gelu")
    apply_liger_kernel_to_hfllm(model=model)
    assert all(m._get_name() == "HfllmMLP" for m in model.modules() if type(m).__name__ == "HfllmMLP")


# Run in a fresh process: TRITON_INTERPRET must be set before triton is first imported. Triton's interpreter runs
# Liger's RoPE and fused linear cross-entropy kernels on CPU tensors (not its RMSNorm and SwiGLU kernels, whose
# float scalar arguments the interpreter rejects: "'float' object has no attribute 'to'").
LIGER_PARITY = """
import torch
from tests.test_kernels import tiny_model
from hfllm.training.kernels import apply_liger_kernel_to_hfllm

ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
positions = torch.tensor([list(range(10)) + list(range(14))] * 2)  # two documents per row
def loss_and_grads(model):
    model.train()
    out = model(input_ids=ids, labels=ids, position_ids=positions)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}

plain, plain_grads = loss_and_grads(tiny_model())
liger_model = tiny_model()
apply_liger_kernel_to_hfllm(rms_norm=False, swiglu=False, model=liger_model)
liger, liger_grads = loss_and_grads(liger_model)
assert liger.logits is None  # fused: no (B, T, V) logits in training
torch.testing.assert_close(liger.loss, plain.loss, atol=1e-5, rtol=1e-5)
for name, grad in plain_grads.items():
    torch.testing.assert_close(liger_grads[name], grad, atol=1e-4, rtol=1e-3, msg=name)
liger_model.eval()
with torch.no_grad():
    torch.testing.assert_close(liger_model(input_ids=ids, labels=ids).logits, tiny_model().eval()(input_ids=ids).logits)
print("parity", float(plain.loss), float(liger.loss))
"""


@pytest.mark.slow  # a fresh process with Triton's interpreter: ~20 s of CPU
def test_liger_loss_and_gradients_match_the_plain_path_in_tritons_cpu_interpreter():
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(LIGER_PARITY)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
                                                         "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity" in result.stdout


def test_fp8_converts_the_decoder_projections_only():
    """torchao's Float8Linear for attention and MLP projections (shared experts included); the LM head, embeddings,
    the router and a layer whose size is not a multiple of 16 stay as they were. The conversion runs on CPU.
    torchao is only in the `gpu` extra: on a CPU-only torch it cannot load its CUDA libraries and says so on stderr
    in every process that imports transformers' modeling code."""
    Float8Linear = pytest.importorskip("torchao.float8.float8_linear", reason="torchao is in the gpu extra: "
                                       "pip install -e .[gpu]").Float8Linear

    moe_keys = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "num_shared_experts": 1,
                "mlp_only_layers": [0]}
    model = tiny_model(**moe_keys)
    model.model.layers[0].mlp.up_proj = nn.Linear(64, 120, bias=False)  # 120: not a multiple of 16
    convert_to_fp8(model)
    converted = {name for name, module in model.named_modules() if isinstance(module, Float8Linear)}
    projections = {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}
    expected = projections | {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj",
                              *(f"model.layers.1.mlp.shared_experts.{p}_proj" for p in ("gate", "up", "down"))}
    assert converted == expected
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert type(model.model.layers[1].mlp.gate).__name__ == "HfllmRouter"
