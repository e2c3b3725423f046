"""SFT packing (`packing: true`): TRL's best-fit-decreasing rows, padding-free batches with per-sample position_ids,
and attention that never crosses samples, on hfllm models, native Llama and LoRA adapters."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from helpers import adaptation_recipe

from hfllm.data.packing import batch_fill, packed_fill, padded_fill
from hfllm.training.align import build, parse_recipe

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread is fastest

PACKED = dict(packing=True, max_length=256, assistant_only_loss=True, max_steps=1, eval_strategy="no")


def packed_trainer(tmp_path, model_dir, synth_dir, **overrides):
    """align.build of a packed SFT recipe (nothing trained): the trainer with TRL's packed dataset and collator."""
    recipe = adaptation_recipe(tmp_path, model_dir, synth_dir / "sft.jsonl", **(PACKED | overrides))
    return build("sft", parse_recipe("sft", [str(recipe)], "hfllm sft")).trainer


def samples_of(batch: dict) -> list[slice]:
    """Where each sample of a padding-free batch (one row) lies: a new one wherever position_ids restart at 0."""
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["position_ids"].shape[1]]
    return [slice(a, b) for a, b in zip(starts, starts[1:])]


def sample_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(V,) per-sample mean next-token loss over the labelled tokens; logits (T, V), labels (T,)."""
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)


@pytest.fixture(scope="module")
def packed_llama(tmp_path_factory, tiny_llama_chat_dir, synth_dir):
    return packed_trainer(tmp_path_factory.mktemp("packed"), tiny_llama_chat_dir, synth_dir, use_peft=False)


def test_packing_fills_rows_and_batches_are_padding_free(packed_llama):
    """Several samples per row of max_length; the collator joins rows into one, positions restart per sample, the
    first label of each sample is masked (no sample learns from its neighbour's last token); and the run log's line."""
    dataset, args = packed_llama.train_dataset, packed_llama.args
    assert args.packing and args.packing_strategy == "bfd"
    rows = dataset["seq_lengths"]
    assert max(map(len, rows)) >= 2 and all(sum(row) <= 256 for row in rows)
    batch = packed_llama.data_collator([dataset[i] for i in range(2)])
    assert "attention_mask" not in batch and batch["input_ids"].shape == batch["position_ids"].shape == (1, sum(map(sum, rows[:2])))
    pieces = samples_of(batch)
    assert [p.stop - p.start for p in pieces] == rows[0] + rows[1]
    assert all(batch["labels"][0, p.start] == -100 for p in pieces)
    fill = packed_fill(rows, 256)
    assert 0.5 < fill <= 1 and fill == sum(map(sum, rows)) / (256 * len(rows))
    line = batch_fill(dataset, args)
    assert line == f"packing: {sum(map(len, rows))} samples in {len(rows)} rows of 256 tokens, {fill:.1%} real tokens per batch"


def test_padded_fill_counts_real_tokens_in_padded_batches():
    assert padded_fill([4, 4, 2, 2], batch_size=4) == 12 / 16
    assert padded_fill([3, 3], batch_size=1) == 1.0
    assert packed_fill([[3, 1], [2]], max_length=4) == 6 / 8
    unpacked = Dataset.from_dict({"input_ids": [[1] * 4, [1] * 2]})
    args = SimpleNamespace(per_device_train_batch_size=2, seed=0, max_length=8)
    assert batch_fill(unpacked, args) == "no packing: 2 samples, 75.0% real tokens per batch of 2 padded to its longest"
    assert batch_fill(Dataset.from_dict({"chosen_input_ids": [[1]]}), args) is None  # DPO's data: no line


def test_assistant_only_loss_marks_exactly_the_assistant_tokens_when_packed(packed_llama, synth_dir):
    """Each packed sample's labels are its own tokens where the template marks assistant tokens, -100 elsewhere."""
    tokenizer = packed_llama.processing_class
    expected = {}
    for line in (synth_dir / "sft.jsonl").read_text().splitlines():
        rendered = tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        ids, mask = rendered["input_ids"], rendered["assistant_masks"]
        expected[tuple(ids)] = [token if keep else -100 for token, keep in zip(ids, mask)]
    checked = 0
    for row in packed_llama.train_dataset:
        start = 0
        for length in row["seq_lengths"]:
            ids, labels = row["input_ids"][start : start + length], row["labels"][start : start + length]
            assert labels == expected[tuple(ids)]
            assert 0 < sum(label != -100 for label in labels) < length
            start, checked = start + length, checked + 1
    assert checked == len(expected)


MODELS = ["llama", "llama-lora", "hfllm", "hfllm-lora"]
ATTENTION = ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def trainers(tmp_path_factory, tiny_llama_chat_dir, tiny_chat_dir, synth_dir):
    """A packed SFT trainer per model kind (built once, lazily)."""
    built = {}

    def get(kind: str):
        if kind not in built:
            model_dir = tiny_llama_chat_dir if kind.startswith("llama") else tiny_chat_dir
            built[kind] = packed_trainer(tmp_path_factory.mktemp(kind), model_dir, synth_dir, use_peft=kind.endswith("lora"))
        return built[kind]

    return get


@pytest.mark.parametrize("attn_implementation", ATTENTION)
@pytest.mark.parametrize("kind", MODELS)
def test_packed_samples_do_not_see_each_other(trainers, kind, attn_implementation):
    """A packed batch gives every sample the logits and the loss it has alone, a changed neighbour changes none of
    them, and the same batch with an all-ones attention_mask (plain causal attention) does: the check can fail."""
    trainer = trainers(kind)
    model = trainer.model.eval()
    model.set_attn_implementation(attn_implementation)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    pieces = samples_of(batch)
    assert len(pieces) >= 3
    with torch.no_grad():
        packed = model(**batch).logits[0]  # (T, V)
        alone = [model(input_ids=batch["input_ids"][:, p]).logits[0] for p in pieces]
        changed = dict(batch, input_ids=batch["input_ids"].clone())
        changed["input_ids"][0, pieces[0]] = torch.randint(0, 300, (pieces[0].stop - pieces[0].start,))
        neighbour_changed = model(**changed).logits[0]
        leaky = model(**batch, attention_mask=torch.ones_like(batch["input_ids"])).logits[0]
    for piece, logits in zip(pieces, alone):
        torch.testing.assert_close(packed[piece], logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sample_losses(packed[piece], batch["labels"][0, piece]),
                                   sample_losses(logits, batch["labels"][0, piece]), atol=1e-5, rtol=1e-5)
    for piece in pieces[1:]:
        torch.testing.assert_close(neighbour_changed[piece], packed[piece], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(leaky[pieces[1]], packed[pieces[1]], atol=1e-3)
    # the trainer's loss over the packed batch is the token-weighted mean of the samples' own losses
    with torch.no_grad():
        loss = model(**batch).loss
    labelled = [(batch["labels"][0, p][1:] != -100).sum() for p in pieces]
    per_sample = [sample_losses(logits, batch["labels"][0, p]) for p, logits in zip(pieces, alone)]
    torch.testing.assert_close(loss, sum(n * l for n, l in zip(labelled, per_sample)) / sum(labelled), atol=1e-5, rtol=1e-5)
