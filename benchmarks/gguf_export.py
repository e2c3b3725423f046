"""GGUF export of SmolLM2-135M-Instruct per quantization: file size, held-out bits per byte (`hfllm eval` on the GGUF
file, task hfllm_shakespeare_ppl, dequantized by transformers' GGUF reader), and llama.cpp's greedy decode speed on
the file next to hfllm's (float32 checkpoint), same prompt, same thread count.

    OMP_NUM_THREADS=1 python3 benchmarks/gguf_export.py --out runs/benchmarks/gguf [--quants f16,q8_0] [--limit 20]
        [--threads 1] [--new_tokens 64] [--no_eval] [--no_llama_cpp]

Writes OUT/<quant>/ (the export), OUT/eval-<quant>/ and OUT/results.json; prints a markdown table. llama.cpp is
`llama-cpp-python` (built once by hfllm.assets.llama_cpp, minutes); q4_k_m needs it to be written at all.
Tokens/s are of one greedy decode of `--new_tokens` tokens after a warm-up, prefill included, batch 1, for both.
llama.cpp also scores the same `--limit` passages from its own logits (its bits per byte, next to hfllm's).
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from hfllm.assets import llama_cpp
from hfllm.models.smollm2 import smollm2_hfllm_dir
from hfllm.checkpoint import load
from hfllm.cli import main as hfllm
from hfllm.inference.generate import complete
from hfllm.inference.options import Decoding
from hfllm.models.convert import export

PROMPT = "The old lighthouse keeper counted the ships until"


def llama_cpp_tokens_per_s(path: Path, new_tokens: int, threads: int) -> dict:
    """llama.cpp greedy-decodes `new_tokens` after PROMPT (or up to its end-of-text token), timed after a warm-up."""
    llama = llama_cpp().Llama(model_path=str(path), n_ctx=512, n_threads=threads, n_threads_batch=threads,
                              verbose=False)
    ids = llama.tokenize(PROMPT.encode(), add_bos=True)

    def decode(count: int) -> list[int]:
        llama.reset()  # no prefix reuse: the prompt is read again every time, as hfllm does
        generated = []
        for token in llama.generate(ids, temp=0.0, top_k=1):
            generated.append(token)
            if len(generated) == count or token == llama.token_eos():
                return generated

    decode(4)
    start = time.perf_counter()
    generated = decode(new_tokens)
    seconds = time.perf_counter() - start
    return dict(tokens=len(generated), tokens_per_s=round(len(generated) / seconds, 1),
                text=llama.detokenize(generated).decode(errors="replace"))


def llama_cpp_bits_per_byte(path: Path, limit: int | None, threads: int) -> dict:
    """Bits per byte of the first `limit` held-out passages computed by llama.cpp on the file: the same token ids as
    hfllm's perplexity (prefix token + text, one window per passage), scored from llama.cpp's logits."""
    from transformers import AutoTokenizer

    from hfllm.evaluation.perplexity import _token_ids
    from hfllm.evaluation.tasks import shakespeare_passages

    tokenizer = AutoTokenizer.from_pretrained(smollm2_hfllm_dir())
    llama = llama_cpp().Llama(model_path=str(path), n_ctx=2048, n_batch=2048, n_ubatch=512, n_threads=threads,
                              n_threads_batch=threads, logits_all=True, verbose=False)
    nll, nbytes = 0.0, 0
    for text in shakespeare_passages()[:limit]:
        ids = _token_ids(tokenizer, text)  # (N+1,)
        llama.reset()
        llama.eval(ids[:-1])
        logits = torch.from_numpy(llama.scores[: len(ids) - 1]).float()  # (N, V)
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        nbytes += len(text.encode("utf-8"))
    return dict(passages=limit, bits_per_byte=nll / nbytes / math.log(2))


def hfllm_tokens_per_s(new_tokens: int) -> dict:
    """`hfllm generate`'s greedy decode (float32 checkpoint) of the same prompt, timed after a warm-up."""
    model, tokenizer = load(smollm2_hfllm_dir(), dtype=torch.float32)
    complete(model, tokenizer, [PROMPT], Decoding(max_new_tokens=4))
    (completion,) = complete(model, tokenizer, [PROMPT], Decoding(max_new_tokens=new_tokens))
    return dict(tokens=completion.completion_tokens, tokens_per_s=round(completion.tokens_per_s, 1),
                text=completion.text)


def table(results: dict) -> str:
    lines = ["| quant | file size (MB) | bits per byte (hfllm eval) | bits per byte (llama.cpp) | llama.cpp tokens/s |",
             "|---|---|---|---|---|"]
    for quant, row in results.items():
        if quant == "hfllm":
            continue
        scores = row.get("eval", {}).get("models", [{}])[0].get("scores", {}).get("hfllm_shakespeare_ppl", {})
        bpb = f"{scores['bits_per_byte']:.4f}" if scores else "-"
        llama_bpb = f"{row['llama_cpp_bpb']['bits_per_byte']:.4f}" if "llama_cpp_bpb" in row else "-"
        speed = row.get("llama_cpp", {}).get("tokens_per_s", "-")
        lines.append(f"| {quant} | {row['mb']:.1f} | {bpb} | {llama_bpb} | {speed} |")
    if "hfllm" in results:
        lines.append(f"| hfllm, float32 checkpoint (torch) | | | | {results['hfllm']['tokens_per_s']} (hfllm) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/benchmarks/gguf")
    parser.add_argument("--quants", default="f32,f16,bf16,q8_0,q4_0,q4_k_m")
    parser.add_argument("--limit", default=None, help="passages of hfllm_shakespeare_ppl (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="threads for llama.cpp and torch alike")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--no_eval", action="store_true", help="skip bits per byte")
    parser.add_argument("--no_llama_cpp", action="store_true", help="skip llama.cpp's tokens/s and bits per byte")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for quant in args.quants.split(","):
        start = time.time()
        path = next((out / quant).glob("*.gguf"), None) or export(smollm2_hfllm_dir(), out / quant, "gguf", quant)
        row = results.setdefault(quant, {})
        row.update(file=path.name, mb=path.stat().st_size / 1e6)
        row.setdefault("export_s", round(time.time() - start, 1))
        eval_dir = out / f"eval-{quant}"
        if not args.no_eval:
            if not (eval_dir / "results.json").exists():
                hfllm(["eval", str(path), "--tasks", "hfllm_shakespeare_ppl", "--output_path", str(eval_dir),
                       *(["--limit", args.limit] if args.limit else [])])
            row["eval"] = json.loads((eval_dir / "results.json").read_text())
        if not args.no_llama_cpp:
            row["llama_cpp"] = dict(threads=args.threads, **llama_cpp_tokens_per_s(path, args.new_tokens, args.threads))
            limit = int(args.limit) if args.limit else None
            row["llama_cpp_bpb"] = llama_cpp_bits_per_byte(path, limit, args.threads)
        results_path.write_text(json.dumps(results, indent=1))
        print(quant, round(row["mb"], 1), row.get("llama_cpp", {}).get("tokens_per_s"), flush=True)
    if not args.no_llama_cpp:
        results["hfllm"] = dict(threads=args.threads, **hfllm_tokens_per_s(args.new_tokens))
        results_path.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
