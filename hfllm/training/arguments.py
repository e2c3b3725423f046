"""The keys of a pretraining recipe, loaded by `hfllm.recipe` (the one recipe loader):

    model + architecture keys  -> ModelArguments (+ config overrides: any HfllmConfig field, e.g. `num_hidden_layers`)
    tokenizer, data, packing   -> DataArguments
    everything else            -> PretrainingArguments (transformers `TrainingArguments` plus a few pretraining keys)

`PRETRAINING_DEFAULTS` sit between the dataclass defaults and the recipe.
"""

import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from ..data.loading import DatasetConfig
from ..errors import HfllmError
from ..models import HfllmConfig
from ..recipe import Recipe, load_recipe
from . import lifecycle
from .hardware import apply_hardware
from .health import HealthArguments
from .optim import OWN_OPTIMIZERS
from .tracking import EvalArguments

# HfllmConfig fields a recipe may set at top level; vocab_size comes from the tokenizer, special ids too
MODEL_CONFIG_KEYS = {
    name: annotation for name, annotation in HfllmConfig.__annotations__.items()
    if name not in ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "use_cache")
}

# Defaults suited to pretraining, applied under the recipe (TrainingArguments' own defaults suit fine-tuning)
PRETRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "runs/pretrain",
    "report_to": "tensorboard",
    "logging_steps": 10,
    "logging_first_step": True,
    "eval_strategy": "steps",
    "eval_steps": 200,
    "save_steps": 500,
    "save_total_limit": 2,
    "prediction_loss_only": True,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "weight_decay": 0.1,
    "adam_beta2": 0.95,
    "max_grad_norm": 1.0,
}

# Recipe keys that may change between a run and its resumption (everything else must match to reuse output_dir):
# every command's (lifecycle.SESSION_KEYS) and pretraining's own
SESSION_KEYS = lifecycle.SESSION_KEYS | {
    "stop_at_step", "stop_at_eval_loss", "logging_first_step", "preprocessing_num_workers", "num_samples",
    "sample_max_new_tokens", "samples_at_eval", "torch_num_threads",
    "eval_tasks", "eval_tasks_limit", "regression_prompts", "eval_tasks_chat_template",  # measuring, not training
}


@dataclass
class ModelArguments:
    model: str = field(
        default="llama-tiny",
        metadata={"help": "a preset name (see `hfllm presets`), or a model folder to continue pretraining from. "
                          "HfllmConfig fields given as top-level keys (num_hidden_layers: 2, ...) override the preset."},
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "attention kernel: sdpa, eager, flash_attention_2, flex_attention"}
    )


@dataclass
class DataArguments:
    tokenizer: str = field(
        default="bpe", metadata={"help": "'bpe' or 'char' (trained on the train split), or a tokenizer folder"}
    )
    vocab_size: int = field(default=4096, metadata={"help": "vocabulary size of a trained tokenizer"})
    dataset: str | None = field(
        default=None, metadata={"help": "'shakespeare' (embedded; the default without train_files) or a Hub dataset"}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "configuration name of a Hub dataset"})
    train_files: list[str] | None = field(
        default=None, metadata={"help": "local .txt/.jsonl/.parquet/.csv files or globs (one document per .txt file)"}
    )
    validation_files: list[str] | None = field(
        default=None, metadata={"help": "validation files; default: validation_split_percentage of train_files"}
    )
    text_column: str = field(default="text", metadata={"help": "column holding the text in jsonl/parquet/csv"})
    datasets: list[DatasetConfig] = field(
        default_factory=list,
        metadata={"help": "a mixture instead of dataset/train_files: sources {path, name, split, columns, fraction | "
                          "tokens} (docs/data.md#mixtures)"},
    )
    validation_split_percentage: float = field(default=10.0, metadata={"help": "documents held out for validation"})
    block_size: int = field(default=256, metadata={"help": "tokens per training sequence"})
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "evaluate on at most this many sequences (the first ones)"}
    )
    per_document_positions: bool = field(
        default=True,
        metadata={"help": "position ids restart at each document inside a packed block, so sdpa/eager/flex attend "
                          "within documents only (an explicit block-diagonal mask; false: plain causal attention)"},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "processes for tokenization"})
    streaming: bool = field(
        default=False,
        metadata={"help": "read the data as a stream (Hub or large local data): nothing is downloaded or tokenized "
                          "ahead of training; needs max_steps"},
    )
    streaming_validation_documents: int = field(
        default=1000,
        metadata={"help": "with streaming and no validation split: the first this many documents are validation"},
    )
    tokenizer_train_documents: int | None = field(
        default=None, metadata={"help": "train the tokenizer on at most this many train documents (the first ones)"}
    )


