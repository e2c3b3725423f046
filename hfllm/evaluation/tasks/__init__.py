"""Data for hfllm's offline lm-eval tasks, built at run time (never committed) into `cache_dir()/eval_tasks`.

The task YAMLs in this folder load their data through `custom_dataset: !function task_data.<name>`, which
calls the builders here. Every builder is deterministic (fixed split, fixed seed), writes a JSONL file once and
returns it as a `DatasetDict` with a "test" split:

  hfllm_shakespeare_ppl        passages (whole speeches, <= PASSAGE_CHARS characters) of the validation plays
  hfllm_shakespeare_next_line  pick the true next verse line among 4 lines of the same validation play
  hfllm_synth                  {"prompt", "answer"} items from a JSONL (`hfllm data synth` output), or a built-in
                               arithmetic set when none is given

The held-out plays are `hfllm.data.corpus.VALIDATION_PLAYS` (Julius Caesar, Macbeth, Richard II, The Tempest,
Twelfth Night): the same text `hfllm data shakespeare` writes to val.txt, never seen in pretraining.
"""

import json
import random
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from ...assets import cache_dir
from ...checkpoint import atomic_output
from ...data.corpus import shakespeare_corpus
from ...data.synth import synthesize
from ...errors import HfllmError

TASKS_DIR = Path(__file__).resolve().parent  # the task YAMLs sit next to this file
PASSAGE_CHARS = 2000
NEXT_LINE_ITEMS = 500
ARITHMETIC_ITEMS = 200
DATA_VERSION = 2  # bump when a builder changes, so cached files are rebuilt


def data_dir() -> Path:
    return cache_dir() / "eval_tasks" / f"v{DATA_VERSION}"


def _write_jsonl(rows: list[dict], path: Path) -> Path:
    """Write rows atomically, so an interrupted run never leaves half a file behind."""
    with atomic_output(path, folder=False, keep_existing=True) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _as_dataset(path: Path) -> DatasetDict:
    return load_dataset("json", data_files={"test": str(path)})


# ---------------------------------------------------------------- Shakespeare perplexity


def speeches(play: str) -> list[str]:
    """A cleaned play split into its blank-line separated blocks (speeches, headings, stage directions)."""
    return [block.strip("\n") for block in play.split("\n\n") if block.strip()]


def shakespeare_passages(max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Consecutive speeches of each validation play joined into passages of at most `max_chars` characters."""
    passages = []
    for play in shakespeare_corpus()["validation"]:
        current: list[str] = []
        for block in speeches(play):
            if current and len("\n\n".join(current + [block])) > max_chars:
                passages.append("\n\n".join(current) + "\n")
                current = []
            current.append(block[:max_chars])
        if current:
            passages.append("\n\n".join(current) + "\n")
    return passages


def shakespeare_ppl_data() -> DatasetDict:
    path = data_dir() / "shakespeare_ppl.jsonl"
    if not path.exists():
        _write_jsonl([{"text": text} for text in shakespeare_passages()], path)
    return _as_dataset(path)


# ---------------------------------------------------------------- next-line multiple choice


def next_line_items(count: int = NEXT_LINE_ITEMS, context_lines: int = 3, seed: int = 0) -> list[dict]:
    """From every speech with more than `context_lines` verse lines: the speaker and the first lines as context,
    the next line as the answer, and 3 distractor lines of at least 20 characters drawn from the same play."""
    rng = random.Random(seed)
    items = []
    for play in shakespeare_corpus()["validation"]:
        blocks = [block.split("\n") for block in speeches(play)]
        spoken = [lines for lines in blocks if lines[0].endswith(":") and len(lines) > context_lines + 1]
        pool = sorted({line for lines in spoken for line in lines[1:] if len(line) >= 20})
        for lines in spoken:
            gold = lines[context_lines + 1]
            if len(gold) < 20:
                continue
            distractors = rng.sample([line for line in pool if line != gold], 3)
            label = rng.randrange(4)
            choices = distractors[:label] + [gold] + distractors[label:]
            items.append({"context": "\n".join(lines[: context_lines + 1]), "choices": choices, "label": label})
    rng.shuffle(items)
    return items[:count]


def shakespeare_next_line_data() -> DatasetDict:
    path = data_dir() / "shakespeare_next_line.jsonl"
    if not path.exists():
        _write_jsonl(next_line_items(), path)
    return _as_dataset(path)


# ---------------------------------------------------------------- synthetic instruction tasks


def synth_item(row: dict, where: str) -> dict:
    """One synth JSONL row -> {"prompt", "answer"}.

    The prompt is `prompt`, else the content of the last "user" message in `messages`; the answer is `answer`, else
    the content of a final "assistant" message in `messages`.
    """
    messages = row.get("messages") or []
    prompt = row.get("prompt")
    if prompt is None:
        prompt = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), None)
    answer = row.get("answer")
    if answer is None and messages and messages[-1].get("role") == "assistant":
        answer = messages[-1]["content"]
    if prompt is None or answer is None:
        raise HfllmError(
            f"{where}: a synth item needs 'prompt' (or 'messages' with a user turn) and 'answer' "
            f"(or a final assistant message); found keys {sorted(row)}"
        )
    return {"prompt": str(prompt), "answer": str(answer)}


def synth_file(synth_data: str | None) -> Path:
    """The JSONL to evaluate: `synth_data` (a .jsonl file, or a folder holding test.jsonl), else the built-in set
    (the held-out items of `hfllm data synth arithmetic --seed 0`)."""
    if synth_data is None:
        path = data_dir() / "synth_arithmetic.jsonl"
        if not path.exists():
            _write_jsonl(synthesize("arithmetic", n_train=0, n_test=ARITHMETIC_ITEMS, seed=0)["test"], path)
        return path
    path = Path(synth_data)
    if path.is_dir():
        path = path / "test.jsonl"
    if not path.is_file():
        raise HfllmError(f"synth data '{synth_data}' not found; give a .jsonl file or a folder with test.jsonl")
    return path


def synth_data(synth_data: str | None = None) -> DatasetDict:
    path = synth_file(synth_data)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise HfllmError(f"{path}:{number}: not valid JSON ({error.msg}); one JSON object per line") from None
            rows.append(synth_item(row, f"{path}:{number}"))
    if not rows:
        raise HfllmError(f"synth data {path} holds no items")
    return DatasetDict({"test": Dataset.from_list(rows)})
