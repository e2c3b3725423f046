"""SFT, DPO, ORPO, KTO and GRPO from YAML recipes through TRL's trainers: `hfllm sft|dpo|orpo|kto|grpo RECIPE.yaml`.

One wiring for every method, `build`: recipe -> output folder check -> data + chat template (checked before anything
is loaded) -> model + PEFT adapter -> TRL trainer; then the shared lifecycle (lifecycle.py) saves the recipe, trains,
saves the model and evaluates.
`hfllm/run_sft.py` and `hfllm/run_dpo.py` are entry files over it. A recipe's keys are split across TRL's
dataclasses (`ScriptArguments`, the method's config such as `SFTConfig`, `ModelConfig`, `DatasetMixtureConfig`) and
`HfllmArguments` below, by `hfllm.recipe` (the one recipe loader). GRPO's rewards are `module:function` names
(`reward_funcs:`); the default scores completions of `hfllm data synth` prompts by exact match.
"""

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from datasets import Dataset
from transformers import PreTrainedModel, TrainerCallback

from ..errors import HfllmError
from ..recipe import Recipe, RecipeInput, recipe_argv
from . import lifecycle
from .distributed import with_strategy
from .health import HealthArguments, HealthCallback, check_health_arguments, with_health
from .preemption import PreemptionCallback
from .tracking import EvalArguments, add_tracking, check_eval_arguments, check_report_to
from .run_info import write_run_info

# method -> (module, config class, trainer class)
TRAINERS = {
    "sft": ("trl", "SFTConfig", "SFTTrainer"),
    "dpo": ("trl", "DPOConfig", "DPOTrainer"),
    "orpo": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"),
    "kto": ("trl", "KTOConfig", "KTOTrainer"),
    "grpo": ("trl", "GRPOConfig", "GRPOTrainer"),
}
# keys that may change between a run and its resumption: every command's and the exact-match limit
SESSION_KEYS = lifecycle.SESSION_KEYS | {"exact_match_limit", "eval_tasks", "eval_tasks_limit", "regression_prompts",
                                         "eval_tasks_chat_template"}


@dataclass
class HfllmArguments(HealthArguments, EvalArguments):
    """Recipe keys hfllm adds to TRL's, with the training-health keys (`HealthArguments`, docs/reliability.md) and
    evaluation during training (`EvalArguments`: eval_tasks, regression_prompts; tracking.py)."""

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


def recipe_types(method: str) -> tuple[type, ...]:
    """The dataclasses a `method` recipe's keys are split across (TRL's, the method's config, hfllm's)."""
    from trl import ModelConfig, ScriptArguments

    from ..data.alignment import DatasetMixtureConfig

    module_name, config_name, _ = TRAINERS[method]
    config = getattr(importlib.import_module(module_name), config_name)
    extra = (GRPOArguments,) if method == "grpo" else ()
    return (ScriptArguments, config, ModelConfig, DatasetMixtureConfig, HfllmArguments, *extra)


def trainer_class(method: str) -> type:
    """TRL's trainer of `method` with hfllm's health checks, atomic saving and distributed-strategy checks."""
    module_name, _, trainer_name = TRAINERS[method]
    return with_strategy(with_health(getattr(importlib.import_module(module_name), trainer_name)))


def parse_recipe(method: str, argv: list[str], prog: str) -> Recipe:
    """`RECIPE.yaml [--key value ...]` -> Recipe with args `recipe_types(method)`, fitted to this machine."""
    from ..recipe import load_recipe
    from .hardware import apply_hardware

    return load_recipe(argv, recipe_types(method), prog, fit_training_arguments=apply_hardware)


def train(method: str, argv: list, prog: str, callbacks: Sequence[TrainerCallback] = ()) -> lifecycle.RunResult:
    """parse -> build -> the shared lifecycle (lifecycle.py), for `hfllm METHOD RECIPE [--key value ...]` and the
    Python API (`hfllm.sft(recipe, **overrides)`, ...)."""
    return lifecycle.run(build(method, parse_recipe(method, argv, prog), callbacks), prog, argv)


