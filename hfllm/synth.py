"""Verifiable synthetic instruction tasks: SFT chats, preference pairs, KTO rows, GRPO prompts and held-out tests.

Every task has an exact answer, so exact-match accuracy and RL rewards need no judge model.
`hfllm data synth TASK --out DIR` writes (one JSON object per line):
  sft.jsonl         {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
  preference.jsonl  {"prompt": [user msg], "chosen": [assistant msg], "rejected": [assistant msg]}  (DPO, ORPO)
  kto.jsonl         {"prompt": [user msg], "completion": [assistant msg], "label": true|false}
  prompts.jsonl     {"prompt": [user msg], "answer": "..."}                                      (GRPO)
  test.jsonl        {"prompt": "...", "answer": "...", "rejected": "..."}   (held out; rejected = corrupted answer)
Held-out test prompts never appear in the training files.
"""

import argparse
import json
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path

from hfllm.errors import HfllmError

# ----------------------------------------------------------------------------- tasks
# A task draws one item: (question, answer, corrupted answer), all strings.


def arithmetic_item(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    answer = a + b
    wrong = answer + rng.choice([-11, -10, -2, -1, 1, 2, 10, 11])
    return f"What is {a} + {b}? Reply with only the number.", str(answer), str(wrong)


def reverse_item(rng: random.Random) -> tuple[str, str, str]:
    word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 7)))
    answer = word[::-1]
    i = rng.randrange(len(word) - 1)  # swap two neighbours of the answer to corrupt it
    wrong = answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
    if wrong == answer:
        wrong = word if word != answer else answer + answer[-1]
    return f"Reverse the string '{word}'. Reply with only the reversed string.", answer, wrong


UNITS = [("km", "m", 1000), ("m", "cm", 100), ("kg", "g", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60)]


def units_item(rng: random.Random) -> tuple[str, str, str]:
    source, target, factor = rng.choice(UNITS)
    value = rng.randint(2, 200)
    answer = value * factor
    wrong = value * (factor // 10 if factor >= 100 else factor + 10)
    return f"Convert {value} {source} to {target}. Reply with only the number.", str(answer), str(wrong)


TASKS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "arithmetic": arithmetic_item,
    "reverse": reverse_item,
    "units": units_item,
}

# ----------------------------------------------------------------------------- scoring


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


