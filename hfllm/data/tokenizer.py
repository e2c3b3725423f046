"""Tokenizers trained from the corpus with `tokenizers`, wrapped as `transformers.PreTrainedTokenizerFast`.

  bpe   byte-level BPE: ByteLevel pre-tokenizer and decoder, no normalizer, so any unicode text (newlines, tabs,
        emoji) round-trips exactly and nothing is ever unknown.
  char  one token per unicode character of the training text (most frequent first if `vocab_size` is smaller);
        a character never seen in training encodes to `<|unk|>` and decodes as `<|unk|>` (that text does not
        round-trip; `check_round_trip` says which character).

Special tokens (ids 0..4, in this order): `<|pad|>`, `<|bos|>`, `<|endoftext|>` (eos), `<|im_start|>`,
`<|im_end|>`; char tokenizers add `<|unk|>` as id 5. Encoding with `add_special_tokens=True` (the default) prepends
`<|bos|>`, like Llama; eos is appended by packing, not by the tokenizer. Chat turns end with `<|im_end|>`.
The ChatML template comes from `hfllm/data/templates/chatml.jinja`.
"""

from collections import Counter
from importlib import resources
from pathlib import Path

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ..errors import HfllmError, first_line

PAD, BOS, EOS, IM_START, IM_END, UNK = "<|pad|>", "<|bos|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]
ROUND_TRIP_PROBE = "First line\n\n\tindented — «Ça va?»  two  spaces\r\n東京 🎭 naïve\n"


def chatml_template() -> str:
    return resources.files("hfllm").joinpath("data/templates/chatml.jinja").read_text(encoding="utf-8")


def _train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _train_char(texts: list[str], vocab_size: int) -> Tokenizer:
    specials = SPECIAL_TOKENS + [UNK]
    counts = Counter()
    for text in texts:
        counts.update(text)  # counted in C, one text at a time (a generator of characters took 0.3 s on Shakespeare)
    chars = [char for char, _ in counts.most_common(max(vocab_size - len(specials), 0))]
    vocab = {token: i for i, token in enumerate(specials + sorted(chars))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per character
    tokenizer.decoder = decoders.Fuse()  # join pieces without spaces
    return tokenizer


def train_tokenizer(kind: str, texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a "bpe" or "char" tokenizer on `texts`; returns it with special tokens and the ChatML template set."""
    if kind not in ("bpe", "char"):
        raise HfllmError(f"unknown tokenizer kind '{kind}'; choose 'bpe', 'char' or a path to a tokenizer folder")
    minimum = 256 + len(SPECIAL_TOKENS) if kind == "bpe" else len(SPECIAL_TOKENS) + 2
    if vocab_size < minimum:
        raise HfllmError(f"vocab_size {vocab_size} is too small for a {kind} tokenizer; use at least {minimum}")
    if not any(text for text in texts):
        raise HfllmError("cannot train a tokenizer on an empty corpus; give text with at least one character")
    backend = _train_bpe(texts, vocab_size) if kind == "bpe" else _train_char(texts, vocab_size)
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK if kind == "char" else None,
        additional_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False,
        model_max_length=int(1e9),
    )
    tokenizer.chat_template = chatml_template()
    return tokenizer


def load_or_train_tokenizer(spec: str, texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """`spec` is "bpe" or "char" (train on `texts`) or a folder holding a saved tokenizer (loaded, not retrained)."""
    if spec in ("bpe", "char"):
        return train_tokenizer(spec, texts, vocab_size)
    if not Path(spec).is_dir():
        raise HfllmError(f"tokenizer '{spec}' is neither 'bpe', 'char' nor an existing tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as error:
        raise HfllmError(f"could not load a tokenizer from {spec}: {first_line(error)}") from error


def check_round_trip(tokenizer, texts: list[str]) -> None:
    """Raise HfllmError unless decode(encode(text)) == text for every text (special tokens not added)."""
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        decoded = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        if decoded != text:
            at = next((i for i, (a, b) in enumerate(zip(text, decoded)) if a != b), min(len(text), len(decoded)))
            raise HfllmError(
                f"tokenizer does not round-trip the text: at character {at} {text[at:at + 10]!r} decodes as "
                f"{decoded[at:at + 10]!r}; use a byte-level 'bpe' tokenizer or train the tokenizer on this text"
            )


def is_byte_level(tokenizer) -> bool:
    return isinstance(tokenizer.backend_tokenizer.decoder, decoders.ByteLevel)


def text_sample(texts, max_chars: int) -> list[str]:
    """The leading texts holding at most `max_chars` characters (the last one cut)."""
    sample, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        sample.append(text[: max_chars - total])
        total += len(sample[-1])
    return sample


def tokenizer_report(tokenizer, texts: list[str], max_chars: int = 2_000_000) -> dict[str, float]:
    """Vocab usage on `texts` (e.g. the validation split) and a round-trip check.

    Returns vocab_size, used_fraction (share of vocab ids seen), tokens_per_char and unk_fraction, computed on at
    most `max_chars` characters. Raises HfllmError if the texts (and, for byte-level tokenizers, `ROUND_TRIP_PROBE`
    with newlines, tabs and unicode) do not round-trip.
    """
    sample = text_sample(texts, max_chars)
    total = sum(map(len, sample))
    if total == 0:
        raise HfllmError("cannot report on tokenizer usage without text; the validation split is empty")
    check_round_trip(tokenizer, sample[:8] + ([ROUND_TRIP_PROBE] if is_byte_level(tokenizer) else []))
    ids = [i for row in tokenizer(sample, add_special_tokens=False)["input_ids"] for i in row]
    unk_id = tokenizer.unk_token_id
    return {
        "vocab_size": len(tokenizer),
        "used_fraction": len(set(ids)) / len(tokenizer),
        "tokens_per_char": len(ids) / total,
        "unk_fraction": (sum(i == unk_id for i in ids) / len(ids)) if unk_id is not None and ids else 0.0,
    }
