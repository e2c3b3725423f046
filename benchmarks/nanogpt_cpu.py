"""hfllm vs nanoGPT vs transformers' LlamaForCausalLM at nanoGPT's CPU baseline shape, in one run.

    OMP_NUM_THREADS=1 python3 benchmarks/nanogpt_cpu.py [--max_steps 2000] [--out runs/benchmarks]
    python3 benchmarks/nanogpt_cpu.py --speedrun --nanogpt DIR [--rounds 2] [--threads 1] [--variant NAME:FLAGS ...]

--speedrun (issue 13, part 5): whole processes, as a user runs them, timed from the command to the evaluation that
first reaches the target: nanoGPT's own `train.py` (a checkout of github.com/karpathy/nanoGPT in DIR) at its README's
CPU command, on hfllm's text and split (written as its data/shakespeare_char/{train,val}.bin and meta.pkl); the
target is its step-2000 validation loss. Then `hfllm pretrain` with recipes/shakespeare-char-speedrun.yaml, each
`--variant` (the speedrun recipe plus flags, for the ablation) and recipes/shakespeare-char.yaml, each with
`--stop_at_eval_loss` at that target. Rounds interleave the runs so that machine load hits them alike; every run gets
the same thread count; the load average is recorded before each run. Caches are warmed first, untimed (the tokenized
data, inductor's graphs for the compiled recipe). Writes OUT/nanogpt_speedrun.json.

Five trainings on the same text and split (the embedded Shakespeare corpus, char-level tokens), one after another:
  1. nanoGPT: a faithful plain-PyTorch reproduction of nanoGPT's `model.py` + `train.py` at the settings of its README
     CPU command (n_layer 4, n_head 4, n_embd 128, block 64, batch 12, lr 1e-3, 100 warmup, cosine to 1e-4 at 2000,
     AdamW betas (0.9, 0.99), weight decay 0.1, grad clip 1, dropout 0, no bias, eval_iters 20 every 250 steps,
     --compile=False).
  2. hfllm: `recipes/shakespeare-char.yaml` through `hfllm.run_pretrain.main` (Trainer, torch_compile: true).
  3. hfllm eager: the same with `--torch_compile false`.
  4. transformers Llama: the recipe with `model:` a LlamaForCausalLM folder of the same shape (same Trainer, compiled).
  5. nanoGPT compiled: nanoGPT with torch.compile (its train.py default; not its README's CPU command).
Reported per run: tokens/s over steps 51..max_steps (training steps only: no evaluation, no compilation, which
happens in step 1), tokens/s overall (all steps over the whole loop, evaluations and compilation included), final
validation loss, wall time to reach nanoGPT's final validation loss (first evaluation at or below it), MFU
(FLOPs/token from hfllm.training.mfu against a measured CPU matmul peak). Validation losses are on 240 sequences of
64 tokens (nanoGPT: 20 random batches of 12). Timing covers the training loop only (not data preparation).
"""

import argparse
import json
import math
import os
import pickle
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hfllm.run_pretrain import main as pretrain  # noqa: E402
from hfllm import data  # noqa: E402
from hfllm.training.mfu import measure_matmul_flops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "shakespeare-char.yaml"
SPEEDRUN = ROOT / "recipes" / "shakespeare-char-speedrun.yaml"
# nanoGPT README's CPU command (its "I only have a macbook" section)
NANOGPT_COMMAND = ["train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                   "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
                   "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]
WARMUP_STEPS = 50  # steps left out of the steady throughput (torch.compile compiles in the first one)


# ---- nanoGPT (model.py, condensed; bias=False, dropout=0)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.n_head = n_head

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd, bias=False), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd, bias=False))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size=64, n_layer=4, n_head=4, n_embd=128):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets):
        pos = torch.arange(idx.size(1))
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def train_nanogpt(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int, max_steps: int,
                  compile: bool = False) -> dict:
    torch.manual_seed(1337)
    block, batch, lr, min_lr, warmup = 64, 12, 1e-3, 1e-4, 100
    model = GPT(vocab_size)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.99), fused=True)

    def get_batch(ids):
        ix = torch.randint(len(ids) - block, (batch,))
        x = torch.stack([ids[i:i + block] for i in ix])
        y = torch.stack([ids[i + 1:i + 1 + block] for i in ix])
        return x, y

    def get_lr(it):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        ratio = (it - warmup) / (max_steps - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    @torch.no_grad()
    def val_loss():
        model.eval()
        losses = [model(*get_batch(val_ids)).item() for _ in range(20)]
        model.train()
        return sum(losses) / len(losses)

    raw_model = model
    if compile:  # nanoGPT's own default (train.py compile=True); its README's CPU command sets --compile=False
        model = torch.compile(model)
    evals, steady_seconds, start = [], 0.0, time.perf_counter()
    for it in range(max_steps + 1):
        if it % 250 == 0 or it == max_steps:
            evals.append({"step": it, "eval_loss": val_loss(), "elapsed_seconds": time.perf_counter() - start})
        if it == max_steps:
            break
        step_start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it)
        loss = model(*get_batch(train_ids))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if it >= WARMUP_STEPS:  # steps 51..max_steps, as for the Trainer runs
            steady_seconds += time.perf_counter() - step_start
    seconds = time.perf_counter() - start
    model = raw_model
    n_params = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    flops = 6 * n_params + 12 * 4 * 128 * block  # same formula as hfllm.training.mfu
    return {"evals": evals, "seconds": seconds, "tokens": max_steps * batch * block, "flops_per_token": flops,
            "parameters": n_params, "steady_tokens_per_second": (max_steps - WARMUP_STEPS) * batch * block / steady_seconds}


