"""`hfllm eval`: evaluate checkpoints with lm-eval in process and report.

    hfllm eval MODEL [MODEL ...] --tasks T1,T2 [--limit N --batch_size B --apply_chat_template --output_path DIR ...]
    hfllm eval recipes/eval/offline_suite.yaml [--limit 5 ...]        the same keys as a YAML recipe
    hfllm eval MODEL --tasks hfllm_shakespeare_ppl --load_in_4bit     bitsandbytes 4-bit (or --load_in_8bit) weights

Flags follow lm-eval's names; both forms go through `hfllm.recipe` (the one recipe loader). Everything is checked
(models exist, tasks resolve and render, --limit) before any model runs and before anything is written.

In Python: `hfllm.evaluate("runs/sft", tasks="hfllm_offline", limit=5)` -> an `Evaluation` (the scores as data).
"""

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import COMPUTE_DTYPES, QUANT_TYPES, load, quantization_config, spec_kind
from ..errors import HfllmError
from ..recipe import Recipe, RecipeInput, load_recipe, recipe_argv
from .harness import evaluate_model, load_tasks, scores
from .report import markdown_table, write_report, write_sample_logs


@dataclass
class EvalArguments:
    models: list[str] = field(
        default_factory=list, metadata={"help": "checkpoint folders, adapter folders, .gguf files or Hub ids"}
    )
    tasks: list[str] = field(
        default_factory=list, metadata={"help": "task names, comma-separated, e.g. hfllm_offline or hfllm_synth,arc_easy"}
    )
    limit: float | None = field(default=None, metadata={"help": "documents per task (a number below 1 is a fraction)"})
    batch_size: int = field(default=1, metadata={"help": "documents per forward pass"})
    apply_chat_template: bool = field(default=False, metadata={"help": "wrap prompts in the model's chat template"})
    output_path: str | None = field(default=None, metadata={"help": "folder for results.json/.md/.png and samples"})
    log_samples: bool = field(default=False, metadata={"help": "also write per-sample logs (needs output_path)"})
    include_path: list[str] | None = field(default=None, metadata={"help": "extra folders of task YAMLs"})
    synth_data: str | None = field(
        default=None, metadata={"help": "JSONL (or folder with test.jsonl) for hfllm_synth; default: built-in arithmetic"}
    )
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata={"help": "cpu, cuda, ..."})
    load_in_4bit: bool = field(default=False, metadata={"help": "bitsandbytes 4-bit weights (as hfllm generate)"})
    load_in_8bit: bool = field(default=False, metadata={"help": "bitsandbytes 8-bit weights (LLM.int8)"})
    bnb_4bit_quant_type: str | None = field(default=None, metadata={"help": f"{' or '.join(QUANT_TYPES)} (default nf4)"})
    bnb_4bit_use_double_quant: bool = field(default=False, metadata={"help": "quantize the 4-bit scales too"})
    bnb_4bit_compute_dtype: str | None = field(
        default=None, metadata={"help": f"{', '.join(COMPUTE_DTYPES)} (default float32)"}
    )

    def quantization_name(self) -> str | None:
        """"4bit-nf4", "4bit-fp4", "8bit" or None, for the report."""
        if self.load_in_8bit or not self.load_in_4bit:
            return "8bit" if self.load_in_8bit else None
        return f"4bit-{self.bnb_4bit_quant_type or 'nf4'}"

    def quantization(self):
        """The checked `BitsAndBytesConfig` of the bnb keys, or None."""
        return quantization_config(
            load_in_4bit=self.load_in_4bit, load_in_8bit=self.load_in_8bit, bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=self.bnb_4bit_compute_dtype,
        )


def parse_args(argv: list[str], prog: str) -> tuple[EvalArguments, Recipe]:
    """`RECIPE.yaml [--key value ...]` or `MODEL [MODEL ...] --key value ...`, checked."""
    if argv and (isinstance(argv[0], Mapping) or argv[0].endswith((".yaml", ".yml"))):
        recipe = load_recipe(argv, (EvalArguments,), prog)
    else:
        models = [arg for arg in argv[: next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))]]
        recipe = load_recipe(argv[len(models):], (EvalArguments,), prog, values={"models": models} if models else {})
    (args,) = recipe.args
    args.models = [os.path.expanduser(model) for model in args.models]
    args.tasks = [name.strip() for entry in args.tasks for name in entry.split(",") if name.strip()]
    args.output_path = os.path.expanduser(args.output_path) if args.output_path else None
    check_args(args)
    return args, recipe


def check_args(args: EvalArguments) -> None:
    if not args.models:
        raise HfllmError("give at least one model: hfllm eval MODEL [MODEL ...] --tasks ..., or a recipe with models:")
    if not args.tasks:
        raise HfllmError("give the tasks: --tasks hfllm_offline (or tasks: in the recipe)")
    if args.limit is not None and args.limit <= 0:
        raise HfllmError(f"--limit must be positive (got {args.limit:g}); leave it out to evaluate every document")
    if args.limit is not None and args.limit >= 1:
        if args.limit != int(args.limit):
            raise HfllmError(f"--limit {args.limit:g} is neither a whole number of documents nor a fraction below 1")
        args.limit = int(args.limit)
    if args.batch_size < 1:
        raise HfllmError(f"--batch_size must be at least 1 (got {args.batch_size})")
    if args.log_samples and not args.output_path:
        raise HfllmError("--log_samples needs --output_path to write the samples to")
    if args.output_path and Path(args.output_path).is_file():
        raise HfllmError(f"--output_path '{args.output_path}' is a file; give a folder")
    args.quantization()  # one line on a bad combination of the bnb keys
    for spec in args.models:  # cheap checks first: a missing folder fails before any task or model loads
        spec_kind(spec)


