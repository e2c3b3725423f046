"""Synthetic verifiable tasks: files, schemas, held-out separation, exact rewards; the SmolLM2 demo (slow)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_recipe

from hfllm.data.synth import read_jsonl, synth_main, synthesize
from hfllm.evaluation.exact_match import exact_match_reward, parse_answer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("task", ["arithmetic", "reverse", "units"])
def test_synth_writes_all_files_with_held_out_tests(tmp_path, task):
    assert synth_main([task, "--out", str(tmp_path), "--n-train", "40", "--n-test", "10"], prog="hfllm data synth") == 0
    sft, pref, kto, prompts, test = (read_jsonl(tmp_path / f"{n}.jsonl") for n in ("sft", "preference", "kto", "prompts", "test"))
    assert len(sft) == len(pref) == len(kto) == len(prompts) == 40 and len(test) == 10
    assert [m["role"] for m in sft[0]["messages"]] == ["user", "assistant"]
    assert set(pref[0]) == {"prompt", "chosen", "rejected"} and pref[0]["chosen"] != pref[0]["rejected"]
    assert {row["label"] for row in kto} == {True, False}
    assert set(test[0]) == {"prompt", "answer", "rejected"} and test[0]["answer"] != test[0]["rejected"]
    train_questions = {row["messages"][0]["content"] for row in sft}
    assert not train_questions & {row["prompt"] for row in test}


def test_answers_are_exact():
    rows = synthesize("arithmetic", 20, 5, seed=3)
    for row in rows["sft"]:
        a, b = map(int, row["messages"][0]["content"].removeprefix("What is ").split("?")[0].split(" + "))
        assert row["messages"][1]["content"] == str(a + b)
    reverse = synthesize("reverse", 5, 1, seed=0)["sft"][0]["messages"]
    assert reverse[0]["content"].split("'")[1][::-1] == reverse[1]["content"]


def test_parse_answer_and_reward():
    assert [parse_answer(t) for t in ["59 + 63 = 122", " 122.\nmore", "'abc'", ""]] == ["122", "122", "abc", ""]
    completions = [[{"role": "assistant", "content": "122"}], [{"role": "assistant", "content": "12"}]]
    assert exact_match_reward(completions, answer=["122", "122"]) == [1.0, 0.0]


@pytest.mark.usefixtures("single_thread")
def test_chat_exact_match_counts_the_models_own_greedy_answers(tiny_llama_chat_dir):
    """Items answered with what the model greedy-generates (computed here, one prompt at a time, without padding)
    score 1 and items answered otherwise 0, so the scorer's batched, left-padded generation must agree exactly."""
    import torch

    from hfllm.checkpoint import load
    from hfllm.evaluation.exact_match import chat_exact_match

    model, tokenizer = load(str(tiny_llama_chat_dir))
    prompts = ["What is 2 + 2?", "Reverse 'stone'.", "What is 17 + 25?", "How many metres are in 3 km?"]
    greedy = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]  # (1, T)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        greedy.append(parse_answer(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)))
    assert all(greedy)  # the random model says something for each prompt
    items = [{"prompt": prompt, "answer": answer if i % 2 == 0 else answer + " (not this)"}
             for i, (prompt, answer) in enumerate(zip(prompts, greedy))]
    assert chat_exact_match(model, tokenizer, items) == 0.5  # one left-padded batch of four
    assert chat_exact_match(model, tokenizer, items[:1]) == 1.0 and chat_exact_match(model, tokenizer, items[1:2]) == 0.0


def test_unknown_task_fails_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "hfllm", "data", "synth", "sorting", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "hfllm data: error: unknown synth task 'sorting'; choose from: arithmetic, reverse, units"
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_smollm2_sft_then_dpo_shortened(tmp_path, smollm2_hfllm_dir):
    """The demo in small, on held-out items: SFT raises exact match clearly; DPO keeps it and the preference accuracy
    and widens the log-likelihood margin of the answer over the corrupted one."""
    import yaml

    from hfllm.checkpoint import load
    from hfllm.evaluation.exact_match import score_file
    from hfllm.run_dpo import main as dpo_main
    from hfllm.run_sft import main as sft_main

    data = tmp_path / "data"
    synth_main(["arithmetic", "--out", str(data), "--n-train", "400", "--n-test", "60"], prog="hfllm data synth")
    before = score_file(*load(str(smollm2_hfllm_dir)), str(data / "test.jsonl"), None)
    for name in ("sft", "dpo"):  # the recipes' data paths point at runs/smollm2_demo: use copies pointing at this test's data
        recipe = yaml.safe_load((ROOT / "recipes" / name / "smollm2_synth_lora.yaml").read_text())
        recipe["datasets"][0]["path"] = str(data / ("sft.jsonl" if name == "sft" else "preference.jsonl"))
        write_recipe(tmp_path / f"{name}.yaml", recipe)
    common = ["--exact_match_file", str(data / "test.jsonl"), "--report_to", "none", "--save_strategy", "no"]
    assert sft_main([str(tmp_path / "sft.yaml"), "--model_name_or_path", str(smollm2_hfllm_dir), "--max_steps", "40",
                     "--output_dir", str(tmp_path / "sft"), *common]) == 0
    subprocess.run([sys.executable, "-m", "hfllm", "merge", str(tmp_path / "sft"), str(tmp_path / "merged"), "--base", str(smollm2_hfllm_dir)], check=True)
    assert dpo_main([str(tmp_path / "dpo.yaml"), "--model_name_or_path", str(tmp_path / "merged"), "--max_steps", "25",
                     "--eval_strategy", "no", "--output_dir", str(tmp_path / "dpo"), *common]) == 0
    after_sft = json.loads((tmp_path / "sft" / "chat_exact_match.json").read_text())
    after_dpo = json.loads((tmp_path / "dpo" / "chat_exact_match.json").read_text())
    print(f"before SFT {before}\nafter SFT {after_sft}\nafter DPO {after_dpo}")
    assert after_sft["chat_exact_match"] >= before["chat_exact_match"] + 0.3  # SmolLM2 answers "a + b = c" at length, ~0.0 before
    assert after_dpo["chat_exact_match"] >= after_sft["chat_exact_match"]
    # measured: preference accuracy 0.967 -> 0.967 (2 of 60 items stay wrong) while the logp margin rose 5.85 -> 7.23;
    # a strict rise is not reached in 25 DPO steps, so this asserts "not lower" plus a wider margin
    assert after_dpo["preference_accuracy"] >= after_sft["preference_accuracy"]
    assert after_dpo["logp_margin"] > after_sft["logp_margin"]
