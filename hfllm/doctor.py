"""`hfllm doctor RECIPE | MODEL_DIR`: the pre-flight checklist of a training run, at a tiny size, on the recipe's own
architecture, tokenizer and data (docs/reliability.md#hfllm-doctor).

    recipe -> text splits + tokenizer (hfllm/data, as `hfllm pretrain` / `hfllm sft` build them) -> data checks
           -> the recipe's architecture shrunk (2 layers, 16-wide heads) with new weights -> model checks
           -> a table (check, measured, expected, result); exit code 4 when any check fails

Model checks: loss at init ~ ln(vocab), no causal-mask leak, next-token labels, one batch overfits, two seeded runs
are bitwise equal, a run resumed from its checkpoint equals the uninterrupted run. Tokenizer and data checks: round
trip, BOS/EOS rules, newlines, distinct special tokens, vocabulary use and unknowns, train/validation contamination
(exact and near-duplicate documents), the chat template (renders, masks the assistant turns).

It spans stages (data, models, training), hence a top-level module like recipe.py and checkpoint.py. Nothing is
written outside a temporary folder.
"""

import contextlib
import copy
import math
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedConfig,
    TrainerCallback,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback

from .errors import HfllmError

EXIT_FAILED = 4  # a check failed (docs/reliability.md, exit codes)
STEPS = 4  # optimizer steps of the reproducibility / resume runs; the resumed run starts from checkpoint STEPS // 2
OVERFIT_STEPS = 150
OVERFIT_TARGET = 0.5  # nats per token after OVERFIT_STEPS on one batch
INIT_LOSS_TOLERANCE = 0.1  # |loss - ln V| / ln V
LEAK_TOLERANCE = 1e-5  # largest change of an earlier logit when a later token changes
LABEL_LOGIT = 30.0  # logit of the one token a copy / oracle model predicts
NEAR_DUPLICATE_JACCARD = 0.8  # estimated Jaccard similarity of word 5-gram shingles
SHINGLE_WORDS = 5
MIN_SHINGLES = 20  # shorter documents are compared exactly only: short templated texts share most n-grams
UNUSED_TOKENS_MAX = 0.10  # share of a tokenizer trained on this data that the train text never uses
UNKNOWN_MAX = 0.001  # share of unknown tokens in the text
SAMPLE_DOCUMENTS = 8  # documents for round-trip and BOS/EOS checks
MAX_CHARS = 2_000_000  # characters of text for the vocabulary check
STREAM_DOCUMENTS = 2000  # documents read from each split of a streamed dataset
TRAIN_CHARS = 50_000_000  # train text (leading documents) searched for validation duplicates


@dataclass
class Check:
    name: str
    measured: str
    expected: str
    status: str  # "pass", "FAIL" or "info" (reported, never fails)


def verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


# ----------------------------------------------------------------------------- what the checks run on


@dataclass
class Subject:
    """A recipe (or model folder) made ready for the checks: everything the training command would build."""

    label: str
    config: PreTrainedConfig  # the architecture, shrunk, vocabulary set from the tokenizer
    tokenizer: object
    train_texts: list[str]
    validation_texts: list[str]
    batch: dict[str, torch.Tensor]  # one training batch, as the training collator makes it
    train: Callable[[str, str | None], tuple[list[float], dict]]  # (output_dir, resume) -> (losses, final weights)
    seed: int
    tokenizer_from_data: bool  # trained on train_texts (bpe/char): unused tokens are a defect
    chat: bool  # chat data: the template must mask the assistant turns
    assistant_only_loss: bool
    conversations: list[list[dict]] | None = None  # chat data: the first conversations, for BOS/EOS and masks
    loaded_model: torch.nn.Module | None = None  # MODEL_DIR: the checkpoint itself, for the leak and label checks

    def new_model(self) -> torch.nn.Module:
        """The shrunk architecture with new weights, seeded as training seeds it."""
        set_seed(self.seed)
        return AutoModelForCausalLM.from_config(self.config)