def run_names(models: list[str]) -> list[str]:
    """Short, unique, file-name-safe names for the report columns: the folder name (index added on clashes)."""
    names = [re.sub(r"[^\w.-]+", "_", Path(spec.rstrip("/")).name or spec) for spec in models]
    return [f"{name}-{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


PROG = "hfllm eval"  # the API's errors read as the command's


@dataclass
class Evaluation:
    """What `hfllm eval` measured: a run per model (name, model, architecture, quantization, chat template, scores)
    and the report files written (none without `output_path`)."""

    runs: list[dict[str, Any]]
    files: list[Path]

    @property
    def scores(self) -> dict[str, dict[str, dict[str, float]]]:
        """{model name: {task: {metric: value}}}; names as in the report's columns (the folder's name)."""
        return {run["name"]: run["scores"] for run in self.runs}

    @property
    def report_path(self) -> Path | None:
        """results.md, when an `output_path` was given."""
        return next((path for path in self.files if path.name == "results.md"), None)

    def __str__(self) -> str:
        return markdown_table(self.runs)


def evaluate(models: str | os.PathLike | list[str | os.PathLike] | None = None, *, recipe: RecipeInput | None = None,
             tasks: str | list[str] | None = None, **overrides: Any) -> Evaluation:
    """Evaluate models on lm-eval tasks in process (`hfllm eval`): the offline suite, hfllm's own tasks, or any
    lm-eval task whose data is at hand.

    Args:
        models: checkpoint folders, adapter folders, .gguf files or Hub ids (one or a list); or `models:` in the recipe.
        recipe: an eval recipe (a YAML path such as "recipes/eval/offline_suite.yaml", or its mapping).
        tasks: task names, a list or comma-separated ("hfllm_offline", "hfllm_synth,arc_easy").
        **overrides: the recipe's keys: `limit` (documents per task; below 1 a fraction), `batch_size`,
            `apply_chat_template`, `output_path` (results.json/.md/.png written there), `log_samples`, `device`,
            `load_in_4bit` ... (`hfllm eval --help` lists them).

    Returns:
        An `Evaluation`: `.scores` ({model: {task: {metric: value}}}), `.runs`, `.files` and `.report_path`;
        `print()` shows the Markdown table. Bad input raises `HfllmError` with the line the command prints.

    Example:
        >>> hfllm.evaluate(["runs/base", "runs/sft"], tasks="hfllm_offline", limit=10).scores
    """
    given = {"models": [models] if isinstance(models, (str, os.PathLike)) else models, "tasks": tasks}
    keys = {key: value for key, value in given.items() if value is not None} | overrides
    if recipe is not None:
        argv = recipe_argv(recipe, keys)
    else:
        flags = recipe_argv({}, {key: value for key, value in keys.items() if key != "models"})[1:]
        argv = [*map(os.fspath, keys.get("models", [])), *flags]
    return run(*parse_args(argv, PROG))


def run(args: EvalArguments, recipe: Recipe) -> Evaluation:
    """The checked arguments of `hfllm eval` -> every model evaluated on every task, the report written."""
    metadata = {"synth_data": args.synth_data} if args.synth_data else None
    tasks = load_tasks(args.tasks, args.include_path, metadata)

    runs, samples = [], {}
    quantization = args.quantization()
    for spec, name in zip(args.models, run_names(args.models)):
        model, tokenizer = load(spec, merge_adapter=True, quantization_config=quantization)
        if args.apply_chat_template and not tokenizer.chat_template:
            raise HfllmError(f"model '{spec}' has no chat template; drop --apply_chat_template for it")
        if quantization is None:  # a quantized model is placed by its loader (bitsandbytes refuses moves)
            model = model.to(args.device)
        results = evaluate_model(
            model, tokenizer, tasks, args.limit, args.batch_size, args.apply_chat_template, args.log_samples
        )
        runs.append({
            "name": name,
            "model": spec,
            "architecture": type(model).__name__,
            "quantization": args.quantization_name(),
            "chat_template_applied": args.apply_chat_template,
            "has_chat_template": bool(tokenizer.chat_template),
            "scores": scores(results),
        })
        samples[name] = results.get("samples", {})
        del model

    files = []
    if args.output_path:
        config = {key: value for key, value in vars(args).items() if key != "models"}
        files = [*write_report(runs, config, args.output_path), recipe.save(args.output_path)]
        for name in samples if args.log_samples else []:
            files += write_sample_logs(samples[name], name, args.output_path)
    return Evaluation(runs, files)


def main(argv: list[str], prog: str = "hfllm eval") -> int:
    evaluation = run(*parse_args(argv, prog))
    print(evaluation)
    for path in evaluation.files:
        if not path.name.startswith("samples_"):
            print(f"wrote {path}")
    return 0
