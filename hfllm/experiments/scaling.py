"""`hfllm scaling RECIPE [--sizes 2x64,4x128] [--tokens 2e5,8e5] [--holdout 6x192@1.6e6]`: is bigger better, and by
how much.

    hfllm scaling recipes/scaling/shakespeare-char.yaml --out runs/scaling
    hfllm.scaling("recipes/scaling/shakespeare-char.yaml", sizes=["2x64", "4x128"], tokens=[2e5, 8e5])

Trains a grid of model sizes x token budgets with everything else fixed (hardware, optimizer, batch, schedule shape),
each run with its own cosine schedule to its own length (points.py), then:
  - checks that at each token budget a bigger model reaches a lower final validation loss, and that at each size
    more tokens do; every violation is named with its runs, and the command exits 4 (like `hfllm doctor`);
  - fits L(N, D) = E + A/N^alpha + B/D^beta (fit.py: Chinchilla approach 3) with bootstrap intervals, and reports
    the compute-optimal tokens per parameter the fit implies at the grid's largest compute, next to Chinchilla's ~20;
  - predicts the final loss of one held-out larger run, trains it, and reports the error.
A size `LxD` is L layers of width D, heads of the recipe's head dimension (as many key/value heads), and a SwiGLU
width of 8/3 D rounded up to a multiple of 8. N is the model's total parameter count, D the tokens trained.
A recipe may hold these options in a `scaling:` section (sizes, tokens, holdout, seeds); flags replace them.
Output in OUT: results.md, results.json, scaling.png; points/ and runs/ keep the finished runs for a rerun.
"""

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ArgumentParser, HfllmError
from ..recipe import read_yaml, recipe_argv, split_flags
from ..training.arguments import parse_recipe
from ..training.pretrain import resolve_config
from .fit import Law, bootstrap, fit_law, interval
from .plots import plot_scaling
from .points import Budget, Interrupted, Point, Tokenizers, resolve_points, run_points, write_json

PROG = "hfllm scaling"
CHINCHILLA_TOKENS_PER_PARAMETER = 20
SCALING_KEYS = ("sizes", "tokens", "holdout", "seeds")
BOOTSTRAP_SAMPLES = 200


@dataclass
class ScalingResults:
    """What `scaling` returns: the grid's cells, the checks, the fit and the held-out comparison."""

    cells: list[dict[str, Any]]  # one per size x tokens: size, parameters, tokens, loss (mean over seeds), keys
    points: list[dict[str, Any]]
    violations: list[str]
    law: Law | None
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    tokens_per_parameter: dict[str, Any] = field(default_factory=dict)
    holdout: dict[str, Any] | None = None
    out: Path = Path("runs/scaling")
    exit_code: int = 0  # 4: a monotonicity check failed; 130 / 143: interrupted

    def markdown(self) -> str:
        return report(self)


