"""Every adaptation recipe (recipes/{sft,dpo,orpo,kto,grpo}/*.yaml) trains at a tiny size, so none can rot.

The recipe's own keys are kept (PEFT method, 4-bit loading, chat template, loss options) except what names real
resources: the model becomes a tiny random Llama, the data the matching synthetic file, precision float32, one step.
"""

from pathlib import Path

import pytest
import yaml
from helpers import write_recipe

from hfllm.training.align import TRAINERS, train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.relative_to(ROOT) for method in TRAINERS for p in (ROOT / "recipes" / method).glob("*.yaml"))
DATA = {"sft": "sft.jsonl", "dpo": "preference.jsonl", "orpo": "preference.jsonl", "kto": "kto.jsonl",
        "grpo": "prompts.jsonl"}


@pytest.mark.parametrize("path", RECIPES, ids=str)
def test_recipe_trains_at_tiny_size(path, tmp_path, tiny_llama_chat_dir, synth_dir):
    method = path.parent.name
    recipe = yaml.safe_load((ROOT / path).read_text())
    # each source of a mixture becomes the synthetic file, its weight and columns kept
    sources = [{key: value for key, value in source.items() if key in ("columns", "fraction", "tokens")}
               | {"path": str(synth_dir / DATA[method])} for source in recipe.get("datasets", [{}])]
    recipe.update(
        model_name_or_path=str(tiny_llama_chat_dir), dtype="float32", datasets=sources,
        output_dir=str(tmp_path / "out"), max_steps=1, num_train_epochs=1, per_device_train_batch_size=2,
        gradient_accumulation_steps=1, bf16=False, eval_strategy="no", save_strategy="no", report_to="none",
        exact_match_file=None, logging_steps=1,
    )
    recipe.pop("test_split_size", None)
    if recipe.get("eval_tasks"):  # the key is still read (null); lm-eval during SFT is test_eval_callback's
        recipe.update(eval_tasks=None)
    if method == "grpo":
        recipe.update(num_generations=2, generation_batch_size=2, max_completion_length=4)
    else:
        recipe.update(max_length=96)
    assert train(method, [str(write_recipe(tmp_path / "recipe.yaml", recipe))], f"hfllm {method}").exit_code == 0
    out = tmp_path / "out"
    weights = "adapter_model.safetensors" if recipe.get("use_peft") else "model.safetensors"
    assert (out / weights).is_file()