# ---- hfllm and Llama through the pretraining entry point


def train_recipe(out: Path, max_steps: int, *extra: str) -> dict:
    pretrain([str(RECIPE), "--output_dir", str(out), "--max_steps", str(max_steps), "--report_to", "none",
              "--disable_tqdm", "true", "--save_steps", str(10 * max_steps), "--num_samples", "1", *extra])
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    info = json.loads((out / "run_info.json").read_text())
    evals = [e for e in history if "eval_loss" in e]
    end = next(e for e in history if "train_runtime" in e)
    # logs every 50 steps carry the tokens/s of the steps since the previous log, evaluations left out
    logs = [e for e in history if "tokens_per_second" in e and e["step"] > WARMUP_STEPS]
    steps = [e["step"] - previous["step"] for previous, e in zip([{"step": WARMUP_STEPS}] + logs, logs)]
    tokens = [n * info["tokens_per_step"] for n in steps]
    steady = sum(tokens) / sum(t / e["tokens_per_second"] for t, e in zip(tokens, logs))
    return {"evals": evals, "seconds": end["train_runtime"], "tokens": info["tokens_planned"],
            "flops_per_token": info["flops_per_token"], "parameters": info["parameters"]["total"],
            "steady_tokens_per_second": steady}


def llama_folder(folder: Path, vocab_size: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         tie_word_embeddings=True, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def summarise(name: str, run: dict, target: float, peak: float) -> dict:
    reached = next((e for e in run["evals"] if e["eval_loss"] <= target), None)
    tokens_per_second = run["steady_tokens_per_second"]
    return {
        "run": name,
        "parameters": run["parameters"],
        "tokens_per_second": round(tokens_per_second),
        "tokens_per_second_overall": round(run["tokens"] / run["seconds"]),
        "final_val_loss": round(run["evals"][-1]["eval_loss"], 4),
        "seconds_total": round(run["seconds"], 1),
        "seconds_to_target": round(reached["elapsed_seconds"], 1) if reached else None,
        "step_at_target": reached["step"] if reached else None,
        "mfu": round(tokens_per_second * run["flops_per_token"] / peak, 4),
    }


def run_benchmark(max_steps: int, out: Path) -> list[dict]:
    raw = data.load_text_datasets(dataset="shakespeare")
    tokenizer = data.load_or_train_tokenizer("char", raw["train"]["text"], 4096)
    encode = lambda texts: torch.tensor([i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]])  # noqa: E731
    train_ids, val_ids = encode(raw["train"]["text"]), encode(raw["validation"]["text"])
    peak = measure_matmul_flops("cpu", torch.float32)

    runs = {"nanoGPT": train_nanogpt(train_ids, val_ids, len(tokenizer), max_steps)}
    target = runs["nanoGPT"]["evals"][-1]["eval_loss"]
    with tempfile.TemporaryDirectory() as tmp:
        runs["hfllm"] = train_recipe(Path(tmp) / "hfllm", max_steps)
        runs["hfllm eager"] = train_recipe(Path(tmp) / "eager", max_steps, "--torch_compile", "false")
        init = str(llama_folder(Path(tmp) / "init", len(tokenizer)))
        runs["transformers Llama"] = train_recipe(Path(tmp) / "llama", max_steps, "--model", init)
    runs["nanoGPT compiled"] = train_nanogpt(train_ids, val_ids, len(tokenizer), max_steps, compile=True)
    rows = [summarise(name, run, target, peak) for name, run in runs.items()]
    out.mkdir(parents=True, exist_ok=True)
    result = {"max_steps": max_steps, "target_val_loss": target, "peak_flops_measured": peak,
              "threads": torch.get_num_threads(), "rows": rows}
    (out / "nanogpt_cpu.json").write_text(json.dumps(result, indent=2))
    return rows


# ---- --speedrun: whole processes, command to target


