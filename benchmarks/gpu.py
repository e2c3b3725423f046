"""The GPU speed path measured: tokens/s, MFU and peak memory of the 125m and 350m recipes, one row per option.

    bash benchmarks/gpu.sh                                   # on a GPU: writes the GPU section of benchmarks/RESULTS.md
    python3 benchmarks/gpu.py --device cpu --tiny            # dry run of the whole pipeline at a tiny size on CPU

Every row is the recipe itself through `hfllm.run_pretrain.main` (the same Trainer, bf16, optimizer, micro-batch and
block size; torch_compile as the recipe says unless the row changes it), in this process one after another, 350m
first: hfllm compile | transformers Llama compile | + Liger | + FP8 | + Liger + FP8 + FA2 | + FA2 | hfllm eager.
`transformers Llama` is a `LlamaForCausalLM` folder of the same shape (`native_config_from`) given as `model:`.
Liger's RoPE replaces a function of hfllm's model file for the process; it is put back after each row. The table is
written after every row, and rows that would start after `--budget_s` are listed as not run, so one command fits
the ~10 minutes a lent GPU machine gives a command (`--recipes 350m`, `--rows ...` to choose).
What the benchmark changes in the recipes, for every row alike: the data (the embedded Shakespeare corpus with one
BPE tokenizer of `--vocab_size` trained once: the machine has no Hub), one micro-batch per optimizer step (no
gradient accumulation, so a few steps suffice), `--steps` steps with a 10% warmup, no evaluation, no samples.
Throughput is the mean of the Trainer's tokens/s logs after the first `--skip` steps (compilation happens in step 1);
MFU is the Trainer's (hfllm.training.mfu: 6N + attention FLOPs per token over the GPU's dense bf16 peak); peak
memory is torch.cuda.max_memory_allocated. A row whose GPU or package is missing is skipped with hfllm's reason.
"""

import argparse
import datetime
import gc
import time
import json
import re
import shlex
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hfllm.data import shakespeare_corpus, train_tokenizer  # noqa: E402
from hfllm.errors import HfllmError  # noqa: E402
from hfllm.models import get_preset, modeling_hfllm  # noqa: E402
from hfllm.models.convert import native_config_from  # noqa: E402
from hfllm.recipe import read_yaml  # noqa: E402
from hfllm.run_pretrain import main as pretrain  # noqa: E402

RECIPES = ["350m", "125m"]  # 350m first: the targets are about it
# (row, model: "hfllm" or "llama", extra recipe keys), most telling first: a run that spends --budget_s skips the rest
ROWS = [
    ("hfllm compile", "hfllm", []),
    ("transformers Llama compile", "llama", []),
    ("hfllm compile + Liger", "hfllm", ["--use_liger_kernel", "true"]),
    ("hfllm compile + FP8", "hfllm", ["--fp8", "true"]),
    ("hfllm compile + Liger + FP8 + FA2", "hfllm",
     ["--use_liger_kernel", "true", "--fp8", "true", "--attn_implementation", "flash_attention_2"]),
    ("hfllm compile + FA2", "hfllm", ["--attn_implementation", "flash_attention_2"]),
    ("hfllm eager", "hfllm", ["--torch_compile", "false"]),
]
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2}
PLAIN_ROPE = modeling_hfllm.apply_rotary_pos_emb  # Liger replaces it for the process; put back after each row
RESULTS_BEGIN, RESULTS_END = "<!-- benchmarks/gpu.sh: begin -->", "<!-- benchmarks/gpu.sh: end -->"


def recipe_path(name: str) -> Path:
    return ROOT / "recipes" / f"{name}.yaml"


def base_flags(args, out: Path, tokenizer_dir: Path, text_dir: Path) -> list[str]:
    """The keys every row changes alike (see the module docstring)."""
    flags = ["--output_dir", str(out), "--overwrite_output_dir", "true", "--max_steps", str(args.steps),
             "--logging_steps", str(args.logging_steps), "--warmup_steps", "0.1", "--eval_strategy", "no",
             "--num_samples", "0", "--report_to", "none", "--disable_tqdm", "true", "--save_steps", str(10 * args.steps),
             "--dataset", "null", "--dataset_config", "null", "--streaming", "false",
             "--train_files", str(text_dir / "*.txt"),  # files: datasets caches their tokenization across rows
             "--tokenizer", str(tokenizer_dir), "--global_batch_tokens", "null", "--gradient_accumulation_steps", "1",
             "--preprocessing_num_workers", str(args.workers), "--dataloader_num_workers", "2"]
    if args.tiny:
        flags += ["--block_size", "64", "--per_device_train_batch_size", "4", "--bf16", "false",
                  "--dataloader_num_workers", "0", "--torch_num_threads", "1"]
    return flags


def shape_flags(args) -> list[str]:
    return [item for key, value in TINY_SHAPE.items() for item in (f"--{key}", str(value))] if args.tiny else []


def llama_folder(recipe: str, args, tokenizer, folder: Path) -> Path:
    """A LlamaForCausalLM of the recipe's shape (random weights) with the benchmark's vocabulary."""
    from transformers import LlamaForCausalLM

    config = get_preset(read_yaml(str(recipe_path(recipe)))["model"], **(TINY_SHAPE if args.tiny else {}))
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    LlamaForCausalLM(native_config_from(config)).save_pretrained(folder)
    return folder


