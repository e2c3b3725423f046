"""Evaluation: offline tasks, lm-eval parity, perplexity, metrics, reports, the training callback, bad input."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import sacrebleu
import torch
from helpers import write_recipe

from hfllm.errors import HfllmError
from hfllm.checkpoint import load
from hfllm.evaluation import evaluate_model, scores, strided_perplexity
from hfllm.evaluation.run import main
from hfllm.evaluation.tasks import next_line_items, shakespeare_passages, synth_data
from hfllm.evaluation.metrics import load_metric

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("single_thread")


def run_cli(*args: str, module: str = "hfllm") -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, env=env)


# ---------------------------------------------------------------- task data


def test_task_data_is_built_deterministically_from_the_validation_plays():
    passages = shakespeare_passages()
    assert len(passages) == 306 and max(map(len, passages)) <= 2001
    assert passages[0].startswith("Julius Caesar") and passages == shakespeare_passages()
    items = next_line_items()
    assert len(items) == 500 and items == next_line_items()
    for item in items[:50]:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert item["context"].split("\n")[0].endswith(":")  # the speaker opens the context
    assert [items[i]["label"] for i in range(200)].count(0) in range(30, 71)  # gold position is spread out
    builtin = synth_data()["test"]  # the held-out items of `hfllm data synth arithmetic --seed 0`
    assert len(builtin) == 200 and builtin[0] == synth_data()["test"][0] and builtin[0]["answer"]


def test_synth_data_accepts_prompt_or_messages_and_rejects_bad_rows(tmp_path):
    (tmp_path / "test.jsonl").write_text(
        json.dumps({"prompt": "Reverse 'abc'.", "answer": "cba", "rejected": "bca"}) + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}) + "\n"
    )
    rows = synth_data(str(tmp_path))["test"].to_list()
    assert rows == [{"prompt": "Reverse 'abc'.", "answer": "cba"}, {"prompt": "2+2?", "answer": "4"}]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "2+2?"}) + "\n")
    with pytest.raises(HfllmError, match=r"bad.jsonl:1: a synth item needs 'prompt' .* found keys \['question'\]"):
        synth_data(str(tmp_path / "bad.jsonl"))
    with pytest.raises(HfllmError, match="synth data 'nowhere' not found; give a .jsonl file or a folder with test.jsonl"):
        synth_data("nowhere")


# ---------------------------------------------------------------- metrics


def test_local_metric_modules_load_offline_and_match_sacrebleu_and_rouge():
    predictions, references = ["the cat sat on the mat", "a dog barks"], [["the cat is on the mat"], ["a dog barks"]]
    bleu = load_metric("bleu").compute(predictions=predictions, references=references)
    assert bleu["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [[r[0] for r in references]]).score)
    chrf = load_metric("chrf").compute(predictions=predictions, references=references)
    assert chrf["score"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [[r[0] for r in references]]).score)
    rouge = load_metric("rouge").compute(predictions=["the cat sat on the mat"], references=["the cat is on the mat"])
    assert rouge["rouge1"] == pytest.approx(5 / 6) and rouge["rouge2"] == pytest.approx(3 / 5)
    exact = load_metric("exact_match").compute(predictions=["19", "Ab"], references=["19", "ab"])
    assert exact["exact_match"] == 0.5
    assert load_metric("exact_match").compute(predictions=["Ab"], references=["ab"], ignore_case=True)["exact_match"] == 1.0
    with pytest.raises(HfllmError, match="unknown metric 'meteor'; choose from: bleu, chrf, rouge, exact_match"):
        load_metric("meteor")


# ---------------------------------------------------------------- correctness


def test_per_sample_loglikelihoods_equal_lm_eval_cli(tiny_llama_shakespeare_dir, tmp_path):
    """hfllm's in-process path and `lm_eval --model hf --model_args pretrained=DIR` give identical numbers."""
    tasks = "hfllm_shakespeare_next_line,hfllm_shakespeare_ppl"
    cli = run_cli("--model", "hf", "--model_args", f"pretrained={tiny_llama_shakespeare_dir}", "--device", "cpu", "--tasks", tasks,
                  "--include_path", str(ROOT / "hfllm" / "evaluation" / "tasks"), "--limit", "3", "--log_samples",
                  "--output_path", str(tmp_path), module="lm_eval")
    assert cli.returncode == 0, cli.stderr[-2000:]
    model, tokenizer = load(str(tiny_llama_shakespeare_dir))
    ours = evaluate_model(model, tokenizer, tasks.split(","), limit=3, log_samples=True)["samples"]
    for task in tasks.split(","):
        [path] = tmp_path.rglob(f"samples_{task}_*.jsonl")
        theirs = {row["doc_id"]: row["resps"] for row in map(json.loads, path.read_text().splitlines())}
        mine = {row["doc_id"]: as_strings(row["resps"]) for row in ours[task]}  # lm-eval logs str(float): exact
        assert len(mine) == 3 and mine == theirs
        assert all(re.fullmatch(r"-\d+\.\d+", resp[0][0] if task.endswith("line") else resp[0]) for resps in mine.values() for resp in resps)


