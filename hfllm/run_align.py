"""SFT, DPO, ORPO, KTO and GRPO from YAML recipes through TRL's trainers: `hfllm sft|dpo|orpo|kto|grpo RECIPE.yaml`.

One wiring for every method: recipe -> data + chat template (checked before anything is loaded or written) ->
model + PEFT adapter -> TRL trainer -> save -> evaluate. `hfllm/run_sft.py` and `hfllm/run_dpo.py` are the same
script under the names users expect. GRPO's rewards are `module:function` names (`reward_funcs:`); the default,
`hfllm.synth:exact_match_reward`, scores completions of `hfllm data synth` prompts exactly.
Also runs as `python hfllm/run_align.py METHOD RECIPE.yaml` and under `accelerate launch`.
"""

import importlib
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: import hfllm from this checkout, not hfllm/
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from hfllm.errors import HfllmError

# method -> (module, config class, trainer class)
TRAINERS = {
    "sft": ("trl", "SFTConfig", "SFTTrainer"),
    "dpo": ("trl", "DPOConfig", "DPOTrainer"),
    "orpo": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"),
    "kto": ("trl", "KTOConfig", "KTOTrainer"),
    "grpo": ("trl", "GRPOConfig", "GRPOTrainer"),
}


def load_reward(name: str):
    module_name, _, function_name = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, ValueError):
        raise HfllmError(f"reward function '{name}' not found; give it as module:function, e.g. hfllm.synth:exact_match_reward") from None


def run(method: str, argv: list[str], prog: str) -> int:
    from hfllm.adapters import build_peft_config, load_model, load_tokenizer
    from transformers import set_seed

    from hfllm.chat import set_template
    from hfllm.recipes import GRPOArguments, load_splits, parse_recipe

    module_name, config_name, trainer_name = TRAINERS[method]
    module = importlib.import_module(module_name)
    Config, Trainer = getattr(module, config_name), getattr(module, trainer_name)

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
    conversational = "messages" in train.column_names or isinstance(train[0].get("prompt"), list)
    assistant_only_loss = getattr(training_args, "assistant_only_loss", False)
    if conversational or hfllm_args.chat_template:
        set_template(tokenizer, hfllm_args.chat_template, assistant_only_loss)
    elif assistant_only_loss:
        raise HfllmError("assistant_only_loss needs conversational data (a `messages` column); use completion_only_loss for prompt/completion text")

    # ---- model and adapter (with use_peft, DPO's reference is the base with the adapter disabled: no second copy)
    model = load_model(model_args, training_args.trust_remote_code)
    peft_config = build_peft_config(model_args, hfllm_args.peft_type, hfllm_args.num_virtual_tokens, model)

    # ---- train, save (the tokenizer, with its chat template, goes with the model), evaluate
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
    if evaluation is not None:  # DPO: eval_rewards/accuracies and eval_rewards/margins are preference accuracy/margin
        step = trainer.state.global_step  # reuse an evaluation already run at the last step (eval_steps = max_steps)
        done = [log for log in trainer.state.log_history if "eval_loss" in log and log.get("step") == step]
        metrics = {k: v for k, v in done[-1].items() if k != "step"} if done else trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if hfllm_args.exact_match_file and trainer.accelerator.is_main_process:
        from hfllm.synth import score_file

        result = score_file(trainer.model, tokenizer, hfllm_args.exact_match_file, hfllm_args.exact_match_limit, training_args.output_dir)
        print(f"held-out: {result}")
    trainer.accelerator.print(f"saved to {training_args.output_dir}")
    return 0


def sft_main(argv: list[str], prog: str = "hfllm sft") -> int:
    return run("sft", argv, prog)


def dpo_main(argv: list[str], prog: str = "hfllm dpo") -> int:
    return run("dpo", argv, prog)


def orpo_main(argv: list[str], prog: str = "hfllm orpo") -> int:
    return run("orpo", argv, prog)


def kto_main(argv: list[str], prog: str = "hfllm kto") -> int:
    return run("kto", argv, prog)


def grpo_main(argv: list[str], prog: str = "hfllm grpo") -> int:
    return run("grpo", argv, prog)


if __name__ == "__main__":
    from hfllm.cli import main as cli_main

    sys.exit(cli_main(sys.argv[1:]))  # `python hfllm/run_align.py orpo RECIPE.yaml`