def shrink(config: PreTrainedConfig, layers: int = 2, head_dim: int = 16) -> dict:
    """Config overrides for a tiny copy of an architecture: `layers` layers, at most 2 key/value heads with the same
    query-per-key/value ratio, `head_dim`-wide heads; sliding windows, layer types and experts kept."""
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
    if getattr(config, "num_experts", 0):
        overrides["moe_intermediate_size"] = hidden // 2
    if getattr(config, "mlp_only_layers", None):
        overrides["mlp_only_layers"] = [i for i in config.mlp_only_layers if i < overrides["num_hidden_layers"]]
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


def in_folder(args, output_dir: str):
    """A copy of training arguments writing to `output_dir`."""
    args = copy.deepcopy(args)
    args.output_dir = output_dir
    return args


def _run(trainer, resume: str | None) -> tuple[list[float], dict]:
    """Train; (the logged loss of every step, the final weights)."""
    recorder = _LossRecorder()
    trainer.add_callback(recorder)
    trainer.remove_callback(PrinterCallback)  # the table says what matters
    trainer.train(resume_from_checkpoint=resume)
    weights = {name: tensor.detach().clone() for name, tensor in trainer.model.state_dict().items()}
    return recorder.losses, weights


RUN_OVERRIDES = ["--max_steps", str(STEPS), "--save_steps", str(STEPS // 2), "--save_strategy", "steps",
                 "--logging_steps", "1", "--logging_first_step", "false", "--eval_strategy", "no", "--report_to", "none",
                 "--save_total_limit", "null", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
                 "--torch_compile", "false"]


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
    """A pretraining recipe as `hfllm pretrain` builds it: its text, tokenizer, packed blocks and Trainer."""
    from . import data
    from .data.text import load_text, resolve_tokenizer, take
    from .training.arguments import gradient_accumulation, parse_recipe
    from .training.health import HealthCallback
    from .training.pretrain import resolve_config
    from .training.trainer import PretrainTrainer

    recipe = parse_recipe(argv, prog)
    model_args, data_args, args = recipe.args
    if model_dir is not None:  # MODEL_DIR with its recipe.yaml: the folder's architecture and tokenizer
        model_args.model, data_args.tokenizer = model_dir, model_dir
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
    if len(tokenizer) > config.vocab_size and Path(model_args.model).is_dir():
        raise HfllmError(f"the tokenizer has {len(tokenizer)} tokens but the model {model_args.model} has vocab_size "
                         f"{config.vocab_size}; use the model's own tokenizer")
    config = shrunk_config(config, tokenizer, keep_vocab=Path(model_args.model).is_dir())
    batch_size = 4
    blocks = batch_size * accumulation * STEPS
    first_documents = DatasetDict({split: leading_documents(part, 16 * blocks * block_size)
                                   for split, part in raw.items()})  # ~16 characters per token at most
    packed = data.tokenize_and_pack(first_documents, tokenizer, block_size, seed=args.seed,
                                    per_document_positions=data_args.per_document_positions)
    train_blocks = take(packed["train"], blocks)
    batch = data.collate_blocks([packed["train"][i] for i in range(min(batch_size, len(packed["train"])))])

    run_args = parse_recipe(argv + RUN_OVERRIDES + [
        "--per_device_train_batch_size", str(batch_size), "--global_batch_size", str(batch_size * accumulation),
        "--global_batch_tokens", "null", "--block_size", str(block_size)], prog).args[2]
    run_args.gradient_accumulation_steps = gradient_accumulation(run_args, block_size)

    def train(output_dir: str, resume: str | None) -> tuple[list[float], dict]:
        model = subject.new_model()
        trainer = PretrainTrainer(
            model=model, args=in_folder(run_args, output_dir), train_dataset=train_blocks,
            data_collator=data.collate_blocks, processing_class=tokenizer, callbacks=[HealthCallback(run_args)], flops_per_token=1.0, peak_flops=1.0,
            tokens_per_step=batch_size * accumulation * block_size,
        )
        return _run(trainer, resume)

    subject = Subject(
        label=recipe.path or model_dir, config=config, tokenizer=tokenizer,
        train_texts=list(leading_documents(raw["train"], TRAIN_CHARS)["text"]),
        validation_texts=list(raw["validation"]["text"]), batch=batch, train=train, seed=args.seed,
        tokenizer_from_data=data_args.tokenizer in ("bpe", "char"), chat=False, assistant_only_loss=False,
    )
    return subject


def sft_subject(argv: list[str], prog: str) -> Subject:
    """An SFT recipe as `hfllm sft` builds it (hfllm/training/align.py): its data, the base model's tokenizer with
    the recipe's chat template, the base architecture shrunk, and TRL's SFTTrainer."""
    from trl import (
        DatasetMixtureConfig,
        ModelConfig,
        ScriptArguments,
        SFTConfig,
        SFTTrainer,
    )

    from .checkpoint import load_tokenizer, spec_kind
    from .data.alignment import load_splits
    from .data.chat_template import load_template
    from .recipe import load_recipe
    from .training.adapters import build_peft_config
    from .training.align import HfllmArguments
    from .training.health import HealthCallback, with_health

    types = (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig, HfllmArguments)
    recipe = load_recipe(argv, types, prog)
    script_args, args, model_args, mixture_args, hfllm_args = recipe.args
    spec_kind(model_args.model_name_or_path)  # one line when the base model is missing
    train, evaluation = load_splits("sft", script_args, mixture_args, args.eval_strategy != "no")
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

    batch_size = 4
    rows = train.select(range(min(len(train), batch_size * args.gradient_accumulation_steps * STEPS)))

    run_args = load_recipe(argv + RUN_OVERRIDES + ["--per_device_train_batch_size", str(batch_size)], types, prog).args[1]

    def trainer(output_dir: str):
        model = subject.new_model()
        return with_health(SFTTrainer)(
            model=model, args=in_folder(run_args, output_dir), train_dataset=rows, processing_class=tokenizer,
            peft_config=build_peft_config(model_args, hfllm_args.peft_type, hfllm_args.num_virtual_tokens, model),
            callbacks=[HealthCallback(hfllm_args)],
        )

    def train_run(output_dir: str, resume: str | None) -> tuple[list[float], dict]:
        return _run(trainer(output_dir), resume)

    subject = Subject(
        label=recipe.path, config=config, tokenizer=tokenizer, train_texts=texts(train),
        validation_texts=texts(evaluation), batch={}, train=train_run, seed=args.seed, tokenizer_from_data=False,
        chat=conversational, assistant_only_loss=getattr(args, "assistant_only_loss", False),
        conversations=list(train.select(range(min(len(train), SAMPLE_DOCUMENTS)))["messages"]) if conversational else None,
    )
    with tempfile.TemporaryDirectory() as scratch:  # one batch from TRL's own dataloader: its labels and masks
        batch = next(iter(trainer(scratch).get_train_dataloader()))
    subject.batch = {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}
    return subject


def model_dir_subject(folder: str, argv: list[str], prog: str) -> Subject:
    """A model folder: the recipe it was trained with (its recipe.yaml) on the folder's architecture and tokenizer,
    else the embedded Shakespeare text; the causal-mask and label checks also run on the folder's own weights."""
    import yaml

    from .checkpoint import load
    from .recipe import RECIPE_FILE, read_yaml

    recipe = Path(folder) / RECIPE_FILE
    with tempfile.TemporaryDirectory() as scratch:  # the recipe is read here; the runs take parsed arguments
        if recipe.is_file() and "model_name_or_path" in read_yaml(str(recipe)):
            subject = sft_subject([str(recipe), *argv, "--model_name_or_path", folder], prog)
        else:
            if not recipe.is_file():
                recipe = Path(scratch) / RECIPE_FILE
                recipe.write_text(yaml.safe_dump({"model": folder, "tokenizer": folder, "dataset": "shakespeare",
                                                  "block_size": 128}))
            subject = pretraining_subject([str(recipe), *argv], prog, model_dir=folder)
    subject.label = folder
    subject.loaded_model = load(folder, dtype=torch.float32, with_tokenizer=False)[0]
    return subject


def subject_for(argv: list[str], prog: str) -> Subject:
    """RECIPE.yaml (pretraining, or SFT: it names `model_name_or_path`) or MODEL_DIR, each with `--key value`
    overrides."""
    from .recipe import read_yaml

    target, rest = argv[0], argv[1:]
    if Path(target).is_dir():
        return model_dir_subject(target, rest, prog)
    if "model_name_or_path" in read_yaml(target):
        return sft_subject(argv, prog)
    return pretraining_subject(argv, prog)


# ----------------------------------------------------------------------------- model checks


def _lm_loss(model, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = model.loss_function(logits=logits, labels=batch["labels"], vocab_size=logits.shape[-1])
    return float(loss)


def check_init_loss(model, batch: dict[str, torch.Tensor], vocab_size: int) -> Check:
    """A new model predicts nearly uniformly: its loss is close to ln(vocab)."""
    expected = math.log(vocab_size)
    loss = _lm_loss(model.eval(), batch)
    ok = abs(loss - expected) <= INIT_LOSS_TOLERANCE * expected
    return Check("loss at init", f"{loss:.3f}", f"ln {vocab_size} = {expected:.3f} ± {INIT_LOSS_TOLERANCE:.0%}", verdict(ok))


def check_causal_mask(model, batch: dict[str, torch.Tensor]) -> Check:
    """Changing the token at position t must leave the logits before t unchanged (and change some at or after t)."""
    row = {k: v[:1] for k, v in batch.items() if k != "labels"}  # (1, T)
    length = row["input_ids"].shape[1]
    at = length // 2
    changed = {k: v.clone() for k, v in row.items()}
    changed["input_ids"][0, at:] = (changed["input_ids"][0, at:] + 1) % model.config.vocab_size
    with torch.no_grad():
        before, after = model.eval()(**row).logits, model(**changed).logits  # (1, T, V)
    leak = float((before[0, :at] - after[0, :at]).abs().max())
    reaches = float((before[0, at:] - after[0, at:]).abs().max())
    ok = leak <= LEAK_TOLERANCE and reaches > LEAK_TOLERANCE
    return Check("causal mask (no future leak)", f"max |Δ earlier logit| {leak:.2g}", f"≤ {LEAK_TOLERANCE:g}", verdict(ok))


@contextlib.contextmanager
def replaced_logits(model, make_logits: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the model's head outputs `make_logits(input_ids)` (the loss path itself is untouched)."""
    current: dict[str, torch.Tensor] = {}
    pre = model.register_forward_pre_hook(lambda module, args, kwargs: current.update(ids=kwargs["input_ids"]),
                                          with_kwargs=True)
    head = model.get_output_embeddings().register_forward_hook(lambda module, args, output: make_logits(current["ids"]))
    try:
        yield
    finally:
        pre.remove()
        head.remove()


def check_label_shift(model, batch: dict[str, torch.Tensor]) -> Check:
    """The training loss targets the next token: a model that copies its input scores badly, one that predicts the
    true next token scores ~0. Runs the model's own forward with the batch's labels (from the training collator)."""
    vocab_size = model.config.vocab_size

    def one_hot(ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return torch.nn.functional.one_hot(ids, vocab_size).float() * LABEL_LOGIT

    def next_tokens(ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)

    losses = {}
    model.eval()
    router_losses = getattr(model.config, "output_router_logits", None)
    for name, make in (("copy", lambda ids: one_hot(ids)), ("next", lambda ids: one_hot(next_tokens(ids)))):
        try:  # the LM loss alone: MoE load-balancing terms off
            if router_losses is not None:
                model.config.output_router_logits = False
            with replaced_logits(model, make), torch.no_grad():
                losses[name] = float(model(**batch).loss)
        finally:
            if router_losses is not None:
                model.config.output_router_logits = router_losses
    floor = math.log(vocab_size)
    ok = losses["copy"] > floor and losses["next"] < 0.01
    return Check("label shift (next-token targets)", f"copy-input loss {losses['copy']:.2f}, next-token "
                 f"loss {losses['next']:.3f}", f"copy > {floor:.2f}, next < 0.01", verdict(ok))


def check_overfit(model, batch: dict[str, torch.Tensor], steps: int = OVERFIT_STEPS, lr: float = 1e-2) -> Check:
    """A few hundred AdamW steps on one batch take its loss near zero (the model can learn and gradients flow)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    first = loss = None
    for _ in range(steps):
        loss = model(**batch).loss
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    final = _lm_loss(model.eval(), batch)
    return Check("overfit one batch", f"{first:.2f} -> {final:.3f} in {steps} steps", f"< {OVERFIT_TARGET}",
                 verdict(final < OVERFIT_TARGET))


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def check_reproducible(first: tuple[list[float], dict], second: tuple[list[float], dict]) -> Check:
    """Two runs with the recipe's seed give the same losses and bitwise-equal weights."""
    (losses_a, weights_a), (losses_b, weights_b) = first, second
    difference = _max_difference(weights_a, weights_b)
    ok = losses_a == losses_b and difference == 0.0
    return Check("seeded runs bitwise equal", f"{len(losses_a)} steps, losses {'equal' if losses_a == losses_b else 'differ'}, "
                 f"max |Δw| {difference:.2g}", "equal, 0", verdict(ok))


def check_resume(full: tuple[list[float], dict], resumed: tuple[list[float], dict]) -> Check:
    """A run resumed from its step-STEPS//2 checkpoint continues exactly: same later losses, bitwise-equal weights."""
    (losses_full, weights_full), (losses_resumed, weights_resumed) = full, resumed
    tail = losses_full[len(losses_full) - len(losses_resumed):]
    difference = _max_difference(weights_full, weights_resumed)
    ok = bool(losses_resumed) and tail == losses_resumed and difference == 0.0
    return Check("checkpoint resume exact", f"steps {STEPS // 2 + 1}-{STEPS} losses "
                 f"{'equal' if ok or tail == losses_resumed else 'differ'}, max |Δw| {difference:.2g}", "equal, 0",
                 verdict(ok))


# ----------------------------------------------------------------------------- tokenizer and data checks


def check_round_trip(tokenizer, texts: list[str]) -> Check:
    """decode(encode(text)) == text for sample documents."""
    failures = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if tokenizer.decode(ids, clean_up_tokenization_spaces=False) != text:
            failures.append(text)
    return Check("round trip of sample text", f"{len(texts) - len(failures)}/{len(texts)} documents exact",
                 f"{len(texts)}/{len(texts)}", verdict(not failures))


def newline_probe(tokenizer, text: str) -> str:
    """Lines of `text` joined by a newline, a blank line and a trailing space before a newline; for a byte-level
    tokenizer (nothing is unknown) also a tab and a Windows line end."""
    from .data.tokenizer import is_byte_level

    lines = [line.strip() for line in text.splitlines() if line.strip()][:3] or ["a"]
    probe = lines[0] + "\n" + "\n\n".join(lines[1:]) + " \n"
    return probe + ("\tx\r\ny\n" if is_byte_level(tokenizer) else "")


def check_newlines(tokenizer, text: str) -> Check:
    """Newlines, blank lines and trailing spaces (and tabs and CRLF for byte-level tokenizers) survive encode/decode."""
    probe = newline_probe(tokenizer, text)
    ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    wanted = probe.count("\n")
    measured = f"{decoded.count(chr(10))}/{wanted} newlines, {'exact' if decoded == probe else 'changed'}"
    return Check("newlines preserved", measured, f"{wanted}/{wanted}, exact", verdict(decoded == probe))


def check_bos_eos(tokenizer, texts: list[str], conversations: list[list[dict]] | None = None) -> Check:
    """Plain text (pretraining): EOS exists (packing ends every document with it) and never occurs inside an encoded
    document; BOS, when the tokenizer adds it, comes once, first. Chat data (`conversations`, tokenized by the chat
    template as TRL does): EOS right after every assistant reply, and BOS at most once, first (a template that writes BOS and
    a tokenizer that adds it again give two), unless the BOS token is the template's own turn marker (SmolLM2)."""
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if eos is None:
        return Check("BOS/EOS rules", "no eos_token", "an eos_token", "FAIL")
    turn_marker = conversations is not None and tokenizer.bos_token in (tokenizer.chat_template or "")
    check_bos = bos is not None and bos != eos and not turn_marker
    rows = conversations if conversations is not None else texts
    wrong_eos = misplaced_bos = added_bos = 0
    for row in rows:
        if conversations is not None:
            ids = tokenizer.apply_chat_template(row, return_dict=True)["input_ids"]
            rendered = tokenizer.apply_chat_template(row, tokenize=False)
            wrong_eos += not all(m["content"] + tokenizer.eos_token in rendered for m in row if m["role"] == "assistant")
        else:
            ids = tokenizer(row)["input_ids"]
            wrong_eos += ids.count(eos) > 0
        if check_bos:
            count = ids.count(bos)
            added_bos += count == 1 and ids[0] == bos
            misplaced_bos += count > 1 or (count == 1 and ids[0] != bos)
    bos_text = f"bos first in {added_bos}/{len(rows)}, misplaced {misplaced_bos}" if check_bos else "bos not checked"
    ok = wrong_eos == 0 and misplaced_bos == 0 and added_bos in (0, len(rows))
    if conversations is not None:
        return Check("BOS/EOS rules", f"{bos_text}; a reply without eos in {wrong_eos}/{len(rows)} conversations",
                     "bos first in all or none; eos after every reply", verdict(ok))
    return Check("BOS/EOS rules", f"{bos_text}; eos inside {wrong_eos}/{len(rows)} documents",
                 "bos first in all or none; eos inside 0", verdict(ok))


def check_special_tokens(tokenizer) -> Check:
    """bos, eos, unk and the additional special tokens have distinct ids, each a single token (pad may be eos)."""
    named = {name: getattr(tokenizer, f"{name}_token") for name in ("bos", "eos", "unk", "pad")}
    named = {name: token for name, token in named.items() if token is not None}
    extras = [token for token in tokenizer.all_special_tokens if token not in named.values()]
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in [*named.values(), *extras]}
    split = [token for token in ids if len(tokenizer(token, add_special_tokens=False)["input_ids"]) != 1]
    must_differ = [named[name] for name in ("bos", "eos", "unk") if name in named] + extras
    collisions = len(must_differ) - len({ids[token] for token in must_differ})
    if "pad" in named and named["pad"] not in must_differ and ids[named["pad"]] in {ids[t] for t in must_differ}:
        collisions += named["pad"] != named.get("eos") and ids[named["pad"]] != ids.get(named.get("eos"))
    shared = [f"{name}=eos" for name in ("bos", "unk") if named.get(name) is not None and named.get(name) == named.get("eos")]
    ok = collisions == 0 and not split
    measured = f"{len(ids)} special tokens, {collisions} shared ids, {len(split)} split"
    return Check("special tokens distinct", measured + (f" ({', '.join(shared)})" if shared else ""),
                 "0 shared (pad may be eos), 0 split", verdict(ok))


def check_vocabulary(tokenizer, texts: list[str], trained_on_texts: bool) -> list[Check]:
    """Learned tokens the text never uses (a defect for a tokenizer trained on this text: their embeddings never
    train; a byte-level tokenizer's 256 byte tokens are a fallback and not counted) and the share of unknown tokens."""
    from tokenizers import pre_tokenizers

    from .data.tokenizer import is_byte_level, text_sample

    sample = text_sample(texts, MAX_CHARS)
    ids = [i for row in tokenizer(sample, add_special_tokens=False)["input_ids"] for i in row]
    fallback = set(tokenizer.all_special_ids)
    if is_byte_level(tokenizer):
        fallback |= set(tokenizer.convert_tokens_to_ids(list(pre_tokenizers.ByteLevel.alphabet())))
    learned = set(range(len(tokenizer))) - fallback
    unused = len(learned - set(ids)) / max(len(learned), 1)
    measured = f"{unused:.1%} of {len(learned)} learned tokens"
    if trained_on_texts:
        unused_check = Check("unused tokens", measured, f"≤ {UNUSED_TOKENS_MAX:.0%}", verdict(unused <= UNUSED_TOKENS_MAX))
    else:
        unused_check = Check("unused tokens", measured, "(pretrained tokenizer: information)", "info")
    unk = tokenizer.unk_token_id
    unknown = sum(i == unk for i in ids) / max(len(ids), 1) if unk is not None else 0.0
    return [unused_check, Check("unknown tokens", f"{unknown:.3%} of {len(ids)}", f"≤ {UNKNOWN_MAX:.1%}",
                                verdict(unknown <= UNKNOWN_MAX))]


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


def _shingles(text: str) -> np.ndarray:
    """Hashes (uint32) of the word SHINGLE_WORDS-grams of a normalized document."""
    words = _normalized(text).split()
    grams = {" ".join(words[i : i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}
    return np.fromiter((zlib.crc32(gram.encode()) for gram in grams), dtype=np.uint64, count=len(grams))


def minhash(shingles: np.ndarray, permutations: int = 64, seed: int = 0) -> np.ndarray:
    """MinHash signature (permutations,) of a shingle set: min over (a * x + b) mod p per random (a, b)."""
    prime = np.uint64((1 << 61) - 1)
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 31, permutations, dtype=np.uint64)
    b = rng.integers(0, 1 << 31, permutations, dtype=np.uint64)
    return ((shingles[:, None] * a[None, :] + b[None, :]) % prime).min(axis=0)  # (n, P) -> (P,)


def contamination(train: list[str], validation: list[str], bands: int = 16) -> tuple[int, int]:
    """(exact, near) validation documents that also occur in train: exactly after normalizing case and whitespace,
    or with estimated Jaccard similarity of word shingles ≥ NEAR_DUPLICATE_JACCARD (MinHash, LSH with `bands`
    bands to find candidate pairs). Documents under MIN_SHINGLES shingles are compared exactly only."""
    train_exact = {_normalized(text) for text in train}
    exact = [i for i, text in enumerate(validation) if _normalized(text) in train_exact]
    buckets: dict[tuple[int, bytes], list[np.ndarray]] = {}
    for text in train:
        shingles = _shingles(text)
        if len(shingles) >= MIN_SHINGLES:
            signature = minhash(shingles)
            for band, part in enumerate(np.split(signature, bands)):
                buckets.setdefault((band, part.tobytes()), []).append(signature)
    near = 0
    for i, text in enumerate(validation):
        shingles = _shingles(text)
        if i in exact or len(shingles) < MIN_SHINGLES:
            continue
        signature = minhash(shingles)
        candidates = (c for band, part in enumerate(np.split(signature, bands))
                      for c in buckets.get((band, part.tobytes()), []))
        near += any(float((candidate == signature).mean()) >= NEAR_DUPLICATE_JACCARD for candidate in candidates)
    return len(exact), near


def check_contamination(train: list[str], validation: list[str]) -> Check:
    if not validation:
        return Check("train/validation contamination", "no validation split", "a validation split", "info")
    exact, near = contamination(train, validation)
    return Check("train/validation contamination", f"{exact} exact, {near} near-duplicate of {len(validation)} "
                 "validation documents", f"0, 0 (Jaccard ≥ {NEAR_DUPLICATE_JACCARD})", verdict(exact == near == 0))


def check_chat_template(tokenizer, required: bool, assistant_only_loss: bool = False,
                        messages: list[dict] | None = None) -> Check:
    """The chat template passes hfllm's training-template checks (data/chat_template.py: it renders, the inference
    prompt is a prefix of the training text, EOS follows every reply) and, with {% generation %} markers, the
    assistant mask of a real conversation (`messages`) covers exactly the replies and their EOS. `required`: chat
    data is trained on (an SFT recipe); otherwise a failure is reported as information."""
    from trl.chat_template_utils import has_generation_markers

    from .data.chat_template import PROBE, check_template

    expected = "renders, EOS after replies, masks exactly the replies" if assistant_only_loss else "renders, EOS after replies"
    status = "FAIL" if required else "info"
    if not tokenizer.chat_template:
        return Check("chat template", "none", expected, status)
    masks = has_generation_markers(tokenizer.chat_template)
    try:
        check_template(tokenizer, assistant_only_loss=masks)
    except HfllmError as error:
        return Check("chat template", str(error).split(";")[0], expected, status)
    if not masks:
        return Check("chat template", "renders; no {% generation %} markers", expected,
                     "FAIL" if assistant_only_loss else "pass" if required else "info")
    conversation = messages or PROBE
    encoded = tokenizer.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
    trained = tokenizer.decode([t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m])
    replies = "".join(m["content"] + tokenizer.eos_token for m in conversation if m["role"] == "assistant")
    share = sum(encoded["assistant_masks"]) / len(encoded["input_ids"])
    measured = f"renders; masks {share:.0%} of tokens: {'exactly' if trained == replies else 'not'} the replies"
    return Check("chat template", measured, expected, verdict(trained == replies) if required else "info")


# ----------------------------------------------------------------------------- the command


def run_checks(subject: Subject, say: Callable[[str], None] = print) -> list[Check]:
    checks: list[Check] = []

    def add(*new: Check) -> None:
        for check in new:
            checks.append(check)
            say(f"  {check.status:<4}  {check.name}: {check.measured}")

    sample = subject.validation_texts[:SAMPLE_DOCUMENTS] or subject.train_texts[:SAMPLE_DOCUMENTS]
    tokenizer = subject.tokenizer
    add(check_round_trip(tokenizer, sample), check_newlines(tokenizer, sample[0]),
        check_bos_eos(tokenizer, sample, subject.conversations), check_special_tokens(tokenizer))
    add(*check_vocabulary(tokenizer, subject.train_texts, subject.tokenizer_from_data))
    add(check_contamination(subject.train_texts, subject.validation_texts))
    add(check_chat_template(tokenizer, subject.chat, subject.assistant_only_loss,
                            subject.conversations[0] if subject.conversations else None))

    model = subject.new_model()
    add(check_init_loss(model, subject.batch, subject.config.vocab_size))
    inspected = model if subject.loaded_model is None else subject.loaded_model  # MODEL_DIR: its own weights
    add(check_causal_mask(inspected, subject.batch), check_label_shift(inspected, subject.batch))
    add(check_overfit(model, subject.batch))
    with tempfile.TemporaryDirectory() as scratch:
        full = subject.train(f"{scratch}/a", None)
        again = subject.train(f"{scratch}/b", None)
        add(check_reproducible(full, again))
        resumed = subject.train(f"{scratch}/c", f"{scratch}/a/checkpoint-{STEPS // 2}")
        add(check_resume(full, resumed))
    return checks


def format_table(checks: list[Check]) -> str:
    rows = [("check", "measured", "expected", "result")] + [(c.name, c.measured, c.expected, c.status) for c in checks]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv: list[str], prog: str = "hfllm doctor") -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} RECIPE.yaml [--key value ...] | MODEL_DIR\n\n" + __doc__.split("\n\n")[0])
        return 0
    import datasets
    import transformers

    start = time.perf_counter()
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # e.g. the tied head "missing" from a resumed checkpoint
    subject = subject_for(argv, prog)
    print(f"{prog}: {subject.label}: {subject.config.num_hidden_layers} layers x {subject.config.hidden_size}, "
          f"vocab {subject.config.vocab_size}", flush=True)
    checks = run_checks(subject, say=lambda line: print(line, flush=True))
    print("\n" + format_table(checks))
    failed = [check.name for check in checks if check.status == "FAIL"]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed in {time.perf_counter() - start:.0f} s" +
          (f"; failed: {', '.join(failed)} (exit code {EXIT_FAILED})" if failed else ""))
    return EXIT_FAILED if failed else 0
