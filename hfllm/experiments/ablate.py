"""`hfllm ablate RECIPE --axis KEY=V1,V2 [...]`: the recipe against each change of one axis, at equal compute.

    hfllm ablate recipes/tiny.yaml --axis learning_rate=1e-3,3e-3 --budget flops 2e13 --seeds 2 --out runs/ablate
    hfllm.ablate("recipes/tiny.yaml", {"learning_rate": [1e-3, 3e-3]}, budget=("flops", 2e13), seeds=2)

Points: the baseline (the recipe as given) plus one per value of the axis, each trained `seeds` times (seed, seed+1,
...). Two axes change one at a time only with `grid=True` (`--grid`), which trains every combination. Every point
gets the same budget (points.py: steps, FLOPs counted as `hfllm plan` counts them, or seconds on this machine).
Output in OUT: results.md (the table), results.json (the rows and every point), results.png (validation loss
against tokens and against training seconds); points/ and runs/ keep the finished points for a rerun.

A variant's difference to the baseline (mean final validation loss over seeds) smaller than the seed spread (the
larger standard deviation of the two) is labelled "noise" (docs/experiments.md).
"""

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ArgumentParser, HfllmError
from ..recipe import recipe_argv, split_flags
from ..training.arguments import parse_recipe
from .plots import plot_curves
from .points import (
    Budget,
    Interrupted,
    Point,
    Tokenizers,
    mean_spread,
    resolve_points,
    run_points,
    write_json,
)

PROG = "hfllm ablate"
RESERVED = {"seed": "--seeds", "max_steps": "--budget steps N", "output_dir": "--out"}  # keys the sweep sets


@dataclass
class AblationResults:
    """What `ablate` returns: one row per variant (the table), every point's record, and where they were written."""

    rows: list[dict[str, Any]]
    points: list[dict[str, Any]]
    out: Path
    exit_code: int = 0  # 130 / 143: interrupted; a rerun continues

    def markdown(self) -> str:
        return table(self.rows)


def ablate(recipe: str | Path | Mapping, axes: Mapping[str, Sequence], /, *, budget=("steps", 200), seeds: int = 1,
           out: str | Path = "runs/ablate", grid: bool = False, prog: str = PROG, **overrides) -> AblationResults:
    """Train the recipe (the baseline) and each value of one axis (every combination with `grid=True`), each
    `seeds` times under the same budget, as `hfllm ablate` does; the table as data.

    recipe: a YAML recipe file or the same keys as a dict; axes: {recipe key: [values]}; budget: ("steps", N),
    ("flops", F) or ("seconds", S); seeds: runs of each point (the recipe's seed, seed + 1, ...); out: the folder of
    results.md / results.json / results.png and of the finished points, which a rerun reuses; overrides: any recipe
    key, for every point. Bad input raises HfllmError with the command's line, before anything is written.

        results = hfllm.ablate("recipes/tiny.yaml", {"learning_rate": [1e-3, 6e-3]}, budget=("flops", 2e13), seeds=3)
        results.rows[1]["final_eval_loss"], results.rows[1]["verdict"]
    """
    budget, out = Budget.of(budget), Path(out)
    if budget.kind not in ("flops", "seconds", "steps"):
        raise HfllmError(f"ablate's budget is flops, seconds or steps (got {budget.kind})")
    seed = parse_recipe(recipe_argv(recipe, overrides), prog).args[2].seed  # the baseline's, checked first
    points = grid_points(axes, grid, seeds, seed)
    tokenizers = Tokenizers()
    resolve_points(recipe, overrides, points, budget, out, prog, tokenizers)
    out.mkdir(parents=True, exist_ok=True)
    try:
        records = run_points(points, out, prog, tokenizers)
    except Interrupted as stop:
        return AblationResults([], [], out, stop.exit_code)
    ordered = [records[point.key] | {"variant": point.variant, "seed": point.seed} for point in points]
    rows = summarize(ordered)
    results = AblationResults(rows, ordered, out)
    write_json(out / "results.json", {"budget": str(budget), "seeds": seeds, "rows": rows, "points": ordered})
    (out / "results.md").write_text(f"# ablation: budget {budget}, {seeds} seed(s)\n\n{table(rows)}\n",
                                    encoding="utf-8")
    plot_curves(ordered, out / "results.png")
    return results


def grid_points(axes: Mapping[str, Sequence], grid: bool, seeds: int, seed: int) -> list[Point]:
    """Baseline + one point per axis value (or per combination with `grid`), each for `seeds` seeds."""
    if not axes:
        raise HfllmError("give at least one axis: --axis KEY=V1,V2 (a recipe key and its values)")
    if len(axes) > 1 and not grid:
        raise HfllmError(f"{len(axes)} axes ({', '.join(axes)}) change together only in a grid: ablate one axis at a "
                         "time, or add --grid to train every combination")
    if seeds < 1:
        raise HfllmError(f"--seeds must be at least 1 (got {seeds})")
    for key, values in axes.items():
        if key in RESERVED:
            raise HfllmError(f"axis '{key}' is set by the sweep itself; use {RESERVED[key]}")
        if isinstance(values, (str, bytes)) or not values:
            raise HfllmError(f"axis '{key}': give a list of values (--axis {key}=V1,V2)")
    variants = [("baseline", {})]
    for combination in itertools.product(*([(key, value) for value in values] for key, values in axes.items())):
        variants.append((", ".join(f"{key}={value}" for key, value in combination), dict(combination)))
    return [Point(name, values, seed + index) for name, values in variants for index in range(seeds)]


