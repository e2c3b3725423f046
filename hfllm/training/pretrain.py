"""Pretraining from a YAML recipe, from raw text to a model that AutoModelForCausalLM loads (`hfllm pretrain`).

`build`: recipe -> output folder check -> text -> tokenizer -> model -> packed blocks -> PretrainTrainer; then the
shared lifecycle (lifecycle.py) writes the model, tokenizer, recipe, run_info.json, loss_curve.png and samples in
output_dir. See docs/pretraining.md.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel, TrainerCallback, set_seed

from .. import data
from ..assets import cache_dir
from ..checkpoint import load
from ..data.text import load_text_and_mixture, resolve_tokenizer, save_tokenizer, take
from ..errors import HfllmError, first_line
from ..recipe import Recipe, RecipeInput, recipe_argv
from ..models import get_preset, parameter_counts
from ..plots import plot_loss_curve
from . import lifecycle
from .arguments import (
    SESSION_KEYS,
    data_parallel_size,
    gradient_accumulation,
    lr_scheduler_kwargs,
    parse_recipe,
    sequence_lengths,
)
from .callbacks import (
    RouterLoadCallback,
    SamplesCallback,
    StopAtStepCallback,
    append_samples,
    generate_samples,
    generates_here,
)
from .health import HealthCallback, check_health_arguments
from .kernels import check_kernel_options, convert_to_fp8, is_flash_attention
from .mfu import flops_per_token, peak_flops
from .preemption import PreemptionCallback
from .run_info import data_hash, tokenizer_hash, write_run_info
from .tensor_parallel import check_tensor_parallel, shard_model, trainer_parallelism
from .tracking import add_tracking, check_eval_arguments, check_report_to
from .trainer import PretrainTrainer

LEAVE_OUT = ("resume_from_checkpoint", "overwrite_output_dir", "stop_at_step")  # recipe keys of one session


def pretrain(recipe: RecipeInput, /, *, callbacks: Sequence[TrainerCallback] = (), **overrides) -> lifecycle.RunResult:
    """Pretrain a causal language model from raw text, as `hfllm pretrain` does.

    recipe: a YAML recipe file (see recipes/, e.g. "recipes/tiny.yaml") or the same keys as a dict.
    overrides: any recipe key, e.g. max_steps=50, output_dir="runs/mine", learning_rate=1e-3, num_hidden_layers=2.
    callbacks: extra transformers TrainerCallbacks.

    Returns a RunResult: output_dir (model, tokenizer, recipe.yaml, run_info.json, loss_curve.png, samples.txt),
    metrics (final eval_loss), log_history and losses(); `result.load()` gives the model and tokenizer.
    Bad input raises HfllmError with the same one line as the command; the run's own files are in output_dir.

        result = hfllm.pretrain("recipes/tiny.yaml", max_steps=50, output_dir="runs/tiny")
    """
    return train(recipe_argv(recipe, overrides), "hfllm pretrain", callbacks)


def main(argv: list[str], prog: str = "hfllm pretrain", callbacks: Sequence[TrainerCallback] = ()) -> int:
    """`hfllm pretrain RECIPE [--key value ...]`: the command line of `pretrain`."""
    return train(argv, prog, callbacks).exit_code


def train(argv: list, prog: str, callbacks: Sequence[TrainerCallback] = ()) -> lifecycle.RunResult:
    """parse -> build -> the shared lifecycle (hfllm/training/lifecycle.py), for the command and the Python API."""
    return lifecycle.run(build(parse_recipe(argv, prog), callbacks), prog, argv)


def build(recipe: Recipe, callbacks: Sequence[TrainerCallback] = (), *, text: DatasetDict | None = None,
          tokenizer=None, model: PreTrainedModel | None = None) -> lifecycle.Parts:
    """A pretraining recipe's parts: tokenizer, packed blocks, model and PretrainTrainer, every input checked first.
    Nothing is written to disk (Trainer's constructor makes the output folder, empty; with several processes the
    main one opens the folder to share the tokenizer). `callbacks` replace the default callback of their class
    (`lifecycle.with_defaults`) or are added; `text`, `tokenizer` and `model` replace what the recipe would load
    or create (doctor: the first documents, packed without the token cache, the tokenizer it checked, a shrunk
    model)."""
    # ---- recipe: everything is checked before any work
    model_args, data_args, args = recipe.args
    if args.max_steps <= 0:
        raise HfllmError("set max_steps to a positive number of optimizer steps; pretraining is planned in steps")
    check_health_arguments(args)
    check_eval_arguments(args)
    check_report_to(args.report_to)
    check_kernel_options(args.use_liger_kernel, args.fp8, model_args.attn_implementation)
    args.gradient_accumulation_steps = gradient_accumulation(args, data_args.block_size)
    args.lr_scheduler_kwargs = lr_scheduler_kwargs(args)
    lengths = sequence_lengths(args, data_args.block_size)
    if lengths and is_flash_attention(model_args.attn_implementation):
        raise HfllmError("sequence_length_schedule cuts padded rows, FlashAttention reads one flat row of documents: "
                         "remove sequence_length_schedule or use attn_implementation sdpa")
    config = resolve_config(model_args.model, recipe.free, data_args.block_size)
    check_tensor_parallel(config, args)
    resume = lifecycle.output_policy(recipe, args, args.overwrite_output_dir, SESSION_KEYS)
    if args.torch_num_threads is not None:
        torch.set_num_threads(args.torch_num_threads)
    set_seed(args.seed)

    # ---- data: raw text -> tokenizer -> packed blocks of block_size tokens -> model sized to the tokenizer. With
    # several processes the main one goes first and saves the tokenizer in output_dir; the others then load it
    # (hfllm/data/text.py)
    shared_folder = args.world_size > 1
    with args.main_process_first(local=False, desc="tokenizer and data"):
        raw, mixture = load_text_and_mixture(data_args, args.seed) if text is None else (text, None)
        if tokenizer is None:
            tokenizer = resolve_tokenizer(data_args, raw["train"], args.output_dir, args.should_save, resume is not None)
        check_vocabulary(model_args.model, config, tokenizer)
        packed = data.tokenize_and_pack(
            raw, tokenizer, data_args.block_size, num_proc=data_args.preprocessing_num_workers, seed=args.seed,
            per_document_positions=data_args.per_document_positions,
            cache_dir=cache_dir() / "tokenized" if text is None else None,  # text given: packed in memory only
        )
        if shared_folder and args.should_save:  # everything is checked: the output folder may be written
            lifecycle.open_output_dir(recipe, args.output_dir, resume, args.overwrite_output_dir, LEAVE_OUT)
            save_tokenizer(tokenizer, args.output_dir)
    # every process at once: ZeRO-3 partitions the parameters as they are created (collectives across processes)
    if model is None:
        model = build_model(model_args.model, config, tokenizer, model_args.attn_implementation)
    if args.tp_size > 1:  # a collective too
        model = shard_model(model, args.tp_size)
        trainer_parallelism(args)
    if args.fp8:
        convert_to_fp8(model)  # before Trainer compiles the model and builds the optimizer
    eval_dataset = take(packed["validation"], data_args.max_eval_samples)
    if args.world_size > 1:
        source = tokenizer.name_or_path or "trained here"  # a loaded tokenizer knows its folder
        print(f"process {args.process_index}: tokenizer sha256 {tokenizer_hash(tokenizer)} ({source})", flush=True)
    streamed = data_args.streaming

    # ---- plan: size, FLOPs, tokens
    counts = parameter_counts(model)
    tokens_per_step = (args.per_device_train_batch_size * args.gradient_accumulation_steps * data_parallel_size(args)
                       * data_args.block_size)
    flops = flops_per_token(model, data_args.block_size)
    peak, peak_source = peak_flops(torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32)
    plan = {
        "parameters": counts, "flops_per_token": flops, "tokens_per_step": tokens_per_step,
        "tokens_planned": tokens_per_step * args.max_steps, "chinchilla_tokens": 20 * counts["total"],
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "world_size": args.world_size,
        "tp_size": args.tp_size,
        "peak_flops_per_device": peak, "peak_flops_source": peak_source,
        "train_sequences": None if streamed else len(packed["train"]),
        "validation_sequences": None if streamed else len(eval_dataset),
        "data_sha256": data_hash({"validation": eval_dataset} if streamed else packed),
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "data_mixture": mixture.record() if mixture else None,  # the realized shares and the mixed rows' sha256
    }

    # ---- trainer
    router_load = RouterLoadCallback() if getattr(model.config, "num_experts", 0) else None  # MoE balancing + logs
    preemption = PreemptionCallback()  # SIGTERM / SIGINT: checkpoint, resume command, exit 143 / 130
    defaults = [StopAtStepCallback(), HealthCallback(args), preemption, *([router_load] if router_load else [])]
    if args.samples_at_eval:
        defaults.append(SamplesCallback(tokenizer, args.output_dir))
    chosen = lifecycle.with_defaults(defaults, callbacks)
    # FlashAttention reads documents from one flat row (cu_seq_lens); sdpa/eager/flex from position_ids per row
    collator = data.collate_flat_blocks if is_flash_attention(model_args.attn_implementation) else data.collate_blocks
    trainer = PretrainTrainer(
        model=model, args=args, train_dataset=packed["train"], eval_dataset=eval_dataset, data_collator=collator,
        processing_class=tokenizer, callbacks=chosen,
        flops_per_token=flops, peak_flops=peak, tokens_per_step=tokens_per_step, router_load=router_load,
        sequence_lengths=lengths,
    )
    # eval_tasks / regression_prompts every eval_steps; run_info.json's facts to the trackers (tracking.py)
    evaluator = add_tracking(args, trainer, args.eval_steps, chat=False)

    def write_outputs() -> None:  # the tokenizer for a resumed run, the plan on screen and in run_info.json
        if not shared_folder:
            save_tokenizer(tokenizer, args.output_dir)
        print_plan(model_args.model, plan, args, data_args.block_size)
        if mixture:
            print(mixture.summary(), flush=True)
        write_run_info(args.output_dir, plan)

    def finish() -> None:  # samples and the loss curve
        if args.num_samples > 0 and generates_here(args):
            samples = generate_samples(model, tokenizer, args)
            if args.should_save:
                append_samples(samples, Path(args.output_dir) / "samples.txt", "end of training")
        if args.should_save and args.num_samples > 0:
            plot_loss_curve(trainer.state.log_history, f"{args.output_dir}/loss_curve.png")
        if evaluator is not None:
            evaluator.save_scores(args.output_dir)  # eval_results.json and the summary on screen

    return lifecycle.Parts(
        recipe=recipe, trainer=trainer, tokenizer=tokenizer,
        preemption=next(cb for cb in chosen if isinstance(cb, PreemptionCallback)), resume=resume,
        overwrite=args.overwrite_output_dir, leave_out=LEAVE_OUT, final_eval_logged=True,
        write_outputs=write_outputs, finish=finish, output_opened=shared_folder,
    )


def print_plan(model_name: str, plan: dict, args, block_size: int) -> None:
    counts, tokens = plan["parameters"], plan["tokens_planned"]
    tp_note = f", each layer split over {args.tp_size} processes" if args.tp_size > 1 else ""
    print(
        f"model {model_name}: {counts['total'] / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M non-embedding), "
        f"{plan['flops_per_token']:.3g} FLOPs/token\n"
        f"batch {plan['tokens_per_step'] // block_size} sequences x {block_size} tokens = {plan['tokens_per_step']} tokens/step "
        f"({args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation x "
        f"{data_parallel_size(args)} data-parallel device(s){tp_note})\n"
        f"plan {args.max_steps} steps = {tokens / 1e6:.2f}M tokens = {tokens / counts['total']:.1f} tokens/parameter "
        f"(Chinchilla-optimal ~20: {plan['chinchilla_tokens'] / 1e6:.1f}M tokens); data: "
        f"{plan['train_sequences'] or 'streamed'} train / {plan['validation_sequences'] or 'streamed'} validation "
        f"sequences\n"
        f"MFU peak {plan['peak_flops_per_device']:.3g} FLOP/s per device ({plan['peak_flops_source']})",
        flush=True,
    )



# ----------------------------------------------------------------------------- the model of a recipe
# A preset (new weights, vocabulary from the tokenizer) or a model folder (continued pretraining), checked against
# the block size and the tokenizer before anything is trained.


def is_model_folder(model: str) -> bool:
    """A recipe's `model` names a folder (continued pretraining) rather than a preset (new weights)."""
    return Path(model).is_dir()