def as_strings(value):
    return [as_strings(item) for item in value] if isinstance(value, (list, tuple)) else str(value)


def next_line_accuracy(samples: list[dict]) -> float:
    """Share of logged documents whose gold line has the highest log-likelihood of the four choices."""
    best = [max(range(len(row["resps"])), key=lambda i: float(row["resps"][i][0][0])) for row in samples]
    return sum(choice == int(row["target"]) for choice, row in zip(best, samples)) / len(samples)


def test_next_line_accuracy_is_the_share_of_documents_whose_gold_line_scores_highest(tiny_llama_shakespeare_dir):
    model, tokenizer = load(str(tiny_llama_shakespeare_dir))
    results = evaluate_model(model, tokenizer, ["hfllm_shakespeare_next_line"], limit=10, log_samples=True)
    samples = results["samples"]["hfllm_shakespeare_next_line"]
    expected = next_line_accuracy(samples)
    assert len(samples) == 10 and 0 < expected < 1  # some documents right, some wrong: the value says which
    assert scores(results)["hfllm_shakespeare_next_line"]["acc"] == pytest.approx(expected)


def test_strided_perplexity_matches_lm_eval_rolling(tiny_llama_shakespeare_dir):
    model, tokenizer = load(str(tiny_llama_shakespeare_dir))
    results = evaluate_model(model, tokenizer, ["hfllm_shakespeare_ppl"], limit=2)
    lm_eval = scores(results)["hfllm_shakespeare_ppl"]
    texts = shakespeare_passages()[:2]
    exact = strided_perplexity(model, tokenizer, texts, max_length=512)  # lm-eval's windows: max_length 512
    assert exact["byte_perplexity"] == pytest.approx(lm_eval["byte_perplexity"], rel=1e-5)
    assert exact["word_perplexity"] == pytest.approx(lm_eval["word_perplexity"], rel=1e-5)
    strided = strided_perplexity(model, tokenizer, texts, max_length=512, stride=128)  # more context per token
    assert strided["byte_perplexity"] == pytest.approx(lm_eval["byte_perplexity"], rel=0.01)
    assert strided["tokens"] == exact["tokens"] > 512
    assert strided["bits_per_byte"] == pytest.approx(math.log2(strided["byte_perplexity"]))


# ---------------------------------------------------------------- CLI, reports, recipes


