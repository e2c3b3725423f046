"""Verifiable synthetic instruction tasks: SFT chats, preference pairs, KTO rows, GRPO prompts and held-out tests.

Every task has an exact answer, so exact-match accuracy and RL rewards need no judge model.
`hfllm data synth TASK --out DIR` writes (one JSON object per line):
  sft.jsonl         {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
  preference.jsonl  {"prompt": [user msg], "chosen": [assistant msg], "rejected": [assistant msg]}  (DPO, ORPO)
  kto.jsonl         {"prompt": [user msg], "completion": [assistant msg], "label": true|false}
  prompts.jsonl     {"prompt": [user msg], "answer": "..."}                                      (GRPO)
  test.jsonl        {"prompt": "...", "answer": "...", "rejected": "..."}   (held out; rejected = corrupted answer)
Held-out test prompts never appear in the training files. Scoring (exact match, preference accuracy, the GRPO
reward) is in `hfllm.evaluation.exact_match`.
"""

import json
import random
from collections.abc import Callable
from pathlib import Path

from ..checkpoint import atomic_output
from ..errors import ArgumentParser, HfllmError

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
    with atomic_output(path, folder=False) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise HfllmError(f"no such file: {path}; create it with `hfllm data synth TASK --out DIR`")
    try:
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as error:  # not UTF-8, or a line that is not JSON: name the line
        from .loading import unreadable_data

        raise unreadable_data([str(path)], error) from None


def synth_main(argv: list[str], prog: str) -> int:
    parser = ArgumentParser(prog=prog, description="Write a verifiable synthetic instruction task as JSONL files.")
    parser.add_argument("task", help=f"one of: {', '.join(TASKS)}")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.n_train < 1 or args.n_test < 1:
        raise HfllmError("--n-train and --n-test must be at least 1")
    synth(args.task, args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    return 0


def synth(task: str, out: str | Path, *, n_train: int = 1000, n_test: int = 100, seed: int = 0) -> dict[str, Path]:
    """Write a verifiable synthetic instruction task as JSONL files in `out`, as `hfllm data synth` does: sft.jsonl
    (chat messages), preference.jsonl (chosen/rejected), prompts.jsonl (GRPO prompts with answers) and test.jsonl
    (held-out items for exact match). Returns {name: path}.

        files = hfllm.synth("arithmetic", "runs/data", n_train=200)
    """
    if n_train < 1 or n_test < 1:
        raise HfllmError("--n-train and --n-test must be at least 1")
    rows = synthesize(task, n_train, n_test, seed)  # validates before anything is written
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, file_rows in rows.items():
        paths[name] = folder / f"{name}.jsonl"
        write_jsonl(paths[name], file_rows)
    print(f"wrote {n_train} train and {n_test} test items of '{task}' to {folder}")
    return paths
