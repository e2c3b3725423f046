"""The Python API of the stages other than training (docs/api.md): `generate`, `chat`, `evaluate`, `convert` /
`export`, `push`, `doctor`, `plan`. Each returns its result as data, and bad input raises `HfllmError` with the very
line its `hfllm` command prints (the command parses its argv and takes the same path)."""

import json
from pathlib import Path

import pytest
import yaml
from helpers import CORPUS, TINY, write_recipe

from hfllm.cli import main as cli
from hfllm.diagnostics import doctor
from hfllm.errors import HfllmError
from hfllm.evaluation.run import evaluate
from hfllm.inference.chat import chat
from hfllm.inference.generate import generate
from hfllm.models.convert import convert, export
from hfllm.shipping.push import push
from hfllm.training.plan import plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def cli_line(capsys, *argv) -> str:
    """The one line `hfllm ARGV` prints on stderr, without its `hfllm CMD: error: ` prefix (it must exit 2)."""
    capsys.readouterr()
    assert cli([str(arg) for arg in argv]) == 2
    err = capsys.readouterr().err.strip()
    prefix = f"hfllm {argv[0]}: error: "
    assert err.startswith(prefix) and "\n" not in err, err
    return err[len(prefix):]


def api_line(function, *args, **kwargs) -> str:
    with pytest.raises(HfllmError) as error:
        function(*args, **kwargs)
    return " ".join(str(error.value).split())


# ----------------------------------------------------------------------------- generate and chat


def test_generate_returns_the_completions_the_command_prints(tiny_chat_dir, capsys):
    completions = generate(tiny_chat_dir, ["To be, or not", "Once upon"], max_new_tokens=6)
    assert [c.prompt for c in completions] == ["To be, or not", "Once upon"]
    assert all(c.completion_tokens <= 6 and c.text for c in completions)
    capsys.readouterr()
    assert cli(["generate", str(tiny_chat_dir), "--prompt", "To be, or not", "--prompt", "Once upon",
                "--max_new_tokens", "6", "--json"]) == 0
    printed = [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()]
    assert printed == [c.text for c in completions]


def test_generate_takes_a_loaded_model_and_tokenizer(tiny_chat_dir):
    from hfllm.checkpoint import load

    prompts = ["What is 2+3? Answer with one number.", "Hi"]  # one batch: the short one is padded
    from_folder = generate(tiny_chat_dir, prompts, chat=True, max_new_tokens=5)
    in_memory = generate(load(tiny_chat_dir), prompts, chat=True, max_new_tokens=5)
    assert [c.text for c in in_memory] == [c.text for c in from_folder]
    assert in_memory[1].rendered_prompt.startswith("<|im_start|>")


@pytest.mark.parametrize("options, flags", [
    ({"max_new_tokens": 0}, ["--max_new_tokens", "0"]),  # a check of hfllm's own
    ({"engine": "vllm"}, ["--engine", "vllm"]),  # an argparse choice
    ({"greedy": True, "temperature": 0.7}, ["--greedy", "--temperature", "0.7"]),
])
def test_generate_bad_input_is_the_commands_line(tiny_chat_dir, capsys, options, flags):
    line = api_line(generate, tiny_chat_dir, "Hello", **options)
    assert line == cli_line(capsys, "generate", tiny_chat_dir, "--prompt", "Hello", *flags)


def test_chat_answers_and_carries_the_history(tiny_chat_dir, capsys):
    from hfllm.checkpoint import load

    loaded = load(tiny_chat_dir)
    first = chat(loaded, "What is 2+3?", system="Be terse.", max_new_tokens=5)
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant"]
    assert first.messages[-1]["content"] == first.reply == str(first)
    [same] = generate(tiny_chat_dir, "What is 2+3?", chat=True, system="Be terse.", max_new_tokens=5)
    assert first.reply == same.text  # the chat's first answer is `generate --chat`'s
    second = chat(loaded, "And 4+4?", history=first.messages, max_new_tokens=5, stream=True)
    assert second.messages[:3] == first.messages and [m["role"] for m in second.messages[3:]] == ["user", "assistant"]
    assert capsys.readouterr().out == second.reply + "\n"
    line = api_line(chat, tiny_chat_dir, "Hi", top_p=1.5)
    assert line == cli_line(capsys, "chat", tiny_chat_dir, "--top_p", "1.5")