def scaling(recipe: str | Path | Mapping, /, *, sizes: Sequence[str] | None = None, tokens: Sequence[float] | None = None,
            holdout: str | None = None, seeds: int | None = None, out: str | Path = "runs/scaling",
            prog: str = PROG, **overrides) -> ScalingResults:
    """Train the grid of sizes x token budgets, check that bigger and longer are better, fit L(N, D), predict and
    train the held-out run, as `hfllm scaling` does; the results as data (`exit_code` 4 when a check failed).

    recipe: a YAML recipe file or the same keys as a dict, optionally with a `scaling:` section (sizes, tokens,
    holdout, seeds) that the keyword arguments replace; sizes: ["LAYERSxWIDTH", ...]; tokens: [tokens per run, ...];
    holdout: "SIZE@TOKENS"; out: the folder of results.md / results.json / scaling.png and of the finished runs, which
    a rerun reuses; overrides: any recipe key, for every run. Bad input raises HfllmError before anything is written.

        results = hfllm.scaling("recipes/scaling/shakespeare-char.yaml", out="runs/scaling-char")
        results.law.alpha, results.intervals["alpha"], results.holdout["error"], results.violations
    """
    base, options = split_recipe(recipe)
    sizes = list(sizes if sizes is not None else options.get("sizes") or [])
    budgets = [float(t) for t in (tokens if tokens is not None else options.get("tokens") or [])]
    holdout = holdout if holdout is not None else options.get("holdout")
    seeds = int(seeds if seeds is not None else options.get("seeds", 1))
    if len(sizes) < 2 or len(budgets) < 2 or len(sizes) * len(budgets) < 6:
        raise HfllmError(f"a scaling grid needs at least 2 sizes and 2 token budgets, 6 cells in all, to fit 5 "
                         f"numbers (got {len(sizes)} sizes x {len(budgets)} budgets); give --sizes and --tokens")
    if seeds < 1:
        raise HfllmError(f"--seeds must be at least 1 (got {seeds})")
    out = Path(out)
    head_dim = recipe_head_dim(base, overrides, prog)
    seed = parse_recipe(recipe_argv(base, overrides), prog).args[2].seed
    tokenizers = Tokenizers()
    grid: list[Point] = []
    for budget in budgets:
        cell = [Point(f"{size} @ {budget:g} tokens", size_overrides(size, head_dim), seed + index)
                for size in sizes for index in range(seeds)]
        resolve_points(base, overrides, cell, Budget("tokens", budget), out, prog, tokenizers)
        grid += cell
    held: list[Point] = []
    if holdout:
        size, budget = parse_holdout(holdout)
        held = [Point(f"held-out {size} @ {budget:g} tokens", size_overrides(size, head_dim), seed)]
        resolve_points(base, overrides, held, Budget("tokens", budget), out, prog, tokenizers)
    out.mkdir(parents=True, exist_ok=True)

    try:
        records = run_points(grid, out, prog, tokenizers)
        ordered = [records[p.key] | {"variant": p.variant, "seed": p.seed} for p in grid]
        cells = grid_cells(grid, ordered)
        violations = monotonicity(cells)
        for line in violations:
            print(f"FAIL {line}", flush=True)
        runs = [r for r in ordered if r["final_eval_loss"] is not None]
        law = fit_law([r["parameters"] for r in runs], [r["tokens"] for r in runs],
                      [r["final_eval_loss"] for r in runs])
        laws = bootstrap([r["parameters"] for r in runs], [r["tokens"] for r in runs],
                         [r["final_eval_loss"] for r in runs], law, samples=BOOTSTRAP_SAMPLES)
        compute = max(6 * r["parameters"] * r["tokens"] for r in runs)
        intervals = {name: interval([getattr(each, name) for each in laws]) for name in ("E", "A", "B", "alpha", "beta")}
        optimal = {"flops": compute, "fit": law.tokens_per_parameter(compute),
                   "interval": interval([each.tokens_per_parameter(compute) for each in laws]),
                   "chinchilla": CHINCHILLA_TOKENS_PER_PARAMETER}
        held_out = None
        if held:
            point = held[0]
            parameters = point.shape["parameters"]["total"]
            tokens_trained = point.recipe.args[2].max_steps * point.shape["tokens_per_step"]
            predicted = float(law.loss(parameters, tokens_trained))
            band = interval([float(each.loss(parameters, tokens_trained)) for each in laws])
            print(f"{point.variant}: {parameters / 1e6:.3f}M parameters, {tokens_trained:,} tokens; predicted final "
                  f"validation loss {predicted:.4f} (95% interval {band[0]:.4f}-{band[1]:.4f}); training it", flush=True)
            record = run_points(held, out, prog, tokenizers)[point.key]
            actual = record["final_eval_loss"]
            held_out = {"variant": point.variant, "key": point.key, "parameters": parameters, "tokens": tokens_trained,
                        "predicted": predicted, "interval": band, "loss": actual,
                        "error": None if actual is None else actual - predicted,
                        "relative_error": None if actual is None else (actual - predicted) / actual}
            ordered.append(record)
    except Interrupted as stop:
        return ScalingResults([], [], [], None, out=out, exit_code=stop.exit_code)
    results = ScalingResults(cells, ordered, violations, law, intervals, optimal, held_out, out,
                             4 if violations else 0)
    write_json(out / "results.json", {"cells": cells, "violations": violations, "law": law.as_dict(),
                                      "intervals": intervals, "tokens_per_parameter": optimal, "holdout": held_out,
                                      "points": ordered})
    (out / "results.md").write_text(report(results) + "\n", encoding="utf-8")
    plot_scaling(cells, law, held_out, out / "scaling.png")
    return results


