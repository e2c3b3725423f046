"""`hfllm eval MODEL [MODEL ...] --tasks T1,T2 ...`: evaluate checkpoints with lm-eval in process and report.

Flags follow lm-eval's names. Everything is checked (models exist, tasks resolve and render, --limit) before any
model runs and before anything is written.
"""

import argparse
import re
from pathlib import Path

import torch

from ..errors import HfllmError
from .harness import evaluate_model, load_model, load_tasks, scores
from .report import markdown_table, write_report, write_samples


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Evaluate causal LMs with lm-evaluation-harness.")
    parser.add_argument("models", nargs="+", metavar="MODEL", help="checkpoint folder, adapter folder, .gguf file or Hub id")
    parser.add_argument("--tasks", required=True, help="comma-separated task names, e.g. hfllm_offline or hfllm_synth,arc_easy")
    parser.add_argument("--limit", type=float, help="documents per task (a number below 1 is a fraction)")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--apply_chat_template", action="store_true", help="wrap prompts in the model's chat template")
    parser.add_argument("--output_path", help="folder for results.json, results.md, results.png and samples")
    parser.add_argument("--log_samples", action="store_true", help="also write per-sample logs (needs --output_path)")
    parser.add_argument("--include_path", action="append", help="extra folder of task YAMLs (repeatable)")
    parser.add_argument("--synth_data", help="JSONL (or folder with test.jsonl) for hfllm_synth; default: built-in arithmetic")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def check_args(args: argparse.Namespace) -> None:
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
    args.tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not args.tasks:
        raise HfllmError("--tasks is empty; give task names such as hfllm_offline")
    for spec in args.models:  # cheap checks first: a missing folder fails before any task or model loads
        path = Path(spec)
        if path.is_dir() and not any((path / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise HfllmError(f"'{spec}' is not a model checkpoint (no config.json or adapter_config.json); give a "
                             f"folder written by save_pretrained, a PEFT adapter folder, a .gguf file or a Hub id")


def run_names(models: list[str]) -> list[str]:
    """Short, unique, file-name-safe names for the report columns: the folder name (index added on clashes)."""
    names = [re.sub(r"[^\w.-]+", "_", Path(spec.rstrip("/")).name or spec) for spec in models]
    return [f"{name}-{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def main(argv: list[str], prog: str = "hfllm eval") -> int:
    args = build_parser(prog).parse_args(argv)
    check_args(args)
    metadata = {"synth_data": args.synth_data} if args.synth_data else None
    tasks = load_tasks(args.tasks, args.include_path, metadata)

    runs, samples = [], {}
    for spec, name in zip(args.models, run_names(args.models)):
        model, tokenizer = load_model(spec)
        if args.apply_chat_template and not tokenizer.chat_template:
            raise HfllmError(f"model '{spec}' has no chat template; drop --apply_chat_template for it")
        results = evaluate_model(
            model.to(args.device), tokenizer, tasks, args.limit, args.batch_size, args.apply_chat_template, args.log_samples
        )
        runs.append({
            "name": name,
            "model": spec,
            "architecture": type(model).__name__,
            "chat_template_applied": args.apply_chat_template,
            "has_chat_template": bool(tokenizer.chat_template),
            "scores": scores(results),
        })
        samples[name] = results.get("samples", {})
        del model

    print(markdown_table(runs))
    if args.output_path:
        config = {key: value for key, value in vars(args).items() if key != "models"}
        for path in write_report(runs, config, args.output_path):
            print(f"wrote {path}")
        for name in samples if args.log_samples else []:
            write_samples(samples[name], name, args.output_path)
    return 0
