"""The model code that travels with checkpoints, under the transformers versions readers have.

`modeling_hfllm.py` is loaded with `trust_remote_code=True` by people without hfllm, under whatever transformers they
installed. transformers 5.24 renamed the KV cache argument (`past_key_values` -> `cache`); a model that missed the
rename rebuilt an empty cache at every step and generated garbage with no error. These tests run the checkpoint's own
code in fresh processes where hfllm cannot be imported: on the installed (pinned) transformers; written under one
release and read under another (the oldest tested, the minors between, the newest on PyPI), where it must generate the
same tokens; under a newer release, where it loads and warns once; and under a transformers that breaks a contract it
needs or is older than the oldest tested, where loading refuses with one line naming what is missing.

The other releases come from hfllm's wheel cache (~/.cache/hfllm/wheels) or PyPI. Offline with an empty cache those
cases skip and say so; the cases on the installed release (the pinned one, which is also the newest while nothing newer
is out or PyPI cannot be asked) and the contract cases always run.
"""

import configparser
import functools
import json
import os
import re
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
from hfllm.models.modeling_hfllm import TESTED_TRANSFORMERS, upstream_contracts

pytestmark = pytest.mark.upstream
ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
VARIANTS = {
    "dense": dict(),
    "sliding": dict(sliding_window=6),  # 32 new tokens run far past the window: the sliding cache must roll
    "moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_shared_experts=1),
    "mamba": dict(layer_types=["mamba", "full_attention"], mamba_d_state=8, mamba_chunk_size=8),  # + mamba2_hfllm.py
}

# Loads each checkpoint given with its own code (hfllm blocked), then greedy-generates 32 tokens for a left-padded
# batch with the KV cache and without it. Deprecations raised by the checkpoint's code are errors.
GENERATE_SCRIPT = """
import sys, warnings
sys.modules["hfllm"] = None  # only the checkpoint's own code can be used
warnings.filterwarnings("error", category=FutureWarning, module="transformers_modules")
warnings.filterwarnings("error", category=DeprecationWarning, module="transformers_modules")
import torch, transformers
from transformers import AutoModelForCausalLM
for checkpoint in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
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
    assert torch.equal(cached, uncached), (checkpoint, cached[:, 9:].tolist(), uncached[:, 9:].tolist())
    print(checkpoint, "under transformers", transformers.__version__, "cached == uncached:", cached.tolist())
"""

# Writes the three variants' checkpoints with hfllm (this checkout, argv[2]) into argv[1], under whatever transformers
# the child's PYTHONPATH gives it.
WRITE_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[2])
from hfllm import HfllmForCausalLM, get_preset
for variant, extra in {variants!r}.items():
    torch.manual_seed(0)
    config = get_preset("llama-tiny", **{shape!r}, **extra)
    HfllmForCausalLM(config).save_pretrained(f"{{sys.argv[1]}}/{{variant}}")
