"""The points of an experiment: one pretraining run each, trained in this process and kept once finished.

A point is the sweep's recipe plus its own overrides (an axis value, a model size) and a seed. It is resolved
through the one recipe parser (so a bad key or value is the recipe's own one-line error), given its step count by
the budget, and keyed by the resolved recipe: `OUT/points/<key>.json` holds a finished point, and a rerun of the
sweep reuses it instead of training again (a killed sweep continues with the points it has not finished).

    budget steps N      every point trains N optimizer steps
    budget flops F      steps = F / (FLOPs per token x tokens per step), FLOPs per token counted as `hfllm plan`
                        counts them (training/mfu.py: 6N + attention), so a bigger variant trains fewer steps
    budget seconds S    steps = S / (seconds per step measured on this machine by a short probe of each variant,
                        evaluation left out; its seeds share the timing, so they train the same steps), kept in
                        OUT/timings.json; the key holds the budget, not the measured steps, and a rerun reuses both
    budget tokens T     (scaling) steps = T / tokens per step

Points are trained with `pretrain.build` + `lifecycle.run` in one process, sharing one tokenizer per data source
and the token cache of hfllm/data (the packed blocks are tokenized once). Each point's output (Trainer logs, the plan)
goes to `OUT/logs/<key>.txt`; the terminal shows a tqdm bar over the points with an ETA and one line per point.
"""

import contextlib
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PrinterCallback, ProgressCallback, TrainerCallback
from transformers.utils import logging as transformers_logging

from ..data.text import load_text, resolve_tokenizer
from ..errors import HfllmError, TrainingHalted
from ..models import parameter_counts
from ..recipe import Recipe, recipe_argv
from ..training import lifecycle
from ..training.arguments import SESSION_KEYS, data_parallel_size, gradient_accumulation, parse_recipe
from ..training.mfu import flops_per_token
from ..training.pretrain import build, resolve_config

BUDGET_KINDS = ("flops", "seconds", "steps", "tokens")
# Keys every point sets for itself: its own folder, no samples, no bars or log lines from Trainer (all session keys,
# so they are not part of the point's key)
POINT_KEYS = {"overwrite_output_dir": True, "num_samples": 0, "disable_tqdm": True, "report_to": "none"}
PROBE_STEPS = (5, 20)  # seconds budget: steps run before timing, steps timed (8 timed steps of 50 ms varied by 50%)
TIMINGS_FILE = "timings.json"  # seconds budget: {timing key: seconds per step} of the probes


@dataclass(frozen=True)
class Budget:
    """What every point of a sweep gets the same amount of."""

    kind: str  # one of BUDGET_KINDS
    value: float

    @classmethod
    def of(cls, budget: "Budget | tuple | Sequence") -> "Budget":
        if isinstance(budget, Budget):
            return budget
        try:
            kind, value = budget
            value = float(value)
        except (TypeError, ValueError):
            raise HfllmError(f"budget {budget!r}: give a kind and a number, e.g. ('steps', 200) or --budget flops "
                             "1e12") from None
        if kind not in BUDGET_KINDS or not math.isfinite(value) or value <= 0:
            raise HfllmError(f"budget {kind} {value:g}: give one of {', '.join(BUDGET_KINDS[:3])} and a number > 0")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.kind} {self.value:g}"


@dataclass
class Point:
    """One run of a sweep: `variant` names it in tables, `overrides` go onto the sweep's recipe."""

    variant: str
    overrides: dict[str, Any]
    seed: int
    recipe: Recipe | None = None  # resolved, with its steps and output folder
    argv: list = field(default_factory=list)
    key: str = ""  # hash of the resolved recipe (without the session keys and output folder)
    shape: dict[str, Any] = field(default_factory=dict)  # parameters, flops_per_token, tokens_per_step
    seconds_per_step: float | None = None  # seconds budget: the probe's timing (kept in OUT/timings.json)
    timing_key: str = ""  # seconds budget: the key without the seed; a variant's seeds share one probe