def score_exact_match(model, tokenizer, items: list[dict], max_new_tokens: int = 8, batch_size: int = 16) -> float:
    """Greedy-generate an answer for each {"prompt", "answer"} item with the tokenizer's chat template; accuracy."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    correct = 0
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": item["prompt"]}], tokenize=False, add_generation_prompt=True)
            for item in batch
        ]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]  # (B, <=max_new_tokens)
        generations = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        correct += sum(exact_match(g, item["answer"]) for g, item in zip(generations, batch))
    return correct / len(items)


def preference_accuracy(model, tokenizer, items: list[dict]) -> tuple[float, float]:
    """Share of items whose answer has a higher log-likelihood than the corrupted one, and the mean log-prob margin."""
    import torch

    margins = []
    for item in items:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": item["prompt"]}], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        logps = []
        for reply in (item["answer"], item["rejected"]):
            ids = tokenizer(prompt + reply + tokenizer.eos_token, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1]  # (T-1, V): predicts tokens 1..T-1
            token_logps = logits.log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]  # (T-1,)
            logps.append(token_logps[len(prompt_ids) - 1 :].sum().item())  # the reply and its EOS only
        margins.append(logps[0] - logps[1])
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins)


def score_file(model, tokenizer, test_file: str, limit: int | None, out_dir: str | None = None) -> dict:
    """Exact match on a synth test.jsonl; written to OUT_DIR/exact_match.json when out_dir is given."""
    items = read_jsonl(test_file)[:limit]
    if not items or not {"prompt", "answer"} <= set(items[0]):
        raise HfllmError(f"{test_file} has no {{'prompt', 'answer'}} rows; use the test.jsonl from `hfllm data synth`")
    result = {"exact_match": score_exact_match(model, tokenizer, items), "n": len(items), "test_file": str(test_file)}
    if "rejected" in items[0]:
        result["preference_accuracy"], result["logp_margin"] = preference_accuracy(model, tokenizer, items)
    if out_dir:
        Path(out_dir, "exact_match.json").write_text(json.dumps(result) + "\n")
    return result


# ----------------------------------------------------------------------------- generation


def synthesize(task: str, n_train: int, n_test: int, seed: int) -> dict[str, list[dict]]:
    """Distinct items for train and test (no shared question); returns rows for each output file."""
    if task not in TASKS:
        raise HfllmError(f"unknown synth task '{task}'; choose from: {', '.join(TASKS)}")
    rng, draw = random.Random(seed), TASKS[task]
    items: dict[str, tuple[str, str]] = {}
    for _ in range(50 * (n_train + n_test)):
        if len(items) == n_train + n_test:
            break
        question, answer, wrong = draw(rng)
        items.setdefault(question, (answer, wrong))
    if len(items) < n_train + n_test:
        raise HfllmError(f"task '{task}' has fewer than {n_train + n_test} distinct items; lower --n-train/--n-test")
    questions = list(items)
    test, train = questions[:n_test], questions[n_test:]

    def user(q: str) -> list[dict]:
        return [{"role": "user", "content": q}]

    def assistant(a: str) -> list[dict]:
        return [{"role": "assistant", "content": a}]

    rows: dict[str, list[dict]] = {"sft": [], "preference": [], "kto": [], "prompts": [], "test": []}
    for i, q in enumerate(train):
        answer, wrong = items[q]
        rows["sft"].append({"messages": user(q) + assistant(answer)})
        rows["preference"].append({"prompt": user(q), "chosen": assistant(answer), "rejected": assistant(wrong)})
        good = i % 2 == 0  # KTO: alternate desirable / undesirable completions
        rows["kto"].append({"prompt": user(q), "completion": assistant(answer if good else wrong), "label": good})
        rows["prompts"].append({"prompt": user(q), "answer": answer})
    rows["test"] = [{"prompt": q, "answer": items[q][0], "rejected": items[q][1]} for q in test]
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise HfllmError(f"no such file: {path}; create it with `hfllm data synth TASK --out DIR`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def synth_main(argv: list[str], prog: str) -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Write a verifiable synthetic instruction task as JSONL files.")
    parser.add_argument("task", help=f"one of: {', '.join(TASKS)}")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n_train < 1 or args.n_test < 1:
        raise HfllmError("--n-train and --n-test must be at least 1")
    rows = synthesize(args.task, args.n_train, args.n_test, args.seed)  # validates before anything is written
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, file_rows in rows.items():
        write_jsonl(out / f"{name}.jsonl", file_rows)
    print(f"wrote {args.n_train} train and {args.n_test} test items of '{args.task}' to {out}")
    return 0


def score_main(argv: list[str], prog: str) -> int:
    """`python3 -m hfllm.synth score MODEL TEST.jsonl`: greedy exact-match accuracy of a model or adapter folder."""
    from hfllm.adapters import load_for_inference

    parser = argparse.ArgumentParser(prog=prog, description="Exact-match accuracy on held-out synth items.")
    parser.add_argument("model", help="model folder or PEFT adapter folder")
    parser.add_argument("test_file", help="test.jsonl written by `hfllm data synth`")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items")
    parser.add_argument("--json", default=None, help="also write {'exact_match': ..., 'n': ...} to this file")
    args = parser.parse_args(argv)
    model, tokenizer = load_for_inference(args.model)
    result = score_file(model, tokenizer, args.test_file, args.limit)
    print(f"{result} ({args.model})")
    if args.json:
        Path(args.json).write_text(json.dumps(result | {"model": args.model}) + "\n")
    return 0


if __name__ == "__main__":  # `python3 -m hfllm.synth score MODEL TEST.jsonl` or `python3 -m hfllm.synth TASK --out DIR`
    command, function = ("score", score_main) if sys.argv[1:2] == ["score"] else ("synth", synth_main)
    try:
        sys.exit(function(sys.argv[2:] if command == "score" else sys.argv[1:], prog=f"python3 -m hfllm.synth"))
    except HfllmError as error:
        print(f"hfllm {command}: error: {error}", file=sys.stderr)
        sys.exit(2)