def timed_lines(command: list[str], cwd: Path, threads: int, pattern: str) -> tuple[list[tuple[float, str]], float]:
    """Run `command`; the seconds since its start at which each stdout line matching `pattern` appeared, and the
    load average (1 min) just before the start."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marks, tail = [], []
    for line in process.stdout:
        tail = (tail + [line])[-20:]
        if re.search(pattern, line):
            marks.append((time.perf_counter() - start, line))
    if process.wait() != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{''.join(tail)}")
    return marks, load


def prepare_nanogpt(nanogpt: Path, work: Path) -> Path:
    """A copy of nanoGPT's train.py, model.py, configurator.py and config with hfllm's text and split as its
    shakespeare_char data (char ids of hfllm's tokenizer; documents concatenated, as in run_benchmark)."""
    import numpy as np

    folder = work / "nanoGPT"
    for name in ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text((nanogpt / name).read_text())
    raw = data.load_text_datasets(dataset="shakespeare")
    tokenizer = data.load_or_train_tokenizer("char", raw["train"]["text"], 4096)
    data_dir = folder / "data" / "shakespeare_char"
    data_dir.mkdir(parents=True)
    for split, name in (("train", "train.bin"), ("validation", "val.bin")):
        ids = [i for text in raw[split]["text"] for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
        np.array(ids, dtype=np.uint16).tofile(data_dir / name)
    (data_dir / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": len(tokenizer)}))
    return folder


def run_nanogpt(folder: Path, threads: int) -> dict:
    marks, load = timed_lines([sys.executable, *NANOGPT_COMMAND], folder, threads, r"^step \d+: train loss|^iter 0:")
    evals = [(int(re.search(r"step (\d+)", line)[1]), float(re.search(r"val loss ([\d.]+)", line)[1]), t)
             for t, line in marks if line.startswith("step")]
    step, loss, seconds = evals[-1]
    first_step = next(t for t, line in marks if line.startswith("iter 0:"))  # its step-0 evaluation included
    return {"run": "nanoGPT train.py", "target": loss, "seconds_to_target": round(seconds, 2), "step_at_target": step,
            "seconds_to_first_step": round(first_step, 2), "load_average": load}


def run_hfllm(name: str, recipe: Path, flags: list[str], target: float, threads: int, out: Path) -> dict:
    """`hfllm pretrain` as its own process; the time of the first evaluation at or below `target`."""
    command = [sys.executable, "-m", "hfllm.cli", "pretrain", str(recipe), "--output_dir", str(out),
               "--overwrite_output_dir", "true", "--stop_at_eval_loss", str(target), "--torch_num_threads", str(threads),
               "--report_to", "none", "--disable_tqdm", "true", "--num_samples", "0", *flags]
    marks, load = timed_lines(command, ROOT, threads, r"'eval_loss'")
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    evals = [e for e in history if "eval_loss" in e]
    reached = next((i for i, e in enumerate(evals) if e["eval_loss"] <= target), None)
    first = next(e for e in history if "seconds_to_first_step" in e)
    return {"run": name, "seconds_to_target": round(marks[reached][0], 2) if reached is not None else None,
            "step_at_target": evals[reached]["step"] if reached is not None else None,
            "eval_loss": evals[reached if reached is not None else -1]["eval_loss"],
            "seconds_to_first_step": first["seconds_to_first_step"], "load_average": load}


def run_speedrun(nanogpt: Path, rounds: int, threads: int, variants: list[str], out: Path) -> list[dict]:
    runs = [("speedrun", SPEEDRUN, [])]
    runs += [(v.split(":", 1)[0], SPEEDRUN, shlex.split(v.split(":", 1)[1])) for v in variants]
    runs.append(("shakespeare-char", RECIPE, []))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = prepare_nanogpt(nanogpt, Path(tmp))
        for name, recipe, flags in runs:  # warm the caches (tokenized data, inductor), untimed
            run_hfllm(name, recipe, [*flags, "--max_steps", "2", "--eval_steps", "2"], 0.0, threads, Path(tmp) / "warm")
        for round_index in range(rounds):
            nano = run_nanogpt(folder, threads)
            rows.append({"round": round_index, **nano})
            for name, recipe, flags in runs:
                row = run_hfllm(name, recipe, flags, nano["target"], threads, Path(tmp) / name)
                ratio = row["seconds_to_target"] / nano["seconds_to_target"] if row["seconds_to_target"] else None
                rows.append({"round": round_index, **row, "ratio": round(ratio, 3) if ratio else None})
                print(json.dumps(rows[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "nanogpt_speedrun.json").write_text(json.dumps({"threads": threads, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_steps", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--speedrun", action="store_true", help="whole processes vs nanoGPT's own train.py")
    parser.add_argument("--nanogpt", type=Path, help="a checkout of github.com/karpathy/nanoGPT (with --speedrun)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variant", action="append", default=[], help="NAME:FLAGS, the speedrun recipe plus flags")
    cli = parser.parse_args()
    if cli.speedrun:
        if cli.nanogpt is None or not (cli.nanogpt / "train.py").is_file():
            parser.error("--speedrun needs --nanogpt DIR, a checkout of https://github.com/karpathy/nanoGPT")
        for row in run_speedrun(cli.nanogpt, cli.rounds, cli.threads, cli.variant, cli.out):
            print(row)
        sys.exit(0)
    rows = run_benchmark(cli.max_steps, cli.out)
    print(f"{'run':<20}{'params':>9}{'tok/s':>9}{'overall':>9}{'val loss':>10}{'total s':>9}{'s to target':>13}"
          f"{'MFU':>8}")
    for r in rows:
        print(f"{r['run']:<20}{r['parameters']:>9}{r['tokens_per_second']:>9}{r['tokens_per_second_overall']:>9}"
              f"{r['final_val_loss']:>10}{r['seconds_total']:>9}{str(r['seconds_to_target']):>13}{r['mfu']:>8}")
