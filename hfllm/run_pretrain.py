"""Pretrain a causal language model from a YAML recipe, from raw text to a model that AutoModelForCausalLM loads.

    python hfllm/run_pretrain.py recipes/tiny.yaml [--key value ...]
    accelerate launch hfllm/run_pretrain.py recipes/350m.yaml
    hfllm pretrain recipes/tiny.yaml --max_steps 100

recipe -> output folder check -> text -> tokenizer -> model -> packed blocks -> Trainer -> model, tokenizer, recipe,
run_info.json, loss_curve.png and samples in output_dir. See docs/pretraining.md.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a file: import hfllm from this checkout, not from hfllm/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402
from transformers import set_seed

from hfllm import data
from hfllm.errors import HfllmError
from hfllm.training.args import apply_global_batch, parse_recipe, scheduler_kwargs
from hfllm.training.callbacks import (
    RouterLoadCallback, SamplesCallback, StopAtStepCallback, generate_samples, plot_loss_curve, write_samples,
)
from hfllm.training.data import load_text, resolve_tokenizer, save_tokenizer, take
from hfllm.training.mfu import flops_per_token, parameter_counts, peak_flops
from hfllm.training.model import build_model, resolve_config
from hfllm.training.run_info import (
    check_output_dir, data_hash, prepare_output_dir, tokenizer_hash, write_recipe, write_run_info,
)
from hfllm.training.trainer import PretrainTrainer


def main(argv: list[str] | None = None, prog: str = "run_pretrain.py") -> int:
    # ---- recipe: everything is checked before any work
    recipe = parse_recipe(sys.argv[1:] if argv is None else argv, prog)
    model_args, data_args, args = recipe.model, recipe.data, recipe.training
    if args.max_steps <= 0:
        raise HfllmError("set max_steps to a positive number of optimizer steps; pretraining is planned in steps")
    apply_global_batch(args, data_args.block_size)
    scheduler_kwargs(args)
    config = resolve_config(model_args.model, recipe.model_overrides, data_args.block_size)
    resume = check_output_dir(args.output_dir, recipe.resolved, args.resume_from_checkpoint, args.overwrite_output_dir)
    if args.torch_num_threads is not None:
        torch.set_num_threads(args.torch_num_threads)
    set_seed(args.seed)

    # ---- data: raw text -> tokenizer -> model sized to it -> packed blocks of block_size tokens. The main process
    # goes first and saves the tokenizer in output_dir; the others then load it (hfllm/training/data.py)
    with args.main_process_first(local=False, desc="tokenizer and data"):
        raw = load_text(data_args, args.seed)
        tokenizer = resolve_tokenizer(data_args, raw["train"], args.output_dir, args.should_save, resume is not None)
        model = build_model(model_args.model, config, tokenizer, model_args.attn_implementation)
        packed = data.tokenize_and_pack(
            raw, tokenizer, data_args.block_size, num_proc=data_args.preprocessing_num_workers, seed=args.seed,
            per_document_positions=data_args.per_document_positions,
        )
        if args.should_save:  # everything is checked: the output folder may be written
            prepare_output_dir(args.output_dir, args.overwrite_output_dir and resume is None)
            write_recipe(args.output_dir, recipe.resolved)
            save_tokenizer(tokenizer, args.output_dir)
    eval_dataset = take(packed["validation"], data_args.max_eval_samples)
    if args.world_size > 1:
        source = tokenizer.name_or_path or "trained here"  # a loaded tokenizer knows its folder
        print(f"process {args.process_index}: tokenizer sha256 {tokenizer_hash(tokenizer)} ({source})", flush=True)
    streamed = data_args.streaming

    # ---- plan: size, FLOPs, tokens
    counts = parameter_counts(model)
    tokens_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size * data_args.block_size
    flops = flops_per_token(model, data_args.block_size)
    peak, peak_source = peak_flops(torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32)
    plan = {
        "parameters": counts, "flops_per_token": flops, "tokens_per_step": tokens_per_step,
        "tokens_planned": tokens_per_step * args.max_steps, "chinchilla_tokens": 20 * counts["total"],
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "world_size": args.world_size,
        "peak_flops_per_device": peak, "peak_flops_source": peak_source,
        "train_sequences": None if streamed else len(packed["train"]),
        "validation_sequences": None if streamed else len(eval_dataset),
        "data_sha256": data_hash({"validation": eval_dataset} if streamed else packed),
        "tokenizer_sha256": tokenizer_hash(tokenizer),
    }
    if args.should_save:
        print_plan(model_args.model, plan, args, data_args.block_size)

    # ---- train
    callbacks = [StopAtStepCallback()]
    if getattr(model.config, "num_experts", 0) and hasattr(model, "update_router_bias"):
        callbacks.append(RouterLoadCallback())
    if args.samples_at_eval:
        callbacks.append(SamplesCallback(tokenizer, args.output_dir))
    trainer = PretrainTrainer(
        model=model, args=args, train_dataset=packed["train"], eval_dataset=eval_dataset, data_collator=data.collate_blocks,
        processing_class=tokenizer, callbacks=callbacks,
        flops_per_token=flops, peak_flops=peak, tokens_per_step=tokens_per_step,
    )
    if args.should_save:
        write_run_info(args.output_dir, plan)
    trainer.train(resume_from_checkpoint=resume)
    if trainer.state.global_step < args.max_steps:
        trainer.save_state()
        print(f"stopped at step {trainer.state.global_step} of {args.max_steps}; continue with "
              f"--resume_from_checkpoint true")
        return 0

    # ---- outputs: model + tokenizer, state, final validation, samples, loss curve
    if args.eval_strategy != "no" and not any(e.get("step") == args.max_steps and "eval_loss" in e
                                                for e in trainer.state.log_history):
        trainer.evaluate()
    trainer.save_model()
    trainer.save_state()
    if args.should_save and args.num_samples > 0:
        write_samples(generate_samples(model, tokenizer, args), trainer.args.output_dir + "/samples.txt", "end of training")
        plot_loss_curve(trainer.state.log_history, f"{args.output_dir}/loss_curve.png")
    return 0


def print_plan(model_name: str, plan: dict, args, block_size: int) -> None:
    counts, tokens = plan["parameters"], plan["tokens_planned"]
    print(
        f"model {model_name}: {counts['total'] / 1e6:.2f}M parameters ({counts['non_embedding'] / 1e6:.2f}M non-embedding), "
        f"{plan['flops_per_token']:.3g} FLOPs/token\n"
        f"batch {plan['tokens_per_step'] // block_size} sequences x {block_size} tokens = {plan['tokens_per_step']} tokens/step "
        f"({args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation x "
        f"{args.world_size} device(s))\n"
        f"plan {args.max_steps} steps = {tokens / 1e6:.2f}M tokens = {tokens / counts['total']:.1f} tokens/parameter "
        f"(Chinchilla-optimal ~20: {plan['chinchilla_tokens'] / 1e6:.1f}M tokens); data: "
        f"{plan['train_sequences'] or 'streamed'} train / {plan['validation_sequences'] or 'streamed'} validation "
        f"sequences\n"
        f"MFU peak {plan['peak_flops_per_device']:.3g} FLOP/s per device ({plan['peak_flops_source']})",
        flush=True,
    )


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HfllmError as error:
        print(f"run_pretrain.py: error: {error}", file=sys.stderr)
        sys.exit(2)