# ----------------------------------------------------------------------------- resolving a point


def resolve_points(recipe, overrides: Mapping[str, Any], points: list[Point], budget: Budget, out: Path,
                   prog: str, tokenizers: "Tokenizers") -> None:
    """Resolve every point in place (recipe, steps, key, shape); every mistake raises before anything is written.
    Under a seconds budget a variant is probed once for all its seeds, and a point timed by an earlier run of the
    sweep keeps that timing (OUT/timings.json), so a rerun gives every point the steps of the invocation that timed
    them all."""
    timings_file = out / TIMINGS_FILE
    timings = json.loads(timings_file.read_text(encoding="utf-8")) if timings_file.is_file() else {}
    for point in points:
        values = {**overrides, **point.overrides, "seed": point.seed}
        argv = recipe_argv(recipe, values)
        first = parse_recipe(argv, prog)  # the recipe's own checks: unknown key, type, value rules
        tokenizer = tokenizers.get(first)
        point.shape = model_shape(first, tokenizer)
        if budget.kind == "seconds":
            point.key = recipe_key({**first.resolved, "max_steps": str(budget)})
            point.timing_key = recipe_key({**first.resolved, "max_steps": str(budget), "seed": None})
            point.seconds_per_step = timings.get(point.timing_key)
        probe = {**values, **POINT_KEYS, "max_steps": sum(PROBE_STEPS), "eval_strategy": "no"}
        steps = budget_steps(budget, point, lambda folder: recipe_argv(recipe, {**probe, "output_dir": folder}),
                             prog, tokenizer)
        if budget.kind == "seconds":
            timings.setdefault(point.timing_key, point.seconds_per_step)  # the variant's next seed reuses it
        else:
            point.key = recipe_key({**first.resolved, "max_steps": steps})
        point.argv = recipe_argv(recipe, {**values, "max_steps": steps, **POINT_KEYS,
                                          "output_dir": str(out / "runs" / point.key)})
        point.recipe = parse_recipe(point.argv, prog)


def recipe_key(resolved: Mapping[str, Any]) -> str:
    """A point's key: the resolved recipe without the keys of one session and the output folder."""
    kept = {k: v for k, v in resolved.items() if k not in SESSION_KEYS and k != "output_dir"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def model_shape(recipe: Recipe, tokenizer) -> dict[str, Any]:
    """Parameters, FLOPs per token (as `hfllm plan` counts them) and tokens per optimizer step of a recipe's model,
    built on the meta device (no memory, no time); a config the model refuses raises here."""
    model_args, data_args, args = recipe.args
    config = resolve_config(model_args.model, recipe.free, data_args.block_size)
    if not Path(model_args.model).is_dir():
        config.vocab_size = len(tokenizer)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    accumulation = gradient_accumulation(args, data_args.block_size)
    tokens_per_step = args.per_device_train_batch_size * accumulation * data_parallel_size(args) * data_args.block_size
    return {"parameters": parameter_counts(model), "flops_per_token": flops_per_token(model, data_args.block_size),
            "tokens_per_step": tokens_per_step}


def budget_steps(budget: Budget, point: Point, probe: Callable[[str], list], prog: str, tokenizer) -> int:
    """Optimizer steps of `point` under `budget`; a budget below one step raises, naming the minimum."""
    tokens_per_step, per_token = point.shape["tokens_per_step"], point.shape["flops_per_token"]
    if budget.kind == "steps":
        steps, unit = int(budget.value), 1
    elif budget.kind == "tokens":
        steps, unit = round(budget.value / tokens_per_step), tokens_per_step
    elif budget.kind == "flops":
        unit = per_token * tokens_per_step
        steps = whole_steps(budget.value / unit)
    else:
        if point.seconds_per_step is None:
            point.seconds_per_step = seconds_per_step(probe, prog, tokenizer)
        unit = point.seconds_per_step
        steps = whole_steps(budget.value / unit)
    if steps < 1:
        raise HfllmError(f"budget {budget} is below one optimizer step of {point.variant} ({unit:.4g} {budget.kind} "
                         f"per step); raise it to at least {unit:.3g}")
    return steps


def whole_steps(ratio: float) -> int:
    """The steps that fit in the budget: 1.0 s / 0.1 s per step is 10 (`1.0 // 0.1` is 9.0 in floating point)."""
    return math.floor(ratio + 1e-9)


def seconds_per_step(probe: Callable[[str], list], prog: str, tokenizer) -> float:
    """Median seconds of an optimizer step on this machine, timed over a short probe run in a temporary folder
    (`probe(folder)`: its command line; nothing kept)."""
    clock = StepClock()
    with tempfile.TemporaryDirectory() as folder, quiet(Path(folder) / "log" / "probe.txt"):
        parts = build(parse_recipe(probe(str(Path(folder) / "run")), prog), [clock], tokenizer=tokenizer)
        parts.trainer.train()
    return statistics.median(clock.seconds[PROBE_STEPS[0]:])


class StepClock(TrainerCallback):
    """Seconds of each optimizer step."""

    def __init__(self):
        self.seconds: list[float] = []
        self.start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.start)


