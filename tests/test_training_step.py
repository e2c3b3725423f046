"""What one pretraining optimizer step does: `torch_compile: true` (inductor) trains with eager's losses, and
`max_grad_norm` bounds the norm of the gradient the optimizer applies."""

import shutil
import subprocess

import pytest
import torch
from helpers import TINY, data_args, losses, series, write_recipe
from transformers import TrainerCallback

from hfllm.run_pretrain import main as pretrain_main

pytestmark = pytest.mark.usefixtures("single_thread")


def pretrain(tmp_path, out: str, *extra: str, callbacks=()) -> object:
    recipe = write_recipe(tmp_path / "recipe.yaml", {"model": "llama-tiny", "learning_rate": 3e-3, "warmup_steps": 1,
                                                     "logging_steps": 1, "seed": 7, "eval_steps": 100,
                                                     "num_samples": 0, "save_steps": 100})
    output_dir = tmp_path / out
    argv = [str(recipe), *TINY, *data_args(tmp_path), "--output_dir", str(output_dir), "--max_steps", "3", *extra]
    assert pretrain_main(argv, callbacks=callbacks) == 0
    return output_dir


def inductor_unavailable() -> str | None:
    """Why inductor cannot compile a CPU kernel here (it needs a C++ compiler), or None."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return "inductor needs a C++ compiler (g++) for CPU kernels; none is installed"
    if subprocess.run([compiler, "--version"], capture_output=True).returncode != 0:
        return f"{compiler} --version fails"
    return None


@pytest.mark.skipif(inductor_unavailable() is not None, reason=str(inductor_unavailable()))
def test_torch_compile_trains_with_eager_losses(tmp_path):
    """The same 3 steps eager and compiled with inductor (Trainer's torch_compile): the same losses within float
    tolerance (inductor fuses and reorders the float32 sums)."""
    from torch._dynamo.utils import counters

    eager = pretrain(tmp_path, "eager")
    counters.clear()
    compiled = pretrain(tmp_path, "compiled", "--torch_compile", "true")
    assert counters["stats"]["unique_graphs"] > 0  # dynamo captured the model: the run was compiled
    assert len(losses(compiled)) == 3
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4)
    assert series(compiled, "grad_norm") == pytest.approx(series(eager, "grad_norm"), rel=1e-3)


class AppliedGradNorm(TrainerCallback):
    """The norm of the gradient the optimizer is about to apply (after clipping), at every optimizer step."""

    def __init__(self):
        self.norms: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())


@pytest.mark.parametrize("max_grad_norm", [0.01, 0.0], ids=["clipped", "off"])
def test_max_grad_norm_bounds_the_applied_gradient(max_grad_norm, tmp_path):
    """max_grad_norm 0.01, far below the natural norm (~1): every applied gradient has norm 0.01 while the logged
    (pre-clipping) norm is ~100x larger. With 0 (off) the applied gradient is the natural one."""
    measured = AppliedGradNorm()
    out = pretrain(tmp_path, "out", "--max_grad_norm", str(max_grad_norm), callbacks=[measured])
    natural = series(out, "grad_norm")
    assert len(measured.norms) == len(natural) == 3 and min(natural) > 0.3
    if max_grad_norm:
        assert all(norm <= max_grad_norm * (1 + 1e-4) for norm in measured.norms), (measured.norms, natural)
        assert measured.norms == pytest.approx([max_grad_norm] * 3, rel=1e-3)  # clipped to the bound, not below it
    else:
        assert measured.norms == pytest.approx(natural, rel=1e-4)
