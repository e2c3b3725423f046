"""Provenance (hfllm/checkpoint/provenance.py, docs/reliability.md#provenance): run_info.json holds the sha256 of every
weights file of the final model and of each checkpoint kept, written after the move (a resumed run keeps the earlier
checkpoints' hashes), and `hfllm verify RUN_DIR` names any file that changed: exit 0, 4 on a mismatch, 2 on bad
input."""

import json
from pathlib import Path

import pytest
from helpers import TINY, data_args, write_recipe

from hfllm.checkpoint.provenance import verify
from hfllm.cli import main as cli_main
from hfllm.files import sha256
from hfllm.run_pretrain import main as pretrain_main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny pretraining run stopped at step 2 (checkpoint-2) and resumed to step 4 (checkpoint-4, the final model)."""
    tmp = tmp_path_factory.mktemp("provenance")
    recipe = write_recipe(tmp / "recipe.yaml", {"model": "llama-tiny", "seed": 7, "eval_steps": 100, "num_samples": 0})
    argv = [str(recipe), *TINY, *data_args(tmp), "--output_dir", str(tmp / "out"), "--max_steps", "4",
            "--save_steps", "2", "--save_total_limit", "null"]
    assert pretrain_main([*argv, "--stop_at_step", "2"]) == 0
    assert pretrain_main([*argv, "--resume_from_checkpoint", "true"]) == 0
    return tmp / "out"


def weights_sha256(run_dir: Path) -> dict[str, str]:
    return json.loads((run_dir / "run_info.json").read_text())["weights_sha256"]


def test_run_info_holds_the_sha256_of_every_weights_file(run_dir):
    recorded = weights_sha256(run_dir)
    assert sorted(recorded) == ["checkpoint-2/model.safetensors", "checkpoint-4/model.safetensors", "model.safetensors"]
    assert all(recorded[name] == sha256(run_dir / name) for name in recorded)
    assert json.loads((run_dir / "run_info.json").read_text())["tokenizer_sha256"]  # the start's facts are still there


def test_verify_names_a_changed_a_missing_and_an_unrecorded_file(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    import shutil

    shutil.copytree(run_dir, copy)
    assert cli_main(["verify", str(copy)]) == 0
    assert capsys.readouterr().out.strip() == f"{copy}: all 3 weights files match run_info.json"

    weights = copy / "checkpoint-4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    (copy / "checkpoint-2" / "model.safetensors").unlink()
    (copy / "extra.safetensors").write_bytes(b"not recorded")
    assert cli_main(["verify", str(copy)]) == 4
    out = capsys.readouterr().out
    assert "changed: checkpoint-4/model.safetensors (sha256 " in out
    assert "missing: checkpoint-2/model.safetensors" in out
    assert "not recorded: extra.safetensors" in out
    assert "model.safetensors" not in out.replace("checkpoint-4/model.safetensors", "").replace(
        "checkpoint-2/model.safetensors", "")  # the final model, unchanged, is not named
    result = verify(copy)
    assert (result.ok, result.matched, result.missing) == (False, ["model.safetensors"],
                                                           ["checkpoint-2/model.safetensors"])


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "nothing", "is not a folder; give a run's output_dir"),
    (lambda tmp: tmp, "has no run_info.json; give the output_dir of an hfllm training run"),
    (lambda tmp: (tmp / "run_info.json").write_text('{"started": "x"}') and tmp, "records no weights hashes"),
], ids=["not-a-folder", "no-run-info", "no-hashes"])
def test_verify_bad_input_exits_2(make, message, tmp_path, capsys):
    assert cli_main(["verify", str(make(tmp_path))]) == 2
    assert message in capsys.readouterr().err
