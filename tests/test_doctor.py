"""`hfllm doctor` (hfllm/diagnostics/): it passes on a healthy tiny recipe, and each check fails on something broken on
purpose (a leaking mask, unshifted labels, a tokenizer that drops newlines, overlapping splits, unseeded runs, ...)."""

import tempfile

import pytest
import torch
from helpers import CORPUS, TINY, write_recipe
from tokenizers import normalizers, processors
from transformers import AutoModelForCausalLM

from hfllm import diagnostics as doctor
from hfllm.diagnostics import data_checks, model_checks, subjects
from hfllm.cli import main as cli

# validation text in the train text's characters (the char tokenizer knows them all), but no passage of it in train
VALIDATION = "All:\nYou are resolved to speak further.\n\nFirst Citizen:\nRather die than famish, hear me.\n\n" * 4


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    yield


def tiny_recipe(folder, validation: str = VALIDATION) -> list[str]:
    """`hfllm doctor` arguments: a pretraining recipe on local files, at the test suite's tiny size."""
    train, valid = folder / "train.txt", folder / "validation.txt"
    train.write_text(CORPUS * 40, encoding="utf-8")
    valid.write_text(validation, encoding="utf-8")
    recipe = write_recipe(folder / "recipe.yaml", {"model": "llama-tiny", "max_steps": 100, "seed": 3})
    return [str(recipe), *TINY, "--dataset", "null", "--train_files", str(train), "--validation_files", str(valid)]


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    return subjects.pretraining_subject(tiny_recipe(tmp_path_factory.mktemp("doctor")), "hfllm doctor")


def test_doctor_passes_on_a_tiny_recipe(tmp_path, capsys):
    assert cli(["doctor", *tiny_recipe(tmp_path)]) == 0
    out = capsys.readouterr().out
    table = out[out.index("\ncheck "):]
    for name in ("loss at init", "causal mask", "label shift", "overfit one batch", "seeded runs bitwise equal",
                 "checkpoint resume exact", "round trip", "newlines preserved", "BOS/EOS rules",
                 "special tokens distinct", "unused tokens", "unknown tokens", "contamination", "chat template"):
        assert name in table
    assert "FAIL" not in table and "14 of 14 checks passed" in out


def test_contaminated_recipe_exits_with_the_doctor_code(tmp_path, capsys):
    assert cli(["doctor", *tiny_recipe(tmp_path, validation=CORPUS * 4)]) == doctor.EXIT_FAILED
    out = capsys.readouterr().out
    assert "failed: train/validation contamination" in out


# ----------------------------------------------------------------------------- model checks


def test_causal_mask_leak_fails(subject):
    assert model_checks.check_causal_mask(subject.new_model(), subject.batch).status == "pass"

    def full_attention(module, args, kwargs):  # every position sees every other: the future leaks
        batch, length = kwargs["input_ids"].shape
        no_mask = torch.zeros(batch, 1, length, length)
        return args, {**kwargs, "attention_mask": {kind: no_mask for kind in module.config.layer_types}}

    model = subject.new_model()
    model.model.register_forward_pre_hook(full_attention, with_kwargs=True)  # the decoder is given this mask
    check = model_checks.check_causal_mask(model, subject.batch)
    assert check.status == "FAIL", check


def test_label_shift_bug_fails(subject):
    model = subject.new_model()
    assert model_checks.check_label_shift(model, subject.batch).status == "pass"

    def unshifted(logits, labels, vocab_size, **kwargs):  # scores each position on its own token
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size).float(), labels.reshape(-1))

    model.loss_function = unshifted
    check = model_checks.check_label_shift(model, subject.batch)
    assert check.status == "FAIL" and check.measured.startswith("copy-input loss 0.00"), check


def test_init_loss_far_from_uniform_fails(subject):
    model = subject.new_model()
    assert model_checks.check_init_loss(model, subject.batch, subject.config.vocab_size).status == "pass"
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(300)  # confident random logits at init
    assert model_checks.check_init_loss(model, subject.batch, subject.config.vocab_size).status == "FAIL"


def test_overfit_fails_when_nothing_learns(subject):
    assert model_checks.check_overfit(subject.new_model(), subject.batch, steps=60).status == "pass"
    assert model_checks.check_overfit(subject.new_model(), subject.batch, steps=60, lr=0.0).status == "FAIL"