# ----------------------------------------------------------------------------- the grid


def split_recipe(recipe) -> tuple[Any, dict[str, Any]]:
    """(the recipe without its `scaling:` section, that section)."""
    values = read_yaml(recipe if isinstance(recipe, Mapping) else str(recipe))
    options = values.pop("scaling", None) or {}
    if not isinstance(options, Mapping):
        raise HfllmError(f"the recipe's scaling section must be a mapping of {', '.join(SCALING_KEYS)}")
    unknown = [key for key in options if key not in SCALING_KEYS]
    if unknown:
        raise HfllmError(f"unknown key '{unknown[0]}' in the recipe's scaling section; use {', '.join(SCALING_KEYS)}")
    return values, dict(options)


def recipe_head_dim(recipe, overrides: Mapping[str, Any], prog: str) -> int:
    parsed = parse_recipe(recipe_argv(recipe, overrides), prog)
    model_args, data_args, _ = parsed.args
    config = resolve_config(model_args.model, parsed.free, data_args.block_size)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def size_overrides(size: str, head_dim: int) -> dict[str, int]:
    """`LxD` -> the recipe keys of L layers of width D with heads of `head_dim`."""
    layers, sep, width = str(size).partition("x")
    if not sep or not layers.isdigit() or not width.isdigit() or int(layers) < 1 or int(width) < 1:
        raise HfllmError(f"size '{size}': give LAYERSxWIDTH, e.g. 4x128")
    layers, width = int(layers), int(width)
    if width % head_dim:
        raise HfllmError(f"size '{size}': width {width} is not a multiple of the recipe's head dimension {head_dim}")
    heads = width // head_dim
    return {"num_hidden_layers": layers, "hidden_size": width, "num_attention_heads": heads,
            "num_key_value_heads": heads, "intermediate_size": math.ceil(8 * width / 3 / 8) * 8}


def parse_holdout(text: str) -> tuple[str, float]:
    size, sep, tokens = str(text).partition("@")
    try:
        return size, float(tokens)
    except ValueError:
        raise HfllmError(f"holdout '{text}': give SIZE@TOKENS, e.g. 6x192@1.6e6") from None


def grid_cells(points: list[Point], records: list[dict]) -> list[dict[str, Any]]:
    """One cell per size x token budget: the mean final loss over its seeds."""
    cells: dict[str, dict] = {}
    for point, record in zip(points, records):
        size, _, budget = point.variant.partition(" @ ")
        cell = cells.setdefault(point.variant, {"size": size, "budget": budget, "parameters": record["parameters"],
                                                "tokens": record["tokens"], "losses": [], "keys": []})
        cell["losses"].append(record["final_eval_loss"])
        cell["keys"].append(record["key"])
    for cell in cells.values():
        losses = [loss for loss in cell.pop("losses") if loss is not None]
        cell["loss"] = statistics.fmean(losses) if losses else None
    return list(cells.values())


def monotonicity(cells: list[dict]) -> list[str]:
    """Every adjacent pair where more parameters (same tokens) or more tokens (same size) does not lower the loss."""
    violations = []
    for group, order, what in (("tokens", "parameters", "a bigger model"), ("size", "tokens", "more tokens")):
        for value in dict.fromkeys(cell[group] for cell in cells):
            row = sorted((c for c in cells if c[group] == value), key=lambda c: c[order])
            for smaller, bigger in zip(row, row[1:]):
                if smaller["loss"] is None or bigger["loss"] is None or bigger["loss"] >= smaller["loss"]:
                    violations.append(
                        f"{what} is not better: {name(bigger)} loss {loss_text(bigger)} >= {name(smaller)} loss "
                        f"{loss_text(smaller)} (runs {', '.join(bigger['keys'] + smaller['keys'])})")
    return violations


