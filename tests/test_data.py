"""Corpus cleaning and split, `hfllm data` CLI, text dataset loading, tokenize + pack."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from hfllm import HfllmForCausalLM, get_preset
from hfllm.cli import main as cli_main
from hfllm.data import (
    DOCUMENT_SEPARATOR,
    VALIDATION_PLAYS,
    clean_play,
    collate_blocks,
    collate_flat_blocks,
    load_text_datasets,
    read_documents,
    shakespeare_corpus,
    tokenize_and_pack,
    train_tokenizer,
    write_documents,
)
from hfllm.errors import HfllmError

ROOT = Path(__file__).resolve().parents[1]

MARKDOWN = """# Macbeth

## ACT I

### SCENE II. A camp near Forres.

_Alarum within. Enter DUNCAN, with Attendants,
meeting a bleeding Sergeant_

**DUNCAN**  
What bloody man is that? He can report,  
As seemeth by his plight, of the revolt  
The newest state.



**HAMLET**  
_\\[Aside]_  
A little more than kin\\--and less than kind.

*Exeunt.*
"""

CLEAN = """Macbeth

ACT I

SCENE II. A camp near Forres.

Alarum within. Enter DUNCAN, with Attendants,
meeting a bleeding Sergeant

DUNCAN:
What bloody man is that? He can report,
As seemeth by his plight, of the revolt
The newest state.

HAMLET:
[Aside]
A little more than kin--and less than kind.

