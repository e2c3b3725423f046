"""No traceback on bad input, anywhere (docs/reliability.md): a table of malformed inputs across every command.

Each case must end with exactly one stderr line `hfllm CMD: error: ...` naming the culprit and what is allowed, exit
code 2, no "Traceback", and nothing written (every file under pytest's temporary folders unchanged). Most cases run
in process through `hfllm.cli.main`; a few run as `python3 -m hfllm` to prove it end to end. `HFLLM_DEBUG=1` shows
the traceback, and a genuine bug (an internal error) keeps its traceback.
"""

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import run_hfllm, write_recipe
from hfllm.cli import COMMANDS, main
from hfllm.errors import HfllmError

# ----------------------------------------------------------------------------- the broken inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_llama_chat_dir, synth_dir, tiny_llama_shakespeare_gguf) -> dict[str, str]:
    """Placeholders for the table: {bad} a folder of broken inputs, {model} a good tiny chat model, {synth} good
    `hfllm data synth` files, {gguf} a good .gguf file ({tmp}, the test's own folder, is added per test)."""
    bad = tmp_path_factory.mktemp("bad-inputs")
    (bad / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (bad / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (bad / "broken.yaml").write_text("learning_rate: [1e-3\n")
    (bad / "list.yaml").write_text("- learning_rate\n- 1e-3\n")
    (bad / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [}\n')
    (bad / "bad.csv").write_text('text,label\n"one",1\n"two",2,extra,fields\n')
    (bad / "notes.docx").write_text("not a data file")
    (bad / "afile").write_text("a file, not a folder")
    (bad / "nonempty").mkdir()
    (bad / "nonempty" / "keep.txt").write_text("someone's file")
    (bad / "empty-model").mkdir()
    (bad / "no-columns.jsonl").write_text('{"foo": "bar"}\n{"foo": "baz"}\n')
    (bad / "body.jsonl").write_text("".join(json.dumps({"body": f"document {i}"}) + "\n" for i in range(20)))
    (bad / "not.gguf").write_text("this is a text file with a .gguf name\n" * 10)
    gguf_bytes = Path(tiny_llama_shakespeare_gguf).read_bytes()
    (bad / "truncated.gguf").write_bytes(gguf_bytes[: len(gguf_bytes) // 2])
    for name, damage in (("corrupt-weights", "weights"), ("corrupt-config", "config")):
        shutil.copytree(tiny_llama_chat_dir, bad / name)
        if damage == "weights":
            weights = bad / name / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:1000])
        else:
            (bad / name / "config.json").write_text('{"model_type": "llama", ')
    adapter = bad / "orphan-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(bad / "deleted-base"), "r": 8,
        "target_modules": ["q_proj"],
    }))
    write_recipe(bad / "typo.yaml", {"model": "llama-tiny", "learning_rat": 1e-3})
    write_recipe(bad / "pretrain.yaml", {"model": "llama-tiny", "max_steps": 2, "report_to": "none"})
    write_recipe(bad / "sft.yaml", {
        "model_name_or_path": str(tiny_llama_chat_dir), "use_peft": True, "lora_r": 8, "chat_template": "smollm2",
        "datasets": [{"path": str(Path(synth_dir) / "sft.jsonl")}], "max_steps": 1, "report_to": "none",
        "save_strategy": "no",
    })
    return {"bad": str(bad), "model": str(tiny_llama_chat_dir), "synth": str(synth_dir),
            "gguf": str(tiny_llama_shakespeare_gguf)}


def pretrain(*flags: str) -> list[str]:
    return ["pretrain", "{bad}/pretrain.yaml", "--output_dir", "{tmp}/out", *flags]


def adapt(method: str, *flags: str) -> list[str]:
    return [method, "{bad}/sft.yaml", "--output_dir", "{tmp}/out", *flags]


