"""Tokenizer and data checks: round trip, newlines, BOS/EOS rules, distinct special tokens, vocabulary use and
unknowns, train/validation contamination (exact and near-duplicate documents), the chat template."""

import zlib

import numpy as np

from ..errors import HfllmError
from .checks import Check, verdict

NEAR_DUPLICATE_JACCARD = 0.8  # estimated Jaccard similarity of word 5-gram shingles
SHINGLE_WORDS = 5
MIN_SHINGLES = 20  # shorter documents are compared exactly only: short templated texts share most n-grams
UNUSED_TOKENS_MAX = 0.10  # share of a tokenizer trained on this data that the train text never uses
UNKNOWN_MAX = 0.001  # share of unknown tokens in the text
MAX_CHARS = 2_000_000  # characters of text for the vocabulary check


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
    from ..data.tokenizer import is_byte_level

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

    from ..data.tokenizer import is_byte_level, text_sample

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

    from ..data.chat_template import PROBE, check_template

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