def build(method: str, recipe: Recipe, callbacks: Sequence[TrainerCallback] = (), *,
          data: tuple[Dataset, Dataset | None] | None = None, tokenizer=None,
          model: PreTrainedModel | None = None) -> lifecycle.Parts:
    """A `method` recipe's parts: data with its chat template, model with its adapter, and TRL's trainer, every input
    checked first; nothing is written to disk (Trainer's constructor makes the output folder, empty). `callbacks`
    replace the default callback of their class (`lifecycle.with_defaults`) or are added; `data` (train,
    evaluation), `tokenizer` (used as it is, its template unchecked) and `model` replace what the recipe would
    load (doctor: a few rows, the tokenizer whose template it checks itself, a shrunk model)."""
    from transformers import set_seed
    from trl import get_quantization_config

    from ..checkpoint import load, load_tokenizer, spec_kind
    from ..data.alignment import load_mixture
    from ..data.chat_template import set_template
    from .adapters import build_peft_config, check_bitsandbytes
    from .kernels import check_kernel_options

    # ---- recipe and output folder
    script_args, training_args, model_args, mixture_args, hfllm_args, *grpo_args = recipe.args
    check_health_arguments(hfllm_args)
    check_eval_arguments(hfllm_args)
    check_report_to(training_args.report_to)
    check_kernel_options(training_args.use_liger_kernel, False, model_args.attn_implementation)
    overwrite = hfllm_args.overwrite_output_dir
    resume = lifecycle.output_policy(recipe, training_args, overwrite, SESSION_KEYS)
    spec_kind(model_args.model_name_or_path)  # a missing or empty model folder fails before the data is read
    set_seed(training_args.seed)
    trainer_kwargs = {}
    if method == "grpo":
        trainer_kwargs["reward_funcs"] = [load_reward(name) for name in grpo_args[0].reward_funcs]

    # ---- data and chat template (checked before anything is loaded); the model's tokenizer counts `tokens` weights
    own_tokenizer = tokenizer is None
    if own_tokenizer:
        tokenizer = load_tokenizer(model_args.model_name_or_path)
    train, evaluation, mixture = (*data, None) if data else load_mixture(
        method, script_args, mixture_args, training_args.eval_strategy != "no", training_args.seed, tokenizer)
    if own_tokenizer:
        conversational = "messages" in train.column_names or isinstance(train[0].get("prompt"), list)
        assistant_only_loss = getattr(training_args, "assistant_only_loss", False)
        if conversational or hfllm_args.chat_template:
            set_template(tokenizer, hfllm_args.chat_template, assistant_only_loss)
        elif assistant_only_loss:
            raise HfllmError("assistant_only_loss needs conversational data (a `messages` column); use completion_only_loss for prompt/completion text")

    # ---- model and adapter (with use_peft, DPO's reference is the base with the adapter disabled: no second copy)
    if model is None:
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

    # ---- the trainer. Health checks and preemption (SIGTERM / SIGINT: checkpoint, resume command, exit 143 / 130):
    # hfllm/training/health.py; the tokenizer, with its chat template, is saved with the model
    chosen = lifecycle.with_defaults([HealthCallback(hfllm_args), PreemptionCallback()], callbacks)
    trainer = trainer_class(method)(
        model=model, args=training_args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        peft_config=peft_config, callbacks=chosen, **trainer_kwargs,
    )
    # eval_tasks / regression_prompts every eval_steps (chat template on when the tokenizer has one); run_info.json's
    # facts to the trackers (tracking.py)
    evaluator = add_tracking(hfllm_args, trainer, training_args.eval_steps or training_args.logging_steps,
                             chat=bool(tokenizer.chat_template))

    def finish() -> None:  # held-out exact match (hfllm data synth's test.jsonl)
        if hfllm_args.exact_match_file and trainer.accelerator.is_main_process:
            from ..evaluation.exact_match import score_file

            result = score_file(trainer.model, tokenizer, hfllm_args.exact_match_file, hfllm_args.exact_match_limit,
                                training_args.output_dir)
            print(f"held-out: {result}")
        if evaluator is not None:
            evaluator.save_scores(training_args.output_dir)  # beside the final eval loss in eval_results.json
        trainer.accelerator.print(f"saved to {training_args.output_dir}")

    return lifecycle.Parts(
        recipe=recipe, trainer=trainer, tokenizer=tokenizer,
        preemption=next(cb for cb in chosen if isinstance(cb, PreemptionCallback)), resume=resume,
        overwrite=overwrite, leave_out=("resume_from_checkpoint", "overwrite_output_dir"), final_eval_logged=False,
        write_outputs=lambda: data_report(trainer, mixture), finish=finish,
    )


