"""The model card (`README.md`) of a pushed run: Hub metadata (license, base_model, datasets, tags, pipeline_tag,
library_name, model-index with the run's evaluation results) and a body with the recipe, the data, tokenizer and
weights hashes, the commit, the loss curve, the evaluation table and a `from_pretrained` snippet.

Everything comes from files the run folder already holds (recipe.yaml, run_info.json, trainer_state.json,
eval_results.json, results.json from `hfllm eval`, config.json / adapter_config.json); nothing is recomputed. The
scores of a recipe's `eval_tasks:` / `regression_prompts:` during training are read from the log history (their last
evaluation; `hfllm eval` scores of the final model take precedence for the same task).
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..checkpoint import HUB_ID

TRAINING_SCORES = "eval_tasks/"  # log-history prefix of EvalCallback's scores (hfllm/evaluation/callback.py)
# the training command a run came from, by the keys its recipe.yaml holds
METHOD_KEYS = {"beta": "dpo", "num_generations": "grpo", "desirable_weight": "kto", "model": "pretraining"}


@dataclass
class RunFacts:
    """What the run folder says about itself; every field may be missing (None or empty)."""

    name: str
    kind: str  # "hfllm" (remote code), "transformers" (native architecture) or "adapter"
    recipe: dict[str, Any] = field(default_factory=dict)
    run_info: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    log_history: list[dict] = field(default_factory=list)
    eval_scores: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metric -> value
    weight_hashes: dict[str, str] = field(default_factory=dict)  # file -> sha256
    gguf_files: list[str] = field(default_factory=list)
    has_loss_curve: bool = False
    samples: str | None = None
    published: str | None = None  # which format `hfllm push --format` published, and why

    @property
    def method(self) -> str:
        if self.kind == "adapter" or "model_name_or_path" in self.recipe:
            found = [method for key, method in METHOD_KEYS.items() if key in self.recipe and method != "pretraining"]
            return found[0] if found else "sft"
        return "pretraining" if self.recipe else "unknown"


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def hub_base_model(facts: RunFacts) -> str | None:
    """The base model as a Hub id (the card's `base_model` must name a Hub repo; a local path does not)."""
    base = facts.base_model
    if base and HUB_ID.match(base) and "/" in base and not Path(base).exists():
        return base
    return None


def hub_datasets(recipe: dict[str, Any]) -> list[str]:
    """Hub dataset ids named in a recipe (local files and the embedded Shakespeare corpus are not Hub datasets)."""
    entries = recipe.get("datasets") or []
    names = [entry.get("path") if isinstance(entry, dict) else entry for entry in entries]
    names.append(recipe.get("dataset"))
    return [name for name in names if isinstance(name, str) and "/" in name and HUB_ID.match(name)
            and not Path(name).exists()]


def training_scores(log_history: list[dict]) -> tuple[int | None, dict[str, dict[str, float]]]:
    """(step, {task: {metric: value}}) of the last evaluation of the recipe's eval_tasks / regression_prompts during
    training; (None, {}) without one."""
    last = next((entry for entry in reversed(log_history) if any(k.startswith(TRAINING_SCORES) for k in entry)), None)
    if last is None:
        return None, {}
    table: dict[str, dict[str, float]] = {}
    for key, value in last.items():
        if key.startswith(TRAINING_SCORES) and isinstance(value, (int, float)):
            task, _, metric = key[len(TRAINING_SCORES):].partition("/")
            table.setdefault(task, {})[metric] = float(value)
    return last.get("step"), table


def eval_results(facts: RunFacts, repo_id: str) -> list[EvalResult]:
    """model-index entries: the validation loss (and perplexity) the run logged, `hfllm eval` scores, and the
    scores of the recipe's eval_tasks at the last evaluation during training (tasks `hfllm eval` did not score)."""
    results = []
    validation = [entry["eval_loss"] for entry in facts.log_history if "eval_loss" in entry]
    if validation and math.isfinite(validation[-1]):
        for metric, value in (("loss", validation[-1]), ("perplexity", math.exp(min(validation[-1], 50)))):
            results.append(EvalResult(task_type="text-generation", dataset_type="validation", dataset_name="validation split of the training data",
                                      dataset_split="validation", metric_type=metric, metric_value=round(value, 4)))
    _, during_training = training_scores(facts.log_history)
    during_training = {task: metrics for task, metrics in during_training.items() if task not in facts.eval_scores}
    for task, metrics in sorted({**facts.eval_scores, **during_training}.items()):
        for metric, value in sorted(metrics.items()):
            if metric == "sample_len" or not isinstance(value, (int, float)):
                continue
            results.append(EvalResult(task_type="text-generation", dataset_type=task, dataset_name=task,
                                      metric_type=metric, metric_value=round(float(value), 4)))
    return results


def build_card(facts: RunFacts, repo_id: str, license_id: str) -> ModelCard:
    tags = ["hfllm", "text-generation", facts.method]
    if facts.kind == "adapter":
        tags += ["peft", "lora"]
    if facts.gguf_files:
        tags.append("gguf")
    data = ModelCardData(
        license=license_id,
        base_model=hub_base_model(facts),
        datasets=hub_datasets(facts.recipe) or None,
        tags=tags,
        pipeline_tag="text-generation",
        library_name="peft" if facts.kind == "adapter" else "transformers",
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results(facts, repo_id) or None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_body(facts, repo_id)}")


def card_body(facts: RunFacts, repo_id: str) -> str:
    sections = [f"# {repo_id.split('/')[-1]}\n\n{summary(facts)}"]
    if facts.published:
        sections.append(f"**Format.** {facts.published}")
    sections.append(usage(facts, repo_id))
    if facts.has_loss_curve:
        sections.append("## Training\n\n![loss curve](loss_curve.png)")
    else:
        sections.append("## Training")
    if facts.recipe:
        recipe = yaml.safe_dump(facts.recipe, sort_keys=False).strip()
        sections.append(f"The recipe (`recipe.yaml` in this repository; `hfllm {command(facts)} recipe.yaml` reruns it):\n\n"
                        f"```yaml\n{recipe}\n```")
    sections.append(provenance(facts))
    sections.append(evaluation(facts))
    if facts.samples:
        sections.append(f"## Samples\n\n```text\n{facts.samples.strip()}\n```")
    return "\n\n".join(sections) + "\n"


def command(facts: RunFacts) -> str:
    return "pretrain" if facts.method in ("pretraining", "unknown") else facts.method


def summary(facts: RunFacts) -> str:
    config = facts.config
    parts = []
    if config:
        parts.append(f"A causal language model (`{config.get('model_type', '?')}`): {config.get('num_hidden_layers', '?')} layers, "
                     f"hidden size {config.get('hidden_size', '?')}, {config.get('num_attention_heads', '?')} attention heads, "
                     f"vocabulary {config.get('vocab_size', '?')}, context {config.get('max_position_embeddings', '?')} tokens.")
    parameters = facts.run_info.get("parameters", {}).get("total")
    if parameters:
        parts.append(f"Parameters: {parameters:,}.")
    if facts.kind == "adapter":
        parts.append(f"A PEFT adapter for the base model `{facts.base_model}`.")
    parts.append(f"Trained with hfllm ({facts.method}).")
    return " ".join(parts)


def usage(facts: RunFacts, repo_id: str) -> str:
    if facts.kind == "adapter":
        code = (f"from peft import AutoPeftModelForCausalLM\nfrom transformers import AutoTokenizer\n\n"
                f"model = AutoPeftModelForCausalLM.from_pretrained(\"{repo_id}\")  # loads the base model `{facts.base_model}` under it\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{repo_id}\")")
    else:
        remote = ", trust_remote_code=True" if facts.kind == "hfllm" else ""
        note = "  # the model code travels in this repository" if remote else ""
        code = (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained(\"{repo_id}\"{remote}){note}\n"
                f"tokenizer = AutoTokenizer.from_pretrained(\"{repo_id}\"{remote})\n"
                f"ids = tokenizer(\"ROMEO:\\n\", return_tensors=\"pt\")\n"
                f"print(tokenizer.decode(model.generate(**ids, max_new_tokens=60)[0]))")
    text = f"## Use\n\n```python\n{code}\n```\n\nor `hfllm chat {repo_id}` / `hfllm serve {repo_id}`."
    if facts.gguf_files:
        names = ", ".join(f"`{name}`" for name in facts.gguf_files)
        text += (f"\n\nGGUF files for llama.cpp and Ollama: {names} (with an Ollama `Modelfile` where present):\n\n"
                 f"```bash\nllama-cli -m {facts.gguf_files[0]} -cnv\n```")
    return text


def provenance(facts: RunFacts) -> str:
    info = facts.run_info
    git = info.get("git") or {}
    rows = [("hfllm commit", f"`{git.get('commit')}`" + (" (uncommitted changes)" if git.get("dirty") else "")
             if git.get("commit") else "not recorded")]
    for split, digest in (info.get("data_sha256") or {}).items():
        rows.append((f"data sha256 ({split} token ids)", f"`{digest}`"))
    if info.get("tokenizer_sha256"):
        rows.append(("tokenizer sha256", f"`{info['tokenizer_sha256']}`"))
    for name, digest in facts.weight_hashes.items():
        rows.append((f"`{name}` sha256", f"`{digest}`"))
    for package, version in (info.get("versions") or {}).items():
        if version:
            rows.append((package, version))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"## Provenance\n\n| | |\n|---|---|\n{table}"


def evaluation(facts: RunFacts) -> str:
    lines = ["## Evaluation", ""]
    validation = [entry for entry in facts.log_history if "eval_loss" in entry]
    if validation:
        last = validation[-1]
        lines.append(f"Validation loss {last['eval_loss']:.4f} at step {last.get('step', '?')}.")
    if facts.eval_scores:
        from ..evaluation.report import markdown_table

        lines += ["", markdown_table([{"name": facts.name, "chat_template_applied": False, "scores": facts.eval_scores}])]
    step, during_training = training_scores(facts.log_history)
    if during_training:
        rows = "\n".join(f"| {task} | {metric} | {value:.4g} |" for task, metrics in sorted(during_training.items())
                         for metric, value in sorted(metrics.items()))
        lines += ["", f"Scores during training (step {step}; the recipe's `eval_tasks` / `regression_prompts`):", "",
                  "| task | metric | value |", "|---|---|---|", rows]
    if len(lines) == 2:
        lines.append("No evaluation recorded for this run (`hfllm eval` writes one).")
    return "\n".join(lines)