Exeunt.
"""


@pytest.fixture(scope="module")
def corpus() -> dict[str, list[str]]:
    return shakespeare_corpus()


def hfllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hfllm", *args], cwd=ROOT, capture_output=True, text=True)


# ---- corpus -------------------------------------------------------------------------------------------------------


def test_clean_play_removes_markdown_and_keeps_speakers_and_verse():
    assert clean_play(MARKDOWN) == CLEAN


def test_real_plays_are_clean_text(corpus):
    macbeth = next(play for play in corpus["validation"] if play.startswith("Macbeth\n"))
    assert "First Witch:\nWhen shall we three meet again\nIn thunder, lightning, or in rain?\n" in macbeth
    for play in corpus["train"] + corpus["validation"]:
        assert not {"*", "_", "#", "\\"} & set(play)
        assert "  \n" not in play and "\n\n\n" not in play


def test_split_is_by_play_fixed_disjoint_and_about_ten_percent(corpus):
    assert corpus == shakespeare_corpus()  # deterministic
    assert (len(corpus["train"]), len(corpus["validation"])) == (33, 5)
    titles = [play.split("\n", 1)[0] for play in corpus["validation"]]
    assert titles == ["Julius Caesar", "Macbeth", "Richard II", "The Tempest", "Twelfth Night"]
    assert len(VALIDATION_PLAYS) == 5
    train_titles = {play.split("\n", 1)[0] for play in corpus["train"]}
    assert not train_titles & set(titles) and len(train_titles) == 33
    assert not set(corpus["validation"]) & set(corpus["train"])
    validation_chars = sum(map(len, corpus["validation"]))
    share = validation_chars / (validation_chars + sum(map(len, corpus["train"])))
    assert 0.09 < share < 0.13


def test_documents_survive_a_text_file(tmp_path):
    documents = ["one\n\ntwo\n", "three\n", "four\n\n\nfive\n"]
    write_documents(documents, tmp_path / "docs.txt")
    assert read_documents(tmp_path / "docs.txt") == ["one\n\ntwo\n", "three\n", "four\n\n\nfive\n"]
    with pytest.raises(HfllmError, match="contains the separator"):
        write_documents([f"a\n{DOCUMENT_SEPARATOR}\nb"], tmp_path / "bad.txt")


def test_cli_shakespeare_writes_train_and_val(tmp_path, corpus):
    result = hfllm("data", "shakespeare", "--out", str(tmp_path / "shakespeare"))
    assert result.returncode == 0, result.stderr
    assert read_documents(tmp_path / "shakespeare" / "train.txt") == corpus["train"]
    assert read_documents(tmp_path / "shakespeare" / "val.txt") == corpus["validation"]


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "a_file").write_text("x")
    result = hfllm("data", "shakespeare", "--out", str(tmp_path / "a_file"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == f"hfllm data: error: --out '{tmp_path / 'a_file'}' is a file; give a folder path\n"
    assert not (tmp_path / "a_file" / "train.txt").exists()


def test_unknown_data_action_is_an_error(capsys):
    assert cli_main(["data", "plays"]) == 2
    assert capsys.readouterr().err == (
        "hfllm data: error: unknown data action 'plays'; choose from: shakespeare, tokenizer, synth\n"
    )


# ---- loading ------------------------------------------------------------------------------------------------------


def write_sources(folder: Path) -> dict[str, str]:
    rows = [{"body": f"document {i}\nline two", "id": i} for i in range(3)]
    write_documents(["document 0\nline two\n", "document 1\n\nthree\n"], folder / "docs.txt")
    (folder / "docs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "docs.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_csv(folder / "docs.csv", index=False)
    datasets.Dataset.from_list(rows).to_parquet(folder / "docs.parquet")
    (folder / "val.jsonl").write_text(json.dumps({"body": "held out"}) + "\n")
    return {ext: str(folder / f"docs.{ext}") for ext in ("txt", "jsonl", "json", "csv", "parquet")}


@pytest.mark.parametrize("ext", ["txt", "jsonl", "json", "csv", "parquet"])
def test_local_files_load_with_the_text_column(ext, tmp_path):
    files = write_sources(tmp_path)
    data = load_text_datasets(train_files=files[ext], validation_files=str(tmp_path / "val.jsonl"), text_column="body")
    assert data["train"].column_names == ["text"] and data["validation"]["text"] == ["held out"]
    if ext == "txt":  # documents split on separator lines; text_column does not apply
        assert data["train"]["text"] == ["document 0\nline two\n", "document 1\n\nthree\n"]
    else:
        assert data["train"]["text"] == [f"document {i}\nline two" for i in range(3)]


def test_globs_and_validation_percentage_hold_out_documents(tmp_path):
    for part in range(2):
        rows = [{"text": f"doc {part}-{i}"} for i in range(10)]
        (tmp_path / f"part{part}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = load_text_datasets(train_files=str(tmp_path / "part*.jsonl"), validation_split_percentage=10, seed=3)
    assert (len(data["train"]), len(data["validation"])) == (18, 2)
    everything = sorted([*data["train"]["text"], *data["validation"]["text"]])
    assert everything == sorted(f"doc {p}-{i}" for p in range(2) for i in range(10))
    again = load_text_datasets(train_files=str(tmp_path / "part*.jsonl"), validation_split_percentage=10, seed=3)
    assert again["validation"]["text"] == data["validation"]["text"]


def test_validation_duplicates_are_dropped_from_train(tmp_path, caplog):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["a", "b", "c", "b"]))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["b", "z"]))
    with caplog.at_level(logging.WARNING, logger="hfllm.data.loading"):
        data = load_text_datasets(
            train_files=str(tmp_path / "train.jsonl"), validation_files=str(tmp_path / "val.jsonl")
        )
    assert data["train"]["text"] == ["a", "c"]
    assert "dropped 2 train document(s) that also occur in validation" in caplog.text


def test_shakespeare_dataset_has_no_validation_play_in_train(corpus):
    data = load_text_datasets("shakespeare")
    assert data["validation"]["text"] == corpus["validation"] and data["train"]["text"] == corpus["train"]


@pytest.mark.parametrize(
    "kwargs, message",
    [  # fmt: skip (one case per line)
        ({"train_files": "{d}/nothing*.jsonl"}, "no file matches the pattern '{d}/nothing*.jsonl'; check the path and the glob"),
        ({"train_files": "{d}/missing.txt"}, "data file '{d}/missing.txt' does not exist; check the path"),
        ({"train_files": "{d}/empty.txt"}, "data file '{d}/empty.txt' is empty; give it some text or leave it out"),
        ({"train_files": "{d}/notes.md"}, "data file '{d}/notes.md' has an unknown extension '.md'; use one of .txt, .jsonl, .json, .parquet, .csv"),
        ({"train_files": "{d}/docs.jsonl", "text_column": "content"}, "text_column 'content' not found in {d}/docs.jsonl; available columns: body, id"),
        ({"train_files": "{d}/blank.jsonl", "validation_files": "{d}/val.jsonl", "text_column": "body"}, "{d}/blank.jsonl contains no text in the train split; give documents with text"),
        ({"train_files": "{d}/docs.txt"}, "{d}/docs.txt has 2 document(s), too few to hold out 10.0% for validation; give validation files, or separate documents in .txt files with '<|endofdoc|>' lines"),
    ],
)
def test_bad_inputs_raise_one_line_messages(kwargs, message, tmp_path):
    write_sources(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "notes.md").write_text("# notes")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"body": "  "}) + "\n")
    kwargs = {key: value.format(d=tmp_path) for key, value in kwargs.items()}
    with pytest.raises(HfllmError) as error:
        load_text_datasets(**kwargs)
    assert str(error.value) == message.format(d=tmp_path)


# ---- tokenize + pack ------------------------------------------------------------------------------------------------

DOCUMENTS = [f"document {i}: " + "to be or not to be " * (i % 5 + 1) for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer("char", DOCUMENTS, 128)


def documents_dataset(train: list[str], validation: list[str]) -> datasets.DatasetDict:
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": train}),
            "validation": datasets.Dataset.from_dict({"text": validation}),
        }
    )


def token_stream(tokenizer, documents: list[str]) -> list[int]:
    return [t for doc in documents for t in tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]]


def test_blocks_are_full_and_concatenate_to_the_token_stream(tokenizer):
    packed = tokenize_and_pack(documents_dataset(DOCUMENTS, DOCUMENTS[:10]), tokenizer, block_size=64, seed=0)
    for split, documents in (("train", DOCUMENTS), ("validation", DOCUMENTS[:10])):
        stream = token_stream(tokenizer, documents)
        blocks = packed[split]["input_ids"]
        assert all(len(block) == 64 for block in blocks)
        assert len(blocks) == len(stream) // 64  # only the final remainder is dropped
        expected = [stream[i : i + 64] for i in range(0, len(blocks) * 64, 64)]
        if split == "validation":  # not shuffled: same order
            assert blocks == expected
        else:
            assert sorted(blocks) == sorted(expected) and blocks != expected
    first = packed["validation"]["input_ids"][0]
    eos_at = first.index(tokenizer.eos_token_id)
    assert first[0] == tokenizer.bos_token_id and first[eos_at + 1] == tokenizer.bos_token_id  # EOS, then next doc


def test_position_ids_restart_after_eos_and_at_block_start(tokenizer):
    packed = tokenize_and_pack(documents_dataset(DOCUMENTS, DOCUMENTS[:10]), tokenizer, block_size=64, seed=0)
    for row in packed["validation"]:
        ids, positions = row["input_ids"], row["position_ids"]
        assert positions[0] == 0
        for i in range(1, 64):
            assert positions[i] == (0 if ids[i - 1] == tokenizer.eos_token_id else positions[i - 1] + 1)
    assert max(max(row) for row in packed["validation"]["position_ids"]) < 64
    plain = tokenize_and_pack(documents_dataset(DOCUMENTS, DOCUMENTS[:10]), tokenizer, 64, per_document_positions=False)
    assert plain["train"].column_names == ["input_ids"]


def test_shuffling_is_deterministic_by_seed(tokenizer):
    data = documents_dataset(DOCUMENTS, DOCUMENTS[:10])
    order = tokenize_and_pack(data, tokenizer, 32, seed=1)["train"]["input_ids"]
    assert tokenize_and_pack(data, tokenizer, 32, seed=1)["train"]["input_ids"] == order
    assert tokenize_and_pack(data, tokenizer, 32, seed=2)["train"]["input_ids"] != order


def test_in_memory_data_is_cached_by_text_tokenizer_and_block_settings(tokenizer, tmp_path, monkeypatch):
    calls = []
    tokenizer_call = type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or tokenizer_call(self, *a, **k))
    cache = tmp_path / "cache"

    def pack(train: list[str], tokenizer=tokenizer, block_size: int = 32):
        calls.clear()
        files = set(cache.glob("*.arrow")) if cache.exists() else set()
        packed = tokenize_and_pack(documents_dataset(train, DOCUMENTS[:10]), tokenizer, block_size, seed=0, cache_dir=cache)
        return packed, bool(calls), set(cache.glob("*.arrow")) - files

    first, tokenized, new_files = pack(DOCUMENTS)
    assert tokenized and {f.name.split("-")[0] for f in new_files} == {"tokens", "blocks", "cache"}
    assert {f["filename"] for f in first["validation"].cache_files} <= {str(f) for f in new_files}
    second, tokenized, new_files = pack(DOCUMENTS)  # a new process would see the same: same text, same tokenizer
    assert not tokenized and not new_files
    assert second["train"]["input_ids"] == first["train"]["input_ids"]  # same blocks, same shuffle
    _, tokenized, new_files = pack(DOCUMENTS[:-1] + [DOCUMENTS[-1] + " and more"])  # the text changed
    assert tokenized and new_files
    _, tokenized, new_files = pack(DOCUMENTS, tokenizer=train_tokenizer("char", DOCUMENTS[:5], 128))  # tokenizer changed
    assert tokenized and new_files
    _, tokenized, new_files = pack(DOCUMENTS, block_size=16)  # same tokens, new blocks
    assert not tokenized and {f.name.split("-")[0] for f in new_files} >= {"blocks"}


def test_streaming_packs_the_same_blocks(tokenizer, tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS[:10]))
    files = {"train_files": str(tmp_path / "train.jsonl"), "validation_files": str(tmp_path / "val.jsonl")}
    streamed = tokenize_and_pack(load_text_datasets(**files, streaming=True), tokenizer, 64, seed=0)
    in_memory = tokenize_and_pack(load_text_datasets(**files), tokenizer, 64, seed=0)
    assert isinstance(streamed["train"], datasets.IterableDataset)
    assert [row["input_ids"] for row in streamed["validation"]] == in_memory["validation"]["input_ids"]
    assert sorted(row["input_ids"] for row in streamed["train"]) == sorted(in_memory["train"]["input_ids"])


def test_packing_errors_name_block_size_and_tokens(tokenizer):
    data = documents_dataset(DOCUMENTS, ["tiny"])
    with pytest.raises(HfllmError) as error:
        tokenize_and_pack(data, tokenizer, block_size=1)
    assert str(error.value) == "block_size must be at least 2 (an input and its next-token target), got 1"
    with pytest.raises(HfllmError) as error:
        tokenize_and_pack(data, tokenizer, block_size=64)
    assert str(error.value) == (
        "the validation split has 6 tokens, fewer than one block of block_size 64; lower block_size or give more text"
    )


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_collated_blocks_keep_documents_apart_in_hfllm_models(tokenizer, attn_implementation):
    """No attention_mask + restarting position_ids: hfllm's model attends within each document only, at the
    document's own positions, so a packed document's logits are those of the document alone."""
    packed = tokenize_and_pack(documents_dataset(DOCUMENTS, DOCUMENTS[:10]), tokenizer, 128, seed=0)
    batch = collate_blocks([packed["validation"][i] for i in range(2)])
    assert set(batch) == {"input_ids", "labels", "position_ids"} and torch.equal(batch["labels"], batch["input_ids"])
    config = get_preset(
        "llama-tiny", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, use_cache=False,
    )
    torch.manual_seed(0)
    model = HfllmForCausalLM(config).eval()
    model.set_attn_implementation(attn_implementation)
    row = batch["input_ids"][0]
    start = int((row == tokenizer.eos_token_id).nonzero()[0]) + 1  # second document starts here
    end = start + int((row[start:] == tokenizer.eos_token_id).nonzero()[0]) + 1
    with torch.no_grad():
        packed_logits = model(**batch).logits[0, start:end]  # (T_doc, V)
        alone = model(row[start:end][None]).logits[0]  # (T_doc, V)
        leaky = model(row[None], attention_mask=torch.ones_like(row[None])).logits[0, start:end]
    torch.testing.assert_close(packed_logits, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leaky, alone, atol=1e-3)  # with a mask, documents see each other


def test_flat_blocks_give_flash_attention_one_sequence_per_document(tokenizer):
    """FlashAttention's varlen batch: the rows as one row without padding, a sequence boundary at every document
    start and every row start, the same B*(T-1) predictions as the plain batch; and hfllm's sdpa path reading the
    flat row (batch of one: transformers detects the packed documents from position_ids) gives the plain loss."""
    packed = tokenize_and_pack(documents_dataset(DOCUMENTS, DOCUMENTS[:10]), tokenizer, 128, seed=0)
    rows = [packed["validation"][i] for i in range(2)]
    flat = collate_flat_blocks(rows)
    input_ids = torch.tensor([row["input_ids"] for row in rows])  # (2, 128)
    assert torch.equal(flat["input_ids"], input_ids.reshape(1, -1))
    assert torch.equal(flat["position_ids"], torch.tensor([row["position_ids"] for row in rows]).reshape(1, -1))
    # the expected boundaries, read from the tokens: each row's start and the token after each EOS inside a row
    starts = sorted({0, 128} | {r * 128 + t + 1 for r in range(2) for t, token in enumerate(rows[r]["input_ids"])
                                if token == tokenizer.eos_token_id and t + 1 < 128})
    expected = torch.tensor([*starts, 256], dtype=torch.int32)
    assert len(expected) > 4  # several documents per row
    assert torch.equal(flat["cu_seq_lens_q"], expected) and torch.equal(flat["cu_seq_lens_k"], expected)
    assert flat["max_length_q"] == flat["max_length_k"] == int(expected.diff().max())
    assert flat["labels"].tolist()[0] == [-100, *rows[0]["input_ids"][1:], -100, *rows[1]["input_ids"][1:]]

    config = get_preset(
        "llama-tiny", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, use_cache=False,
    )
    torch.manual_seed(0)
    model = HfllmForCausalLM(config).eval()
    with torch.no_grad():
        plain = model(**collate_blocks(rows)).loss
        flat_loss = model(input_ids=flat["input_ids"], labels=flat["labels"], position_ids=flat["position_ids"]).loss
    torch.testing.assert_close(flat_loss, plain, atol=1e-5, rtol=1e-5)


def test_cli_tokenizer_trains_saves_and_reports(tmp_path, capsys):
    rows = [{"text": f"line {i}\nwith verse {i * 7}\n"} for i in range(50)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["data", "tokenizer", "--kind", "char", "--train-files", str(tmp_path / "docs.jsonl")]
    argv += ["--out", str(tmp_path / "tok")]
    assert cli_main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["tokens_per_char"] == 1.0 and report["vocab_size"] == 6 + len(set("".join(r["text"] for r in rows)))
    assert (tmp_path / "tok" / "tokenizer.json").is_file() and (tmp_path / "tok" / "chat_template.jinja").is_file()