def test_chat_refuses_a_conversation_that_does_not_end_with_the_user(tiny_chat_dir):
    with pytest.raises(HfllmError, match="must end with a user message"):
        chat(tiny_chat_dir, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    with pytest.raises(HfllmError, match="a message must be"):
        chat(tiny_chat_dir, [{"role": "robot", "content": "Hi"}])


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_returns_the_scores_and_writes_the_report(tiny_llama_shakespeare_dir, tmp_path):
    out = tmp_path / "report"
    result = evaluate(tiny_llama_shakespeare_dir, tasks=["hfllm_synth"], limit=2, output_path=out)
    name = tiny_llama_shakespeare_dir.name
    assert result.scores[name]["hfllm_synth"]["sample_len"] == 2
    assert result.report_path == out / "results.md" and result.report_path.read_text() == str(result)
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"][0]["scores"] == result.scores[name]
    # a recipe mapping with keyword overrides: the same keys, the same parsing
    again = evaluate(recipe={"models": [str(tiny_llama_shakespeare_dir)], "tasks": ["hfllm_synth"]}, limit=2)
    assert again.scores == result.scores and again.files == []


def test_evaluate_bad_input_is_the_commands_line(tiny_llama_shakespeare_dir, capsys):
    line = api_line(evaluate, tiny_llama_shakespeare_dir, tasks="hfllm_synth", limits=3)
    assert line == "unknown key 'limits' in the command line (did you mean 'limit'?)"
    assert line == cli_line(capsys, "eval", tiny_llama_shakespeare_dir, "--tasks", "hfllm_synth", "--limits", "3")
    line = api_line(evaluate, tiny_llama_shakespeare_dir, tasks="hfllm_synth", limit=0)
    assert line == cli_line(capsys, "eval", tiny_llama_shakespeare_dir, "--tasks", "hfllm_synth", "--limit", "0")
    assert api_line(evaluate, recipe={"tasks": ["hfllm_synth"]}).startswith("give at least one model")


# ----------------------------------------------------------------------------- convert / export


def test_convert_and_export_return_their_output_and_raise_the_commands_line(tiny_chat_dir, tmp_path, capsys):
    native = export(tiny_chat_dir, tmp_path / "native")
    assert native == tmp_path / "native" and json.loads((native / "config.json").read_text())["model_type"] == "llama"
    back = convert(native, tmp_path / "back")
    assert back == tmp_path / "back" and json.loads((back / "config.json").read_text())["model_type"] == "hfllm"
    line = api_line(export, tiny_chat_dir, tmp_path / "gguf", to="gguf", quant="q9")
    assert line == cli_line(capsys, "export", tiny_chat_dir, tmp_path / "gguf", "--to", "gguf", "--quant", "q9")
    line = api_line(convert, tmp_path / "missing", tmp_path / "x")
    assert line == cli_line(capsys, "convert", tmp_path / "missing", tmp_path / "x")
    assert not (tmp_path / "gguf").exists() and not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- push


@pytest.fixture
def adapter_dir(tiny_llama_chat_dir, tmp_path):
    """A LoRA adapter of the tiny Llama (push checks an adapter without a fresh process: seconds, not half a minute)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_chat_dir)
    adapter = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapter.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(tiny_llama_chat_dir).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_push_dry_run_returns_the_staged_files(adapter_dir, tiny_chat_dir, tmp_path, capsys):
    pushed = push(adapter_dir, "me/tiny-adapter", dry_run=tmp_path / "staged", license="mit")
    assert pushed.staged == tmp_path / "staged" and pushed.url is None
    assert pushed.files == sorted(path.name for path in pushed.staged.iterdir())
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(pushed.files)
    assert "license: mit" in (pushed.staged / "README.md").read_text()
    assert str(pushed).startswith(f"staged {len(pushed.files)} files for me/tiny-adapter in ")
    line = api_line(push, tiny_chat_dir, "not a repo", dry_run=tmp_path / "other")
    assert line == cli_line(capsys, "push", tiny_chat_dir, "not a repo", "--dry_run", tmp_path / "other")
    line = api_line(push, tiny_chat_dir, "me/x", dry_run=tmp_path / "other", license="wtfpl")
    assert line == cli_line(capsys, "push", tiny_chat_dir, "me/x", "--dry_run", tmp_path / "other", "--license", "wtfpl")
    assert not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------- doctor and plan


def tiny_recipe(folder: Path) -> dict:
    """A pretraining recipe mapping on local files, at the test suite's tiny size (as tests/test_doctor.py)."""
    (folder / "train.txt").write_text(CORPUS * 40, encoding="utf-8")
    (folder / "validation.txt").write_text("First Citizen:\nRather die than famish, hear me.\n\n" * 4, encoding="utf-8")
    flags = dict(zip(TINY[::2], TINY[1::2]))
    return {"model": "llama-tiny", "max_steps": 100, "seed": 3, **{key[2:]: yaml.safe_load(v) for key, v in flags.items()},
            "dataset": None, "train_files": str(folder / "train.txt"), "validation_files": str(folder / "validation.txt")}


def test_doctor_returns_the_checks_and_the_commands_table(tmp_path):
    report = doctor(tiny_recipe(tmp_path))
    assert report.passed and report.failed == [] and len(report.checks) == 14
    names = " | ".join(check.name for check in report.checks)
    assert all(name in names for name in ("loss at init", "causal mask", "checkpoint resume exact", "contamination"))
    assert str(report).startswith("check ") and "14 of 14 checks passed" in str(report)


def test_doctor_bad_input_is_the_commands_line(tmp_path, capsys):
    line = api_line(doctor, tmp_path / "missing.yaml")
    assert line == cli_line(capsys, "doctor", tmp_path / "missing.yaml")
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(tmp_path))
    line = api_line(doctor, recipe, max_step=3)
    assert line == cli_line(capsys, "doctor", recipe, "--max_step", "3")
    assert "did you mean 'max_steps'" in line


def test_plan_returns_the_plan_and_a_misfit_raises_nothing(capsys):
    result = plan(ROOT / "recipes/350m.yaml", gpu="h100", gpus=8)
    assert result.counts["total"] == pytest.approx(360.0e6, rel=1e-3) and result.devices == 8
    assert result.micro_batch() is not None and result.train_seconds() > 0
    one_b = yaml.safe_load((ROOT / "recipes/1b.yaml").read_text())
    misfit = plan(one_b, gpu="t4", max_steps=10)  # a mapping recipe; it does not fit one T4
    assert misfit.micro_batch() is None and misfit.recipe == "the recipe mapping"
    assert plan(ROOT / "recipes/1b.yaml", gpu="t4").micro_batch() is None
    assert cli(["plan", str(ROOT / "recipes/1b.yaml"), "--gpu", "t4"]) == 2  # the command refuses it
    line = api_line(plan, ROOT / "recipes/350m.yaml", gpu="v100")
    assert line == cli_line(capsys, "plan", ROOT / "recipes/350m.yaml", "--gpu", "v100")
    line = api_line(plan, ROOT / "recipes/350m.yaml", learning_rat=1)
    assert line == cli_line(capsys, "plan", ROOT / "recipes/350m.yaml", "--learning_rat", "1")
