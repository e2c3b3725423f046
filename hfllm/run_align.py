"""ORPO, KTO and GRPO from YAML recipes: `hfllm orpo|kto|grpo RECIPE.yaml [--key value ...]`.

Same recipe layout as `hfllm sft`/`dpo`. GRPO's rewards are `module:function` names (`reward_funcs:`); the default,
`hfllm.synth:exact_match_reward`, scores completions of `hfllm data synth` prompts exactly.
Also runs as `python hfllm/run_align.py orpo|kto|grpo RECIPE.yaml` and under `accelerate launch`.
"""

import importlib
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: import hfllm from this checkout, not hfllm/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from hfllm.errors import HfllmError


def load_reward(name: str):
    module_name, _, function_name = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, ValueError):
        raise HfllmError(f"reward function '{name}' not found; give it as module:function, e.g. hfllm.synth:exact_match_reward") from None


def run(method: str, argv: list[str], prog: str) -> int:
    from hfllm.adapters import build_peft_config, load_model, load_tokenizer  # first: quiets bitsandbytes
    from transformers import set_seed

    from hfllm.chat import set_template
    from hfllm.recipes import GRPOArguments, load_splits, parse_recipe

    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer
    elif method == "kto":
        from trl import KTOConfig as Config, KTOTrainer as Trainer
    else:
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer

    # ---- recipe
    extra = (GRPOArguments,) if method == "grpo" else ()
    script_args, training_args, model_args, mixture_args, hfllm_args, *grpo_args = parse_recipe(argv, Config, prog, extra)
    set_seed(training_args.seed)
    trainer_kwargs = {}
    if method == "grpo":
        trainer_kwargs["reward_funcs"] = [load_reward(name) for name in grpo_args[0].reward_funcs]

    # ---- data and chat template (checked before anything is loaded or written)
    train, evaluation = load_splits(method, script_args, mixture_args, training_args.eval_strategy != "no")
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    if isinstance(train[0]["prompt"], list) or hfllm_args.chat_template:
        set_template(tokenizer, hfllm_args.chat_template, assistant_only_loss=False)

    # ---- model and adapter
    model = load_model(model_args, training_args.trust_remote_code)
    peft_config = build_peft_config(model_args, hfllm_args.peft_type, hfllm_args.num_virtual_tokens, model)

    # ---- train and save
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config,
        **trainer_kwargs,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if not (Path(training_args.output_dir) / "tokenizer_config.json").exists():  # not every trainer saves it
        tokenizer.save_pretrained(training_args.output_dir)
    if evaluation is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if hfllm_args.exact_match_file and trainer.accelerator.is_main_process:
        from hfllm.synth import score_file

        result = score_file(trainer.model, tokenizer, hfllm_args.exact_match_file, hfllm_args.exact_match_limit, training_args.output_dir)
        print(f"held-out: {result}")
    trainer.accelerator.print(f"saved to {training_args.output_dir}")
    return 0


def orpo_main(argv: list[str], prog: str = "hfllm orpo") -> int:
    return run("orpo", argv, prog)


def kto_main(argv: list[str], prog: str = "hfllm kto") -> int:
    return run("kto", argv, prog)


def grpo_main(argv: list[str], prog: str = "hfllm grpo") -> int:
    return run("grpo", argv, prog)


if __name__ == "__main__":
    from hfllm.cli import main as cli_main

    sys.exit(cli_main(sys.argv[1:]))  # `python hfllm/run_align.py orpo RECIPE.yaml`
