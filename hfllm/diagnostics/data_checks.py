"""Tokenizer and data checks: round trip, newlines, BOS/EOS rules, distinct special tokens, vocabulary use and
unknowns, train/validation contamination (exact and near-duplicate documents), the chat template; for fine-tuning
data the trained-token share per role and decontamination against the recipe's eval tasks."""

import re
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


# ----------------------------------------------------------------------------- fine-tuning data: trained tokens per role
# What SFT trains on is decided by TRL's rule (trl/trainer/sft_trainer.py, "Build a labels column"): conversational
# data with assistant_only_loss trains the tokens the template's {% generation %} markers cover
# (`apply_chat_template(return_assistant_tokens_mask=True)`, as TRL calls it); without it, every token. A template
# without markers gives an all-zero mask: nothing trains (TRL stops with a RuntimeError, other toolkits train on
# nothing); markers around the wrong span train the user's turns.

ROLES = ("system", "user", "assistant", "template")  # "template": tokens outside every message's content


def trained_mask(tokenizer, conversation: list[dict], assistant_only_loss: bool) -> list[bool]:
    """Which tokens of a conversation TRL's SFT trains (before truncation): the assistant mask of the chat template
    with assistant_only_loss, else all of them."""
    encoded = tokenizer.apply_chat_template(conversation, return_dict=True,
                                            return_assistant_tokens_mask=assistant_only_loss)
    return [bool(m) for m in encoded["assistant_masks"]] if assistant_only_loss else [True] * len(encoded["input_ids"])


def trained_tokens_per_role(tokenizer, conversation: list[dict], assistant_only_loss: bool) -> dict[str, list[int]]:
    """{role: [trained, total]} tokens of one conversation as TRL would train it. A token belongs to the message
    whose content it overlaps (found in order in the rendered text); headers, turn ends and other template text are
    "template"."""
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    trained = trained_mask(tokenizer, conversation, assistant_only_loss)
    if len(trained) != len(encoded["input_ids"]):
        raise HfllmError("the chat template's text tokenizes differently from its token ids; check the template")
    spans, cursor = [], 0  # (start, end, role) of each message's content in the rendered text
    for message in conversation:
        start = text.find(message["content"], cursor) if message["content"] else -1
        if start >= 0:
            spans.append((start, start + len(message["content"]), message["role"]))
            cursor = start + len(message["content"])
    counts = {role: [0, 0] for role in ROLES}
    for (start, end), mask in zip(encoded["offset_mapping"], trained):
        role = next((r for s, e, r in spans if start < e and end > s), "template")
        role = role if role in counts else "template"
        counts[role][0] += bool(mask)
        counts[role][1] += 1
    return counts


def check_trained_roles(tokenizer, conversations: list[list[dict]], assistant_only_loss: bool) -> Check:
    """SFT trains some but not all tokens, and no token of a system or user message (sample conversations)."""
    totals = {role: [0, 0] for role in ROLES}
    for conversation in conversations:
        for role, (trained, total) in trained_tokens_per_role(tokenizer, conversation, assistant_only_loss).items():
            totals[role][0] += trained
            totals[role][1] += total
    trained, total = sum(t for t, _ in totals.values()), sum(n for _, n in totals.values())
    share = trained / max(total, 1)
    per_role = ", ".join(f"{role} {t / n:.0%} of {n}" for role, (t, n) in totals.items() if n)
    leaked = [role for role in ("system", "user") if totals[role][0]]
    ok = 0 < trained < total and not leaked
    hint = ("" if ok else "; nothing trains: put {% generation %} markers around the assistant replies"
            if trained == 0 else f"; trains {' and '.join(leaked)} tokens" if leaked else "; trains every token")
    return Check("trained tokens per role", f"{share:.0%} of {total} tokens trained: {per_role}{hint}",
                 "0% < share < 100%, system 0%, user 0%", verdict(ok))