class Tokenizers:
    """One tokenizer per data source of a sweep, trained or loaded once and given to every point's build."""

    def __init__(self):
        self.cache: dict[str, Any] = {}

    def get(self, recipe: Recipe):
        _, data_args, args = recipe.args
        source = {k: v for k, v in vars(data_args).items() if k not in ("block_size", "max_eval_samples",
                                                                       "per_document_positions")}
        if data_args.dataset != "shakespeare" and not data_args.validation_files:
            source["seed"] = args.seed  # the validation documents are drawn with the seed
        key = json.dumps(source, sort_keys=True, default=str)
        if key not in self.cache:
            with tempfile.TemporaryDirectory() as folder, quiet(None):
                text = load_text(data_args, args.seed)
                self.cache[key] = resolve_tokenizer(data_args, text["train"], folder, True, False)
        return self.cache[key]


# ----------------------------------------------------------------------------- training the points


class Recorder(TrainerCallback):
    """The validation loss against steps and training seconds (evaluation time left out)."""

    def __init__(self):
        self.start = self.last_step_end = 0.0
        self.eval_seconds = 0.0
        self.curve: list[dict[str, float]] = []  # {step, seconds, eval_loss}

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_step_end = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step_end = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics and not any(p["step"] == state.global_step for p in self.curve):
            self.curve.append({"step": state.global_step, "seconds": self.train_seconds,
                               "eval_loss": metrics["eval_loss"]})
        self.eval_seconds += time.perf_counter() - self.last_step_end
        self.last_step_end = time.perf_counter()

    @property
    def train_seconds(self) -> float:
        return self.last_step_end - self.start - self.eval_seconds


def train_point(point: Point, prog: str, tokenizer) -> dict[str, Any]:
    """Train one point to its end; its record (what tables and plots read)."""
    recorder = Recorder()
    parts = build(point.recipe, [recorder], tokenizer=tokenizer)
    for callback in (PrinterCallback, ProgressCallback):
        parts.trainer.remove_callback(callback)
    try:
        code = lifecycle.run(parts, prog, point.argv).exit_code
    except TrainingHalted as halted:  # a diverged variant is a result of the sweep, not its end
        print(f"halted: {halted}")
        code = halted.exit_code
    state = parts.trainer.state
    tokens_per_step = point.shape["tokens_per_step"]
    losses = [p["eval_loss"] for p in recorder.curve]
    seconds = recorder.train_seconds
    tokens = tokens_per_step * state.global_step
    return {
        "key": point.key, "variant": point.variant, "seed": point.seed, "overrides": point.overrides,
        "exit_code": code, "parameters": point.shape["parameters"]["total"],
        "non_embedding_parameters": point.shape["parameters"]["non_embedding"],
        "flops_per_token": point.shape["flops_per_token"], "tokens_per_step": tokens_per_step,
        "steps": state.global_step, "tokens": tokens, "flops": point.shape["flops_per_token"] * tokens,
        "train_seconds": seconds, "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "final_eval_loss": losses[-1] if losses and code == 0 else None,
        "best_eval_loss": min(losses) if losses else None,
        "curve": [{**p, "tokens": p["step"] * tokens_per_step} for p in recorder.curve],
        "run_dir": str(point.recipe.args[2].output_dir),
    }


