"""Weighted dataset mixtures from recipes (`datasets:` with `fraction` or `tokens`): realized shares, seeds, hashes,
the run log and run_info.json, and one-line errors for bad weights, columns and sources."""

import json

import pytest
from datasets import Dataset
from helpers import adaptation_recipe, write_recipe

from hfllm.data.loading import DatasetConfig, mix_datasets
from hfllm.data.text import load_text_and_mixture
from hfllm.errors import HfllmError
from hfllm.training.align import build, parse_recipe
from hfllm.training.arguments import parse_recipe as parse_pretraining_recipe


def source(name: str, rows: int, words: int = 3) -> Dataset:
    """`rows` rows "name-i w w w" of `words` + 1 words."""
    return Dataset.from_dict({"text": [f"{name}-{i} " + "w " * words for i in range(rows)]})


def words(batch: dict[str, list]) -> list[int]:
    return [len(text.split()) for text in batch["text"]]


def test_fractions_are_realized_seeded_and_without_repeats():
    a, b = source("a", 300), source("b", 120)
    configs = [DatasetConfig("a", fraction=0.7), DatasetConfig("b", fraction=0.3)]
    mixture = mix_datasets([a, b], configs, seed=0)
    texts = list(mixture.train["text"])
    share_a = sum(text.startswith("a-") for text in texts) / len(texts)
    assert abs(share_a - 0.7) < 0.01 and len(set(texts)) == len(texts)  # no row twice
    assert len(texts) == 400  # the largest mixture that repeats no row: all 120 of b are 30 %
    assert [s["share"] for s in mixture.sources] == pytest.approx([0.7, 0.3], abs=0.01)
    again = mix_datasets([a, b], configs, seed=0)
    assert list(again.train["text"]) == texts and again.sha256 == mixture.sha256
    other = mix_datasets([a, b], configs, seed=1)
    assert set(other.train["text"]) != set(texts) and other.sha256 != mixture.sha256  # other rows of a, not only order
    assert mixture.summary().startswith("data mixture: a 70.0% of rows (weight 0.7, ")


def test_token_weights_take_that_many_tokens_repeating_a_small_source():
    a, b = source("a", 100, words=9), source("b", 10, words=1)  # 10 and 2 words a row
    mixture = mix_datasets([a, b], [DatasetConfig("a", tokens=500), DatasetConfig("b", tokens=100)], 0, words)
    counts = {s["source"]: s["tokens"] for s in mixture.sources}
    assert 500 <= counts["a"] < 510 and 100 <= counts["b"] < 102
    assert sum(len(t.split()) for t in mixture.train["text"] if t.startswith("a-")) == counts["a"]
    assert [s["share"] for s in mixture.sources] == pytest.approx([5 / 6, 1 / 6], abs=0.01)
    assert mixture.unit == "tokens" and len([t for t in mixture.train["text"] if t.startswith("b-")]) == 50


def test_no_weights_keep_every_row():
    mixture = mix_datasets([source("a", 5), source("b", 3)], [DatasetConfig("a"), DatasetConfig("b")], seed=0)
    assert sorted(mixture.train["text"]) == sorted([*source("a", 5)["text"], *source("b", 3)["text"]])


@pytest.mark.parametrize(
    "entries, message",
    [  # fmt: skip (one case per line)
        ([{"path": "a.jsonl", "fraction": 0.5}, {"path": "b.jsonl", "tokens": 100}], "`datasets:` mixes weights (fraction, tokens); give every source a fraction, or every source tokens, or none (all rows)"),
        ([{"path": "a.jsonl", "fraction": -1}], "dataset 'a.jsonl': fraction must be a positive number, got -1"),
        ([{"path": "a.jsonl", "tokens": 2.5}], "dataset 'a.jsonl': tokens must be a positive whole number, got 2.5"),
        ([{"path": "a.jsonl", "fraction": 0.5, "tokens": 9}], "dataset 'a.jsonl' gives both fraction and tokens; give one weight per source"),
        ([{"path": "a.jsonl", "weight": 0.5}], "`datasets:` entry 1 has unknown key(s) weight; its keys are: path, name, data_dir, data_files, split, columns, fraction, tokens"),
        ([{"path": "{d}/a.jsonl", "columns": ["messages", "answer"]}], "dataset '{d}/a.jsonl' has no column(s) answer; its columns are: messages; fix `columns:` in the recipe's datasets"),
        ([{"path": "{d}/a.jsonl"}, {"path": "{d}/b.jsonl"}], "the sources have different columns ({d}/a.jsonl: ['messages']; {d}/b.jsonl: ['messages', 'source']); select the same ones with `columns:` in the recipe's datasets"),
        ([{"path": "{d}/missing.jsonl"}], "no such data file: {d}/missing.jsonl; fix `data_files` in the recipe's datasets"),
    ],
)
def test_bad_mixtures_are_one_line_errors(entries, message, tmp_path, tiny_llama_chat_dir):
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (tmp_path / "a.jsonl").write_text(json.dumps(chat) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps(chat | {"source": "b"}) + "\n")
    entries = [{k: v.format(d=tmp_path) if isinstance(v, str) else v for k, v in e.items()} for e in entries]
    recipe = adaptation_recipe(tmp_path, tiny_llama_chat_dir, tmp_path / "a.jsonl", datasets=entries)
    with pytest.raises(HfllmError) as error:
        build("sft", parse_recipe("sft", [str(recipe)], "hfllm sft"))
    assert str(error.value) == message.format(d=tmp_path)