# ----------------------------------------------------------------------------- the table


def summarize(records: list[dict]) -> list[dict[str, Any]]:
    """One row per variant: means over seeds, the spread, the difference to the baseline and its label."""
    variants = list(dict.fromkeys(record["variant"] for record in records))
    rows = []
    for variant in variants:
        mine = [record for record in records if record["variant"] == variant]
        final, spread = mean_spread([r["final_eval_loss"] for r in mine])
        best, best_spread = mean_spread([r["best_eval_loss"] for r in mine])
        rows.append({
            "variant": variant, "seeds": len(mine), "parameters": mine[0]["parameters"],
            "tokens": mean_spread([r["tokens"] for r in mine])[0], "flops": mean_spread([r["flops"] for r in mine])[0],
            "train_seconds": mean_spread([r["train_seconds"] for r in mine])[0],
            "final_eval_loss": final, "final_spread": spread, "best_eval_loss": best, "best_spread": best_spread,
            "tokens_per_second": mean_spread([r["tokens_per_second"] for r in mine])[0],
            "halted": sum(r["final_eval_loss"] is None for r in mine),
        })
    base = rows[0]
    for row in rows:
        row["delta"], row["verdict"] = verdict(row, base)
    return rows


def verdict(row: dict, base: dict) -> tuple[float | None, str]:
    """(final loss minus the baseline's, label): better / worse, or noise when the difference is within the seed
    spread; "1 seed" when there is no spread to compare with."""
    if row is base:
        return 0.0, "baseline"
    if row["final_eval_loss"] is None or base["final_eval_loss"] is None:
        return None, "halted"
    delta = row["final_eval_loss"] - base["final_eval_loss"]
    spreads = [s for s in (row["final_spread"], base["final_spread"]) if s is not None]
    if not spreads:
        return delta, "1 seed: spread unknown"
    if abs(delta) < max(spreads):
        return delta, "noise"
    return delta, "better" if delta < 0 else "worse"


def loss_text(mean: float | None, spread: float | None) -> str:
    if mean is None:
        return "halted"
    return f"{mean:.4f}" + (f" ± {spread:.4f}" if spread is not None else "")


def table(rows: list[dict]) -> str:
    lines = ["| variant | parameters | tokens | FLOPs | wall time | final validation loss | best validation loss | "
             "tokens/s | Δ final vs baseline | |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        delta = "–" if row["delta"] is None else f"{row['delta']:+.4f}"
        lines.append(
            f"| {row['variant']} | {row['parameters'] / 1e6:.3f}M | {row['tokens']:,.0f} | {row['flops']:.3g} | "
            f"{row['train_seconds']:.1f} s | {loss_text(row['final_eval_loss'], row['final_spread'])} | "
            f"{loss_text(row['best_eval_loss'], row['best_spread'])} | {row['tokens_per_second'] or 0:,.0f} | "
            f"{delta} | {row['verdict']} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command


def parse_axis(text: str) -> tuple[str, list[str]]:
    """`KEY=V1,V2` -> (KEY, [V1, V2]); commas inside brackets or braces belong to a value, so a value can be a YAML
    list or mapping: `layer_types=[mamba,full_attention],[full_attention,full_attention]`."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values.strip(","):
        raise HfllmError(f"--axis {text}: give KEY=V1,V2 (a recipe key and comma-separated values)")
    parts, depth, start = [], 0, 0
    for i, char in enumerate(values + ","):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            parts.append(values[start:i].strip())
            start = i + 1
    if depth != 0:
        raise HfllmError(f"--axis {text}: unbalanced brackets in the values")
    return key.strip(), [part for part in parts if part]


def parser(prog: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a pretraining recipe (YAML); --key value overrides after it apply to every point")
    parser.add_argument("--axis", action="append", default=[], metavar="KEY=V1,V2", help="a recipe key and its values")
    parser.add_argument("--budget", nargs=2, metavar=("KIND", "VALUE"), default=["steps", "200"],
                        help="flops|seconds|steps and the amount every point gets (default: steps 200)")
    parser.add_argument("--seeds", type=int, default=1, help="runs of each point with seeds seed, seed+1, ... (default 1)")
    parser.add_argument("--out", default="runs/ablate", help="output folder (default runs/ablate)")
    parser.add_argument("--grid", action="store_true", help="train every combination of several axes")
    return parser


def main(argv: list[str], prog: str = PROG) -> int:
    args, rest = parser(prog).parse_known_args(argv)
    axes: dict[str, list[str]] = {}
    for text in args.axis:
        key, values = parse_axis(text)
        if key in axes:
            raise HfllmError(f"axis '{key}' is given twice; give its values once: --axis {key}=V1,V2,...")
        axes[key] = values
    results = ablate(args.recipe, axes, budget=tuple(args.budget), seeds=args.seeds, out=args.out, grid=args.grid,
                     prog=prog, **split_flags(rest))
    if results.exit_code:
        return results.exit_code
    print(results.markdown())
    print(f"written: {results.out / 'results.md'}, results.json, results.png")
    return 0
