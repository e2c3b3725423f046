"""Pretrain a causal language model from a YAML recipe (the code is `hfllm/training/pretrain.py`).

    python hfllm/run_pretrain.py recipes/tiny.yaml [--key value ...]
    accelerate launch hfllm/run_pretrain.py recipes/350m.yaml
    hfllm pretrain recipes/tiny.yaml --max_steps 100
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import hfllm from this checkout, not from hfllm/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from hfllm.training.pretrain import main  # noqa: E402

if __name__ == "__main__":
    from hfllm.cli import main as cli_main

    sys.exit(cli_main(["pretrain", *sys.argv[1:]]))
