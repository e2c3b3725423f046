"""What the doctor's checks run on: a recipe (pretraining or SFT) or a model folder, built by the training command's
own `build` (hfllm/training/pretrain.py, align.py) at a tiny size: the architecture shrunk, a few documents or rows,
4 optimizer steps. Nothing is written outside a temporary folder."""

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, Trainer, TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback

STEPS = 4  # optimizer steps of the reproducibility / resume runs; the resumed run starts from checkpoint STEPS // 2
SAMPLE_DOCUMENTS = 8  # documents for round-trip and BOS/EOS checks
STREAM_DOCUMENTS = 2000  # documents read from each split of a streamed dataset
TRAIN_CHARS = 50_000_000  # train text (leading documents) searched for validation duplicates


@dataclass
class Subject:
    """A recipe (or model folder) made ready for the checks: everything the training command would build."""

    label: str
    config: PreTrainedConfig  # the architecture, shrunk, vocabulary set from the tokenizer
    tokenizer: object
    train_texts: list[str]
    validation_texts: list[str]
    batch: dict[str, torch.Tensor]  # one training batch, as the training collator makes it
    trainer: Callable[..., Trainer]  # (output_dir, model=None) -> the training command's own built trainer
    seed: int
    tokenizer_from_data: bool  # trained on train_texts (bpe/char): unused tokens are a defect
    chat: bool  # chat data: the template must mask the assistant turns
    assistant_only_loss: bool
    conversations: list[list[dict]] | None = None  # chat data: the first conversations, for BOS/EOS and masks
    loaded_model: torch.nn.Module | None = None  # MODEL_DIR: the checkpoint itself, for the leak and label checks
    scratch: tempfile.TemporaryDirectory | None = None  # MODEL_DIR without a recipe: the one written for the runs

    def new_model(self) -> torch.nn.Module:
        """The shrunk architecture with new weights, seeded as training seeds it."""
        set_seed(self.seed)
        return AutoModelForCausalLM.from_config(self.config)

    def train(self, output_dir: str, resume: str | None, model: torch.nn.Module | None = None
              ) -> tuple[list[float], dict]:
        """A tiny run of the training command in `output_dir` on `model` (default: `new_model()`), resumed from
        the checkpoint `resume`: (the logged loss of every step, the final weights)."""
        return _run(self.trainer(output_dir, model), resume)