def test_unseeded_runs_fail_reproducibility(subject, tmp_path):
    def unseeded():  # built from wherever the RNG is, as a run without set_seed would be
        return AutoModelForCausalLM.from_config(subject.config)

    check = model_checks.check_reproducible(subject.train(str(tmp_path / "a"), None, unseeded()),
                                      subject.train(str(tmp_path / "b"), None, unseeded()))
    assert check.status == "FAIL" and "max |Δw| 0 " not in check.measured + " ", check


def test_resume_without_optimizer_state_fails(subject, monkeypatch, tmp_path):
    full = subject.train(str(tmp_path / "a"), None)
    resumed = subject.train(str(tmp_path / "b"), str(tmp_path / "a" / f"checkpoint-{subjects.STEPS // 2}"))
    assert model_checks.check_resume(full, resumed).status == "pass"
    from transformers import Trainer

    monkeypatch.setattr(Trainer, "_load_optimizer_and_scheduler", lambda self, checkpoint: None)  # fresh Adam moments
    resumed = subject.train(str(tmp_path / "c"), str(tmp_path / "a" / f"checkpoint-{subjects.STEPS // 2}"))
    assert model_checks.check_resume(full, resumed).status == "FAIL"


# ----------------------------------------------------------------------------- tokenizer and data checks


def fresh_tokenizer(subject):
    return subject.tokenizer.__class__(tokenizer_object=subject.tokenizer.backend_tokenizer.__class__.from_str(
        subject.tokenizer.backend_tokenizer.to_str()), **{k: getattr(subject.tokenizer, k) for k in
        ("bos_token", "eos_token", "pad_token", "unk_token")})


def test_tokenizer_that_drops_newlines_fails(subject):
    tokenizer = fresh_tokenizer(subject)
    texts = subject.validation_texts
    assert data_checks.check_newlines(tokenizer, texts[0]).status == data_checks.check_round_trip(tokenizer, texts).status == "pass"
    tokenizer.backend_tokenizer.normalizer = normalizers.Replace("\n", " ")
    assert data_checks.check_newlines(tokenizer, texts[0]).status == "FAIL"
    assert data_checks.check_round_trip(tokenizer, texts).status == "FAIL"


def test_tokenizer_that_appends_eos_breaks_the_bos_eos_rules(subject):
    tokenizer = fresh_tokenizer(subject)
    texts = subject.validation_texts
    assert data_checks.check_bos_eos(tokenizer, texts).status == "pass"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A <|endoftext|>", special_tokens=[("<|bos|>", 1), ("<|endoftext|>", 2)])
    check = data_checks.check_bos_eos(tokenizer, texts)
    assert check.status == "FAIL" and "eos inside 1/1 documents" in check.measured, check


def test_special_tokens_sharing_an_id_fail(subject):
    tokenizer = fresh_tokenizer(subject)
    assert data_checks.check_special_tokens(tokenizer).status == "pass"
    tokenizer.bos_token = tokenizer.eos_token
    assert data_checks.check_special_tokens(tokenizer).status == "FAIL"


def test_unknown_and_unused_tokens(subject):
    tokenizer = subject.tokenizer
    used, unknown = data_checks.check_vocabulary(tokenizer, subject.train_texts, trained_on_texts=True)
    assert used.status == unknown.status == "pass"
    used, unknown = data_checks.check_vocabulary(tokenizer, ["All:\n" * 50 + "ĀāĂ"], trained_on_texts=True)
    assert used.status == "FAIL" and unknown.status == "FAIL"  # most characters unused; 3 of ~250 unknown


def test_overlapping_splits_fail():
    plays = [" ".join(f"word{i}x{j}" for j in range(200)) for i in range(6)]
    assert data_checks.contamination(plays[:4], plays[4:]) == (0, 0)
    assert data_checks.contamination(plays[:4], [plays[1].upper()]) == (1, 0)  # same text, other case: exact
    edited = plays[2].replace("word2x50 ", "changed ").replace("word2x150 ", "edited ")
    assert data_checks.contamination(plays[:4], [edited, plays[5]]) == (0, 1)  # two words changed: near-duplicate
    assert data_checks.check_contamination(plays[:4], [edited]).status == "FAIL"