@dataclass
class PretrainingArguments(TrainingArguments, HealthArguments, EvalArguments):
    """`TrainingArguments` plus pretraining keys, the training-health keys (`HealthArguments`) and evaluation during
    training (`EvalArguments`: eval_tasks, regression_prompts; tracking.py). `optim: muon` and
    `optim: soap` are hfllm's own (hfllm/training/optim.py): Trainer only knows its own optimizer names, so it is
    given `adamw_torch` and `own_optimizer` records the choice for `PretrainTrainer.create_optimizer`."""

    global_batch_size: int | None = field(
        default=None, metadata={"help": "sequences per optimizer step over all devices; sets gradient_accumulation_steps"}
    )
    global_batch_tokens: int | None = field(
        default=None, metadata={"help": "tokens per optimizer step over all devices (rounded to whole sequences)"}
    )
    wsd_decay_ratio: float = field(
        default=0.2, metadata={"help": "share of max_steps in the final decay of lr_scheduler_type warmup_stable_decay"}
    )
    muon_lr: float | None = field(
        default=None, metadata={"help": "Muon's learning rate (default: learning_rate; Muon matches AdamW's update RMS)"}
    )
    soap_precondition_frequency: int = field(
        default=10, metadata={"help": "optim: soap: steps between updates of the preconditioner's eigenbasis"}
    )
    sequence_length_schedule: dict[int, int] | None = field(
        default=None,
        metadata={"help": "sequence-length warmup: {step: length, ...}; from each step on, every block of block_size "
                          "tokens is cut into rows of that length (a divisor of block_size), so tokens per step stay "
                          "the same; block_size after the last entry if it is shorter. E.g. {0: 16, 100: 32, 200: 64}"},
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "delete a previous hfllm run in output_dir instead of refusing to start"}
    )
    stop_at_step: int | None = field(
        default=None, metadata={"help": "end this session after this step with a checkpoint (the schedule still "
                                        "follows max_steps); resume later with resume_from_checkpoint: true"}
    )
    tp_size: int = field(
        default=1,
        metadata={"help": "tensor parallel: split every layer (attention heads, MLP and expert widths) over this many "
                          "processes with transformers' tp_plan; the processes of a group see the same batch, so the "
                          "data-parallel size is world_size / tp_size (docs/scaling.md#tensor-parallel)"},
    )
    stop_at_eval_loss: float | None = field(
        default=None, metadata={"help": "end training at the first evaluation whose loss is at or below this (a "
                                        "speedrun's target); the model is saved as at the end of training"},
    )
    torch_num_threads: int | None = field(
        default=None,
        metadata={"help": "CPU threads for torch (torch.set_num_threads; default one per core). 1 keeps small CPU "
                          "models fast on a machine whose cores are shared with other work"},
    )
    fp8: bool = field(
        default=False,
        metadata={"help": "train the decoder's linear layers in float8 through torchao (GPU with compute capability "
                          "8.9+; the LM head stays in bf16). With use_liger_kernel and a flash attn_implementation: "
                          "the GPU speed path (docs/scaling.md)"},
    )
    num_samples: int = field(default=3, metadata={"help": "texts generated at the end of training"})
    sample_prompts: list[str] | None = field(default=None, metadata={"help": "prompts for the samples (default: none)"})
    sample_max_new_tokens: int = field(default=200, metadata={"help": "length of each sample in tokens"})
    samples_at_eval: bool = field(default=False, metadata={"help": "also generate samples at each evaluation"})

    optim: str = field(
        default="adamw_torch_fused",
        metadata={"help": "optimizer: muon (Muon for hidden matrices, AdamW for the rest), soap (SOAP, needs "
                          "pytorch-optimizer) or one of Trainer's OptimizerNames (adamw_torch_fused, adamw_torch, "
                          "schedule_free_adamw, ...)"},
    )
    own_optimizer: str | None = field(default=None, init=False, metadata={"help": "set from optim: muon / soap"})

    def __post_init__(self):
        if self.optim in OWN_OPTIMIZERS:
            self.own_optimizer, self.optim = self.optim, "adamw_torch"
        super().__post_init__()


