"""Plain helpers shared by the test modules (the fixtures are in conftest.py): writing recipes, reading a run's log
history, a small corpus and overrides that make any pretraining recipe run in seconds, the tiny ChatML BPE."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run_hfllm(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m hfllm ARGS` as a process, from the repository root (this checkout's hfllm), with `env` added to the
    environment (an empty value removes the variable) and one torch thread."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    environment = {key: value for key, value in environment.items() if value != ""}
    return subprocess.run([sys.executable, "-m", "hfllm", *args], cwd=ROOT, capture_output=True, text=True,
                          env=environment, timeout=600)


# ----------------------------------------------------------------------------- recipes and run outputs


def write_recipe(path: Path, keys: dict) -> Path:
    """Write a recipe (a YAML mapping) to `path`; every test writes its recipes through this."""
    path = Path(path)
    path.write_text(yaml.safe_dump(keys))
    return path


def adaptation_recipe(tmp_path: Path, model_dir, data_file, **overrides) -> Path:
    """An `hfllm sft/dpo/orpo/kto/grpo` recipe at tiny size: LoRA r=8, SmolLM2's template, output in tmp_path/out."""
    keys = dict(
        model_name_or_path=str(model_dir), use_peft=True, lora_r=8, chat_template="smollm2",
        datasets=[{"path": str(data_file)}], output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
        learning_rate=5e-3, report_to="none", save_strategy="no", seed=0,
    )
    return write_recipe(tmp_path / "recipe.yaml", keys | overrides)


def log_history(output_dir: Path) -> list[dict]:
    """`log_history` of the trainer_state.json in `output_dir` (a run folder or one of its checkpoint-N folders)."""
    return json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]


def series(output_dir: Path, key: str) -> list[float]:
    """One logged value (e.g. "loss", "reward", "rewards/margins") at each logging step, in order."""
    return [entry[key] for entry in log_history(output_dir) if key in entry]


def losses(output_dir: Path) -> list[float]:
    return series(output_dir, "loss")


def checkpoint_series(output_dir: Path, key: str) -> list[float]:
    """`series` from the one checkpoint-N folder in `output_dir` (adaptation runs keep trainer_state.json there)."""
    [checkpoint] = Path(output_dir).glob("checkpoint-*")
    return series(checkpoint, key)


def first_rows(source: Path, n: int, target: Path) -> Path:
    """The first `n` rows of a .jsonl file written to `target`: with a batch of `n`, every step sees the same rows,
    so a method's metrics can be compared from step to step."""
    lines = Path(source).read_text().splitlines(keepends=True)[:n]
    Path(target).write_text("".join(lines))
    return Path(target)


# ----------------------------------------------------------------------------- pretraining

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
)

# a 1-layer, 32-wide model, char tokenizer, 16-token blocks, local data: any recipe trains in seconds
TINY = [
    "--hidden_size", "32", "--intermediate_size", "64", "--num_hidden_layers", "1", "--num_attention_heads", "2",
    "--num_key_value_heads", "1", "--tokenizer", "char", "--block_size", "16", "--per_device_train_batch_size", "2",
    "--per_device_eval_batch_size", "4", "--global_batch_size", "null", "--global_batch_tokens", "null",
    "--max_eval_samples", "4", "--report_to", "none", "--disable_tqdm", "true", "--num_samples", "1",
    "--sample_max_new_tokens", "8", "--dataloader_num_workers", "0", "--torch_compile", "false",
    "--attn_implementation", "sdpa", "--preprocessing_num_workers", "null",
]


def write_corpus(folder: Path, copies: int = 40) -> tuple[str, str]:
    """(train file, validation file) of repeated dialogue."""
    train, validation = folder / "train.txt", folder / "validation.txt"
    train.write_text(CORPUS * copies, encoding="utf-8")
    validation.write_text(CORPUS * 4, encoding="utf-8")
    return str(train), str(validation)


def data_args(folder: Path) -> list[str]:
    train, validation = write_corpus(folder)
    return ["--dataset", "null", "--train_files", train, "--validation_files", validation]


# ----------------------------------------------------------------------------- a tiny chat tokenizer

