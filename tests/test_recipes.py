"""Every recipe in recipes/ runs end to end with tiny overrides (1-layer 32-wide model, char tokenizer, local text,
2 steps): the recipe parses, trains, evaluates, saves, and the saved model reloads and generates."""

import math
from pathlib import Path

import pytest
import yaml
from helpers import TINY, data_args, log_history
from transformers import AutoModelForCausalLM, AutoTokenizer

from hfllm.run_pretrain import main

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
SHRINK = [*TINY, "--max_steps", "2", "--logging_steps", "1", "--eval_steps", "1", "--warmup_steps", "1", "--layer_types", "null",
          "--moe_intermediate_size", "null", "--max_position_embeddings", "64", "--sliding_window", "null"]


pytestmark = pytest.mark.usefixtures("single_thread")


def test_recipes_exist():
    names = {path.stem for path in RECIPES}
    assert {"tiny", "shakespeare-char", "125m", "350m", "1b"} <= names
    assert any(n.startswith("moe-") for n in names) and any(n.startswith("mistral-") for n in names)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_recipe_runs(recipe, tmp_path):
    values = yaml.safe_load(recipe.read_text())
    extra = []
    if values["model"].startswith("mistral"):
        extra = ["--sliding_window", "8"]  # smaller than the 16-token test block, so the window matters
    out = tmp_path / "out"
    assert main([str(recipe), *SHRINK, *data_args(tmp_path), "--output_dir", str(out), *extra]) == 0

    history = log_history(out)
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert [e["step"] for e in history if "eval_loss" in e] == [1, 2]
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    for key in ("model", "learning_rate", "lr_scheduler_type", "optim", "bf16"):
        if key in values:  # the recipe's own settings are kept (not the test overrides)
            assert saved[key] == values[key] or float(saved[key]) == float(values[key]), key

    model = AutoModelForCausalLM.from_pretrained(out)
    config = model.config
    assert config.model_type == "hfllm" and config.num_hidden_layers == 1
    if values["model"].startswith("moe"):
        assert config.num_experts == 8 and config.router_bias_update_rate == float(values["router_bias_update_rate"])
        assert all("router_max_load" in e for e in history if "loss" in e)
    if values["model"].startswith("mistral"):
        assert config.sliding_window == 8 and config.layer_types == ["sliding_attention"]
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("All:", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4


def test_every_shipped_recipe_is_run_by_a_test():
    """A recipe is run by a test that globs its folder (pretraining: recipes/*.yaml here; recipes/<method>/ in
    test_adapt_recipes, recipes/eval/ in test_eval, recipes/variants/ in test_variants) or that names its path."""
    root = Path(__file__).resolve().parents[1]
    globbed = {"recipes", "sft", "dpo", "orpo", "kto", "grpo", "eval", "variants"}
    tests_text = "".join(path.read_text() for path in (root / "tests").glob("test_*.py"))
    unrun = [path.relative_to(root).as_posix() for path in (root / "recipes").rglob("*.yaml")
             if path.parent.name not in globbed and path.relative_to(root).as_posix() not in tests_text]
    assert not unrun, f"no test runs {unrun}"
