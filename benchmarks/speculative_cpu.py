"""Speculative decoding on a CPU: SmolLM2-135M-Instruct (hfllm, float32, batch 1, greedy) with prompt lookup,
self-speculation (early exit) and a truncated draft model, on a prompt-copying task and on free generation.

    OMP_NUM_THREADS=1 python3 benchmarks/speculative_cpu.py [--new_tokens 64] [--draft_layers 10] [--out runs/benchmarks]

Methods (the flags of `hfllm generate`, through `hfllm.inference.generate.complete`):
  - greedy: plain decoding, the reference;
  - `--prompt_lookup 10`: drafts copied from the prompt where its last n-gram (up to 2 tokens) occurs earlier;
  - `--assistant_early_exit K`: self-speculation, the draft is the model's own first K of 30 layers;
  - `--assistant DRAFT`: a separate draft model, SmolLM2 truncated to its first K layers (saved once under --out;
    the same computation as the early exit, with its own KV cache).
Tasks (chat template applied): "copy" asks to fix the typos of a given paragraph (the answer mostly copies the
prompt); "free" asks for a short story (nothing to copy).
Reported per (task, method): tokens/s of the generate() call (prefill included), speedup over greedy, acceptance
(accepted draft tokens / drafted tokens, counted by wrapping transformers' candidate generator), tokens per forward
pass of the full model, and whether the tokens equal greedy's.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from transformers.generation.utils import GenerationMixin  # noqa: E402

from hfllm.models.smollm2 import smollm2_hfllm_dir  # noqa: E402
from hfllm.inference.generate import complete  # noqa: E402
from hfllm.inference.options import Decoding, load_assistant, load_for_inference  # noqa: E402

TASKS = {
    "copy": ("Fix the spelling mistakes in this text and return the corrected text only:\n\n"
             "The old lighthouse keeper climed the stairs every evening to light the lamp. He had done this for "
             "fourty years, in storms and in calm wether, and he had never once missed a night. The ships that "
             "passed the rocks did not know his name, but they knew his light, and the saylors were greatful for it."),
    "free": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


class DraftCounter:
    """Wraps the candidate generator of every assisted generate(): drafted and accepted tokens, verification steps."""

    def __init__(self) -> None:
        self.drafted = self.accepted = self.steps = 0
        original = GenerationMixin._get_candidate_generator
        counter = self

        def counted(model, *args, **kwargs):
            generator = original(model, *args, **kwargs)
            get_candidates, update = generator.get_candidates, generator.update_candidate_strategy

            def get(input_ids, *a, **k):
                candidates, logits = get_candidates(input_ids, *a, **k)
                counter.drafted += candidates.shape[1] - input_ids.shape[1]
                return candidates, logits

            def updated(input_ids, scores, num_matches):
                counter.accepted += int(num_matches)
                counter.steps += 1
                return update(input_ids, scores, num_matches)

            generator.get_candidates, generator.update_candidate_strategy = get, updated
            return generator

        GenerationMixin._get_candidate_generator = counted

    def reset(self) -> None:
        self.drafted = self.accepted = self.steps = 0


def truncated_draft(source: Path, layers: int, out: Path) -> Path:
    """SmolLM2 cut to its first `layers` layers (embeddings, final norm and head kept), saved once."""
    folder = out / f"smollm2-first-{layers}-layers"
    if (folder / "config.json").is_file():
        return folder
    from hfllm.checkpoint import atomic_output

    model, tokenizer = load_for_inference(str(source), "auto")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.config.layer_types = model.config.layer_types[:layers]
    with atomic_output(folder) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--draft_layers", type=int, default=10, help="K: layers of the early exit and the draft")
    parser.add_argument("--prompt_lookup", type=int, default=10)
    parser.add_argument("--out", default="runs/benchmarks")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = smollm2_hfllm_dir()
    model, tokenizer = load_for_inference(str(source), "auto")
    draft_dir = truncated_draft(source, args.draft_layers, out)
    draft = load_assistant(str(draft_dir), model, tokenizer, "auto")
    counter = DraftCounter()
    methods = {
        "greedy": ({}, None),
        f"prompt lookup {args.prompt_lookup}": ({"prompt_lookup": args.prompt_lookup}, None),
        f"early exit, first {args.draft_layers} layers": ({"assistant_early_exit": args.draft_layers}, None),
        f"draft model, first {args.draft_layers} layers": ({"assistant": str(draft_dir)}, draft),
    }
    complete(model, tokenizer, ["Hi"], Decoding(max_new_tokens=4), chat=True)  # warm-up
    rows = []
    for task, prompt in TASKS.items():
        greedy = None
        for method, (options, assistant) in methods.items():
            counter.reset()
            decoding = Decoding(max_new_tokens=args.new_tokens, **options)
            start = time.perf_counter()
            (completion,) = complete(model, tokenizer, [prompt], decoding, chat=True, assistant_model=assistant)
            seconds = time.perf_counter() - start
            greedy = greedy or (completion, seconds)
            tokens = completion.completion_tokens
            rows.append({
                "task": task, "method": method, "new_tokens": tokens, "seconds": round(seconds, 2),
                "tokens_per_s": round(tokens / seconds, 2), "speedup": round(greedy[1] / seconds, 2),
                "drafted": counter.drafted, "accepted": counter.accepted,
                "acceptance": round(counter.accepted / counter.drafted, 3) if counter.drafted else None,
                "tokens_per_forward": round(tokens / counter.steps, 2) if counter.steps else 1.0,
                "same_as_greedy": completion.completion_token_ids == greedy[0].completion_token_ids,
                "text": completion.text,
            })
            print(json.dumps(rows[-1]), flush=True)
    (out / "speculative_cpu.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| task | method | tokens/s | speedup | acceptance | tokens per full forward | same tokens as greedy |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        acceptance = "–" if row["acceptance"] is None else f"{row['acceptance']:.0%}"
        print(f"| {row['task']} | {row['method']} | {row['tokens_per_s']} | {row['speedup']}x | {acceptance} | "
              f"{row['tokens_per_forward']} | {'yes' if row['same_as_greedy'] else 'NO'} |")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