# ----------------------------------------------------------------------------- decontamination against eval tasks
# An eval item is its longest text field (the question, the passage, the context). Exact: its words, normalized
# (case, punctuation, whitespace), appear contiguously in a training document. Near: it shares a word 13-gram with
# the training data, the overlap test of GPT-3 and lm-eval's decontamination. 13-grams rather than MinHash here: an
# eval item sits inside a much longer training document (a rendered chat, a play), whose Jaccard similarity to the
# item is small, so MinHash (the train/validation check above, whole documents) would miss it; a shared 13-gram
# finds it at any length.

OVERLAP_WORDS = 13
MIN_EXACT_WORDS = 3  # shorter items ("4", "yes") occur everywhere
LISTED_ITEMS = 10


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def eval_items(task) -> list[str]:
    """The longest text field of each document of an lm-eval Task (after its own process_docs)."""
    items = []
    for doc in task.eval_docs:
        texts = [value for value in doc.values() if isinstance(value, str)]
        texts += [v for value in doc.values() if isinstance(value, list) for v in value if isinstance(v, str)]
        items.append(max(texts, key=len, default=""))
    return items


def eval_overlap(train: list[str], items: dict[str, list[str]]) -> list[tuple[str, int, str, str]]:
    """(task, index, "exact" | "13-gram", item) for every eval item found in the training texts. The items' 13-grams
    are indexed and the training text scanned once (the training data is the large side)."""
    corpus = " " + " ".join(" ".join(_words(text)) + " |" for text in train) + " "  # "|": no match across documents
    item_grams: dict[tuple[str, ...], list[tuple[str, int]]] = {}
    for task, texts in items.items():
        for index, item in enumerate(texts):
            words = _words(item)
            for i in range(len(words) - OVERLAP_WORDS + 1):
                item_grams.setdefault(tuple(words[i : i + OVERLAP_WORDS]), []).append((task, index))
    shared: set[tuple[str, int]] = set()
    for text in train:
        words = _words(text)
        for i in range(len(words) - OVERLAP_WORDS + 1):
            shared.update(item_grams.get(tuple(words[i : i + OVERLAP_WORDS]), ()))
    found = []
    for task, texts in items.items():
        for index, item in enumerate(texts):
            words = _words(item)
            if len(words) >= MIN_EXACT_WORDS and f" {' '.join(words)} " in corpus:
                found.append((task, index, "exact", item))
            elif (task, index) in shared:
                found.append((task, index, "13-gram", item))
    return found


def check_eval_contamination(train: list[str], task_names: list[str] | None) -> Check:
    """Training documents against the documents of the recipe's `eval_tasks` (hfllm's offline tasks and any lm-eval
    task whose data is cached); the overlapping items are listed."""
    name = "decontamination against eval_tasks"
    if not task_names:
        return Check(name, "the recipe names no eval_tasks", "eval_tasks to check", "info")
    from ..evaluation.harness import load_tasks

    try:
        tasks = load_tasks(task_names)
    except HfllmError as error:  # e.g. a Hub task whose data is not cached (offline)
        return Check(name, f"tasks not loadable: {error}", "the tasks' documents", "info")
    items = {task.config.task: eval_items(task) for task in tasks}
    found = eval_overlap(train, items)
    exact = sum(kind == "exact" for *_, kind, _ in found)
    listed = "; ".join(f"{task}[{index}] {kind}: {item[:60]!r}" for task, index, kind, item in found[:LISTED_ITEMS])
    more = f" (+{len(found) - LISTED_ITEMS} more)" if len(found) > LISTED_ITEMS else ""
    measured = (f"{exact} exact, {len(found) - exact} 13-gram of {sum(map(len, items.values()))} items of "
                f"{', '.join(items)}" + (f": {listed}{more}" if found else ""))
    return Check(name, measured, "0, 0", verdict(not found))


def recipe_eval_tasks(label: str | None) -> list[str] | None:
    """The `eval_tasks` a recipe file names (a model folder: the recipe.yaml of its run)."""
    from pathlib import Path

    from ..recipe import RECIPE_FILE, read_yaml

    if not label:
        return None
    path = Path(label) / RECIPE_FILE if Path(label).is_dir() else Path(label)
    return read_yaml(str(path)).get("eval_tasks") if path.is_file() else None
