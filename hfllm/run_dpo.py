"""Direct preference optimisation with TRL's DPOTrainer from a YAML recipe: `hfllm dpo RECIPE.yaml [--key value ...]`.

The wiring is shared by every TRL method (see `hfllm/training/align.py`). Also runs as
`python hfllm/run_dpo.py RECIPE.yaml` and `accelerate launch hfllm/run_dpo.py RECIPE.yaml`.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: import hfllm from this checkout, not hfllm/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from hfllm.training.align import dpo_main as main  # noqa: E402

__all__ = ["main"]

if __name__ == "__main__":
    from hfllm.cli import main as cli_main

    sys.exit(cli_main(["dpo", *sys.argv[1:]]))
