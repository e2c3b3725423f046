"""Supervised fine-tuning from a YAML recipe with TRL's SFTTrainer: `hfllm sft RECIPE.yaml [--key value ...]`.

Also runs as `python hfllm/run_sft.py RECIPE.yaml` and `accelerate launch hfllm/run_sft.py RECIPE.yaml`.
"""

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: import hfllm from this checkout, not hfllm/
    sys.path[0] = str(Path(__file__).resolve().parents[1])
from hfllm.errors import HfllmError


def main(argv: list[str], prog: str = "hfllm sft") -> int:
    from hfllm.adapters import build_peft_config, load_model, load_tokenizer  # first: quiets bitsandbytes
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from hfllm.chat import set_template
    from hfllm.recipes import load_splits, parse_recipe
    from hfllm.synth import score_file

    # ---- recipe
    script_args, training_args, model_args, mixture_args, hfllm_args = parse_recipe(argv, SFTConfig, prog)
    set_seed(training_args.seed)

    # ---- data and chat template (checked before anything is loaded or written)
    train, evaluation = load_splits("sft", script_args, mixture_args, training_args.eval_strategy != "no")
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    conversational = "messages" in train.column_names or isinstance(train[0].get("prompt"), list)
    if conversational or hfllm_args.chat_template:
        set_template(tokenizer, hfllm_args.chat_template, training_args.assistant_only_loss)
    elif training_args.assistant_only_loss:
        raise HfllmError("assistant_only_loss needs conversational data (a `messages` column); use completion_only_loss for prompt/completion text")

    # ---- model and adapter
    model = load_model(model_args, training_args.trust_remote_code)
    peft_config = build_peft_config(model_args, hfllm_args.peft_type, hfllm_args.num_virtual_tokens, model)

    # ---- train and save (the tokenizer, with its chat template, is saved with the model)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if evaluation is not None:
        trainer.log_metrics("eval", trainer.evaluate())
    if hfllm_args.exact_match_file and trainer.accelerator.is_main_process:
        result = score_file(trainer.model, tokenizer, hfllm_args.exact_match_file, hfllm_args.exact_match_limit, training_args.output_dir)
        print(f"held-out: {result}")
    trainer.accelerator.print(f"saved to {training_args.output_dir}")
    return 0


if __name__ == "__main__":
    from hfllm.cli import main as cli_main

    sys.exit(cli_main(["sft", *sys.argv[1:]]))