# (id, argv, culprit, what is allowed): both must appear in the one error line
CASES = [
    # recipes
    ("recipe-missing", ["pretrain", "{bad}/nope.yaml"], "nope.yaml", "give a YAML file"),
    ("recipe-binary", ["pretrain", "{bad}/binary.yaml"], "binary.yaml", "not UTF-8"),
    ("recipe-invalid-yaml", ["pretrain", "{bad}/broken.yaml"], "broken.yaml", "not valid YAML"),
    ("recipe-not-mapping", ["pretrain", "{bad}/list.yaml"], "list.yaml", "mapping of key: value"),
    ("recipe-unknown-key", ["pretrain", "{bad}/typo.yaml"], "learning_rat'", "did you mean 'learning_rate'"),
    ("recipe-wrong-type", pretrain("--max_steps", "ten"), "max_steps", "invalid int value"),
    ("recipe-model-field-wrong-type", pretrain("--num_hidden_layers", "two"), "num_hidden_layers", "expected int"),
    ("recipe-unknown-preset", pretrain("--model", "llama-huge"), "llama-huge", "llama-tiny"),
    ("recipe-negative-lr", pretrain("--learning_rate", "-1e-3"), "learning_rate", "a number >= 0"),
    ("recipe-batch-size-zero", pretrain("--per_device_train_batch_size", "0"), "per_device_train_batch_size", ">= 1"),
    ("recipe-unknown-attention", pretrain("--attn_implementation", "fast"), "attn_implementation", "sdpa"),
    ("recipe-adam-beta", pretrain("--adam_beta2", "1.5"), "adam_beta2", "[0, 1)"),
    ("recipe-negative-seed", pretrain("--seed", "-1"), "seed", "[0, 2**32)"),
    ("recipe-max-steps-zero", pretrain("--max_steps", "0"), "max_steps", "positive"),
    ("flag-without-key", pretrain("stray"), "stray", "--key value"),
    # output folders
    ("output-dir-is-file", pretrain("--output_dir", "{bad}/afile"), "afile", "give a folder path"),
    ("output-dir-inside-file", pretrain("--output_dir", "{bad}/afile/run"), "afile", "give a folder path"),
    ("output-dir-foreign", pretrain("--output_dir", "{bad}/nonempty"), "nonempty", "choose a new or empty folder"),
    ("resume-missing-checkpoint", pretrain("--resume_from_checkpoint", "{tmp}/checkpoint-9"), "checkpoint-9",
     "give a checkpoint-* folder"),
    # data files (pretraining)
    ("data-hub-offline", pretrain("--dataset", "someone/corpus"), "someone/corpus", "give train_files"),
    ("data-missing", pretrain("--train_files", "{bad}/missing.txt"), "missing.txt", "check the path"),
    ("data-binary", pretrain("--train_files", "{bad}/binary.txt"), "binary.txt", "give a UTF-8 text file"),
    ("data-malformed-jsonl", pretrain("--train_files", "{bad}/bad.jsonl"), "bad.jsonl", "one JSON object per line"),
    ("data-malformed-csv", pretrain("--train_files", "{bad}/bad.csv"), "bad.csv", "check their format"),
    ("data-wrong-column", pretrain("--train_files", "{bad}/body.jsonl"), "text_column 'text'", "available columns: body"),
    ("data-unknown-extension", pretrain("--train_files", "{bad}/notes.docx"), "notes.docx", "use one of"),
    # fine-tuning recipes and data
    ("sft-malformed-jsonl", adapt("sft", "--datasets", "[{path: {bad}/bad.jsonl}]"), "bad.jsonl", "line 2"),
    ("sft-lora-r-zero", adapt("sft", "--lora_r", "0"), "lora_r", "a whole number >= 1"),
    ("sft-negative-lr", adapt("sft", "--learning_rate", "-1"), "learning_rate", "a number >= 0"),
    ("sft-unknown-key", adapt("sft", "--lora_rank", "8"), "lora_rank", "did you mean"),
    ("sft-data-missing", adapt("sft", "--datasets", "[{path: {bad}/gone.jsonl}]"), "gone.jsonl", "fix `data_files`"),
    ("sft-wrong-columns", adapt("sft", "--datasets", "[{path: {bad}/no-columns.jsonl}]"), "['foo']",
     "sft needs messages"),
    ("sft-model-missing", adapt("sft", "--model_name_or_path", "{bad}/no-model"), "no-model",
     "give an hfllm or transformers checkpoint folder"),
    ("sft-model-empty", adapt("sft", "--model_name_or_path", "{bad}/empty-model"), "empty-model",
     "no config.json or adapter_config.json"),
    ("dpo-wrong-columns", adapt("dpo"), "dpo needs prompt+chosen+rejected", "convert the data"),
    ("orpo-batch-size-zero", adapt("orpo", "--per_device_train_batch_size", "0"), "per_device_train_batch_size", ">= 1"),
    ("kto-unknown-attention", adapt("kto", "--attn_implementation", "fast"), "attn_implementation", "eager"),
    ("grpo-unknown-reward", adapt("grpo", "--datasets", "[{path: {synth}/prompts.jsonl}]", "--reward_funcs",
                                  "nowhere:reward"), "nowhere:reward", "module:function"),
    # model folders and GGUF files
    ("convert-truncated-gguf", ["convert", "{bad}/truncated.gguf", "{tmp}/out"], "truncated.gguf",
     "give a complete .gguf file"),
    ("convert-not-gguf", ["convert", "{bad}/not.gguf", "{tmp}/out"], "is not a GGUF file", "give a complete .gguf"),
    ("convert-missing", ["convert", "{bad}/no-model", "{tmp}/out"], "no-model", "give a transformers checkpoint"),
    ("convert-corrupt-config", ["convert", "{bad}/corrupt-config", "{tmp}/out"], "config.json", "not valid JSON"),
    ("convert-output-not-empty", ["convert", "{model}", "{bad}/nonempty"], "nonempty", "choose a new folder"),
    ("export-not-hfllm", ["export", "{model}", "{tmp}/out"], "not an hfllm checkpoint", "nothing to export"),
    ("export-unknown-target", ["export", "{model}", "{tmp}/out", "--to", "onnx"], "onnx", "choose from 'transformers', 'gguf'"),
    ("generate-corrupt-weights", ["generate", "{bad}/corrupt-weights", "--prompt", "hi"], "corrupt-weights",
     "give an hfllm or transformers checkpoint folder"),
    ("generate-corrupt-config", ["generate", "{bad}/corrupt-config", "--prompt", "hi"], "corrupt-config",
     "give an hfllm or transformers checkpoint folder"),
    ("generate-empty-folder", ["generate", "{bad}/empty-model", "--prompt", "hi"], "empty-model", "no config.json"),
    ("generate-truncated-gguf", ["generate", "{bad}/truncated.gguf", "--prompt", "hi"], "truncated.gguf",
     "give a complete .gguf file"),
    ("score-missing-model", ["score", "{bad}/no-model", "{synth}/test.jsonl"], "no-model", "give an hfllm"),
    # flags
    ("presets-unknown-flag", ["presets", "--all"], "unrecognized arguments: --all", "see hfllm presets --help"),
    ("convert-unknown-flag", ["convert", "{model}", "{tmp}/out", "--fast"], "--fast", "see hfllm convert --help"),
    ("convert-bad-dtype", ["convert", "{model}", "{tmp}/out", "--dtype", "int3"], "int3", "choose from"),
    ("convert-missing-argument", ["convert", "{model}"], "out", "see hfllm convert --help"),
    ("generate-bad-temperature", ["generate", "{model}", "--prompt", "hi", "--do_sample", "--temperature", "-1"],
     "--temperature", "> 0"),
    ("chat-bad-top-p", ["chat", "{model}", "--top_p", "2"], "--top_p", "(0, 1]"),
    ("chat-unknown-flag", ["chat", "{model}", "--colour"], "--colour", "see hfllm chat --help"),
    ("data-unknown-action", ["data", "wikipedia"], "wikipedia", "choose from"),
    ("data-synth-unknown-task", ["data", "synth", "poetry", "--out", "{tmp}/out"], "poetry", "choose from"),
    ("data-tokenizer-binary", ["data", "tokenizer", "--train-files", "{bad}/binary.txt", "--out", "{tmp}/out"],
     "binary.txt", "UTF-8"),
    ("data-out-is-file", ["data", "shakespeare", "--out", "{bad}/afile"], "afile", "give a folder path"),
    ("score-malformed-test-file", ["score", "{model}", "{bad}/bad.jsonl"], "bad.jsonl", "one JSON object per line"),
    ("unknown-command", ["train", "x.yaml"], "train", "choose from"),
    # adapters
    ("merge-missing-base", ["merge", "{bad}/orphan-adapter", "{tmp}/out"], "deleted-base", "pass the base model"),
    ("merge-not-adapter", ["merge", "{model}", "{tmp}/out"], "adapter_config.json", "use_peft: true"),
    ("generate-adapter-missing-base", ["generate", "{bad}/orphan-adapter", "--prompt", "hi"], "deleted-base",
     "pass the base model"),
    # evaluation
    ("eval-unknown-task", ["eval", "{model}", "--tasks", "no_such_task"], "no_such_task", "tasks"),
    ("eval-missing-model", ["eval", "{bad}/no-model", "--tasks", "hfllm_synth"], "no-model", "give an hfllm"),
    ("eval-bad-limit", ["eval", "{model}", "--tasks", "hfllm_synth", "--limit", "-1"], "--limit", "positive"),
    ("eval-output-path-file", ["eval", "{model}", "--tasks", "hfllm_synth", "--output_path", "{bad}/afile"], "afile",
     "give a folder"),
    # commands added with serving, shipping and planning
    ("serve-missing-model", ["serve", "{bad}/no-model"], "no-model", "give an hfllm or transformers checkpoint folder"),
    ("chat-web-missing-model", ["chat", "{bad}/no-model", "--web"], "no-model", "give an hfllm or transformers"),
    ("export-gguf-bad-quant", ["export", "{model}", "{tmp}/out", "--to", "gguf", "--quant", "q3"], "q3", "q8_0, q4_0"),
    ("verify-not-a-folder", ["verify", "{bad}/afile"], "afile", "give a run's output_dir"),
    ("verify-no-run-info", ["verify", "{bad}/nonempty"], "nonempty", "give the output_dir of an hfllm training run"),
    ("push-not-a-model", ["push", "{bad}/empty-model", "me/x"], "empty-model", "give an hfllm or transformers"),
    ("push-bad-repo-id", ["push", "{model}", "not a repo"], "not a repo", "NAMESPACE/NAME"),
    ("plan-unknown-gpu", ["plan", "{bad}/pretrain.yaml", "--gpu", "v100"], "v100", "choose from 'h100'"),
    ("plan-zero-gpus", ["plan", "{bad}/pretrain.yaml", "--gpus", "0"], "--gpus", "at least 1"),
    ("doctor-missing-recipe", ["doctor", "{bad}/missing.yaml"], "missing.yaml", "give a YAML file"),
]


