"""The Python API of training (`hfllm.pretrain`, `hfllm.sft`, ...): the command's path with a recipe path or dict and
keyword overrides, a RunResult back, and the command's one-line errors as HfllmError (never SystemExit)."""

import inspect

import pytest
import yaml

import hfllm
from hfllm.cli import main as cli
from hfllm.recipe import recipe_argv

TINY = dict(max_steps=2, tokenizer="char", block_size=32, num_hidden_layers=1, hidden_size=32, intermediate_size=64,
            num_attention_heads=2, num_key_value_heads=2, eval_steps=2, max_eval_samples=8, sample_max_new_tokens=4,
            logging_steps=1)


def test_every_api_name_resolves_with_a_docstring():
    for name in hfllm.API:
        function = getattr(hfllm, name)
        assert name in dir(hfllm)
        assert inspect.getdoc(function) and len(inspect.getdoc(function).splitlines()) > 2, name
    with pytest.raises(AttributeError, match="has no attribute 'pretrian'"):
        hfllm.pretrian  # noqa: B018


def test_pretrain_from_a_dict_with_overrides_returns_the_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "recipes/tiny.yaml" resolves to the shipped recipe from any folder
    recipe = yaml.safe_load(open(hfllm.recipe.find_recipe("recipes/tiny.yaml")))
    result = hfllm.pretrain(recipe, output_dir="run", **TINY)
    assert result.exit_code == 0 and result.finished and (result.step, result.max_steps) == (2, 2)
    assert result.output_dir.name == "run" and (result.output_dir / "model.safetensors").is_file()
    assert [step for step, _ in result.losses()] == [1, 2]
    assert result.metrics["eval_loss"] == pytest.approx(result.losses("eval_loss")[-1][1])
    assert yaml.safe_load((result.output_dir / "recipe.yaml").read_text())["num_hidden_layers"] == 1
    model, tokenizer = result.load()
    assert type(model).__name__ == "HfllmForCausalLM" and model.config.hidden_size == 32
    assert "<img src='data:image/png;base64," in result._repr_html_() and "finished at step 2/2" in repr(result)


@pytest.mark.parametrize("command, function, recipe", [
    ("pretrain", "pretrain", "recipes/tiny.yaml"),
    ("sft", "sft", "recipes/sft/hfllm_tiny.yaml"),
    ("dpo", "dpo", "recipes/dpo/hfllm_tiny.yaml"),
])
@pytest.mark.parametrize("flag, value", [("max_stepz", 3), ("learning_rate", -1.0), ("max_steps", "ten")])
def test_bad_input_raises_the_commands_line(command, function, recipe, flag, value, capsys):
    assert cli([command, recipe, f"--{flag}", str(value)]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"hfllm {command}: error: ") and "\n" not in line
    with pytest.raises(hfllm.HfllmError) as raised:
        getattr(hfllm, function)(recipe, **{flag: value})
    assert f"hfllm {command}: error: {raised.value}" == line


def test_a_missing_recipe_is_the_commands_line_too(capsys):
    assert cli(["sft", "no/such.yaml"]) == 2
    with pytest.raises(hfllm.HfllmError) as raised:
        hfllm.sft("no/such.yaml")
    assert capsys.readouterr().err.strip() == f"hfllm sft: error: {raised.value}"


def test_overrides_are_typed_as_yaml_reads_them():
    argv = recipe_argv("r.yaml", dict(max_steps=5, bf16=False, warmup_steps=None, report_to=["tensorboard", "none"],
                                      lr_scheduler_kwargs={"min_lr_rate": 0.1}, layer_types=["full"]))
    assert argv == ["r.yaml", "--max_steps", "5", "--bf16", "false", "--warmup_steps", "null", "--report_to",
                    '["tensorboard", "none"]', "--lr_scheduler_kwargs", '{"min_lr_rate": 0.1}', "--layer_types",
                    '["full"]']
    from hfllm.training.arguments import parse_recipe

    recipe = parse_recipe(recipe_argv("recipes/tiny.yaml", dict(report_to=["tensorboard", "none"], bf16=False,
                                                               lr_scheduler_kwargs={"min_lr_rate": 0.2})), "hfllm pretrain")
    args = recipe.args[2]
    assert args.report_to == ["tensorboard", "none"] and args.lr_scheduler_kwargs == {"min_lr_rate": 0.2}
