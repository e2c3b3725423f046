"""Pretraining from a YAML recipe, from raw text to a model that AutoModelForCausalLM loads (`hfllm pretrain`).

recipe -> output folder check -> text -> tokenizer -> model -> packed blocks -> Trainer -> model, tokenizer, recipe,
run_info.json, loss_curve.png and samples in output_dir. See docs/pretraining.md.
"""

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, set_seed

from .. import data
from ..assets import cache_dir
from ..checkpoint import check_output_dir, clear_output_dir, load
from ..data.text import load_text, resolve_tokenizer, save_tokenizer, take
from ..errors import HfllmError, first_line
from ..models import get_preset, parameter_counts
from ..plots import plot_loss_curve
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
    reached_eval_loss,
)
from .health import (
    HealthCallback,
    PreemptionCallback,
    check_health_arguments,
    resume_command,
)
from .kernels import check_kernel_options, convert_to_fp8, is_flash_attention
from .mfu import flops_per_token, peak_flops
from .run_info import data_hash, tokenizer_hash, write_run_info
from .tensor_parallel import check_tensor_parallel, shard_model, trainer_parallelism
from .trainer import PretrainTrainer


def main(argv: list[str], prog: str = "hfllm pretrain") -> int:
    # ---- recipe: everything is checked before any work
    recipe = parse_recipe(argv, prog)
    model_args, data_args, args = recipe.args
    if args.max_steps <= 0:
        raise HfllmError("set max_steps to a positive number of optimizer steps; pretraining is planned in steps")
    check_health_arguments(args)
    check_kernel_options(args.use_liger_kernel, args.fp8, model_args.attn_implementation)
    args.gradient_accumulation_steps = gradient_accumulation(args, data_args.block_size)
    args.lr_scheduler_kwargs = lr_scheduler_kwargs(args)
    lengths = sequence_lengths(args, data_args.block_size)
    if lengths and is_flash_attention(model_args.attn_implementation):
        raise HfllmError("sequence_length_schedule cuts padded rows, FlashAttention reads one flat row of documents: "
                         "remove sequence_length_schedule or use attn_implementation sdpa")
    config = resolve_config(model_args.model, recipe.free, data_args.block_size)
    check_tensor_parallel(config, args)
    resume = check_output_dir(args.output_dir, run=recipe, resume=args.resume_from_checkpoint,
                              overwrite=args.overwrite_output_dir, session_keys=SESSION_KEYS)
    if args.torch_num_threads is not None:
        torch.set_num_threads(args.torch_num_threads)
    set_seed(args.seed)

    # ---- data: raw text -> tokenizer -> packed blocks of block_size tokens -> model sized to the tokenizer. The main
    # process goes first and saves the tokenizer in output_dir; the others then load it (hfllm/data/text.py)
    with args.main_process_first(local=False, desc="tokenizer and data"):
        raw = load_text(data_args, args.seed)
        tokenizer = resolve_tokenizer(data_args, raw["train"], args.output_dir, args.should_save, resume is not None)
        check_vocabulary(model_args.model, config, tokenizer)
        packed = data.tokenize_and_pack(
            raw, tokenizer, data_args.block_size, num_proc=data_args.preprocessing_num_workers, seed=args.seed,
            per_document_positions=data_args.per_document_positions, cache_dir=cache_dir() / "tokenized",
        )
        if args.should_save:  # everything is checked: the output folder may be written
            if args.overwrite_output_dir and resume is None:
                clear_output_dir(args.output_dir)
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            recipe.save(args.output_dir, leave_out=("resume_from_checkpoint", "overwrite_output_dir", "stop_at_step"))
            save_tokenizer(tokenizer, args.output_dir)
    # every process at once: ZeRO-3 partitions the parameters as they are created (collectives across processes)
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
    }
    if args.should_save:
        print_plan(model_args.model, plan, args, data_args.block_size)

    # ---- train
    router_load = RouterLoadCallback() if getattr(model.config, "num_experts", 0) else None  # MoE balancing + logs
    preemption = PreemptionCallback()  # SIGTERM / SIGINT: checkpoint, resume command, exit 143 / 130
    callbacks = [StopAtStepCallback(), HealthCallback(args), preemption, *([router_load] if router_load else [])]
    if args.samples_at_eval:
        callbacks.append(SamplesCallback(tokenizer, args.output_dir))
    # FlashAttention reads documents from one flat row (cu_seq_lens); sdpa/eager/flex from position_ids per row
    collator = data.collate_flat_blocks if is_flash_attention(model_args.attn_implementation) else data.collate_blocks
    trainer = PretrainTrainer(
        model=model, args=args, train_dataset=packed["train"], eval_dataset=eval_dataset, data_collator=collator,
        processing_class=tokenizer, callbacks=callbacks,
        flops_per_token=flops, peak_flops=peak, tokens_per_step=tokens_per_step, router_load=router_load,
        sequence_lengths=lengths,
    )
    if args.should_save:
        write_run_info(args.output_dir, plan)
    trainer.train(resume_from_checkpoint=resume)  # TrainingHalted (exit code 3) when the health checks stop it
    if preemption.received and trainer.state.global_step < args.max_steps:
        trainer.save_state()
        trainer.accelerator.wait_for_everyone()  # no process exits before every part is written
        if args.should_save:
            print(f"interrupted at step {trainer.state.global_step} of {args.max_steps}; checkpoint saved; resume "
                  f"with:\n{resume_command(prog, argv)}", flush=True)
        return preemption.exit_code
    reached = reached_eval_loss(args, trainer.state.log_history)
    if reached is not None and args.should_save:
        print(f"eval_loss {reached['eval_loss']:.4f} <= stop_at_eval_loss {args.stop_at_eval_loss} at step "
              f"{reached['step']}: training ends here", flush=True)
    if trainer.state.global_step < args.max_steps and reached is None:
        trainer.save_state()
        print(f"stopped at step {trainer.state.global_step} of {args.max_steps}; continue with "
              f"--resume_from_checkpoint true")
        return 0

    # ---- outputs: model + tokenizer, state, final validation, samples, loss curve
    if args.eval_strategy != "no" and not any(e.get("step") == trainer.state.global_step and "eval_loss" in e
                                                for e in trainer.state.log_history):
        trainer.evaluate()
    trainer.save_model()
    trainer.save_state()
    if args.num_samples > 0 and generates_here(args):
        samples = generate_samples(model, tokenizer, args)
        if args.should_save:
            append_samples(samples, Path(args.output_dir) / "samples.txt", "end of training")
    if args.should_save and args.num_samples > 0:
        plot_loss_curve(trainer.state.log_history, f"{args.output_dir}/loss_curve.png")
    return 0


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


def resolve_config(model: str, overrides: dict[str, Any], block_size: int) -> PreTrainedConfig:
    """The model config (vocabulary not set yet for presets); raises if `block_size` does not fit."""
    if Path(model).is_dir():
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
    if Path(model).is_dir() and len(tokenizer) > config.vocab_size:
        raise HfllmError(
            f"the tokenizer has {len(tokenizer)} tokens but the model {model} has vocab_size {config.vocab_size}; "
            "use the model's own tokenizer (tokenizer: <model folder>)"
        )


def build_model(model: str, config: PreTrainedConfig, tokenizer, attn_implementation: str):
    """A preset gets new weights sized to the tokenizer; a folder is loaded (`check_vocabulary` first)."""
    if Path(model).is_dir():
        return load(model, config=config, attn_implementation=attn_implementation, with_tokenizer=False)[0].train()
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