def parse_recipe(argv: list[str], prog: str) -> Recipe:
    """`RECIPE.yaml [--key value ...]` -> Recipe with args (ModelArguments, DataArguments, PretrainingArguments) and
    the architecture overrides in `recipe.free`."""
    recipe = load_recipe(argv, (ModelArguments, DataArguments, PretrainingArguments), prog,
                         defaults=PRETRAINING_DEFAULTS, free_keys=MODEL_CONFIG_KEYS, fit_training_arguments=apply_hardware)
    data_args = recipe.args[1]
    if data_args.dataset is None and data_args.train_files is None and not data_args.datasets:
        data_args.dataset = "shakespeare"
    return recipe


def global_batch_sequences(args: PretrainingArguments, block_size: int) -> int | None:
    """Sequences per optimizer step the recipe asks for (global_batch_size, or global_batch_tokens rounded to whole
    sequences), or None when it sets neither."""
    if args.global_batch_size is not None and args.global_batch_tokens is not None:
        raise HfllmError("give global_batch_size (sequences) or global_batch_tokens, not both")
    if args.global_batch_tokens is not None:
        return max(1, round(args.global_batch_tokens / block_size))
    return args.global_batch_size


def data_parallel_size(args: PretrainingArguments) -> int:
    """Processes that see different batches: the `tp_size` processes of a tensor-parallel group share one."""
    return max(1, args.world_size // args.tp_size)


def gradient_accumulation(args: PretrainingArguments, block_size: int) -> int:
    """The `gradient_accumulation_steps` at which one optimizer step sees the recipe's global batch on any number of
    devices: global = per_device_train_batch_size * data_parallel_size * accumulation."""
    sequences = global_batch_sequences(args, block_size)
    if sequences is None:
        return args.gradient_accumulation_steps
    replicas = data_parallel_size(args)
    per_step = args.per_device_train_batch_size * replicas
    if sequences % per_step:
        lower = max(per_step, sequences // per_step * per_step)
        raise HfllmError(
            f"global batch of {sequences} sequences is not a multiple of per_device_train_batch_size "
            f"({args.per_device_train_batch_size}) x {replicas} data-parallel device(s); use {lower} or "
            f"{lower + per_step}, or change per_device_train_batch_size"
        )
    return sequences // per_step


def sequence_lengths(args: PretrainingArguments, block_size: int) -> dict[int, int] | None:
    """`sequence_length_schedule` checked against block_size, as {first step: length} sorted by step, from step 0
    (block_size until the first entry)."""
    if not args.sequence_length_schedule:
        return None
    schedule = {int(step): int(length) for step, length in sorted(args.sequence_length_schedule.items(), key=lambda i: int(i[0]))}
    for step, length in schedule.items():
        if step < 0 or length < 2 or block_size % length:
            raise HfllmError(
                f"sequence_length_schedule {{{step}: {length}}}: give steps >= 0 and lengths >= 2 that divide "
                f"block_size {block_size} (e.g. {block_size // 4}, {block_size // 2}, {block_size})"
            )
    return {0: block_size, **schedule}


def lr_scheduler_kwargs(args: PretrainingArguments) -> dict:
    """The scheduler's keyword arguments: the decay length of warmup-stable-decay from `wsd_decay_ratio` unless
    given."""
    kwargs = dict(args.lr_scheduler_kwargs or {})
    if args.lr_scheduler_type == "warmup_stable_decay" and "num_decay_steps" not in kwargs:
        kwargs["num_decay_steps"] = max(1, math.ceil(args.wsd_decay_ratio * args.max_steps))
    return kwargs
