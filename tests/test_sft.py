"""SFT recipes, chat templates, PEFT adapters, QLoRA and merge on a tiny random Llama (seconds each)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback
from helpers import SMOLLM2_ORIGINAL_TEMPLATE, adaptation_recipe, chat_bpe_tokenizer, losses

from hfllm.data.chat_template import PROBE, check_roles, check_template, load_template, set_template
from hfllm.errors import HfllmError
from hfllm.run_sft import main as sft_main

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: one thread is fastest


SFT = dict(assistant_only_loss=True, max_steps=6, logging_steps=1, save_strategy="steps", save_steps=6, max_length=128)


def sft_recipe(tmp_path, model_dir, synth_dir, **overrides) -> Path:
    return adaptation_recipe(tmp_path, model_dir, synth_dir / "sft.jsonl", **(SFT | overrides))


def checkpoint_losses(out: Path) -> list[float]:
    """The training losses logged up to the (one) checkpoint saved in `out`."""
    return losses(next(out.glob("checkpoint-*")))


class TrainingRecorder(TrainerCallback):
    """Given to `sft_main(argv, callbacks=[...])`, it fills `record`: "start" and "end", copies of the trainable
    weights of the trainer's model (by name) when training starts and ends, and "end_logits", the trained model's
    `last_logits`."""

    def __init__(self):
        self.record: dict = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.record["start"] = trainable_weights(model)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        from hfllm.checkpoint import eval_mode

        self.record["end"] = trainable_weights(model)
        with eval_mode(model):
            self.record["end_logits"] = last_logits(model, processing_class)


def trainable_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def last_logits(model, tokenizer, question: str = "What is 2 + 2?") -> torch.Tensor:
    """(V,) next-token logits after a chat prompt."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]  # (1, T)
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].float()


# ----------------------------------------------------------------------------- recipes


def test_recipe_yaml_cli_override_and_machine_defaults(tmp_path, tiny_llama_chat_dir, synth_dir):
    from hfllm.training.align import parse_recipe

    recipe = sft_recipe(tmp_path, tiny_llama_chat_dir, synth_dir)
    script, training, model, mixture, extra = parse_recipe("sft", [str(recipe), "--learning_rate", "0.25"], "hfllm sft").args
    assert training.learning_rate == 0.25 and training.max_steps == 6  # CLI over YAML, YAML over defaults
    assert model.use_peft and model.lora_r == 8 and extra.chat_template == "smollm2"
    assert mixture.datasets[0].path.endswith("sft.jsonl")
    if not torch.cuda.is_available():
        assert training.bf16 is False and training.activation_checkpointing is False


def test_unknown_recipe_key_fails_with_one_line_through_the_cli(tmp_path, tiny_llama_chat_dir, synth_dir):
    recipe = sft_recipe(tmp_path, tiny_llama_chat_dir, synth_dir, lora_rank=8)
    result = subprocess.run([sys.executable, "-m", "hfllm", "sft", str(recipe)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"hfllm sft: error: unknown key 'lora_rank' in recipe '{recipe}' (did you mean 'lora_r'?)"
    assert not (tmp_path / "out").exists()


def test_unknown_cli_flag_fails_with_one_line(tmp_path, tiny_llama_chat_dir, synth_dir):
    recipe = sft_recipe(tmp_path, tiny_llama_chat_dir, synth_dir)
    with pytest.raises(HfllmError, match=r"^unknown key 'no_such_flag' in the command line$"):
        sft_main([str(recipe), "--no_such_flag", "1"])


# ----------------------------------------------------------------------------- chat templates


def test_smollm2_training_template_renders_like_the_original():
    tokenizer = chat_bpe_tokenizer()
    conversations = [PROBE, PROBE[1:], PROBE[1:2]]
    originals = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=len(c) == 1) for c in conversations]
    tokenizer.chat_template = load_template("smollm2")
    assert [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=len(c) == 1) for c in conversations] == originals
    check_template(tokenizer)  # markers cover each reply + EOS; prompt is a prefix; EOS after each reply


