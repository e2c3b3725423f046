"""hfllm ablate and hfllm scaling: a tiny sweep with seeds, resuming, bad input, equal-FLOPs steps, the scaling
grid's monotonicity checks and the fit of L(N, D) on losses drawn from a known law."""

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import write_corpus

from hfllm.cli import main as cli
from hfllm.errors import HfllmError
from hfllm.experiments.ablate import ablate, grid_points, parse_axis, verdict
from hfllm.experiments.fit import Law, bootstrap, fit_law, interval
from hfllm.experiments.points import Budget, Tokenizers, resolve_points
from hfllm.experiments.scaling import monotonicity, scaling
from hfllm.models import HfllmForCausalLM, get_preset
from hfllm.training.mfu import flops_per_token

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_recipe(folder: Path, **keys) -> dict:
    """A pretraining recipe that trains in a fraction of a second: a 1-layer char model on a small corpus."""
    train, validation = write_corpus(folder)
    return {"model": "llama-tiny", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "tokenizer": "char", "block_size": 16,
            "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4, "max_eval_samples": 4,
            "train_files": [train], "validation_files": [validation], "learning_rate": 3e-3, "warmup_steps": 2,
            "eval_steps": 4, "logging_steps": 4, "save_steps": 1000, "seed": 7, "dataloader_num_workers": 0,
            "torch_compile": False, **keys}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """2 values x 2 seeds of one axis, plus the baseline: 6 points of 8 steps, 4 trained (the value 3e-3 is the
    baseline's own, so its points are the baseline's)."""
    folder = tmp_path_factory.mktemp("sweep")
    recipe = tiny_recipe(folder)
    progress = io.StringIO()
    with contextlib.redirect_stderr(progress):
        results = ablate(recipe, {"learning_rate": [3e-3, 1e-2]}, budget=("steps", 8), seeds=2, out=folder / "out")
    return recipe, results, progress.getvalue()


