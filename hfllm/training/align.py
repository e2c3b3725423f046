"""SFT, DPO, ORPO, KTO and GRPO from YAML recipes through TRL's trainers: `hfllm sft|dpo|orpo|kto|grpo RECIPE.yaml`.

One wiring for every method: recipe -> output folder check -> data + chat template (checked before anything is
loaded or written) -> model + PEFT adapter -> TRL trainer -> save (with the resolved recipe) -> evaluate.
`hfllm/run_sft.py` and `hfllm/run_dpo.py` are entry files over it. A recipe's keys are split across TRL's
dataclasses (`ScriptArguments`, the method's config such as `SFTConfig`, `ModelConfig`, `DatasetMixtureConfig`) and
`HfllmArguments` below, by `hfllm.recipe` (the one recipe loader). GRPO's rewards are `module:function` names
(`reward_funcs:`); the default scores completions of `hfllm data synth` prompts by exact match.
"""

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HfllmError
from .distributed import with_engine
from .health import (HEALTH_KEYS, HealthArguments, HealthCallback, PreemptionCallback, check_health_arguments,
                     resume_command, with_health)

# method -> (module, config class, trainer class)
TRAINERS = {
    "sft": ("trl", "SFTConfig", "SFTTrainer"),
    "dpo": ("trl", "DPOConfig", "DPOTrainer"),
    "orpo": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"),
    "kto": ("trl", "KTOConfig", "KTOTrainer"),
    "grpo": ("trl", "GRPOConfig", "GRPOTrainer"),
}
# keys that may change between a run and its resumption
SESSION_KEYS = frozenset({"resume_from_checkpoint", "overwrite_output_dir", "report_to", "logging_steps",
                          "disable_tqdm", "dataloader_num_workers", "eval_steps", "save_steps", "save_total_limit",
                          "run_name", "exact_match_limit", *HEALTH_KEYS})


@dataclass
class HfllmArguments(HealthArguments):
    """Recipe keys hfllm adds to TRL's, with the training-health keys (`HealthArguments`, docs/reliability.md)."""

    chat_template: str | None = field(
        default=None, metadata={"help": "shipped template name (smollm2, chatml) or .jinja path; saved with the model"}
    )
    peft_type: str = field(default="lora", metadata={"help": "with use_peft: lora | prefix | prompt | p_tuning | ia3"})
    num_virtual_tokens: int = field(default=16, metadata={"help": "virtual tokens for prefix / prompt / p_tuning"})
    exact_match_file: str | None = field(
        default=None, metadata={"help": "test.jsonl from `hfllm data synth`: exact-match accuracy after training"}
    )
    exact_match_limit: int | None = field(default=None, metadata={"help": "score only the first N exact-match items"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "replace an earlier hfllm run in output_dir instead of refusing to start"}
    )


@dataclass
class GRPOArguments:
    """GRPO's reward functions, each `module:function` (TRL's reward signature)."""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["hfllm.evaluation.exact_match:exact_match_reward"], metadata={"help": "module:function rewards"}
    )


def load_reward(name: str):
    module_name, _, function_name = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, ValueError):
        raise HfllmError(f"reward function '{name}' not found; give it as module:function, e.g. "
                         "hfllm.evaluation.exact_match:exact_match_reward") from None


def run(method: str, argv: list[str], prog: str) -> int:
    from transformers import set_seed
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, get_quantization_config

    from ..checkpoint import check_output_dir, clear_output_dir, load, load_tokenizer, spec_kind
    from ..data.alignment import load_splits
    from ..data.chat_template import set_template
    from ..recipe import load_recipe
    from .adapters import build_peft_config, check_bitsandbytes
    from .kernels import check_kernel_options

    module_name, config_name, trainer_name = TRAINERS[method]
    module = importlib.import_module(module_name)
    Config, Trainer = getattr(module, config_name), with_engine(with_health(getattr(module, trainer_name)))

    # ---- recipe and output folder
    extra = (GRPOArguments,) if method == "grpo" else ()
    recipe = load_recipe(argv, (ScriptArguments, Config, ModelConfig, DatasetMixtureConfig, HfllmArguments, *extra), prog)
    script_args, training_args, model_args, mixture_args, hfllm_args, *grpo_args = recipe.args
    check_health_arguments(hfllm_args)
    check_kernel_options(training_args.use_liger_kernel, False, model_args.attn_implementation)
    overwrite = hfllm_args.overwrite_output_dir
    resume = check_output_dir(training_args.output_dir, run=recipe, resume=training_args.resume_from_checkpoint,
                              overwrite=overwrite, session_keys=SESSION_KEYS)
    spec_kind(model_args.model_name_or_path)  # a missing or empty model folder fails before the data is read
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
    quantization = None
    if model_args.load_in_4bit or model_args.load_in_8bit:
        check_bitsandbytes()
        quantization = get_quantization_config(model_args)  # compute dtype = `dtype`
    model, _ = load(model_args.model_name_or_path, dtype=model_args.dtype, revision=model_args.model_revision,
                    attn_implementation=model_args.attn_implementation, quantization_config=quantization,
                    trust_remote_code=training_args.trust_remote_code, with_tokenizer=False)
    model.train()
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if tokenizer.eos_token_id not in eos:  # the template ends turns with another token: generation stops at it too
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, *eos]
    peft_config = build_peft_config(model_args, hfllm_args.peft_type, hfllm_args.num_virtual_tokens, model)

    # ---- the output folder may be written now: the resolved recipe goes first
    if training_args.should_save:
        if overwrite and resume is None:
            clear_output_dir(training_args.output_dir)
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        recipe.save(training_args.output_dir, leave_out=("resume_from_checkpoint", "overwrite_output_dir"))

    # ---- train, save (the tokenizer, with its chat template, goes with the model), evaluate. Health checks and
    # preemption (SIGTERM / SIGINT: checkpoint, resume command, exit 143 / 130): hfllm/training/health.py
    preemption = PreemptionCallback()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[HealthCallback(hfllm_args), preemption],
        **trainer_kwargs,
    )
    trainer.train(resume_from_checkpoint=resume)  # TrainingHalted (exit code 3) when the health checks stop it
    if preemption.received and trainer.state.global_step < trainer.state.max_steps:
        trainer.accelerator.wait_for_everyone()  # no process exits before every part is written
        trainer.accelerator.print(f"interrupted at step {trainer.state.global_step} of {trainer.state.max_steps}; "
                                  f"checkpoint saved; resume with:\n{resume_command(prog, argv)}")
        return preemption.exit_code
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history (loss curve) next to the model
    if not (Path(training_args.output_dir) / "tokenizer_config.json").exists():  # not every trainer saves it
        tokenizer.save_pretrained(training_args.output_dir)
    if evaluation is not None:  # DPO: eval_rewards/accuracies and eval_rewards/margins are preference accuracy/margin
        step = trainer.state.global_step  # reuse an evaluation already run at the last step (eval_steps = max_steps)
        done = [log for log in trainer.state.log_history if "eval_loss" in log and log.get("step") == step]
        metrics = {k: v for k, v in done[-1].items() if k != "step"} if done else trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if hfllm_args.exact_match_file and trainer.accelerator.is_main_process:
        from ..evaluation.exact_match import score_file

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