def test_offline_suite_on_two_models_writes_json_markdown_chart_and_samples(tiny_llama_shakespeare_dir, tmp_path, capsys):
    out = tmp_path / "report"
    main([str(tiny_llama_shakespeare_dir), str(tiny_llama_shakespeare_dir), "--tasks", "hfllm_offline", "--limit", "2",
          "--apply_chat_template", "--output_path", str(out), "--log_samples"])
    report = json.loads((out / "results.json").read_text())
    assert [run["name"] for run in report["models"]] == [f"{tiny_llama_shakespeare_dir.name}-0", f"{tiny_llama_shakespeare_dir.name}-1"]
    first = report["models"][0]
    assert first["chat_template_applied"] is True and first["scores"] == report["models"][1]["scores"]
    assert set(first["scores"]) == {"hfllm_shakespeare_ppl", "hfllm_shakespeare_next_line", "hfllm_synth"}
    ppl = first["scores"]["hfllm_shakespeare_ppl"]
    assert 1 < ppl["byte_perplexity"] and ppl["bits_per_byte"] == pytest.approx(math.log2(ppl["byte_perplexity"]))
    next_line = [json.loads(row) for row in (out / f"samples_{tiny_llama_shakespeare_dir.name}-0_hfllm_shakespeare_next_line.jsonl").read_text().splitlines()]
    assert first["scores"]["hfllm_shakespeare_next_line"]["acc"] == next_line_accuracy(next_line)
    assert first["scores"]["hfllm_synth"]["sample_len"] == 2
    table = (out / "results.md").read_text()
    assert table == capsys.readouterr().out.split("\n\nwrote")[0].rstrip() + "\n"
    assert f"| task | metric | {tiny_llama_shakespeare_dir.name}-0 (chat template) |" in table
    assert re.search(r"\| hfllm_shakespeare_ppl \| byte_perplexity ↓ \| [\d.]+ \|", table)
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    samples = (out / f"samples_{tiny_llama_shakespeare_dir.name}-0_hfllm_synth.jsonl").read_text().splitlines()
    assert len(samples) == 2 and "<|im_start|>user" in json.loads(samples[0])["arguments"][0][0]


def test_recipe_runs_through_eval_and_rejects_unknown_keys(tiny_llama_shakespeare_dir, tmp_path):
    from hfllm.evaluation.run import main as run_eval

    recipe = write_recipe(tmp_path / "eval.yaml", {"models": [str(tiny_llama_shakespeare_dir)], "tasks": ["hfllm_synth"],
                                                    "limit": 1, "output_path": str(tmp_path / "o")})
    assert run_eval([str(recipe)]) == 0
    assert not (tmp_path / "o" / "results.png").exists()  # one model: no chart
    assert json.loads((tmp_path / "o" / "results.json").read_text())["config"]["limit"] == 1
    write_recipe(recipe, {"models": ["x"], "tasks": ["hfllm_synth"], "limits": 3})
    with pytest.raises(HfllmError, match=r"^unknown key 'limits' in recipe '.*eval.yaml' \(did you mean 'limit'\?\)$"):
        run_eval([str(recipe)])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "recipes" / "eval").glob("*.yaml")))
def test_shipped_eval_recipes_run_at_tiny_size(name, tiny_llama_shakespeare_dir, tmp_path):
    """Each shipped recipe runs with its own tasks and flags; only the models, limit and output folder change."""
    from hfllm.evaluation.run import main as run_eval

    recipe = yaml.safe_load((ROOT / "recipes" / "eval" / name).read_text())
    recipe.update(models=[str(tiny_llama_shakespeare_dir)] * len(recipe["models"]), limit=1, output_path=str(tmp_path / "o"))
    assert run_eval([str(write_recipe(tmp_path / name, recipe))]) == 0
    assert (tmp_path / "o" / "results.json").is_file()


# ---------------------------------------------------------------- kinds of MODEL


