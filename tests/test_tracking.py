"""`report_to: tensorboard | trackio | wandb`: one tiny pretraining run reports to all three (wandb offline: no
network), and each tracker's own store is read back: loss, learning rate, grad norm, tokens/s and the health
statistics at the logged steps, the run config and the run_info.json facts."""

import importlib.util
import json
import uuid

import pytest
from helpers import TINY, data_args, log_history, write_recipe

from hfllm.errors import HfllmError
from hfllm.run_pretrain import main as pretrain_main
from hfllm.training import lifecycle
from hfllm.training.arguments import parse_recipe
from hfllm.training.pretrain import build

# logged every 2 steps of 4: the training scalars at steps 2 and 4 (tokens/s from the second log: it measures the
# window since the previous one), the evaluation at 4
SCALARS = ("loss", "learning_rate", "grad_norm", "grad_norm/embeddings", "update_ratio", "activation_rms/mean")
STEPS = [2, 4]
NO_WANDB = importlib.util.find_spec("wandb") is None
NO_TRACKIO = importlib.util.find_spec("trackio") is None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run folder, the trackio project and run name, and the wandb folder."""
    folder = tmp_path_factory.mktemp("tracking")
    trackers = ["tensorboard"] + ([] if NO_TRACKIO else ["trackio"]) + ([] if NO_WANDB else ["wandb"])
    # a project name of its own: when trackio was imported earlier in the session it keeps its default store, which
    # outlives the run (the same name in a second suite run found [2, 4, 2, 4] logged steps)
    project = f"hfllm-test-{uuid.uuid4().hex[:12]}"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(folder), "WANDB_SILENT": "true",
           "TRACKIO_DIR": str(folder / "trackio")}  # trackio reads it when first imported (here)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        recipe = write_recipe(folder / "r.yaml", {"model": "llama-tiny", "project": project, "run_name": "tiny"})
        argv = [str(recipe), *TINY, *data_args(folder), "--output_dir", str(folder / "out"), "--max_steps", "4",
                "--logging_steps", "2", "--logging_first_step", "false", "--eval_steps", "4", "--num_samples", "0"]
        # the three trackers in one run: recipes name one (recipe.py reads report_to as one string), the command's
        # own parse -> build -> run takes the list TrainingArguments allows
        recipe = parse_recipe(argv, "hfllm pretrain")
        recipe.args[2].report_to = trackers
        lifecycle.run(build(recipe), "hfllm pretrain", argv)
        if not NO_WANDB:
            import wandb

            wandb.finish()  # what the end of the command's process does: the offline run folder is complete
    return folder / "out", project, folder


def expected_steps(history: list[dict]) -> dict[str, list[int]]:
    """Every scalar's steps in the run's own log history (what each tracker must hold)."""
    wanted = {key: [e["step"] for e in history if key in e] for key in (*SCALARS, "tokens_per_second", "eval_loss")}
    assert wanted["loss"] == STEPS and wanted["tokens_per_second"] == [4] and wanted["eval_loss"] == [4], wanted
    assert all(wanted[key] == STEPS for key in SCALARS), wanted
    return wanted


def test_tensorboard_holds_the_scalars_config_and_run_info(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = run
    [events_dir] = (out / "runs").iterdir()
    events = EventAccumulator(str(events_dir), size_guidance={"tensors": 0}).Reload()
    for key, steps in expected_steps(log_history(out)).items():
        tag = "eval/loss" if key == "eval_loss" else f"train/{key}"
        assert [e.step for e in events.Scalars(tag)] == steps, tag
    history = {e["step"]: e for e in log_history(out) if "loss" in e}
    assert events.Scalars("train/loss")[-1].value == pytest.approx(history[4]["loss"], rel=1e-5)

    texts = {tag: events.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in events.Tags()["tensors"]}
    assert '"learning_rate"' in texts["args/text_summary"]  # TrainingArguments, as JSON
    run_info = json.loads((out / "run_info.json").read_text())
    assert f"| run_info/tokenizer_sha256 | {run_info['tokenizer_sha256']} |" in texts["run_info/text_summary"]
    assert f"| run_info/parameters/total | {run_info['parameters']['total']} |" in texts["run_info/text_summary"]


@pytest.mark.skipif(NO_TRACKIO, reason="trackio is not installed (pip install trackio)")
def test_trackio_local_store_holds_the_scalars_config_and_run_info(run):
    from trackio import SQLiteStorage

    out, project, _ = run
    logs = SQLiteStorage.get_logs(project, "tiny")
    for key, steps in expected_steps(log_history(out)).items():
        tag = "eval/loss" if key == "eval_loss" else f"train/{key}"
        assert [entry["train/global_step"] for entry in logs if tag in entry] == steps, tag
    config = SQLiteStorage.get_run_config(project, "tiny")
    run_info = json.loads((out / "run_info.json").read_text())
    assert config["learning_rate"] > 0 and config["run_info/tokenizer_sha256"] == run_info["tokenizer_sha256"]
    assert config["run_info/data_sha256/train"] == run_info["data_sha256"]["train"]


@pytest.mark.skipif(NO_WANDB, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_run_holds_the_scalars_config_and_run_info(run):
    """The offline run file's records (read with wandb's own record reader): history rows and config updates."""
    out, _, folder = run
    [path] = (folder / "wandb").glob("offline-run-*/run-*.wandb")
    rows, config = wandb_records(path)
    run_info = json.loads((out / "run_info.json").read_text())
    assert config["learning_rate"] > 0 and config["run_info/tokenizer_sha256"] == run_info["tokenizer_sha256"]
    for key, steps in expected_steps(log_history(out)).items():
        tag = "eval/loss" if key == "eval_loss" else f"train/{key}"
        assert [row["train/global_step"] for row in rows if tag in row] == steps, tag


def wandb_records(path) -> tuple[list[dict], dict]:
    """(history rows, config) of an offline .wandb file, through wandb's own record reader."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(path))
    rows, config = [], {}
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    return rows, config


def test_missing_tracker_is_one_line(tmp_path, monkeypatch):
    import hfllm.training.tracking as tracking

    monkeypatch.setitem(tracking.TRACKERS, "wandb", "wandb_that_is_not_installed")
    recipe = write_recipe(tmp_path / "r.yaml", {"model": "llama-tiny", "report_to": "wandb"})
    with pytest.raises(HfllmError, match=r"^report_to wandb needs the wandb_that_is_not_installed package: pip install"):
        pretrain_main([str(recipe), *TINY, *data_args(tmp_path), "--output_dir", str(tmp_path / "out"),
                       "--report_to", "wandb", "--max_steps", "2"])