def test_pretrained_hfllm_tokenizer_takes_chatmls_turn_end_as_eos():
    """`hfllm pretrain` tokenizers end documents with <|endoftext|> and carry ChatML's tokens: with the chatml
    template the SFT tokenizer's EOS becomes <|im_end|>, so replies are trained to end, and generation stops, there."""
    from hfllm.data.tokenizer import train_tokenizer
    from hfllm.evaluation.tasks import shakespeare_passages

    tokenizer = train_tokenizer("bpe", shakespeare_passages()[:20], 300)
    assert tokenizer.eos_token == "<|endoftext|>"
    set_template(tokenizer, "chatml", assistant_only_loss=True)  # raised "does not put the EOS token" before
    assert tokenizer.eos_token == "<|im_end|>"
    encoded = tokenizer.apply_chat_template(PROBE, return_dict=True, return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
    assert trained[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_template_checks_name_the_problem():
    tokenizer = chat_bpe_tokenizer()  # SmolLM2's original template: no generation markers
    with pytest.raises(HfllmError, match=r"assistant_only_loss needs a chat template with \{% generation %\} markers"):
        check_template(tokenizer)
    check_template(tokenizer, assistant_only_loss=False)
    tokenizer.chat_template = SMOLLM2_ORIGINAL_TEMPLATE.replace("'<|im_end|>' + '\n'", "'\n'")  # no EOS
    with pytest.raises(HfllmError, match=r"does not put the EOS token '<\|im_end\|>' right after each assistant reply"):
        check_template(tokenizer, assistant_only_loss=False)
    tokenizer.chat_template = SMOLLM2_ORIGINAL_TEMPLATE.replace("'<|im_start|>assistant\n'", "'<|im_start|>bot\n'")
    with pytest.raises(HfllmError, match="inference prompt is not a prefix of its training rendering"):
        check_template(tokenizer, assistant_only_loss=False)


def test_roles_must_alternate():
    check_roles(PROBE)
    with pytest.raises(HfllmError, match=r"row 3 has roles \['user', 'user', 'assistant'\] which do not alternate"):
        check_roles([{"role": "user"}, {"role": "user"}, {"role": "assistant"}], "training row 3")
    with pytest.raises(HfllmError, match="do not alternate"):
        check_roles([{"role": "assistant"}, {"role": "user"}])


# ----------------------------------------------------------------------------- training


def test_sft_lora_assistant_only_loss_saves_adapter_and_template(tmp_path, tiny_llama_chat_dir, synth_dir):
    from hfllm.checkpoint import load
    from hfllm.evaluation.exact_match import score_file

    recipe = sft_recipe(tmp_path, tiny_llama_chat_dir, synth_dir, exact_match_file=str(synth_dir / "test.jsonl"))
    assert sft_main([str(recipe)]) == 0
    out = tmp_path / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]  # attention projections
    assert (out / "chat_template.jinja").read_text() == load_template("smollm2")  # stored with the model
    series = checkpoint_losses(out)
    assert len(series) == 6 and series[-1] < series[0]
    result = json.loads((out / "chat_exact_match.json").read_text())
    assert result["n"] == 8 and "preference_accuracy" in result
    # the run scored the model it saved: the reloaded adapter scores the same (the scorer's own test is in test_synth)
    assert result == pytest.approx(score_file(*load(out), str(synth_dir / "test.jsonl"), None), abs=1e-5)


def test_sft_lora_trains_hfllm_models(tmp_path, tiny_hfllm_chat_dir, synth_dir):
    assert sft_main([str(sft_recipe(tmp_path, tiny_hfllm_chat_dir, synth_dir))]) == 0
    out = tmp_path / "out"
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == [
        "k_proj", "o_proj", "q_proj", "v_proj"]
    series = checkpoint_losses(out)
    assert series[-1] < series[0]


@pytest.mark.parametrize(
    "peft_type, extra, expected",
    [("lora", {"use_dora": True}, "LORA"), ("ia3", {}, "IA3"), ("prefix", {}, "PREFIX_TUNING"),
     ("prompt", {}, "PROMPT_TUNING"), ("p_tuning", {}, "P_TUNING")],
)
def test_peft_methods_train_save_and_reload(tmp_path, tiny_llama_chat_dir, synth_dir, peft_type, extra, expected):
    from transformers import AutoModelForCausalLM

    from hfllm.checkpoint import load

    recorder = TrainingRecorder()
    record = recorder.record
    recipe = sft_recipe(tmp_path, tiny_llama_chat_dir, synth_dir, peft_type=peft_type, max_steps=2, save_strategy="no",
                        num_virtual_tokens=4, assistant_only_loss=peft_type == "lora", **extra)
    assert sft_main([str(recipe)], callbacks=[recorder]) == 0
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == expected and config.get("use_dora", False) == bool(extra)
    model, tokenizer = load(tmp_path / "out")
    assert type(model).__name__ == "PeftModelForCausalLM" and tokenizer.chat_template == load_template("smollm2")
    start, end = record["start"], record["end"]
    assert start and [name for name, weight in start.items() if torch.equal(end[name], weight)] == []  # all trained
    if peft_type == "lora":  # LoRA's B starts at zero (the adapter adds nothing) and training made it non-zero
        lora_b = [name for name in start if ".lora_B." in name]
        assert lora_b and all(not start[name].any() and end[name].abs().sum() > 0 for name in lora_b)
    # the reloaded adapter is the trained one, and it changes what the base model says
    adapted = last_logits(model, tokenizer)
    torch.testing.assert_close(adapted, record["end_logits"], atol=1e-5, rtol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_chat_dir).eval()
    assert (adapted - last_logits(base, tokenizer)).abs().max() > 1e-3


def test_qlora_on_cpu_layers_are_4bit_adapter_trains_and_reloads(tmp_path, tiny_llama_chat_dir, synth_dir):
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    recorder = TrainingRecorder()
    record = recorder.record
    recipe = sft_recipe(tmp_path, tiny_llama_chat_dir, synth_dir, load_in_4bit=True, bnb_4bit_quant_type="nf4",
                        use_bnb_nested_quant=True, dtype="float32")
    assert sft_main([str(recipe)], callbacks=[recorder]) == 0
    quantized = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_chat_dir, quantization_config=quantized, device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, tmp_path / "out")
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and q_proj.base_layer.weight.quant_type == "nf4"
    # only the adapter trains: LoRA's B starts at zero (A is random) and the saved B is no longer zero
    start = record["start"]
    assert start and all(".lora_A." in name or ".lora_B." in name for name in start)
    lora_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    assert not start[lora_b].any() and q_proj.lora_B["default"].weight.abs().sum() > 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    adapted = last_logits(model, tokenizer)
    # the trained adapter, reloaded (4-bit kernels round a little differently in training: 5e-4 measured; the adapter
    # itself moves these logits by ~0.9)
    torch.testing.assert_close(adapted, record["end_logits"], atol=5e-3, rtol=0)
    with model.disable_adapter():
        assert (adapted - last_logits(model, tokenizer)).abs().max() > 1e-3  # it changes what the 4-bit model says
    series = checkpoint_losses(tmp_path / "out")
    assert series[-1] < series[0]