CASE = {row[0]: row[1:] for row in CASES}
SLOW = {"eval-unknown-task"}  # lm-eval indexes its whole task registry first (~1 min on 2 busy cores)


def fill(text: str, places: dict[str, str]) -> str:
    for name, value in places.items():
        text = text.replace(f"{{{name}}}", value)
    return text


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `folders` with its size and modification time."""
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns)
            for folder in folders for path in sorted(Path(folder).rglob("*"))}


@pytest.fixture
def quiet_progress():
    """No progress bars: the error must be the only line on stderr."""
    import datasets

    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def check_one_line(err: str, command: str, culprit: str, allowed: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    [line] = lines
    assert line.startswith(f"hfllm {command}: error: " if command in COMMANDS else "hfllm: error: "), line
    assert culprit in line and allowed in line, line
    return line


def test_the_table_covers_every_command_with_40_cases():
    commands = {argv[0] for _, argv, _, _ in CASES}
    assert len(CASES) >= 40
    assert {"presets", "convert", "export", "data", "pretrain", "sft", "dpo", "orpo", "kto", "grpo", "merge", "eval",
            "score", "generate", "chat"} <= commands


@pytest.mark.parametrize("argv, culprit, allowed", [
    pytest.param(*row[1:], id=row[0], marks=[pytest.mark.slow] if row[0] in SLOW else []) for row in CASES])
def test_bad_input_is_one_line_nonzero_and_writes_nothing(argv, culprit, allowed, inputs, tmp_path, tmp_path_factory,
                                                          capsys, caplog, quiet_progress, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative default output folder would land here
    places = inputs | {"tmp": str(tmp_path)}
    argv = [fill(arg, places) for arg in argv]
    before = snapshot(tmp_path_factory.getbasetemp())
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    check_one_line(err, argv[0], fill(culprit, places), allowed)
    assert "Traceback" not in out
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]  # none on stderr
    assert snapshot(tmp_path_factory.getbasetemp()) == before


# ----------------------------------------------------------------------------- end to end, debug, genuine bugs


def hfllm(*argv: str, debug: bool = False) -> subprocess.CompletedProcess:
    return run_hfllm(*argv, HFLLM_DEBUG="1" if debug else "", HF_DATASETS_DISABLE_PROGRESS_BARS="1")


@pytest.mark.parametrize("case_id", [  # a process imports torch and transformers: ~1 min on 2 busy cores
    "recipe-negative-lr",
    pytest.param("sft-malformed-jsonl", marks=pytest.mark.slow),
    pytest.param("convert-truncated-gguf", marks=pytest.mark.slow),
])
def test_bad_input_as_a_process_has_no_traceback(case_id, inputs, tmp_path):
    argv, culprit, allowed = CASE[case_id]
    result = hfllm(*[fill(arg, inputs | {"tmp": str(tmp_path)}) for arg in argv])
    assert result.returncode == 2, result.stderr
    check_one_line(result.stderr, argv[0], culprit, allowed)
    assert not (tmp_path / "out").exists()


def test_hfllm_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setenv("HFLLM_DEBUG", "1")
    with pytest.raises(HfllmError, match="unrecognized arguments: --all"):
        main(["presets", "--all"])
    result = hfllm("presets", "--all", debug=True)
    assert result.returncode != 0 and "Traceback" in result.stderr and "HfllmError" in result.stderr


@pytest.fixture
def presets_raising(monkeypatch):
    """`hfllm presets` made to raise a given error from inside (HFLLM_DEBUG unset)."""
    import hfllm.models.presets as presets

    monkeypatch.delenv("HFLLM_DEBUG", raising=False)

    def make(error: Exception) -> list[str]:
        def fail(*args, **kwargs):
            raise error

        monkeypatch.setattr(presets, "preset_parameter_counts", fail)
        return ["presets"]

    return make


@pytest.mark.parametrize("bug", [KeyError("n_layer"), FileNotFoundError(2, "No such file or directory", "internal.json"),
                                 ValueError("shapes (2, 3) and (4, 5) not aligned")], ids=["KeyError", "ENOENT", "ValueError"])
def test_a_genuine_bug_keeps_its_traceback(bug, presets_raising):
    with pytest.raises(type(bug)):
        main(presets_raising(bug))


@pytest.mark.parametrize("error, culprit, allowed", [
    (OSError(28, "No space left on device", "/data/runs/out/model.safetensors"), "the disk is full: writing /data/runs/out",
     "free some disk space or change output_dir"),
    (PermissionError(13, "Permission denied", "/data/runs"), "/data/runs", "check its permissions"),
    (ConnectionError("Couldn't reach 'someone/corpus' on the Hub (OfflineModeIsEnabled)"), "someone/corpus",
     "give a local file or folder"),
], ids=["disk-full", "permission", "offline"])
def test_a_library_error_from_the_users_machine_is_one_line_unless_debugging(error, culprit, allowed, presets_raising,
                                                                               monkeypatch, capsys):
    argv = presets_raising(error)
    assert main(argv) == 2
    check_one_line(capsys.readouterr().err, "presets", culprit, allowed)
    monkeypatch.setenv("HFLLM_DEBUG", "1")
    with pytest.raises(type(error)):
        main(argv)
