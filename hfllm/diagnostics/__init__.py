"""`hfllm doctor RECIPE | MODEL_DIR`: the pre-flight checklist of a training run, at a tiny size, on the recipe's own
architecture, tokenizer and data (docs/reliability.md#hfllm-doctor).

    recipe -> text splits + tokenizer -> data checks (data_checks.py)
           -> the training command's own `build` with tiny overrides, on the recipe's architecture shrunk (2 layers,
              16-wide heads) with new weights (subjects.py) -> model checks (model_checks.py)
           -> a table (check, measured, expected, result; checks.py); exit code 4 when any check fails

Model checks: loss at init ~ ln(vocab), no causal-mask leak, next-token labels, one batch overfits, two seeded runs
are bitwise equal, a run resumed from its checkpoint equals the uninterrupted run. Tokenizer and data checks: round
trip, BOS/EOS rules, newlines, distinct special tokens, vocabulary use and unknowns, train/validation contamination
(exact and near-duplicate documents), the chat template (renders, masks the assistant turns).

It spans stages (data, models, training), hence a top-level package beside recipe.py and checkpoint/. Nothing is
written outside a temporary folder.

In Python: `hfllm.doctor("recipes/tiny.yaml")` -> a `Report` (the checks as data, `.passed`; `print()` shows the table).
"""

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..recipe import RecipeInput, recipe_argv

from .checks import Check, format_table
from .data_checks import (check_bos_eos, check_chat_template, check_contamination, check_eval_contamination,
                          check_newlines, check_round_trip, check_special_tokens, check_trained_roles, check_vocabulary,
                          recipe_eval_tasks)
from .model_checks import (check_causal_mask, check_init_loss, check_label_shift, check_overfit, check_reproducible,
                           check_resume)
from .subjects import SAMPLE_DOCUMENTS, STEPS, Subject, subject_for

EXIT_FAILED = 4  # a check failed (docs/reliability.md, exit codes)


def run_checks(subject: Subject, say: Callable[[str], None] = print) -> list[Check]:
    checks: list[Check] = []

    def add(*new: Check) -> None:
        for check in new:
            checks.append(check)
            say(f"  {check.status:<4}  {check.name}: {check.measured}")

    sample = subject.validation_texts[:SAMPLE_DOCUMENTS] or subject.train_texts[:SAMPLE_DOCUMENTS]
    tokenizer = subject.tokenizer
    add(check_round_trip(tokenizer, sample), check_newlines(tokenizer, sample[0]),
        check_bos_eos(tokenizer, sample, subject.conversations), check_special_tokens(tokenizer))
    add(*check_vocabulary(tokenizer, subject.train_texts, subject.tokenizer_from_data))
    add(check_contamination(subject.train_texts, subject.validation_texts))
    add(check_chat_template(tokenizer, subject.chat, subject.assistant_only_loss,
                            subject.conversations[0] if subject.conversations else None))
    if subject.chat and subject.conversations:  # SFT on chat data: what the template trains
        add(check_trained_roles(tokenizer, subject.conversations, subject.assistant_only_loss))
    if eval_tasks := recipe_eval_tasks(subject.label):  # the recipe evaluates on these: none of it in training
        add(check_eval_contamination(subject.train_texts, eval_tasks))

    model = subject.new_model()
    add(check_init_loss(model, subject.batch, subject.config.vocab_size))
    inspected = model if subject.loaded_model is None else subject.loaded_model  # MODEL_DIR: its own weights
    add(check_causal_mask(inspected, subject.batch), check_label_shift(inspected, subject.batch))
    add(check_overfit(model, subject.batch))
    with tempfile.TemporaryDirectory() as scratch:
        full = subject.train(f"{scratch}/a", None)
        again = subject.train(f"{scratch}/b", None)
        add(check_reproducible(full, again))
        resumed = subject.train(f"{scratch}/c", f"{scratch}/a/checkpoint-{STEPS // 2}")
        add(check_resume(full, resumed))
    return checks




PROG = "hfllm doctor"  # the API's errors read as the command's


@dataclass
class Report:
    """The doctor's checks on one recipe or model folder: what each measured, what was expected, its result."""

    label: str  # the recipe or model folder checked
    checks: list[Check]
    seconds: float

    @property
    def failed(self) -> list[str]:
        return [check.name for check in self.checks if check.status == "FAIL"]

    @property
    def passed(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        """The table and the summary line, as `hfllm doctor` prints them."""
        return (format_table(self.checks) + f"\n\n{len(self.checks) - len(self.failed)} of {len(self.checks)} checks "
                f"passed in {self.seconds:.0f} s" + (f"; failed: {', '.join(self.failed)} (exit code {EXIT_FAILED})"
                                                     if self.failed else ""))


def doctor(recipe_or_model_dir: RecipeInput, **overrides: Any) -> Report:
    """Run the pre-flight checklist of a training run at a tiny size on the recipe's own architecture (shrunk),
    tokenizer and data (`hfllm doctor`): init loss, causal mask, label shift, one batch overfits, seeded runs equal,
    exact resume, tokenizer round trip, BOS/EOS, special tokens, vocabulary use, train/validation contamination, chat
    template masks. Nothing is written outside a temporary folder; a failed check raises nothing.

    Args:
        recipe_or_model_dir: a pretraining or SFT recipe (a YAML path or its mapping), or a model folder (checked
            with the recipe.yaml it was trained with, else on Shakespeare).
        **overrides: recipe keys, as `hfllm doctor RECIPE --key value` takes them (e.g. `seed=3`).

    Returns:
        A `Report`: `.checks` (name, measured, expected, status "pass"/"FAIL"/"info"), `.passed`, `.failed`;
        `print(report)` shows the command's table. Bad input raises `HfllmError` with the line the command prints.

    Example:
        >>> report = hfllm.doctor("recipes/tiny.yaml"); assert report.passed, report
    """
    return run(recipe_argv(recipe_or_model_dir, overrides), PROG)


def run(argv: list, prog: str, say: Callable[[str], None] = print) -> Report:
    """`RECIPE [--key value ...] | MODEL_DIR` (the recipe may be a mapping) -> the checks, each `say`d as it ends."""
    import datasets
    import transformers

    start = time.perf_counter()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # e.g. the tied head "missing" from a resumed checkpoint
    subject = subject_for(argv, prog)
    label = subject.label or "the recipe mapping"
    say(f"{prog}: {label}: {subject.config.num_hidden_layers} layers x {subject.config.hidden_size}, "
        f"vocab {subject.config.vocab_size}")
    checks = run_checks(subject, say=say)
    return Report(label, checks, time.perf_counter() - start)


def main(argv: list[str], prog: str = "hfllm doctor") -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} RECIPE.yaml [--key value ...] | MODEL_DIR\n\n" + __doc__.split("\n\n")[0])
        return 0
    report = run(argv, prog, say=lambda line: print(line, flush=True))
    print("\n" + str(report))
    return EXIT_FAILED if report.failed else 0