@contextlib.contextmanager
def quiet(log: Path | None):
    """A point's own output (Trainer, the plan, datasets' bars, warnings) into its log file (None: nowhere)
    instead of the terminal."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with open(log or os.devnull, "a", encoding="utf-8") as stream, contextlib.redirect_stdout(stream), \
                contextlib.redirect_stderr(stream):
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def point_file(out: Path, key: str) -> Path:
    return out / "points" / f"{key}.json"


def run_points(points: list[Point], out: Path, prog: str, tokenizers: Tokenizers) -> dict[str, dict]:
    """Train every point not finished in `out` yet (each key once); {key: record} of all points. A point ends in
    `OUT/points/<key>.json` only once trained to its end; an interrupted point (SIGINT / SIGTERM) stops the sweep
    with its exit code (`Interrupted`; the caller returns it)."""
    records: dict[str, dict] = {}
    timed = {point.timing_key: point.seconds_per_step for point in points if point.seconds_per_step is not None}
    if timed:
        timings_file = out / TIMINGS_FILE
        earlier = json.loads(timings_file.read_text(encoding="utf-8")) if timings_file.is_file() else {}
        write_json(timings_file, {**earlier, **timed})
    first: dict[str, Point] = {}
    for point in points:
        first.setdefault(point.key, point)  # points of one key train once, named by the first
    unique = list(first.values())
    for point in unique:
        if point_file(out, point.key).is_file():
            records[point.key] = json.loads(point_file(out, point.key).read_text(encoding="utf-8"))
    todo = [point for point in unique if point.key not in records]
    if len(todo) < len(unique):
        tqdm.write(f"reusing {len(unique) - len(todo)} finished point(s) from {out / 'points'}", file=sys.stderr)
    if not todo:
        return records
    bar = tqdm(total=len(todo), desc="points", unit="run", file=sys.stderr, dynamic_ncols=True)
    try:
        for point in todo:
            bar.set_postfix_str(f"{point.variant} seed {point.seed}")
            with quiet(out / "logs" / f"{point.key}.txt"):
                record = train_point(point, prog, tokenizers.get(point.recipe))
            if record["exit_code"] in (130, 143):  # interrupted: the point is not finished
                raise Interrupted(record["exit_code"])
            write_json(point_file(out, point.key), record)
            records[point.key] = record
            bar.update()
            tqdm.write(describe_point(record), file=sys.stderr)
    finally:
        bar.close()
    return records


class Interrupted(Exception):
    """A point was stopped by SIGINT / SIGTERM: the sweep ends with its exit code; a rerun continues."""

    def __init__(self, exit_code: int):
        super().__init__(f"interrupted (exit {exit_code}); run the same command again to continue")
        self.exit_code = exit_code


def write_json(path: Path, value: Any) -> None:
    """Written aside and moved in: a file that exists is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1, default=str), encoding="utf-8")
    os.replace(partial, path)


def describe_point(record: dict) -> str:
    """One line per finished point."""
    final = record["final_eval_loss"]
    loss = f"final validation loss {final:.4f}" if final is not None else f"halted (exit {record['exit_code']})"
    return (f"done {record['variant']} seed {record['seed']}: {loss}, {record['steps']} steps, "
            f"{record['tokens']:,} tokens, {record['train_seconds']:.1f} s")


def mean_spread(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation over seeds (spread None with one value)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None