"""


def _checkpoint(tmp_path: Path, variant: str) -> Path:
    torch.manual_seed(0)
    config = get_preset("llama-tiny", **SHAPE, **VARIANTS[variant])
    HfllmForCausalLM(config).save_pretrained(tmp_path / variant)
    return tmp_path / variant


def _run_without_hfllm(script: str, tmp_path: Path, *args: str, pythonpath: str = "") -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": pythonpath}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)


@functools.cache
def newest_release() -> str | None:
    """The newest transformers release on PyPI, or None when PyPI cannot be reached."""
    try:
        result = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"], capture_output=True,
                                text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    found = re.match(r"transformers \(([\d.]+)\)", result.stdout)
    return found.group(1) if found else None


def _release(name: str) -> str:
    """'pinned': the installed release, which constraints.txt pins; 'oldest': the first tested minor; '5.N': a minor in
    between; 'newest': the newest on PyPI (offline, the pinned one, so that the case runs on the installed release)."""
    (_, oldest_minor), (_, newest_minor) = TESTED_TRANSFORMERS
    return {"pinned": transformers.__version__, "oldest": f"5.{oldest_minor}.0",
            "newest": newest_release() or transformers.__version__,
            **{f"5.{minor}": f"5.{minor}.0" for minor in range(oldest_minor + 1, newest_minor)}}[name]


def _transformers_path(version: str) -> str:
    """PYTHONPATH that gives a child process this transformers release: nothing for the installed one, else the
    release's pure-Python wheel (from hfllm's wheel cache, or PyPI), which shadows the installed package."""
    if version == transformers.__version__:
        return ""
    try:
        return str(fetch_wheel(f"transformers=={version}"))
    except HfllmError as error:
        pytest.skip(f"transformers {version}'s wheel is not cached and PyPI cannot be reached (offline): {error}")


@pytest.fixture(scope="module")
def cross_version(tmp_path_factory):
    """written(version) -> the variants' folder written under that release; generated(version, folder) -> what the
    checkpoints there generate under that release (both computed once per module)."""
    folders, outputs = {}, {}

    def written(version: str) -> Path:
        if version not in folders:
            folder = tmp_path_factory.mktemp(f"written-{version}")
            script = WRITE_SCRIPT.format(variants=VARIANTS, shape=SHAPE)
            result = _run_without_hfllm(script, folder, str(folder), str(ROOT), pythonpath=_transformers_path(version))
            assert result.returncode == 0, result.stderr[-3000:]
            folders[version] = folder
        return folders[version]

    def generated(version: str, folder: Path) -> list[str]:
        if (version, folder) not in outputs:
            checkpoints = [str(folder / variant) for variant in VARIANTS]
            result = _run_without_hfllm(GENERATE_SCRIPT, folder, *checkpoints, pythonpath=_transformers_path(version))
            assert result.returncode == 0, f"under transformers {version}: {result.stderr[-3000:]}"
            lines = [line for line in result.stdout.splitlines() if " cached == uncached: " in line]
            assert len(lines) == len(VARIANTS) and all(f"under transformers {version} " in line for line in lines)
            outputs[version, folder] = [line.split(" cached == uncached: ")[1] for line in lines]
        return outputs[version, folder]

    return written, generated


def test_remote_code_cached_generation_equals_uncached(cross_version):
    """Every variant (dense, sliding window, MoE) under the installed transformers, with its own code."""
    written, generated = cross_version
    assert len(generated(transformers.__version__, written(transformers.__version__))) == len(VARIANTS)


_MIDDLE = [f"5.{minor}" for minor in range(TESTED_TRANSFORMERS[0][1] + 1, TESTED_TRANSFORMERS[1][1])]


@pytest.mark.parametrize("writer, reader", [
    ("pinned", "newest"), ("newest", "pinned"), ("pinned", "oldest"), *[("pinned", minor) for minor in _MIDDLE],
    pytest.param("oldest", "pinned", marks=pytest.mark.slow),  # 15 s: writes with hfllm under the oldest release
])
def test_a_checkpoint_generates_the_same_under_another_transformers(writer, reader, cross_version):
    """Written under one release, read with the checkpoint's own code (hfllm blocked) under another: every variant
    generates token for token what it generates under the release it was written with."""
    written, generated = cross_version
    writer_version, reader_version = _release(writer), _release(reader)
    folder = written(writer_version)
    for variant in VARIANTS:
        config = json.loads((folder / variant / "config.json").read_text())
        assert config["transformers_version"] == writer_version
    assert generated(reader_version, folder) == generated(writer_version, folder)


# Loads the checkpoint with its own code (hfllm blocked) under the installed transformers changed by argv[2]: a fake
# version number, a symbol removed, or a mask function without the KV cache argument. Prints REFUSED or LOADED.
UPSTREAM_CHANGE_SCRIPT = """
import sys, inspect
sys.modules["hfllm"] = None
import transformers, transformers.masking_utils as masking, transformers.modeling_outputs as outputs
kind, value = sys.argv[2].split("=", 1)
if kind == "version":
    transformers.__version__ = value  # what a reader with that release would have
elif kind == "removed":
    delattr(masking, value)
elif kind == "signature":  # the function keeps its name, but takes the KV cache under another one
    original = masking.create_causal_mask
    def create_causal_mask(config, inputs_embeds, attention_mask, kv_cache=None, position_ids=None, **kwargs):
        return original(config, inputs_embeds, attention_mask, kv_cache, position_ids, **kwargs)
    masking.create_causal_mask = create_causal_mask
from transformers import AutoModelForCausalLM
try:
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
except ImportError as error:
    print("REFUSED:", error)