def test_sft_mixture_is_logged_and_hashed_in_run_info(tmp_path, tiny_llama_chat_dir, synth_dir, capsys):
    """Two sources at 3:1 through an SFT recipe: the run log's line, run_info.json's record, its hash reproduced."""
    greetings = [[{"role": "user", "content": f"Say hi {i}"}, {"role": "assistant", "content": "hi"}] for i in range(16)]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in greetings))
    entries = [{"path": str(synth_dir / "sft.jsonl"), "fraction": 3}, {"path": str(tmp_path / "b.jsonl"), "fraction": 1}]
    recipe = adaptation_recipe(tmp_path, tiny_llama_chat_dir, None, datasets=entries, max_steps=1)
    parts = build("sft", parse_recipe("sft", [str(recipe)], "hfllm sft"))
    parts.write_outputs()  # the lifecycle's start-of-run files and lines
    record = json.loads((tmp_path / "out" / "run_info.json").read_text())["data_mixture"]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data mixture")]
    # 3:1 without repeating a row: all 32 synthetic rows and round(32 / 3) = 11 greetings
    assert lines[0] == (f"data mixture: {synth_dir / 'sft.jsonl'} 74.4% of rows (weight 3, 32 rows); {tmp_path / 'b.jsonl'} "
                        f"25.6% of rows (weight 1, 11 rows); sha256 {record['sha256'][:16]}")
    assert [s["share"] for s in record["sources"]] == pytest.approx([0.75, 0.25], abs=0.01)
    assert record["sha256"] == mix_datasets(  # the mixed rows' hash: the same data, weights and seed give it again
        [Dataset.from_json(e["path"]) for e in entries], [DatasetConfig(**e) for e in entries], seed=0).sha256


def test_pretraining_recipes_take_a_mixture(tmp_path):
    """`datasets:` in a pretraining recipe: local files mixed by tokens, counted with the recipe's tokenizer."""
    from hfllm.data import train_tokenizer

    for name, count in (("a", 60), ("b", 60)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"body": f"{name} {i} " * 5}) + "\n" for i in range(count)))
    train_tokenizer("char", ["a b 0123456789 "], 64).save_pretrained(tmp_path / "tok")
    keys = dict(model="llama-tiny", tokenizer=str(tmp_path / "tok"), output_dir=str(tmp_path / "out"), datasets=[
        {"path": str(tmp_path / "a.jsonl"), "columns": ["body"], "tokens": 3000},
        {"path": str(tmp_path / "b.jsonl"), "columns": ["body"], "tokens": 1000}])
    recipe = parse_pretraining_recipe([str(write_recipe(tmp_path / "r.yaml", keys))], "hfllm pretrain")
    text, mixture = load_text_and_mixture(recipe.args[1], seed=0)
    assert [s["share"] for s in mixture.sources] == pytest.approx([0.75, 0.25], abs=0.02)
    assert set(text["validation"]["text"]).isdisjoint(text["train"]["text"])
    with pytest.raises(HfllmError, match=r"^`tokens` weights are counted with a tokenizer folder"):
        bad = parse_pretraining_recipe([str(write_recipe(tmp_path / "r.yaml", keys | {"tokenizer": "bpe"}))], "x")
        load_text_and_mixture(bad.args[1], seed=0)


def test_pretraining_run_info_keeps_the_mixture(tmp_path, capsys):
    """A fraction-weighted pretraining mixture (char tokenizer trained on it): the plan's line and run_info.json."""
    from helpers import TINY

    from hfllm.training.pretrain import build as build_pretraining

    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} {i} " * 9}) + "\n" for i in range(40)))
    keys = dict(model="llama-tiny", output_dir=str(tmp_path / "out"), max_steps=1, datasets=[
        {"path": str(tmp_path / "a.jsonl"), "fraction": 1}, {"path": str(tmp_path / "b.jsonl"), "fraction": 1}])
    recipe = parse_pretraining_recipe([str(write_recipe(tmp_path / "r.yaml", keys)), *TINY], "hfllm pretrain")
    parts = build_pretraining(recipe)
    (tmp_path / "out").mkdir(exist_ok=True)
    parts.write_outputs()
    record = json.loads((tmp_path / "out" / "run_info.json").read_text())["data_mixture"]
    assert [(s["rows"], s["share"]) for s in record["sources"]] == [(36, 0.5), (36, 0.5)]  # 10 % of each held out
    assert f"data mixture: {tmp_path / 'a.jsonl'} 50.0% of rows (weight 1, 36 rows)" in capsys.readouterr().out