# SmolLM2-135M-Instruct's own template (no generation markers), as shipped in its GGUF
SMOLLM2_ORIGINAL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
    "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def chat_bpe_tokenizer():
    """A 400-token byte-level BPE with ChatML specials and SmolLM2's original template, trained on synthetic chats
    in a fraction of a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hfllm.data.synth import synthesize

    texts = []
    for task in ("arithmetic", "reverse", "units"):
        for row in synthesize(task, 200, 10, seed=1)["sft"]:
            texts += [m["role"] + "\n" + m["content"] for m in row["messages"]]
    texts.append("system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>",
        chat_template=SMOLLM2_ORIGINAL_TEMPLATE,
    )


# ----------------------------------------------------------------------------- servers


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def left_padded(length: int = 12, pad: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, the second left-padded by `pad` tokens: ids (2, length), attention mask (2, length)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 61, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, :pad], mask[1, :pad] = 0, 0
    return ids, mask


def run_without_hfllm(script: str, folder: Path) -> subprocess.CompletedProcess:
    """`python -c script` in a fresh process with a bare environment (offline, HOME in `folder`, this session's
    OMP_NUM_THREADS), as a reader without hfllm runs a checkpoint's own code; the script blocks `import hfllm` itself."""
    threads = {"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]} if "OMP_NUM_THREADS" in os.environ else {}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=folder,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(folder), **threads})


def tiny_variant_args(layers: int) -> list[str]:
    """Overrides that make a shipped variant recipe train 2 logged steps of a tiny `layers`-layer model."""
    return [*TINY, "--num_hidden_layers", str(layers), "--max_steps", "2", "--logging_steps", "1", "--eval_steps", "2",
            "--warmup_steps", "1", "--max_position_embeddings", "64", "--intermediate_size", "64"]


def train_shrunk(recipe: Path, folder: Path, layers: int = 4) -> Path:
    """Train `recipe` shrunk (`tiny_variant_args`) on the test corpus; checks the run exits 0 with 2 finite logged losses and
    returns its output folder."""
    from hfllm.run_pretrain import main

    out = folder / "out"
    assert main([str(recipe), *tiny_variant_args(layers), *data_args(folder), "--output_dir", str(out)]) == 0
    losses = [entry["loss"] for entry in log_history(out) if "loss" in entry]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    return out


def assert_export_refused(model, folder: Path, to: str, words: str) -> None:
    """`hfllm export --to {to}` of the saved `model` refuses in one line holding `words` and writes nothing."""
    from hfllm.errors import HfllmError
    from hfllm.models.convert import export

    model.save_pretrained(folder / "model")
    try:
        export(folder / "model", folder / "out", to=to)
    except HfllmError as error:
        message = str(error)
    else:
        raise AssertionError(f"export --to {to} did not refuse")
    assert "\n" not in message and words in message, message
    assert not (folder / "out").exists() or not any((folder / "out").iterdir())


TINY_SHAPE = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


def perturbed_tiny(attn: str = "eager", **fields):
    """A random 4-layer HfllmForCausalLM (GQA: 4 query heads, 2 key/value heads; `fields` override `TINY_SHAPE`), in
    eval mode, every weight perturbed so that zero-initialised projections, unit weights and routers carry signal."""
    from hfllm import HfllmConfig, HfllmForCausalLM

    torch.manual_seed(0)
    model = HfllmForCausalLM._from_config(HfllmConfig(**{**TINY_SHAPE, **fields}), attn_implementation=attn)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model.eval()


def measured_flops_per_token(model, length: int) -> float:
    """Training FLOPs per token from a measured training-mode forward pass (Mixture of Depths routes differently in
    evaluation; dropout is 0) with eager attention (torch's FLOP counter sees its matmuls; CPU SDPA's kernel is not
    counted), times 3 for forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    model.config._attn_implementation = "eager"
    ids = torch.randint(1, model.config.vocab_size, (1, length))
    was_training = model.training
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.train()(ids)
    model.train(was_training)
    return 3 * counter.get_total_flops() / length


def assert_cached_generation_equals_uncached(model) -> torch.Tensor:
    """Greedy generation (8 tokens) with the KV cache equals generation without it, for `left_padded()`'s second
    prompt alone and for the left-padded batch; the padded row generates what its prompt does alone. Returns the
    batch's cached generation (2, 12 + 8)."""
    ids, mask = left_padded()
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    for prompt, prompt_mask in ((ids[1:, 5:], mask[1:, 5:]), (ids, mask)):
        cached = model.generate(prompt, attention_mask=prompt_mask, use_cache=True, **settings)
        uncached = model.generate(prompt, attention_mask=prompt_mask, use_cache=False, **settings)
        assert torch.equal(cached, uncached)
    alone = model.generate(ids[1:, 5:], attention_mask=mask[1:, 5:], **settings)
    assert torch.equal(cached[1, 5:], alone[0]), "the left-padded row generates what the prompt does alone"
    return cached
