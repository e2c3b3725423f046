"""Tokenizers: exact round-trips, special tokens, the ChatML template with generation markers, save/load, report."""

import pytest
from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

from hfllm.data.corpus import shakespeare_corpus
from hfllm.data.tokenizer import (
    BOS,
    EOS,
    IM_END,
    IM_START,
    PAD,
    UNK,
    chatml_template,
    check_round_trip,
    load_or_train_tokenizer,
    tokenizer_report,
    train_tokenizer,
)
from hfllm.errors import HfllmError

PROBE = "Ça va?\n\t— 東京 🎭"
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who art thou?"},
    {"role": "assistant", "content": "A player."},
    {"role": "user", "content": "Speak!"},
    {"role": "assistant", "content": "To be."},
]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    corpus = shakespeare_corpus()
    return [play[:20_000] for play in corpus["train"][:3]]  # small subset: trains in well under a second


@pytest.fixture(scope="module")
def bpe(texts):
    return train_tokenizer("bpe", texts, 512)


@pytest.fixture(scope="module")
def char(texts):
    return train_tokenizer("char", texts, 512)


def test_bpe_round_trips_newlines_tabs_and_unicode_exactly(bpe):
    assert len(bpe) == 512
    ids = bpe(PROBE, add_special_tokens=False)["input_ids"]
    assert bpe.decode(ids) == PROBE
    assert bpe.decode(bpe(PROBE)["input_ids"], skip_special_tokens=True) == PROBE
    assert bpe.unk_token_id is None  # byte-level: nothing is unknown


def test_char_tokenizer_round_trips_and_maps_unseen_characters_to_unk(char, texts):
    sample = texts[0][:2000]
    ids = char(sample, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(sample)  # one token per character
    assert char.decode(ids) == sample
    assert char("東", add_special_tokens=False)["input_ids"] == [char.unk_token_id]
    with pytest.raises(HfllmError) as error:
        check_round_trip(char, ["ab東"])
    assert str(error.value) == (
        "tokenizer does not round-trip the text: at character 2 '東' decodes as '<|unk|>'; "
        "use a byte-level 'bpe' tokenizer or train the tokenizer on this text"
    )


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_special_tokens_are_distinct_set_and_bos_is_prepended(kind, bpe, char):
    tokenizer = bpe if kind == "bpe" else char
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == (PAD, BOS, EOS)
    ids = [tokenizer.convert_tokens_to_ids(token) for token in (PAD, BOS, EOS, IM_START, IM_END)]
    assert ids == [0, 1, 2, 3, 4]
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    if kind == "char":
        assert tokenizer.unk_token_id == tokenizer.convert_tokens_to_ids(UNK) == 5
    assert tokenizer("the")["input_ids"][0] == 1
    assert tokenizer(f"{IM_START}user{IM_END}", add_special_tokens=False)["input_ids"][0] == 3  # one token each


def test_chat_template_renders_chatml_with_generation_markers(bpe):
    assert bpe.chat_template == chatml_template()
    assert has_generation_markers(bpe.chat_template)  # TRL's assistant_only_loss check
    assert is_chat_template_stop_token_trained(bpe)  # TRL: <|im_end|> is inside the assistant mask
    assert "{% generation %}" in bpe.chat_template and "{% endgeneration %}" in bpe.chat_template
    text = bpe.apply_chat_template(MESSAGES[:3], tokenize=False, add_generation_prompt=False)
    assert text == (
        "<|bos|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho art thou?<|im_end|>\n"
        "<|im_start|>assistant\nA player.<|im_end|>\n"
    )
    prompt = bpe.apply_chat_template(MESSAGES[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|bos|><|im_start|>user\nWho art thou?<|im_end|>\n<|im_start|>assistant\n"


def test_assistant_mask_covers_exactly_assistant_content_and_im_end(bpe):
    out = bpe.apply_chat_template(MESSAGES, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids[0] == bpe.bos_token_id
    masked = [token for token, on in zip(ids, mask) if on]
    expected = bpe("A player.<|im_end|>To be.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert masked == expected
    spans = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    assert len(spans) == 2  # two assistant turns, nothing else


def test_saved_tokenizer_loads_back_with_template_and_ids(bpe, tmp_path):
    bpe.save_pretrained(tmp_path)
    loaded = load_or_train_tokenizer(str(tmp_path), [], 0)
    assert loaded(PROBE)["input_ids"] == bpe(PROBE)["input_ids"]
    assert loaded.chat_template == bpe.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)


def test_report_measures_vocab_usage_and_tokens_per_char(bpe, char, texts):
    report = tokenizer_report(char, [texts[0][:5000]])
    assert report["tokens_per_char"] == 1.0 and report["unk_fraction"] == 0.0
    used = len(set(texts[0][:5000]))
    assert report["used_fraction"] == pytest.approx(used / len(char))
    report = tokenizer_report(bpe, [texts[1][:5000]])
    assert 0.1 < report["tokens_per_char"] < 0.8  # merges compress English text
    ids = bpe(texts[1][:5000], add_special_tokens=False)["input_ids"]
    assert report["used_fraction"] == pytest.approx(len(set(ids)) / len(bpe)) and report["used_fraction"] < 1
    assert report["tokens_per_char"] == pytest.approx(len(ids) / 5000)


@pytest.mark.parametrize(
    "spec, vocab_size, message",
    [
        ("wordpiece", 512, "tokenizer 'wordpiece' is neither 'bpe', 'char' nor an existing tokenizer folder"),
        ("bpe", 100, "vocab_size 100 is too small for a bpe tokenizer; use at least 261"),
    ],
)
def test_bad_tokenizer_specs_raise_one_line(spec, vocab_size, message, texts):
    with pytest.raises(HfllmError) as error:
        load_or_train_tokenizer(spec, texts, vocab_size)
    assert str(error.value) == message


def test_empty_corpus_cannot_train_a_tokenizer():
    with pytest.raises(HfllmError) as error:
        train_tokenizer("char", ["", ""], 64)
    assert str(error.value) == "cannot train a tokenizer on an empty corpus; give text with at least one character"
