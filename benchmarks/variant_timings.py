"""Seconds per step for issue 23's equal-wall-time sweep (docs/models.md#variants-side-by-side), from earlier runs.

    python3 benchmarks/variant_timings.py OUT EARLIER_SWEEP [EARLIER_SWEEP ...]
    hfllm ablate recipes/variants/rope-tiny.yaml --axis ... --budget seconds 20 --seeds 2 --out OUT $S

`hfllm ablate --budget seconds` probes each variant for 20 steps; on this shared 2-core VM such a probe of a ~50 ms
step drifted 10-45% from the runs' own step times. This writes OUT/timings.json instead, keyed as the sweep keys its
timings, with each variant's median of train_seconds / steps over the finished points of earlier sweeps (each
hundreds of steps), so that every variant gets its share of the budget from its real step time.
"""

import json
import statistics
import sys
from pathlib import Path

from hfllm.experiments import points
from hfllm.experiments.ablate import grid_points

RECIPE = "recipes/variants/rope-tiny.yaml"
SHAPE = {"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 176,
         "eval_steps": 100, "logging_steps": 50}  # docs/models.md's $S
AXES = {"position_embedding": ["alibi", "none"], "mlp_activation": ["relu2"], "final_logit_softcapping": ["15.0"],
        "value_embeddings": ["2"], "unet_skips": ["true"], "zero_init_output_projections": ["true"],
        "mod_capacity": ["0.125"], "num_recursions": ["2", "3"], "layer_types": ["[mamba,mamba,mamba,full_attention]"]}
BUDGET = points.Budget("seconds", 20.0)


def main(out: Path, earlier: list[Path]) -> None:
    per_step: dict[str, list[float]] = {}
    for folder in earlier:
        for path in sorted((folder / "points").glob("*.json")):
            record = json.loads(path.read_text())
            per_step.setdefault(record["variant"], []).append(record["train_seconds"] / record["steps"])
    points.seconds_per_step = lambda *args, **kwargs: 1.0  # resolving only needs the keys: no probe
    timings = {}
    for key, values in AXES.items():
        resolved = grid_points({key: values}, grid=False, seeds=2, seed=1337)
        points.resolve_points(RECIPE, SHAPE, resolved, BUDGET, out, "hfllm ablate", points.Tokenizers())
        for point in resolved:
            timings[point.timing_key] = statistics.median(per_step[point.variant])
    out.mkdir(parents=True, exist_ok=True)
    (out / points.TIMINGS_FILE).write_text(json.dumps(timings, indent=1))
    for variant, values in sorted(per_step.items()):
        print(f"{variant:50s} {statistics.median(values) * 1000:6.1f} ms/step over {len(values)} runs")


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(folder) for folder in sys.argv[2:]])