def shrink(config: PreTrainedConfig, layers: int = 2, head_dim: int = 16) -> dict:
    """Config overrides for a tiny copy of an architecture: `layers` layers, at most 2 key/value heads with the same
    query-per-key/value ratio, `head_dim`-wide heads; sliding windows, layer types and experts kept (Mixture-of-Recursions'
    middle_cycle keeps 3 layers: a unique first and last around a shared middle)."""
    if getattr(config, "num_recursions", 0) > 1 and config.recursion_sharing == "middle_cycle":
        layers = max(layers, 3)  # Mixture-of-Recursions: a unique first and last layer around a shared middle
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kv = min(kv_heads, 2)
    new_heads = kv * (heads // kv_heads)
    if new_heads * head_dim < 32:  # a residual stream narrower than 32 learns too slowly to overfit in time
        new_heads, kv = new_heads * 2, kv * 2
    hidden = new_heads * head_dim
    overrides = {"num_hidden_layers": min(layers, config.num_hidden_layers), "hidden_size": hidden,
                 "intermediate_size": 2 * hidden, "num_attention_heads": new_heads, "num_key_value_heads": kv,
                 "head_dim": head_dim}
    if getattr(config, "layer_types", None):
        types = list(config.layer_types)
        kinds = list(dict.fromkeys(types))  # keep every kind of layer the recipe has
        overrides["layer_types"] = (kinds + types)[: max(layers, len(kinds))]
        overrides["num_hidden_layers"] = len(overrides["layer_types"])
    if getattr(config, "mamba_n_heads", None):  # Mamba-2 heads are derived again at the new width
        overrides.update(mamba_n_heads=None, mamba_d_head=None)
    if getattr(config, "num_experts", 0):
        overrides["moe_intermediate_size"] = hidden // 2
    if getattr(config, "mlp_only_layers", None):
        overrides["mlp_only_layers"] = [i for i in config.mlp_only_layers if i < overrides["num_hidden_layers"]]
    if getattr(config, "mod_layers", None):  # Mixture of Depths: the routed layers kept, else its default
        overrides["mod_layers"] = [i for i in config.mod_layers if i < overrides["num_hidden_layers"]] or None
    return overrides


def shrunk_config(config: PreTrainedConfig, tokenizer, keep_vocab: bool) -> PreTrainedConfig:
    """The tiny copy of `config`; its vocabulary sized to the tokenizer (a preset) or kept (a model folder's)."""
    fields = {**config.to_dict(), **shrink(config)}
    fields.update(vocab_size=config.vocab_size if keep_vocab else len(tokenizer),
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, use_cache=False)
    for key in ("architectures", "transformers_version", "model_type", "auto_map", "dtype", "torch_dtype"):
        fields.pop(key, None)
    return AutoConfig.for_model(config.model_type, **fields)


class _LossRecorder(TrainerCallback):
    """The loss of every optimizer step, as Trainer logs it (logging_steps 1)."""

    def __init__(self):
        self.losses: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def _run(trainer, resume: str | None) -> tuple[list[float], dict]:
    """Train; (the logged loss of every step, the final weights)."""
    recorder = _LossRecorder()
    trainer.add_callback(recorder)
    trainer.remove_callback(PrinterCallback)  # the table says what matters
    trainer.train(resume_from_checkpoint=resume)
    weights = {name: tensor.detach().clone() for name, tensor in trainer.model.state_dict().items()}
    return recorder.losses, weights


def first_batch(trainer) -> dict[str, torch.Tensor]:
    """One batch from the trainer's own dataloader: its collator's inputs, labels and masks."""
    batch = next(iter(trainer.get_train_dataloader()))
    return {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}


# the tiny runs: recipe keys given to the training command's own `build`
RUN_OVERRIDES = ["--max_steps", str(STEPS), "--save_steps", str(STEPS // 2), "--save_strategy", "steps",
                 "--logging_steps", "1", "--logging_first_step", "false", "--eval_strategy", "no", "--report_to", "none",
                 "--save_total_limit", "null", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
                 "--torch_compile", "false"]
BATCH_SIZE = 4


def leading_documents(split, characters: int):
    """The first documents of a split holding at least `characters` characters (all of them if fewer): enough text
    for the tiny runs, packed by the recipe's own pipeline without tokenizing the whole corpus."""
    total = count = 0
    for text in split["text"]:
        total, count = total + len(text), count + 1
        if total >= characters:
            break
    return split.select(range(count))


def pretraining_subject(argv: list[str], prog: str, model_dir: str | None = None) -> Subject:
    """A pretraining recipe as `hfllm pretrain` builds it (`training.pretrain.build`), on its first documents, with
    the tokenizer checked here and the architecture shrunk."""
    from ..data.text import load_text, resolve_tokenizer
    from ..training.arguments import gradient_accumulation, parse_recipe
    from ..training.pretrain import build, check_vocabulary, is_model_folder, resolve_config

    if model_dir is not None:  # MODEL_DIR with its recipe.yaml: the folder's architecture and tokenizer
        argv = [*argv, "--model", model_dir, "--tokenizer", model_dir]
    recipe = parse_recipe(argv, prog)
    model_args, data_args, args = recipe.args
    accumulation = gradient_accumulation(args, data_args.block_size)
    block_size = min(data_args.block_size, 128)
    config = resolve_config(model_args.model, recipe.free, data_args.block_size)
    if args.torch_num_threads is not None:
        torch.set_num_threads(args.torch_num_threads)
    raw = load_text(data_args, args.seed)
    if data_args.streaming:  # the first documents of each stream
        raw = DatasetDict({split: Dataset.from_list(list(part.take(STREAM_DOCUMENTS))) for split, part in raw.items()})
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = resolve_tokenizer(data_args, raw["train"], scratch, is_main=True, resuming=False)
    check_vocabulary(model_args.model, config, tokenizer)
    config = shrunk_config(config, tokenizer, keep_vocab=is_model_folder(model_args.model))
    characters = 16 * BATCH_SIZE * accumulation * STEPS * block_size  # ~16 characters per token at most
    first_documents = DatasetDict({split: leading_documents(part, characters) for split, part in raw.items()})
    run_argv = [*argv, *RUN_OVERRIDES, "--per_device_train_batch_size", str(BATCH_SIZE), "--global_batch_size",
                str(BATCH_SIZE * accumulation), "--global_batch_tokens", "null", "--block_size", str(block_size)]

    def trainer(output_dir: str, model: torch.nn.Module | None = None):
        recipe = parse_recipe([*run_argv, "--output_dir", output_dir], prog)
        return build(recipe, text=first_documents, tokenizer=tokenizer, model=subject.new_model() if model is None else model).trainer

    subject = Subject(
        label=recipe.path or model_dir, config=config, tokenizer=tokenizer,
        train_texts=list(leading_documents(raw["train"], TRAIN_CHARS)["text"]),
        validation_texts=list(raw["validation"]["text"]), batch={}, trainer=trainer, seed=args.seed,
        tokenizer_from_data=data_args.tokenizer in ("bpe", "char"), chat=False, assistant_only_loss=False,
    )
    with tempfile.TemporaryDirectory() as scratch:
        subject.batch = first_batch(trainer(scratch))
    return subject


def sft_subject(argv: list[str], prog: str) -> Subject:
    """An SFT recipe as `hfllm sft` builds it (`training.align.build`): its first rows, the base model's tokenizer
    with the recipe's chat template (checked here), the base architecture shrunk."""
    from ..checkpoint import load_tokenizer, spec_kind
    from ..data.alignment import load_mixture
    from ..data.chat_template import load_template
    from ..training.align import build, parse_recipe

    recipe = parse_recipe("sft", argv, prog)
    script_args, args, model_args, mixture_args, hfllm_args = recipe.args
    spec_kind(model_args.model_name_or_path)  # one line when the base model is missing
    train, evaluation, _ = load_mixture("sft", script_args, mixture_args, args.eval_strategy != "no")
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    if hfllm_args.chat_template:
        tokenizer.chat_template = load_template(hfllm_args.chat_template)
    config = shrunk_config(AutoConfig.from_pretrained(model_args.model_name_or_path), tokenizer, keep_vocab=True)
    conversational = "messages" in train.column_names

    def texts(split) -> list[str]:
        if split is None:
            return []
        if conversational:
            return [tokenizer.apply_chat_template(row, tokenize=False) for row in split["messages"]]
        if "text" in split.column_names:
            return list(split["text"])
        return [f"{row['prompt']}{row['completion']}" for row in split]  # prompt/completion strings

    rows = train.select(range(min(len(train), BATCH_SIZE * args.gradient_accumulation_steps * STEPS)))
    run_argv = [*argv, *RUN_OVERRIDES, "--per_device_train_batch_size", str(BATCH_SIZE)]

    def trainer(output_dir: str, model: torch.nn.Module | None = None):
        recipe = parse_recipe("sft", [*run_argv, "--output_dir", output_dir], prog)
        return build("sft", recipe, data=(rows, None), tokenizer=tokenizer, model=subject.new_model() if model is None else model).trainer

    subject = Subject(
        label=recipe.path, config=config, tokenizer=tokenizer, train_texts=texts(train),
        validation_texts=texts(evaluation), batch={}, trainer=trainer, seed=args.seed, tokenizer_from_data=False,
        chat=conversational, assistant_only_loss=getattr(args, "assistant_only_loss", False),
        conversations=list(train.select(range(min(len(train), SAMPLE_DOCUMENTS)))["messages"]) if conversational else None,
    )
    with tempfile.TemporaryDirectory() as scratch:  # one batch from TRL's own dataloader: its labels and masks
        subject.batch = first_batch(trainer(scratch))
    return subject


def model_dir_subject(folder: str, argv: list[str], prog: str) -> Subject:
    """A model folder: the recipe it was trained with (its recipe.yaml) on the folder's architecture and tokenizer,
    else the embedded Shakespeare text; the causal-mask and label checks also run on the folder's own weights."""
    import yaml

    from ..checkpoint import load
    from ..recipe import RECIPE_FILE, read_yaml

    recipe = Path(folder) / RECIPE_FILE
    scratch = None
    if recipe.is_file() and "model_name_or_path" in read_yaml(str(recipe)):
        subject = sft_subject([str(recipe), *argv, "--model_name_or_path", folder], prog)
    else:
        if not recipe.is_file():  # the runs read this recipe too: its folder lives as long as the subject
            scratch = tempfile.TemporaryDirectory()
            recipe = Path(scratch.name) / RECIPE_FILE
            recipe.write_text(yaml.safe_dump({"model": folder, "tokenizer": folder, "dataset": "shakespeare",
                                              "block_size": 128}))
        subject = pretraining_subject([str(recipe), *argv], prog, model_dir=folder)
    subject.scratch = scratch
    subject.label = folder
    subject.loaded_model = load(folder, dtype=torch.float32, with_tokenizer=False)[0]
    return subject


def subject_for(argv: list, prog: str) -> Subject:
    """RECIPE.yaml or its mapping (pretraining, or SFT: it names `model_name_or_path`) or MODEL_DIR, each with
    `--key value` overrides."""
    from ..recipe import read_yaml

    target, rest = argv[0], argv[1:]
    if isinstance(target, str) and Path(target).is_dir():
        return model_dir_subject(target, rest, prog)
    if "model_name_or_path" in read_yaml(target):
        return sft_subject(argv, prog)
    return pretraining_subject(argv, prog)