def test_merge_gives_a_checkpoint_that_loads_without_peft(tmp_path, tiny_llama_chat_dir, synth_dir):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    recipe = sft_recipe(tmp_path, tiny_llama_chat_dir, synth_dir, max_steps=2, save_strategy="no")
    sft_main([str(recipe)])
    result = subprocess.run([sys.executable, "-m", "hfllm", "merge", str(tmp_path / "out"), str(tmp_path / "merged")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    adapted = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "merged" / "chat_template.jinja").exists()
    again = subprocess.run([sys.executable, "-m", "hfllm", "merge", str(tmp_path / "out"), str(tmp_path / "merged")],
                           capture_output=True, text=True)
    assert again.returncode == 2 and "is not empty; choose a new folder" in again.stderr and "Traceback" not in again.stderr


# ----------------------------------------------------------------------------- bad input


def test_dataset_without_messages_fails_before_writing(tmp_path, tiny_llama_chat_dir, synth_dir):
    recipe = sft_recipe(tmp_path, tiny_llama_chat_dir, synth_dir, datasets=[{"path": str(synth_dir / "prompts.jsonl"), "columns": ["answer"]}])
    with pytest.raises(HfllmError, match=r"columns \['answer'\] but sft needs messages \| prompt\+completion \| text"):
        sft_main([str(recipe)])
    assert not (tmp_path / "out").exists()


def test_non_alternating_roles_fail(tmp_path, tiny_llama_chat_dir):
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}]
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = sft_recipe(tmp_path, tiny_llama_chat_dir, tmp_path, datasets=[{"path": str(tmp_path / "bad.jsonl")}])
    with pytest.raises(HfllmError, match=r"training row 0 has roles \['user', 'user'\] which do not alternate"):
        sft_main([str(recipe)])
    assert not (tmp_path / "out").exists()


def test_empty_dataset_after_filtering_fails(tmp_path, tiny_llama_chat_dir):
    (tmp_path / "empty.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    recipe = sft_recipe(tmp_path, tiny_llama_chat_dir, tmp_path, datasets=[{"path": str(tmp_path / "empty.jsonl")}])
    with pytest.raises(HfllmError, match=r"the training dataset is empty after filtering \(1 rows, none with non-empty messages\)"):
        sft_main([str(recipe)])


def test_assistant_only_loss_without_markers_fails(tmp_path, tiny_llama_chat_dir, synth_dir):
    recipe = sft_recipe(tmp_path, tiny_llama_chat_dir, synth_dir, chat_template=None)  # the model's own: no markers
    with pytest.raises(HfllmError, match=r"set `chat_template: smollm2`"):
        sft_main([str(recipe)])
    assert not (tmp_path / "out").exists()


def test_load_in_4bit_without_bitsandbytes_fails(tmp_path, tiny_llama_chat_dir, synth_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    recipe = sft_recipe(tmp_path, tiny_llama_chat_dir, synth_dir, load_in_4bit=True)
    with pytest.raises(HfllmError, match=r"need bitsandbytes, which is not installed; run `pip install 'hfllm\[qlora\]'`"):
        sft_main([str(recipe)])
    assert not (tmp_path / "out").exists()


def test_merge_refuses_prompt_learning_adapters(tmp_path, tiny_llama_chat_dir, synth_dir):
    from hfllm.training.adapters import merge_main

    recipe = sft_recipe(tmp_path, tiny_llama_chat_dir, synth_dir, peft_type="prefix", num_virtual_tokens=4, max_steps=1,
                        save_strategy="no", assistant_only_loss=False)
    sft_main([str(recipe)])
    with pytest.raises(HfllmError, match="is a PREFIX_TUNING adapter, which adds virtual tokens and cannot be merged"):
        merge_main([str(tmp_path / "out"), str(tmp_path / "merged")], prog="hfllm merge")
    assert not (tmp_path / "merged").exists()
