"""GGUF export of SmolLM2-135M-Instruct per quantization: file size and held-out bits per byte (`hfllm eval` on the
GGUF file, task hfllm_shakespeare_ppl, dequantized by transformers' GGUF reader).

    OMP_NUM_THREADS=1 python3 benchmarks/gguf_export.py --out runs/benchmarks/gguf [--quants f16,q8_0] [--limit 20]

Writes OUT/<quant>/ (the export) and OUT/results.json; prints a markdown table. q4_k_m needs llama-cpp-python
(built once by hfllm.assets.llama_cpp, minutes).
"""

import argparse
import json
import time
from pathlib import Path

from hfllm.assets import smollm2_hfllm_dir
from hfllm.cli import main as hfllm
from hfllm.models.convert import export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/benchmarks/gguf")
    parser.add_argument("--quants", default="f32,f16,bf16,q8_0,q4_0,q4_k_m")
    parser.add_argument("--limit", default=None, help="passages of hfllm_shakespeare_ppl (default: all)")
    args = parser.parse_args()
    out, results = Path(args.out), {}
    for quant in args.quants.split(","):
        start = time.time()
        path = next((out / quant).glob("*.gguf"), None) or export(smollm2_hfllm_dir(), out / quant, "gguf", quant)
        export_s = time.time() - start
        eval_dir = out / f"eval-{quant}"
        if not (eval_dir / "results.json").exists():
            hfllm(["eval", str(path), "--tasks", "hfllm_shakespeare_ppl", "--output_path", str(eval_dir),
                   *(["--limit", args.limit] if args.limit else [])])
        scores = json.loads((eval_dir / "results.json").read_text())
        results[quant] = dict(file=path.name, mb=path.stat().st_size / 1e6, export_s=round(export_s, 1), eval=scores)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(quant, results[quant]["mb"], flush=True)


if __name__ == "__main__":
    main()
