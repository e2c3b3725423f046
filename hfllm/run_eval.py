"""Evaluate from a YAML recipe: `python3 -m hfllm.run_eval recipes/eval/offline_suite.yaml [--limit 5 ...]`.

The recipe's keys are `hfllm eval`'s flags (models, tasks, limit, batch_size, apply_chat_template, output_path,
log_samples, include_path, synth_data, device); flags after the recipe override it.
"""

import os
import sys
from pathlib import Path

import yaml

from hfllm.errors import HfllmError
from hfllm.evaluation import main as eval_main

KEYS = ("models", "tasks", "limit", "batch_size", "apply_chat_template", "output_path", "log_samples",
        "include_path", "synth_data", "device")


def recipe_argv(path: str) -> list[str]:
    """A recipe file -> the equivalent `hfllm eval` argument list."""
    if not Path(path).is_file():
        raise HfllmError(f"recipe '{path}' not found; give a YAML file such as recipes/eval/offline_suite.yaml")
    recipe = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    unknown = sorted(set(recipe) - set(KEYS))
    if unknown:
        raise HfllmError(f"unknown key(s) {unknown} in {path}; use: {', '.join(KEYS)}")
    if "models" not in recipe or "tasks" not in recipe:
        raise HfllmError(f"{path} needs 'models' and 'tasks'")
    models = recipe.pop("models")
    argv = [os.path.expanduser(m) for m in ([models] if isinstance(models, str) else models)]
    for key, value in recipe.items():
        if isinstance(value, bool):
            argv += [f"--{key}"] if value else []
        elif key == "include_path":
            for folder in [value] if isinstance(value, str) else value:
                argv += ["--include_path", str(folder)]
        elif value is not None:
            value = ",".join(value) if isinstance(value, list) else str(value)
            argv += [f"--{key}", os.path.expanduser(value) if key == "output_path" else value]
    return argv


def main(argv: list[str], prog: str = "hfllm.run_eval") -> int:
    if not argv or argv[0].startswith("-"):
        raise HfllmError(f"usage: {prog} RECIPE.yaml [hfllm eval flags to override]")
    return eval_main(recipe_argv(argv[0]) + argv[1:], prog)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except HfllmError as error:
        print(f"hfllm.run_eval: error: {error}", file=sys.stderr)
        sys.exit(2)