def measure(argv: list[str], out: Path, args) -> dict:
    """Train one row; its steady tokens/s, MFU, peak memory and last loss from the run's own logs."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    pretrain(argv)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steady = [entry for entry in history if "tokens_per_second" in entry and entry["step"] > args.skip]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    if not steady:
        raise HfllmError(f"no tokens/s logged after step {args.skip}; raise --steps")
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"tokens_per_second": sum(e["tokens_per_second"] for e in steady) / len(steady),
            "mfu": sum(e["mfu"] for e in steady) / len(steady), "peak_gib": peak, "loss": losses[-1]}


def run_recipe(recipe: str, args, tokenizer, work: Path, rows: list[dict], save) -> None:
    """Measure each row of `recipe` into `rows`, calling `save()` after each one (a run cut short keeps its table)."""
    common = base_flags(args, work / "run", work / "tokenizer", work / "text")
    for name, model, extra in ROWS:
        if args.rows and not any(key.lower() in name.lower() for key in args.rows):
            continue
        row = {"recipe": recipe, "row": name}
        rows.append(row)
        if time.perf_counter() - args.start > args.budget_s:
            row["skipped"] = f"not run: the time budget of {args.budget_s} s was spent (--budget_s)"
            continue
        try:
            if model == "llama":
                folder = llama_folder(recipe, args, tokenizer, work / "llama")
                argv = [str(recipe_path(recipe)), *common, "--model", str(folder), *extra]
            else:
                argv = [str(recipe_path(recipe)), *common, *shape_flags(args), *extra]
            print(f"==> {recipe} / {name}: hfllm pretrain {shlex.join(argv)}", flush=True)
            row |= measure(argv, work / "run", args)
        except HfllmError as error:  # hfllm's one line: the GPU or package this row needs is missing
            row["skipped"] = str(error)
        except Exception as error:  # noqa: BLE001 - a kernel failing on this GPU is a result, not the end of the table
            row["skipped"] = f"failed: {type(error).__name__}: {' '.join(str(error).split())[:200]}"
        finally:
            modeling_hfllm.apply_rotary_pos_emb = PLAIN_ROPE
        print(f"<== {row}", flush=True)
        save()
        gc.collect()


def table(rows: list[dict]) -> str:
    lines = ["| recipe | row | tokens/s | vs Llama | MFU | peak GiB | loss @last | note |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        llama = next((r for r in rows if r["recipe"] == row["recipe"] and r["row"].startswith("transformers")
                      and "skipped" not in r), None)
        if "skipped" in row:
            lines.append(f"| {row['recipe']} | {row['row']} | | | | | | skipped: {row['skipped']} |")
            continue
        ratio = f"{row['tokens_per_second'] / llama['tokens_per_second']:.2f}x" if llama else ""
        peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "n/a (CPU)"
        lines.append(f"| {row['recipe']} | {row['row']} | {row['tokens_per_second']:,.0f} | {ratio} | "
                     f"{100 * row['mfu']:.1f}% | {peak} | {row['loss']:.3f} | |")
    return "\n".join(lines)


def write_results(path: Path, rows: list[dict], command: str) -> None:
    """Replace the benchmark's block in RESULTS.md (or add it at the end of the GPU section's introduction)."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (tiny dry run, not a measurement)"
    block = (f"{RESULTS_BEGIN}\n## GPU speed path: {device}\n\n"
             f"{datetime.date.today().isoformat()}, torch {torch.__version__}, command: `{command}`\n\n"
             f"{table(rows)}\n{RESULTS_END}")
    text = path.read_text() if path.exists() else "# GPU results\n"
    if RESULTS_BEGIN in text:
        text = re.sub(re.escape(RESULTS_BEGIN) + ".*?" + re.escape(RESULTS_END), lambda _: block, text, flags=re.S)
    elif "\n## " in text:  # before the first section: under the GPU section's introduction
        head, _, rest = text.partition("\n## ")
        text = f"{head}\n{block}\n\n## {rest}"
    else:
        text = f"{text.rstrip()}\n\n{block}\n"
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=RECIPES, choices=RECIPES)
    parser.add_argument("--rows", nargs="+", help="only rows whose name contains one of these words (e.g. Liger FP8)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=10, help="steps left out of the steady tokens/s")
    parser.add_argument("--logging_steps", type=int, default=5)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--workers", type=int, default=8, help="processes for tokenization")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape, float32, no GPU needed: a dry run")
    parser.add_argument("--budget_s", type=int, default=480, help="rows that would start after this many seconds "
                        "are listed as not run (the device lends ~10 minutes per command)")
    parser.add_argument("--results", type=Path, help="default: benchmarks/RESULTS.md on a GPU, none for --tiny")
    args = parser.parse_args()
    args.start = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU and none is visible; dry run on CPU: "
              "python3 benchmarks/gpu.py --device cpu --tiny", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.tiny:
        print("--device cpu measures nothing at the recipes' size; add --tiny for a dry run", file=sys.stderr)
        return 2
    if args.tiny:
        args.steps, args.skip, args.logging_steps, args.vocab_size, args.workers = 6, 2, 2, 512, 1
        args.budget_s = 10**6  # a CPU compiles slowly; the dry run is about the pipeline, not time
    results = args.results or (None if args.tiny else ROOT / "benchmarks" / "RESULTS.md")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        texts = shakespeare_corpus()["train"][: 12 if args.tiny else None]  # one play per file: one document each
        (work / "text").mkdir()
        for i, text in enumerate(texts):
            (work / "text" / f"{i:03d}.txt").write_text(text)
        tokenizer = train_tokenizer("bpe", texts, args.vocab_size)
        tokenizer.save_pretrained(work / "tokenizer")
        rows: list[dict] = []
        command = "bash benchmarks/gpu.sh " + shlex.join(sys.argv[1:])

        def save() -> None:
            if results is not None:
                write_results(results, rows, command)

        for recipe in args.recipes:
            run_recipe(recipe, args, tokenizer, work, rows, save)
    print(table(rows))
    if results is not None:
        print(f"written to {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