def name(cell: dict) -> str:
    return f"{cell['size']} ({cell['parameters'] / 1e6:.3f}M) @ {cell['tokens']:,} tokens"


def loss_text(cell: dict) -> str:
    return "halted" if cell["loss"] is None else f"{cell['loss']:.4f}"


# ----------------------------------------------------------------------------- the report


def report(results: ScalingResults) -> str:
    cells, law = results.cells, results.law
    sizes = list(dict.fromkeys(c["size"] for c in cells))
    budgets = list(dict.fromkeys(c["tokens"] for c in cells))
    lines = ["# scaling", "", "final validation loss (mean over seeds); rows: model size, columns: tokens trained", "",
             "| size | parameters | " + " | ".join(f"{t:,}" for t in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for size in sizes:
        mine = {c["tokens"]: c for c in cells if c["size"] == size}
        first = next(iter(mine.values()))
        lines.append(f"| {size} | {first['parameters'] / 1e6:.3f}M | "
                     + " | ".join(loss_text(mine[t]) if t in mine else "–" for t in budgets) + " |")
    lines += ["", "## checks", ""]
    lines += [f"- FAIL {v}" for v in results.violations] or ["- every bigger model and every longer run has a lower loss"]
    if law is not None:
        ci = results.intervals
        lines += ["", "## fit: L(N, D) = E + A / N^alpha + B / D^beta (Huber on log loss, L-BFGS; 95% bootstrap "
                  "intervals)", "",
                  "| | value | 95% interval |", "|---|---|---|"]
        lines += [f"| {k} | {getattr(law, k):.4g} | {ci[k][0]:.4g} – {ci[k][1]:.4g} |" for k in ("E", "A", "B", "alpha", "beta")]
        tpp = results.tokens_per_parameter
        lines += ["", f"compute-optimal tokens per parameter at C = {tpp['flops']:.3g} FLOPs (6 N D, the grid's largest "
                  f"run): {tpp['fit']:.3g} (95% interval {tpp['interval'][0]:.3g} – {tpp['interval'][1]:.3g}); "
                  f"Chinchilla: ≈{tpp['chinchilla']}"]
    held = results.holdout
    if held is not None:
        measured = "halted" if held["loss"] is None else (
            f"{held['loss']:.4f}; error {held['error']:+.4f} ({held['relative_error']:+.1%})")
        lines += ["", "## held-out run", "",
                  f"{held['variant']}: {held['parameters'] / 1e6:.3f}M parameters, {held['tokens']:,} tokens; predicted "
                  f"{held['predicted']:.4f} (95% interval {held['interval'][0]:.4f} – {held['interval'][1]:.4f}), "
                  f"measured {measured}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command


def parser(prog: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a pretraining recipe (YAML), optionally with a scaling: section")
    parser.add_argument("--sizes", help="model sizes LAYERSxWIDTH, comma-separated (e.g. 2x64,4x128)")
    parser.add_argument("--tokens", help="token budgets, comma-separated (e.g. 2e5,8e5)")
    parser.add_argument("--holdout", help="the larger run predicted, then trained: SIZE@TOKENS (e.g. 6x192@1.6e6)")
    parser.add_argument("--seeds", type=int, help="runs of each cell (default 1)")
    parser.add_argument("--out", default="runs/scaling", help="output folder (default runs/scaling)")
    return parser


def main(argv: list[str], prog: str = PROG) -> int:
    args, rest = parser(prog).parse_known_args(argv)
    tokens = None
    if args.tokens is not None:
        try:
            tokens = [float(t) for t in args.tokens.split(",") if t.strip()]
        except ValueError:
            raise HfllmError(f"--tokens {args.tokens}: give numbers separated by commas, e.g. 2e5,8e5") from None
    results = scaling(args.recipe, sizes=args.sizes.split(",") if args.sizes else None, tokens=tokens,
                      holdout=args.holdout, seeds=args.seeds, out=args.out, prog=prog, **split_flags(rest))
    if not results.cells:
        return results.exit_code
    print(results.markdown())
    print(f"written: {results.out / 'results.md'}, results.json, scaling.png")
    return results.exit_code
