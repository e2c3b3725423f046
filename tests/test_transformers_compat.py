"""The model code that travels with checkpoints, under the transformers versions readers have.

`modeling_hfllm.py` is loaded with `trust_remote_code=True` by people without hfllm, under whatever transformers they
installed. transformers 5.24 renamed the KV cache argument (`past_key_values` -> `cache`); a model that missed the
rename rebuilt an empty cache at every step and generated garbage with no error. These tests run the checkpoint's own
code in fresh processes where hfllm cannot be imported: on the installed transformers, on every other supported minor
version, and outside the supported range, where loading must refuse with one line.
"""

import configparser
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from hfllm import HfllmForCausalLM, get_preset
from hfllm.assets import fetch_wheel
from hfllm.errors import HfllmError
from hfllm.models.modeling_hfllm import SUPPORTED_TRANSFORMERS

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "dense": dict(),
    "sliding": dict(sliding_window=6),  # 32 new tokens run far past the window: the sliding cache must roll
    "moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_shared_experts=1),
}

# Loads the checkpoint with its own code (hfllm blocked), then greedy-generates 32 tokens for a left-padded batch with
# the KV cache and without it. Deprecations raised by the checkpoint's code are errors.
GENERATE_SCRIPT = """
import sys, warnings
sys.modules["hfllm"] = None  # only the checkpoint's own code can be used
warnings.filterwarnings("error", category=FutureWarning, module="transformers_modules")
warnings.filterwarnings("error", category=DeprecationWarning, module="transformers_modules")
import torch, transformers
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
ids = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids)
mask[1, :4] = 0  # left padding
kwargs = dict(attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0,
              repetition_penalty=1.5)
cached = model.generate(ids, **kwargs)
uncached = model.generate(ids, use_cache=False, **kwargs)
assert cached.shape == (2, 9 + 32), cached.shape
# a continuation that depends on its context, so that a dropped or stale cache shows (a random model with the
# default init repeats one token whatever it attends to)
assert all(len(set(row)) >= 3 for row in uncached[:, 9:].tolist()), uncached[:, 9:].tolist()
assert torch.equal(cached, uncached), (cached[:, 9:].tolist(), uncached[:, 9:].tolist())
print("cached == uncached under transformers", transformers.__version__)
"""


def _checkpoint(tmp_path: Path, variant: str) -> Path:
    torch.manual_seed(0)
    config = get_preset("llama-tiny", vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1,
                        **VARIANTS[variant])
    HfllmForCausalLM(config).save_pretrained(tmp_path / variant)
    return tmp_path / variant


def _run_without_hfllm(script: str, tmp_path: Path, *args: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": pythonpath}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_remote_code_cached_generation_equals_uncached(variant, tmp_path):
    result = _run_without_hfllm(GENERATE_SCRIPT, tmp_path, str(_checkpoint(tmp_path, variant)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"cached == uncached under transformers {transformers.__version__}" in result.stdout


def _other_supported_versions() -> list[str]:
    """The newest release of every supported minor other than the installed one (the installed one is tested above)."""
    (low_major, low_minor), (high_major, high_minor) = SUPPORTED_TRANSFORMERS
    assert low_major == high_major == 5
    installed = tuple(int(part) for part in transformers.__version__.split(".")[:2])
    return [f"5.{minor}.0" for minor in range(low_minor, high_minor) if (5, minor) != installed]


@pytest.mark.parametrize("version", _other_supported_versions())
def test_remote_code_works_under_every_supported_transformers(version, tmp_path):
    """The pure-Python transformers wheel of that version (fetched once from PyPI) shadows the installed one."""
    try:
        wheel = fetch_wheel(f"transformers=={version}")
    except HfllmError as error:
        pytest.skip(f"transformers {version} could not be fetched from PyPI: {error}")
    for variant in VARIANTS:
        result = _run_without_hfllm(GENERATE_SCRIPT, tmp_path, str(_checkpoint(tmp_path, variant)),
                                    pythonpath=str(wheel))
        assert result.returncode == 0, f"{variant}: {result.stderr[-3000:]}"
        assert f"cached == uncached under transformers {version}" in result.stdout


@pytest.mark.parametrize("version", ["5.22.0", "5.25.0", "6.0.0"])
def test_loading_outside_the_supported_range_refuses_in_one_line(version, tmp_path):
    checkpoint = _checkpoint(tmp_path, "dense")
    script = f"""
        import sys
        sys.modules["hfllm"] = None
        import transformers
        transformers.__version__ = {version!r}  # what a reader with that release would have
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
        except ImportError as error:
            print("REFUSED:", error)
        else:
            print("LOADED")
    """
    result = _run_without_hfllm(script, tmp_path, str(checkpoint))
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith(("REFUSED", "LOADED"))]
    assert line == (f"REFUSED: this hfllm model code supports transformers>=5.23,<5.25, but transformers {version} is "
                    "installed: pip install 'transformers>=5.23,<5.25'")


def test_supported_range_is_the_one_setup_cfg_installs():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    requirements = [line.strip() for line in setup["options"]["install_requires"].splitlines() if line.strip()]
    (low_major, low_minor), (high_major, high_minor) = SUPPORTED_TRANSFORMERS
    assert f"transformers>={low_major}.{low_minor},<{high_major}.{high_minor}" in requirements
    pinned = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("transformers==")]
    assert pinned == [f"transformers=={transformers.__version__}"] or os.environ.get("HFLLM_LATEST") == "1"


def test_config_json_records_the_transformers_version(tmp_path):
    config = json.loads((_checkpoint(tmp_path, "dense") / "config.json").read_text())
    assert config["transformers_version"] == transformers.__version__