def data_report(trainer, mixture) -> None:
    """The run log's data lines at the start: the mixture's realized shares, and how full the batches are (packed
    rows, or padded batches); the mixture's record goes into run_info.json."""
    from ..data.packing import batch_fill

    if mixture is not None:
        print(mixture.summary(), flush=True)
        write_run_info(trainer.args.output_dir, {"data_mixture": mixture.record()})
    fill = batch_fill(trainer.train_dataset, trainer.args) if isinstance(trainer.train_dataset, Dataset) else None
    if fill:
        print(fill, flush=True)


def sft_main(argv: list[str], prog: str = "hfllm sft", callbacks: Sequence[TrainerCallback] = ()) -> int:
    return train("sft", argv, prog, callbacks).exit_code


def dpo_main(argv: list[str], prog: str = "hfllm dpo", callbacks: Sequence[TrainerCallback] = ()) -> int:
    return train("dpo", argv, prog, callbacks).exit_code


def orpo_main(argv: list[str], prog: str = "hfllm orpo", callbacks: Sequence[TrainerCallback] = ()) -> int:
    return train("orpo", argv, prog, callbacks).exit_code


def kto_main(argv: list[str], prog: str = "hfllm kto", callbacks: Sequence[TrainerCallback] = ()) -> int:
    return train("kto", argv, prog, callbacks).exit_code


def grpo_main(argv: list[str], prog: str = "hfllm grpo", callbacks: Sequence[TrainerCallback] = ()) -> int:
    return train("grpo", argv, prog, callbacks).exit_code


# ----------------------------------------------------------------------------- Python API: hfllm.sft, hfllm.dpo, ...

_API_DOC = """{summary}, as `hfllm {method}` does (TRL's {trainer}).

    recipe: a YAML recipe file (see recipes/{method}/) or the same keys as a dict.
    overrides: any recipe key, e.g. model_name_or_path="runs/tiny", max_steps=20, use_peft=True, lora_r=8,
        load_in_4bit=True (QLoRA), output_dir="runs/{method}".
    callbacks: extra transformers TrainerCallbacks.

    Returns a RunResult: output_dir (the model or adapter, tokenizer with its chat template, recipe.yaml),
    metrics (the final evaluation), log_history and losses(); `result.load()` gives the model and tokenizer.
    Bad input raises HfllmError with the same one line as the command.

        result = hfllm.{method}("recipes/{method}/smollm2_synth_lora.yaml", max_steps=20)
    """


def _api(method: str, summary: str):
    def train_method(recipe: RecipeInput, /, *, callbacks: Sequence[TrainerCallback] = (),
                     **overrides) -> lifecycle.RunResult:
        return train(method, recipe_argv(recipe, overrides), f"hfllm {method}", callbacks)

    train_method.__name__ = train_method.__qualname__ = method
    train_method.__doc__ = _API_DOC.format(summary=summary, method=method, trainer=TRAINERS[method][2])
    return train_method


sft = _api("sft", "Supervised fine-tuning on chat or prompt/completion data")
dpo = _api("dpo", "Direct preference optimisation on chosen/rejected pairs")
orpo = _api("orpo", "ORPO (odds-ratio preference optimisation, no reference model) on chosen/rejected pairs")
kto = _api("kto", "KTO on answers labelled desirable or undesirable")
grpo = _api("grpo", "GRPO: online reinforcement learning with reward functions (a verifiable reward, say)")
