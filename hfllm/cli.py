"""`hfllm` command line: each subcommand is a function `fn(argv: list[str], prog: str) -> int | None` in its module.

Bad input raises `HfllmError` (or `HfllmConfigError` from a model config), and library errors that stem from user
input (an unreachable Hub, an unreadable data file, a corrupt weights file, a path that cannot be written) are
translated by `hfllm.errors.user_error`: here each becomes one line on stderr and exit code 2, never a traceback. Any
other error is a bug and keeps its traceback; `HFLLM_DEBUG=1` shows the traceback always. Exit codes
(docs/reliability.md): 0 done, 2 bad input, 3 training halted by its health checks, 4 a
`hfllm doctor` check failed, 130 / 143 training interrupted by
SIGINT / SIGTERM after saving a checkpoint.
"""

import importlib
import sys

from .errors import HfllmError, debug, library_errors, user_error
from .models.configuration_hfllm import HfllmConfigError

# subcommand -> ("module:function", one-line help); modules are imported only when their command runs
COMMANDS: dict[str, tuple[str, str]] = {
    # models
    "presets": ("hfllm.models.presets:main", "list the named model presets with their parameter counts"),
    "convert": ("hfllm.models.convert:convert_main", "convert a transformers checkpoint folder or a .gguf file into an hfllm checkpoint"),
    "export": ("hfllm.models.convert:export_main", "export an hfllm checkpoint to a native transformers architecture or GGUF (--to gguf)"),
    # data
    "data": ("hfllm.data:main", "prepare data: `data shakespeare --out DIR`, `data tokenizer ...`, `data synth TASK --out DIR`"),
    # training
    "pretrain": ("hfllm.training.pretrain:main", "pretrain from a YAML recipe"),
    "sft": ("hfllm.training.align:sft_main", "supervised fine-tuning from a YAML recipe (TRL SFTTrainer)"),
    "dpo": ("hfllm.training.align:dpo_main", "direct preference optimisation from a YAML recipe (TRL DPOTrainer)"),
    "orpo": ("hfllm.training.align:orpo_main", "ORPO from a YAML recipe"),
    "kto": ("hfllm.training.align:kto_main", "KTO from a YAML recipe"),
    "grpo": ("hfllm.training.align:grpo_main", "GRPO from a YAML recipe"),
    "doctor": ("hfllm.diagnostics:main", "check a recipe (or model folder) at a tiny size: init loss, causal mask, labels, overfit, seeding, resume, tokenizer, data"),
    "plan": ("hfllm.training.plan:main", "size, FLOPs, memory per GPU, micro-batch and time of a pretraining recipe, without training"),
    "ablate": ("hfllm.experiments.ablate:main", "train a recipe against each value of one axis at equal compute (flops|seconds|steps), seeds, a table and a plot"),
    "scaling": ("hfllm.experiments.scaling:main", "train a grid of model sizes x tokens, check bigger is better, fit L(N, D), predict a held-out run"),
    "merge": ("hfllm.training.adapters:merge_main", "merge a PEFT adapter into a full checkpoint"),
    "verify": ("hfllm.checkpoint.provenance:main", "check a run's weights files against the sha256 hashes in its run_info.json (exit 4 on a change)"),
    # evaluation
    "eval": ("hfllm.evaluation.run:main", "evaluate models with lm-evaluation-harness (MODEL... --tasks ..., or a YAML recipe)"),
    "score": ("hfllm.evaluation.exact_match:score_main", "chat exact match of a model on `hfllm data synth` test items"),
    # inference
    "generate": ("hfllm.inference.generate:main", "complete prompts with a model (batched, streamed, chat template, --json)"),
    "chat": ("hfllm.inference.chat:main", "chat with a model in the terminal (chat template, history, streamed answers)"),
    "serve": ("hfllm.inference.serve:main", "serve a model over an OpenAI-compatible HTTP API (transformers serve, continuous batching)"),
    # shipping
    "push": ("hfllm.shipping.push:main", "upload a run's model to the Hugging Face Hub with a model card (--dry_run OUT stages it)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: hfllm <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hfllm: error: unknown command '{command}'; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, function_name = COMMANDS[command][0].split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        result = function(rest, prog=f"hfllm {command}")
    except (HfllmError, HfllmConfigError, *library_errors()) as error:
        known = error if isinstance(error, (HfllmError, HfllmConfigError)) else user_error(error)
        if known is None or debug():
            raise
        message = " ".join(str(known).split())  # one line, whatever the message held
        print(f"hfllm {command}: error: {message}", file=sys.stderr)
        return getattr(known, "exit_code", 2)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
