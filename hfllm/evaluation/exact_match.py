"""Exact match on verifiable synthetic tasks (`hfllm data synth`): the answer rule, the GRPO reward, chat scoring.

`chat_exact_match` greedy-generates each answer with the model's chat template, the way the model is used; it is
what `hfllm score` and the adaptation runs (`exact_match_file:`) report. lm-eval's `hfllm_synth` task scores the same
items through lm-eval's prompt format (`exact_match` in its results, chat template only with
`--apply_chat_template`), so the two numbers carry different names.

    hfllm score MODEL TEST.jsonl [--limit N] [--json OUT]
"""

import json
from pathlib import Path

from ..checkpoint import eval_mode
from ..data.synth import read_jsonl
from ..errors import ArgumentParser, HfllmError
from ..generation import chat_messages, generate_texts, render_chat


def parse_answer(text: str) -> str:
    """The answer in a generation: its first non-empty line, after a last '=' if any ("2 + 2 = 4" -> "4"), without
    quotes, spaces or a trailing full stop."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0].rsplit("=", 1)[-1].strip().strip("'\"`").rstrip(".").strip() if lines else ""


def exact_match(generation: str, answer: str) -> bool:
    return parse_answer(generation) == answer


def exact_match_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """GRPO reward function: 1.0 where the completion's parsed answer equals the `answer` column, else 0.0."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]  # conversational or plain
    return [float(exact_match(text, gold)) for text, gold in zip(texts, answer)]


def chat_exact_match(model, tokenizer, items: list[dict], max_new_tokens: int = 8, batch_size: int = 16) -> float:
    """Greedy-generate an answer for each {"prompt", "answer"} item with the tokenizer's chat template (prompts
    left-padded into batches, EOS as padding where the tokenizer has none); the share answered exactly."""
    generations = generate_texts(model, tokenizer, [item["prompt"] for item in items], chat=True,
                                 batch_size=batch_size, max_new_tokens=max_new_tokens, do_sample=False)
    return sum(exact_match(g, item["answer"]) for g, item in zip(generations, items)) / len(items)


def preference_accuracy(model, tokenizer, items: list[dict]) -> tuple[float, float]:
    """Share of items whose answer has a higher log-likelihood than the corrupted one, and the mean log-prob margin."""
    import torch

    margins = []
    for item in items:
        prompt = render_chat(tokenizer, chat_messages(item["prompt"]))
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        logps = []
        for reply in (item["answer"], item["rejected"]):
            ids = tokenizer(prompt + reply + tokenizer.eos_token, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad(), eval_mode(model):
                logits = model(input_ids=ids.to(model.device)).logits[0, :-1].cpu()  # (T-1, V): predicts tokens 1..T-1
            token_logps = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]  # (T-1,)
            logps.append(token_logps[len(prompt_ids) - 1 :].sum().item())  # the reply and its EOS only
        margins.append(logps[0] - logps[1])
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def read_test_items(test_file: str, limit: int | None) -> list[dict]:
    """The first `limit` {prompt, answer} items of a synth test.jsonl; a file without them is one line."""
    items = read_jsonl(test_file)[:limit]
    if not items or not isinstance(items[0], dict) or not {"prompt", "answer"} <= set(items[0]):
        raise HfllmError(f"{test_file} has no {{'prompt', 'answer'}} rows; use the test.jsonl from `hfllm data synth`")
    return items


def score_file(model, tokenizer, test_file: str, limit: int | None, out_dir: str | None = None) -> dict:
    """`chat_exact_match` (and preference accuracy where items have a corrupted answer) on a synth test.jsonl;
    written to OUT_DIR/chat_exact_match.json when out_dir is given."""
    items = read_test_items(test_file, limit)
    result = {"chat_exact_match": chat_exact_match(model, tokenizer, items), "n": len(items), "test_file": str(test_file)}
    if "rejected" in items[0]:
        result["preference_accuracy"], result["logp_margin"] = preference_accuracy(model, tokenizer, items)
    if out_dir:
        Path(out_dir, "chat_exact_match.json").write_text(json.dumps(result) + "\n")
    return result


def score_main(argv: list[str], prog: str) -> int:
    """`hfllm score MODEL TEST.jsonl`: chat exact match of a model (any spec `hfllm.checkpoint.load` takes)."""
    from ..checkpoint import load

    parser = ArgumentParser(prog=prog, description="Exact-match accuracy on held-out synth items.")
    parser.add_argument("model", help="checkpoint folder, PEFT adapter folder, .gguf file or Hub id")
    parser.add_argument("test_file", help="test.jsonl written by `hfllm data synth`")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items")
    parser.add_argument("--json", default=None, help="also write {'chat_exact_match': ..., 'n': ...} to this file")
    args = parser.parse_args(argv)
    read_test_items(args.test_file, args.limit)  # a bad file fails before the model loads
    model, tokenizer = load(args.model)
    result = score_file(model, tokenizer, args.test_file, args.limit)
    print(f"{result} ({args.model})")
    if args.json:
        Path(args.json).write_text(json.dumps(result | {"model": args.model}) + "\n")
    return 0