def test_hfllm_checkpoint_evaluates_without_trust_remote_code(tiny_hfllm_shakespeare_dir, tmp_path):
    """Importing hfllm (as `hfllm eval` does) registers its classes, which load the folder: the auto_map that
    `save_pretrained` writes for hfllm-less machines is not used, so no trust_remote_code prompt (it would raise
    here, stdin being closed)."""
    from hfllm import HfllmForCausalLM

    assert "auto_map" in json.loads((tiny_hfllm_shakespeare_dir / "config.json").read_text())
    main([str(tiny_hfllm_shakespeare_dir), "--tasks", "hfllm_shakespeare_next_line", "--limit", "2", "--output_path", str(tmp_path)])
    [run] = json.loads((tmp_path / "results.json").read_text())["models"]
    assert run["architecture"] == "HfllmForCausalLM"
    model, tokenizer = load(str(tiny_hfllm_shakespeare_dir))
    assert type(model) is HfllmForCausalLM  # hfllm's own class, not a copy loaded from the folder's .py files
    expected = scores(evaluate_model(model, tokenizer, ["hfllm_shakespeare_next_line"], limit=2))
    assert run["scores"] == expected and expected["hfllm_shakespeare_next_line"]["sample_len"] == 2


def test_adapter_folder_is_merged_into_its_base(tiny_llama_shakespeare_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base, tokenizer = load(str(tiny_llama_shakespeare_dir))
    torch.manual_seed(0)  # init_lora_weights=False: a random, non-zero update, so the adapter changes the outputs
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")  # adapter_config.json names tiny_llama_shakespeare_dir as the base; no tokenizer
    ids = tokenizer("To be, or not to be, that is the question.", return_tensors="pt").input_ids  # (1, T)
    with torch.no_grad():
        expected = lora(ids).logits  # (1, T, V)
        with lora.disable_adapter():
            plain = lora(ids).logits
    merged, merged_tokenizer = load(str(tmp_path / "adapter"), merge_adapter=True)
    assert type(merged).__name__ == "LlamaForCausalLM" and merged_tokenizer.get_vocab() == tokenizer.get_vocab()
    with torch.no_grad():
        got = merged(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the adapter really was applied
    main([str(tmp_path / "adapter"), str(tiny_llama_shakespeare_dir), "--tasks", "hfllm_shakespeare_ppl", "--limit", "1",
          "--output_path", str(tmp_path / "out")])
    adapted, original = json.loads((tmp_path / "out" / "results.json").read_text())["models"]
    assert adapted["scores"]["hfllm_shakespeare_ppl"] != original["scores"]["hfllm_shakespeare_ppl"]
    with torch.no_grad():
        lora_scores = scores(evaluate_model(lora, tokenizer, ["hfllm_shakespeare_ppl"], limit=1))
    assert adapted["scores"]["hfllm_shakespeare_ppl"]["bits_per_byte"] == pytest.approx(
        lora_scores["hfllm_shakespeare_ppl"]["bits_per_byte"], rel=1e-5)


def test_gguf_file_scores_like_the_folder_it_was_written_from(tiny_llama_shakespeare_gguf, tiny_llama_shakespeare_dir, tmp_path):
    tasks = ["hfllm_shakespeare_next_line", "hfllm_shakespeare_ppl"]
    main([str(tiny_llama_shakespeare_gguf), str(tiny_llama_shakespeare_dir), "--tasks", ",".join(tasks), "--limit", "2", "--log_samples",
          "--output_path", str(tmp_path)])
    gguf_run, folder_run = json.loads((tmp_path / "results.json").read_text())["models"]
    assert (gguf_run["name"], gguf_run["architecture"]) == ("tiny.gguf", "LlamaForCausalLM")
    for task in tasks:  # same weights, same tokens: identical per-document log-likelihoods
        rows = [(tmp_path / f"samples_{run['name']}_{task}.jsonl").read_text().splitlines() for run in (gguf_run, folder_run)]
        resps = [[json.loads(row)["resps"] for row in run_rows] for run_rows in rows]
        assert len(resps[0]) == 2 and resps[0] == resps[1]
    assert gguf_run["scores"] == folder_run["scores"]


# ---------------------------------------------------------------- bad input


def test_limit_zero_fails_through_the_cli_with_one_line(tiny_llama_shakespeare_dir):
    result = run_cli("eval", str(tiny_llama_shakespeare_dir), "--tasks", "hfllm_synth", "--limit", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == (
        "hfllm eval: error: --limit must be positive (got 0); leave it out to evaluate every document\n"
    )


def test_unknown_task_suggests_close_names(tiny_llama_shakespeare_dir):
    with pytest.raises(HfllmError, match=r"^unknown task 'hfllm_shakespeare_pp'; did you mean hfllm_shakespeare_ppl"):
        main([str(tiny_llama_shakespeare_dir), "--tasks", "hfllm_shakespeare_pp"])


def test_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(HfllmError, match=rf"^'{tmp_path}' is not a model checkpoint \(no config.json or adapter"):
        main([str(tmp_path), "--tasks", "hfllm_synth"])
    with pytest.raises(HfllmError, match=r"^model './missing' does not exist; give an hfllm or transformers checkpoint folder, a PEFT adapter folder, a \.gguf file or a Hub id$"):
        load("./missing")


def test_task_file_with_a_broken_template(tiny_llama_shakespeare_dir, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text(
        "task: my_broken\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(tmp_path / "d.jsonl")
        + "\noutput_type: loglikelihood\ntest_split: test\ndoc_to_text: '{{question'\ndoc_to_target: '{{answer}}'\n"
    )
    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    with pytest.raises(HfllmError, match=r"^task 'my_broken': a template in its YAML is broken "
                                         r"\(TemplateSyntaxError: unexpected end of template.*\); fix the task YAML$"):
        main([str(tiny_llama_shakespeare_dir), "--tasks", "my_broken", "--include_path", str(tasks), "--output_path", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # nothing written on error
    yaml_file = tasks / "broken.yaml"
    yaml_file.write_text(yaml_file.read_text().replace("'{{question'", "'{{questio}}'"))
    with pytest.raises(HfllmError, match=r"^task 'my_broken': a template in its YAML is broken "
                                         r"\(UndefinedError: 'questio' is undefined\); fix the task YAML$"):
        main([str(tiny_llama_shakespeare_dir), "--tasks", "my_broken", "--include_path", str(tasks)])


# ---------------------------------------------------------------- during training


def test_callback_logs_task_scores_and_regression_prompts_with_the_loss(tiny_llama_shakespeare_dir, tmp_path):
    """The regression patterns are the model's own greedy completions, computed here (learning rate 0: the model at
    steps 2 and 4 is the one measured now): each prompt's pattern matches its own completion only."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    from hfllm.evaluation.callback import EvalCallback

    model, tokenizer = load(str(tiny_llama_shakespeare_dir))
    greedy = {}
    for prompt in ("What is 2 + 2?", "Hello", "To be, or not"):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, T), with BOS like the callback
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        greedy[prompt] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert len(set(greedy.values())) == 3 and all(text.strip() for text in greedy.values())
    exactly = {prompt: "^" + re.escape(text) + "$" for prompt, text in greedy.items()}
    prompts = [{"prompt": "What is 2 + 2?", "pattern": exactly["What is 2 + 2?"]},  # passes
               {"prompt": "Hello", "pattern": exactly["Hello"]},  # passes
               {"prompt": "To be, or not", "pattern": exactly["Hello"]}]  # another prompt's completion: fails
    ids = tokenizer("To be, or not to be, that is the question.")["input_ids"]
    data = Dataset.from_list([{"input_ids": ids, "labels": ids}] * 8)
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=2, logging_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no", learning_rate=0.0)
    trainer = Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.add_callback(EvalCallback(trainer, ["hfllm_synth"], every_n_steps=2, limit=2, regression_prompts=prompts,
                                      max_new_tokens=4))
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_tasks/regression_prompts/pass_rate" in entry]
    assert [entry["step"] for entry in evals] == [2, 4]
    assert all(entry["eval_tasks/regression_prompts/pass_rate"] == pytest.approx(2 / 3) for entry in evals), evals
    assert all(entry["eval_tasks/hfllm_synth/exact_match"] == 0.0 for entry in evals)
    assert "loss" in trainer.state.log_history[0] and model.training  # back in training mode