def test_chat_template_must_mask_the_assistant_turns(subject):
    from helpers import chat_bpe_tokenizer

    from hfllm.data.tokenizer import chatml_template

    chat = chat_bpe_tokenizer()  # SmolLM2's template: no {% generation %} markers
    assert data_checks.check_chat_template(chat, required=True, assistant_only_loss=True).status == "FAIL"
    assert data_checks.check_chat_template(chat, required=True, assistant_only_loss=False).status == "pass"
    chat.chat_template = chatml_template()  # markers around each reply and its <|im_end|>
    assert data_checks.check_chat_template(chat, required=True, assistant_only_loss=True).status == "pass"
    chat.chat_template = chat.chat_template.replace("{% generation %}{{- message['content'] + '<|im_end|>' -}}",
                                                    "{{- message['content'] -}}{% generation %}{{- '<|im_end|>' -}}")
    assert data_checks.check_chat_template(chat, required=True, assistant_only_loss=True).status == "FAIL"


# ----------------------------------------------------------------------------- fine-tuning data: trained tokens per role
# The shapes of three stock templates (structure, roles and special text as shipped; no {% generation %} markers,
# as shipped): with assistant_only_loss their assistant mask is all zeros, the silent failure users report.

LLAMA_3_1 = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN3 = (
    "{%- for message in messages %}{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
GEMMA = (  # no system role: the system text opens the first user turn; the assistant is "model"
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


@pytest.mark.parametrize("template", [LLAMA_3_1, QWEN3, GEMMA], ids=["llama-3.1", "qwen3", "gemma"])
def test_stock_templates_train_nothing_with_assistant_only_loss(template):
    from helpers import chat_bpe_tokenizer

    from hfllm.data.chat_template import PROBE

    chat = chat_bpe_tokenizer()
    chat.chat_template = template
    check = data_checks.check_trained_roles(chat, [PROBE], assistant_only_loss=True)
    assert check.status == "FAIL" and check.measured.startswith("0% of") and "nothing trains" in check.measured


def test_markers_around_the_replies_pass_and_around_user_turns_fail():
    """Gemma with markers around each reply and its <end_of_turn> trains exactly the replies (the system text inside
    the first user turn is attributed to the system); Qwen3 with markers around the whole loop trains every role."""
    from helpers import chat_bpe_tokenizer

    from hfllm.data.chat_template import PROBE

    chat = chat_bpe_tokenizer()
    chat.chat_template = GEMMA.replace(
        "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}",
        "{%- if role == 'model' -%}{% generation %}{{ message['content'] | trim }}{{ '<end_of_turn>' }}"
        "{% endgeneration %}{{ '\\n' }}{%- else -%}{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}{%- endif -%}")
    roles = data_checks.trained_tokens_per_role(chat, PROBE, assistant_only_loss=True)
    assert roles["assistant"][0] == roles["assistant"][1] > 0  # every reply token
    assert roles["user"][0] == roles["system"][0] == 0 < roles["user"][1] and roles["system"][1] > 0
    assert 0 < roles["template"][0] < roles["template"][1]  # <end_of_turn> after the replies, no headers
    assert data_checks.check_trained_roles(chat, [PROBE], assistant_only_loss=True).status == "pass"

    chat.chat_template = "{% generation %}" + QWEN3.replace("{%- if add_generation_prompt", "{% endgeneration %}{%- if add_generation_prompt")
    check = data_checks.check_trained_roles(chat, [PROBE], assistant_only_loss=True)
    assert check.status == "FAIL" and "trains system and user tokens" in check.measured
    chat.chat_template = chatml()  # hfllm's own template, right markers, but the recipe trains every token
    assert data_checks.check_trained_roles(chat, [PROBE], assistant_only_loss=True).status == "pass"
    assert data_checks.check_trained_roles(chat, [PROBE], assistant_only_loss=False).status == "FAIL"


def chatml() -> str:
    from hfllm.data.tokenizer import chatml_template

    return chatml_template()


# ----------------------------------------------------------------------------- decontamination against eval tasks


def test_eval_items_in_training_data_are_listed():
    """Exact (a question copied into a rendered chat, other case and punctuation) and 13-gram (a passage edited and
    embedded in a longer document) overlaps are listed by task and index; clean data lists nothing."""
    passage = " ".join(f"w{i}" for i in range(40))
    items = {"qa": ["What is 17 plus 25?", "Name the capital of France."], "ppl": [passage, "a b c"]}
    clean = ["<|im_start|>user\nWhat is 17 plus 26?<|im_end|>", "unrelated text " * 20]
    assert data_checks.eval_overlap(clean, items) == []
    copied = clean + ["<|im_start|>user\nwhat is 17 PLUS 25<|im_end|>\n<|im_start|>assistant\n42<|im_end|>",
                      "prefix " * 30 + passage.replace("w20", "changed") + " suffix"]
    assert [(task, index, kind) for task, index, kind, _ in data_checks.eval_overlap(copied, items)] == [
        ("qa", 0, "exact"), ("ppl", 0, "13-gram")]


def test_check_against_a_recipes_eval_tasks(tmp_path):
    """The recipe names hfllm_synth: clean training chats pass; one of its items copied in fails, listed."""
    from hfllm.evaluation.harness import load_tasks

    [task] = load_tasks(["hfllm_synth"])
    question = data_checks.eval_items(task)[5]
    recipe = write_recipe(tmp_path / "recipe.yaml", {"model_name_or_path": "m", "eval_tasks": ["hfllm_synth"]})
    tasks = data_checks.recipe_eval_tasks(str(recipe))
    train = [f"<|im_start|>user\nSay the word {word}.<|im_end|>" for word in ("alpha", "beta", "gamma")]
    assert data_checks.check_eval_contamination(train, tasks).status == "pass"
    check = data_checks.check_eval_contamination(train + [f"<|im_start|>user\n{question}<|im_end|>"], tasks)
    assert check.status == "FAIL" and check.measured.startswith("1 exact, 0 13-gram of 200 items of hfllm_synth")
    assert f"hfllm_synth[5] exact: {question[:60]!r}" in check.measured
    assert data_checks.check_eval_contamination(train, None).status == "info"


# ----------------------------------------------------------------------------- SFT recipes and model folders


def test_sft_recipe_passes_with_lora_and_assistant_masks(tmp_path, tiny_llama_chat_dir, synth_dir):
    from helpers import adaptation_recipe

    recipe = adaptation_recipe(tmp_path, tiny_llama_chat_dir, synth_dir / "sft.jsonl", chat_template="chatml",
                               assistant_only_loss=True, max_length=64, test_split_size=0.25, eval_strategy="epoch")
    subject = subjects.subject_for([str(recipe)], "hfllm doctor")
    assert subject.chat and subject.assistant_only_loss and subject.batch["labels"].eq(-100).any()
    checks = {check.name: check for check in doctor.run_checks(subject, say=lambda line: None)}
    assert [check for check in checks.values() if check.status == "FAIL"] == []
    assert checks["chat template"].status == "pass" and "exactly the replies" in checks["chat template"].measured
    assert checks["trained tokens per role"].status == "pass" and "user 0% of" in checks["trained tokens per role"].measured
    with tempfile.TemporaryDirectory() as scratch:  # the check's mask is the one TRL's prepared labels hold
        prepared = subject.trainer(scratch).train_dataset[0]
    trl_trained = [label != -100 for label in prepared["labels"]]
    assert trl_trained == data_checks.trained_mask(subject.tokenizer, subject.conversations[0], True)[:len(trl_trained)]
    assert 0 < sum(trl_trained) < len(trl_trained)
    assert not (tmp_path / "out").exists()  # nothing written where the recipe's run would go


def test_model_folder_of_a_pretraining_run(tmp_path, capsys):
    """MODEL_DIR with the recipe.yaml of its run: the recipe's data, the folder's tokenizer and architecture, and the
    causal-mask and label checks on the trained weights themselves."""
    from transformers import AutoTokenizer

    from hfllm.run_pretrain import main as pretrain

    run = tmp_path / "run"
    assert pretrain([*tiny_recipe(tmp_path), "--max_steps", "2", "--output_dir", str(run), "--eval_strategy", "no",
                     "--num_samples", "0"]) == 0
    subject = subjects.subject_for([str(run)], "hfllm doctor")
    assert subject.loaded_model is not None and subject.validation_texts == [VALIDATION.rstrip("\n") + "\n"]
    assert subject.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(run).get_vocab()
    assert cli(["doctor", str(run)]) == 0
    assert "14 of 14 checks passed" in capsys.readouterr().out


@pytest.mark.slow
def test_model_folder_without_a_recipe_uses_shakespeare(tiny_hfllm_shakespeare_dir, capsys):
    assert cli(["doctor", str(tiny_hfllm_shakespeare_dir)]) in (0, doctor.EXIT_FAILED)
    out = capsys.readouterr().out
    assert "causal mask (no future leak)" in out and "label shift" in out


def test_missing_base_model_is_one_line(tmp_path, synth_dir, capsys):
    from helpers import adaptation_recipe

    recipe = adaptation_recipe(tmp_path, tmp_path / "no-such-model", synth_dir / "sft.jsonl")
    assert cli(["doctor", str(recipe)]) == 2
    assert "no-such-model' does not exist" in capsys.readouterr().err