def test_tiny_sweep_writes_the_table_with_seed_spread(sweep):
    _, results, progress = sweep
    variants = ("baseline", "learning_rate=0.003", "learning_rate=0.01")
    assert [row["variant"] for row in results.rows] == list(variants)
    assert [(p["variant"], p["seed"]) for p in results.points] == [(v, seed) for v in variants for seed in (7, 8)]
    assert len({p["key"] for p in results.points}) == 4  # the baseline's value trains once
    assert len(list((results.out / "points").iterdir())) == 4
    done = [line for line in progress.splitlines() if line.startswith("done ")]  # one line per trained point
    assert len(done) == 4 and done[0].startswith("done baseline seed 7: final validation loss ")
    same = results.rows[1]
    assert same["final_eval_loss"] == results.rows[0]["final_eval_loss"] and same["verdict"] == "noise"
    assert results.rows[2]["verdict"] in ("better", "worse", "noise")
    assert all(p["steps"] == 8 and p["tokens"] == 8 * 2 * 16 for p in results.points)  # the same budget everywhere
    for row in results.rows:
        finals = [p["final_eval_loss"] for p in results.points if p["variant"] == row["variant"]]
        assert finals[0] != finals[1]  # the seeds are different runs
        assert row["final_eval_loss"] == pytest.approx(np.mean(finals))
        assert row["final_spread"] == pytest.approx(np.std(finals, ddof=1))
    for point in results.points:  # the validation curve: at every eval_steps and the end, in tokens and seconds
        assert [c["step"] for c in point["curve"]] == [4, 8]
        assert [c["tokens"] for c in point["curve"]] == [128, 256]
        assert point["curve"][-1]["eval_loss"] == point["final_eval_loss"]
        assert 0 < point["curve"][0]["seconds"] < point["curve"][1]["seconds"] <= point["train_seconds"]
    table = (results.out / "results.md").read_text()
    assert "| learning_rate=0.01 |" in table and " ± " in table
    saved = json.loads((results.out / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(results.rows))
    assert (results.out / "results.png").stat().st_size > 10_000


def test_noise_label_compares_the_difference_with_the_seed_spread():
    base = {"final_eval_loss": 2.0, "final_spread": 0.05}
    assert verdict(base, base) == (0.0, "baseline")
    assert verdict({"final_eval_loss": 1.97, "final_spread": 0.01}, base)[1] == "noise"
    assert verdict({"final_eval_loss": 1.90, "final_spread": 0.01}, base)[1] == "better"
    assert verdict({"final_eval_loss": 2.06, "final_spread": 0.01}, base)[1] == "worse"
    assert verdict({"final_eval_loss": 2.04, "final_spread": 0.08}, base)[1] == "noise"  # the larger spread counts
    single = {"final_eval_loss": 2.0, "final_spread": None}
    assert verdict({"final_eval_loss": 1.9, "final_spread": None}, single)[1] == "1 seed: spread unknown"


def test_rerun_reuses_finished_points_and_trains_the_missing_one(sweep):
    recipe, results, _ = sweep
    out = results.out
    logs = {p["key"]: (out / "logs" / f"{p['key']}.txt").stat().st_size for p in results.points}
    assert len(logs) == 4
    missing = results.points[-1]["key"]
    (out / "points" / f"{missing}.json").unlink()  # as if the sweep had been killed during its last point
    again = ablate(recipe, {"learning_rate": [3e-3, 1e-2]}, budget=("steps", 8), seeds=2, out=out)
    grown = [key for key, size in logs.items() if (out / "logs" / f"{key}.txt").stat().st_size != size]
    assert grown == [missing]  # only the unfinished point trained again
    assert [p["final_eval_loss"] for p in again.points[:-1]] == [p["final_eval_loss"] for p in results.points[:-1]]
    assert (out / "points" / f"{missing}.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--axis", "learning_rat=1e-3,2e-3"], "unknown key 'learning_rat'"),
    (["--axis", "learning_rate=1e-3,-1"], "key 'learning_rate': got -1.0; allowed: a number >= 0"),
    (["--axis", "learning_rate=1e-3", "--budget", "flops", "1000"], "below one optimizer step"),
    (["--axis", "learning_rate=1e-3", "--axis", "warmup_steps=1"], "2 axes (learning_rate, warmup_steps) change "
                                                                    "together only in a grid"),
    (["--axis", "learning_rate"], "--axis learning_rate: give KEY=V1,V2"),
    (["--axis", "seed=1,2"], "axis 'seed' is set by the sweep itself; use --seeds"),
    (["--axis", "learning_rate=1e-3", "--budget", "hours", "2"], "budget hours 2"),
    (["--axis", "layer_types=[full_attention"], "unbalanced brackets"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, args, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(json.dumps(tiny_recipe(tmp_path)))
    assert cli(["ablate", str(recipe), *args, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert not (tmp_path / "out").exists()


def test_axis_values_may_be_yaml_lists_or_mappings():
    assert parse_axis("layer_types=[mamba, full_attention],[full_attention,full_attention]") == (
        "layer_types", ["[mamba, full_attention]", "[full_attention,full_attention]"])
    assert parse_axis("lr_scheduler_kwargs={min_lr: 1e-4, x: 2},{}") == ("lr_scheduler_kwargs", ["{min_lr: 1e-4, x: 2}", "{}"])
    assert parse_axis("learning_rate=1e-3,,2e-3") == ("learning_rate", ["1e-3", "2e-3"])


def test_grid_combines_axes_only_when_asked():
    points = grid_points({"a": [1, 2], "b": [3]}, grid=True, seeds=1, seed=0)
    assert [p.variant for p in points] == ["baseline", "a=1, b=3", "a=2, b=3"]
    assert points[1].overrides == {"a": 1, "b": 3}


def test_flops_budget_gives_each_variant_its_steps(tmp_path):
    """Steps = budget / (FLOPs per token as hfllm plan counts them x tokens per step): a model with twice the
    width trains fewer steps."""
    recipe = tiny_recipe(tmp_path)
    points = grid_points({"hidden_size": [64]}, grid=False, seeds=1, seed=7)
    budget = 2e8
    resolve_points(recipe, {}, points, Budget("flops", budget), tmp_path / "out", "hfllm ablate", Tokenizers())
    for point in points:
        shape = {k: recipe[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                        "num_key_value_heads")}
        config = get_preset("llama-tiny", **{**shape, **point.overrides})
        config.vocab_size = point.shape["parameters"]["embedding"] // config.hidden_size
        per_token = flops_per_token(HfllmForCausalLM(config), 16)
        assert point.shape["flops_per_token"] == per_token
        assert point.recipe.args[2].max_steps == math.floor(budget / (per_token * 32))
    assert points[1].recipe.args[2].max_steps < points[0].recipe.args[2].max_steps / 2
    assert not (tmp_path / "out").exists()


def test_seconds_budget_times_each_variant_once_and_keys_it_by_the_budget(tmp_path):
    """Steps from a probe's seconds per step, one probe per variant shared by its seeds (so they train the same
    steps); the key holds the budget, so a rerun (other timings) reuses it, and a rerun after the sweep started keeps
    the first timings (OUT/timings.json)."""
    recipe = tiny_recipe(tmp_path)
    runs = []
    for _ in range(2):
        points = grid_points({"hidden_size": [64]}, grid=False, seeds=1, seed=7)
        resolve_points(recipe, {}, points, Budget("seconds", 1.0), tmp_path / "out", "hfllm ablate", Tokenizers())
        runs.append(points)
    for first, again in zip(*runs):
        assert first.key == again.key and first.recipe.args[2].max_steps >= 1
        assert first.recipe.args[2].max_steps == math.floor(1.0 / first.seconds_per_step + 1e-9)
    assert runs[0][0].key != runs[0][1].key
    seeds = grid_points({"hidden_size": [64]}, grid=False, seeds=2, seed=7)[:2]  # the baseline, seeds 7 and 8
    resolve_points(recipe, {}, seeds, Budget("seconds", 1.0), tmp_path / "out", "hfllm ablate", Tokenizers())
    assert seeds[0].key != seeds[1].key and seeds[0].timing_key == seeds[1].timing_key
    assert seeds[0].recipe.args[2].max_steps == seeds[1].recipe.args[2].max_steps
    (tmp_path / "out" / "timings.json").parent.mkdir()
    (tmp_path / "out" / "timings.json").write_text(json.dumps({runs[0][0].timing_key: 0.1}))  # as the first run wrote it
    points = grid_points({"hidden_size": [64]}, grid=False, seeds=1, seed=7)
    resolve_points(recipe, {}, points, Budget("seconds", 1.0), tmp_path / "out", "hfllm ablate", Tokenizers())
    assert points[0].seconds_per_step == 0.1 and points[0].recipe.args[2].max_steps == 10
    assert points[1].seconds_per_step != 0.1  # not timed before: probed now
    (tmp_path / "out" / "timings.json").unlink()
    (tmp_path / "out").rmdir()
    with pytest.raises(HfllmError, match=r"budget seconds 1e-06 is below one optimizer step of baseline \("):
        resolve_points(recipe, {}, grid_points({"hidden_size": [64]}, grid=False, seeds=1, seed=7),
                       Budget("seconds", 1e-6), tmp_path / "out", "hfllm ablate", Tokenizers())
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- scaling: checks and fit

LAW = Law(E=1.2, A=80.0, B=300.0, alpha=0.35, beta=0.3)
SIZES = {"1x32": 2e4, "2x64": 8e4, "3x96": 3e5, "4x128": 1e6, "6x192": 4e6}
TOKENS = (1e5, 4e5, 1.6e6, 6.4e6)


def cells_from(law: Law) -> list[dict]:
    return [{"size": size, "parameters": n, "tokens": int(d), "loss": float(law.loss(n, d)),
             "keys": [f"{size}-{d:g}"]} for d in TOKENS for size, n in SIZES.items()]


def test_monotonicity_names_every_violation():
    cells = cells_from(LAW)
    assert monotonicity(cells) == []
    broken = next(c for c in cells if c["size"] == "3x96" and c["tokens"] == 4e5)
    broken["loss"] = 20.0  # worse than the smaller model and than fewer tokens
    found = monotonicity(cells)
    assert len(found) == 2
    assert found[0].startswith("a bigger model is not better: 3x96 (0.300M) @ 400,000 tokens loss 20.0000 >= "
                               "2x64 (0.080M) @ 400,000 tokens loss 8.9972")
    assert found[0].endswith("(runs 3x96-400000, 2x64-400000)")
    assert found[1].startswith("more tokens is not better: 3x96 (0.300M) @ 400,000 tokens loss 20.0000 >= "
                               "3x96 (0.300M) @ 100,000 tokens loss 11.6553")


def test_fit_recovers_a_known_law_and_its_bootstrap_covers_it():
    cells = cells_from(LAW)
    noise = np.exp(np.random.default_rng(0).normal(0, 0.003, len(cells)))  # 0.3% scatter
    n, d = [c["parameters"] for c in cells], [c["tokens"] for c in cells]
    losses = [c["loss"] * e for c, e in zip(cells, noise)]
    law = fit_law(n, d, losses)
    assert law.alpha == pytest.approx(LAW.alpha, abs=0.04) and law.beta == pytest.approx(LAW.beta, abs=0.04)
    assert law.E == pytest.approx(LAW.E, abs=0.1)
    laws = bootstrap(n, d, losses, law, samples=20)
    low, high = interval([each.alpha for each in laws])
    assert low < LAW.alpha < high and high - low < 0.2
    # compute-optimal split at C = 6 N D: D/N from the closed form, and the loss there is the lowest at that C
    flops = 1e15
    best_n, best_d = law.optimal(flops)
    assert 6 * best_n * best_d == pytest.approx(flops)
    for factor in (0.5, 2.0):
        assert law.loss(best_n, best_d) < law.loss(best_n * factor, best_d / factor)
    assert law.tokens_per_parameter(flops) == pytest.approx(best_d / best_n)


def test_scaling_refuses_a_grid_too_small_to_fit(tmp_path):
    with pytest.raises(HfllmError, match="at least 2 sizes and 2 token budgets"):
        scaling(tiny_recipe(tmp_path), sizes=["1x32", "2x32"], tokens=[320], out=tmp_path / "out")
    with pytest.raises(HfllmError, match="size '2y32': give LAYERSxWIDTH"):
        scaling(tiny_recipe(tmp_path), sizes=["1x32", "2y32", "2x64"], tokens=[320, 640], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_scaling_grid_end_to_end(tmp_path, capsys):
    """A 3 x 2 grid of tiny models and a held-out run: table, checks, fit, prediction, figure."""
    recipe = tiny_recipe(tmp_path, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, eval_steps=50,
                         scaling={"sizes": ["1x16", "1x32", "2x32"], "tokens": [320, 640], "holdout": "2x64@640"})
    results = scaling(recipe, out=tmp_path / "out")
    assert len(results.cells) == 6 and results.law is not None
    assert results.holdout["loss"] is not None and math.isfinite(results.holdout["error"])
    assert results.exit_code == (4 if results.violations else 0)
    report = (tmp_path / "out" / "results.md").read_text()
    assert "## held-out run" in report and "Chinchilla: ≈20" in report
    assert (tmp_path / "out" / "scaling.png").stat().st_size > 10_000


SHIPPED_SCALING = {"recipes/scaling/shakespeare-char.yaml": ["1x32", "1x64", "2x64", "2x96"],  # head dimension 32
                   "recipes/scaling/fineweb-125m.yaml": ["1x64", "1x128", "2x128", "2x192"]}  # head dimension 64


@pytest.mark.slow
@pytest.mark.parametrize("shipped", SHIPPED_SCALING)
def test_shipped_scaling_recipe_runs_at_tiny_size(shipped, tmp_path):
    *sizes, holdout = SHIPPED_SCALING[shipped]
    """The shipped grids with tiny sizes, budgets and local text (fineweb's data and BPE tokenizer swapped for the
    test corpus and a char tokenizer): the recipe's other keys parse and train."""
    train, validation = write_corpus(tmp_path)
    tiny = dict(tokenizer="char", dataset=None, dataset_config=None, streaming=False, train_files=[train],
                validation_files=[validation], block_size=16, per_device_train_batch_size=2, global_batch_size=None,
                global_batch_tokens=None, per_device_eval_batch_size=4, max_eval_samples=4, eval_steps=50,
                dataloader_num_workers=0, bf16=False, torch_num_threads=1, vocab_size=None,
                tokenizer_train_documents=None)
    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / shipped).read_text())
    results = scaling(str(Path(__file__).resolve().parents[1] / shipped), sizes=sizes, tokens=[320, 640],
                      holdout=f"{holdout}@640", out=tmp_path / "out", **{k: v for k, v in tiny.items() if k in recipe})
    assert len(results.cells) == 6 and results.holdout["loss"] is not None
