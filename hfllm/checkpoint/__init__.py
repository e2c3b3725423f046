"""Checkpoints in and out: the one model loader, folders written atomically, the output-folder check, eval mode.

    model, tokenizer = load("runs/sft")          # hfllm or transformers folder, PEFT adapter folder, .gguf, Hub id
    with atomic_output("runs/merged") as tmp:    # written aside; appears under its name only when complete
        model.save_pretrained(tmp)
    with atomic_output("runs/sft", merge=True) as tmp:  # into a run's folder: config.json moved in last
        model.save_pretrained(tmp)
    resume = check_output_dir("runs/tiny", run=recipe, resume=None, overwrite=False)
    find_checkpoint("runs/tiny")                  # newest complete checkpoint-N; corrupt ones skipped with a warning
    with eval_mode(model):                        # and back to training mode afterwards if it was training
        model.generate(...)

One module per job: `loading` (the loader, model specs, eval mode), `quantization` (bitsandbytes 4/8-bit config),
`atomic` (outputs written aside), `output_dir` (the output-folder policy), `validation` (complete checkpoints).
"""

import os  # noqa: F401  (tests/test_health.py patches `checkpoint.os.replace`)

from .atomic import MODEL_MARKERS, atomic_output
from .loading import (
    HUB_ID,
    SPEC_HELP,
    check_gguf,
    eval_mode,
    load,
    load_tokenizer,
    read_config,
    spec_kind,
)
from .output_dir import check_output_dir, clear_output_dir
from .quantization import COMPUTE_DTYPES, QUANT_TYPES, quantization_config
from .validation import CHECKPOINT_NAME, checkpoint_problem, find_checkpoint, weights_problem

__all__ = [
    "CHECKPOINT_NAME", "COMPUTE_DTYPES", "HUB_ID", "MODEL_MARKERS", "QUANT_TYPES", "SPEC_HELP", "atomic_output",
    "check_gguf", "check_output_dir", "checkpoint_problem", "clear_output_dir", "eval_mode", "find_checkpoint", "load",
    "load_tokenizer", "quantization_config", "read_config", "spec_kind", "weights_problem",
]