else:
    ids = model.generate(__import__("torch").tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    print("LOADED:", ids.shape[1])
"""
_FIX = "pip install 'transformers>={}.{},<{}.{}'".format(*TESTED_TRANSFORMERS[0], TESTED_TRANSFORMERS[1][0],
                                                          TESTED_TRANSFORMERS[1][1] + 1)


def _under_changed_upstream(change: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    checkpoint = _checkpoint(tmp_path, "sliding")
    script = textwrap.dedent(UPSTREAM_CHANGE_SCRIPT)
    run_env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ["PATH"], "HOME": str(tmp_path), **env}
    return subprocess.run([sys.executable, "-c", script, str(checkpoint), change], capture_output=True, text=True,
                          cwd=tmp_path, env=run_env, timeout=300)


def _outcome(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith(("REFUSED", "LOADED"))]
    return line


@pytest.mark.parametrize("version", ["5.26.0", "6.0.0"])
def test_a_newer_transformers_loads_and_warns_once_in_one_line(version, tmp_path):
    result = _under_changed_upstream(f"version={version}", tmp_path, TRANSFORMERS_VERBOSITY="warning")
    assert _outcome(result) == "LOADED: 7"
    (warning,) = [line for line in result.stderr.splitlines() if "hfllm" in line]
    (low_major, low_minor), (high_major, high_minor) = TESTED_TRANSFORMERS
    assert warning.endswith(f"hfllm model code: transformers {version} is newer than the releases it was tested on "
                            f"({low_major}.{low_minor} to {high_major}.{high_minor}); the upstream contracts it needs "
                            "hold, so it runs")


def test_the_tested_transformers_loads_without_a_warning(tmp_path):
    result = _under_changed_upstream(f"version={transformers.__version__}", tmp_path, TRANSFORMERS_VERBOSITY="warning")
    assert _outcome(result) == "LOADED: 7"
    assert "hfllm" not in result.stderr


def test_a_transformers_below_the_oldest_tested_refuses_in_one_line(tmp_path):
    (low_major, low_minor), _ = TESTED_TRANSFORMERS
    result = _under_changed_upstream("version=5.22.9", tmp_path)
    assert _outcome(result) == (f"REFUSED: this hfllm model code needs transformers>={low_major}.{low_minor}, but "
                                f"transformers 5.22.9 is installed: {_FIX}")


@pytest.mark.parametrize("change, contract", [
    ("signature=create_causal_mask", "the mask functions take attention_mask, cache, config, inputs_embeds, "
     "position_ids (create_causal_mask)"),
    ("removed=create_sliding_window_causal_mask", "cannot import name 'create_sliding_window_causal_mask' from "
     "'transformers.masking_utils'"),
])
def test_a_broken_upstream_contract_refuses_in_one_line_naming_it(change, contract, tmp_path):
    line = _outcome(_under_changed_upstream(change, tmp_path))
    assert line.startswith("REFUSED: this hfllm model code ") and contract in line and line.endswith(_FIX), line


def test_every_upstream_contract_holds_on_the_installed_transformers():
    """The pre-flight of `pytest -m upstream`: each contract of the checkpoint's code, by name."""
    _, contracts = upstream_contracts()
    assert [contract for contract, holds in contracts.items() if not holds] == []


def test_the_tested_range_ends_at_the_pinned_release():
    """constraints.txt pins the newest release the model code was tested on; setup.cfg has a floor and no ceiling
    (checkpoints follow upstream by contract)."""
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    requirements = [line.strip() for line in setup["options"]["install_requires"].splitlines() if line.strip()]
    (transformers_requirement,) = [line for line in requirements if re.match(r"transformers\b", line)]
    assert "<" not in transformers_requirement
    (pinned,) = [line.split("==")[1] for line in (ROOT / "constraints.txt").read_text().splitlines()
                 if line.startswith("transformers==")]
    assert tuple(int(part) for part in pinned.split(".")[:2]) == TESTED_TRANSFORMERS[1]
    # setup.sh installs the pinned release; HFLLM_LATEST=1 bash setup.sh a newer one, never an older one
    version = lambda text: tuple(int(part) for part in re.findall(r"\d+", text)[:3])  # noqa: E731
    assert version(transformers.__version__) >= version(pinned)


def test_config_json_records_the_transformers_version(tmp_path):
    config = json.loads((_checkpoint(tmp_path, "dense") / "config.json").read_text())
    assert config["transformers_version"] == transformers.__version__