def resolve_config(model: str, overrides: dict[str, Any], block_size: int) -> PreTrainedConfig:
    """The model config (vocabulary not set yet for presets); raises if `block_size` does not fit."""
    if is_model_folder(model):
        try:
            config = AutoConfig.from_pretrained(model, **overrides)
        except (OSError, ValueError) as error:
            raise HfllmError(f"could not load a model config from {model}: {first_line(error)}") from None
    else:
        config = get_preset(model, **overrides)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and block_size > max_positions:
        raise HfllmError(
            f"block_size {block_size} is above the model's max_position_embeddings {max_positions}; "
            f"lower block_size or set max_position_embeddings: {block_size}"
        )
    return config


def check_vocabulary(model: str, config: PreTrainedConfig, tokenizer) -> None:
    """A model folder must cover the tokenizer's ids (a preset is sized to the tokenizer)."""
    if is_model_folder(model) and len(tokenizer) > config.vocab_size:
        raise HfllmError(
            f"the tokenizer has {len(tokenizer)} tokens but the model {model} has vocab_size {config.vocab_size}; "
            "use the model's own tokenizer (tokenizer: <model folder>)"
        )


def build_model(model: str, config: PreTrainedConfig, tokenizer, attn_implementation: str):
    """A preset gets new weights sized to the tokenizer; a folder is loaded (`check_vocabulary` first)."""
    if is_model_folder(model):
        return load(model, config=config, attn_implementation=attn_implementation, with_tokenizer=False)[0].train()
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
