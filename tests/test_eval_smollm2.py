"""The offline suite on the real SmolLM2-135M-Instruct (slow: minutes on CPU), and perplexity parity on it."""

import json

import pytest
from eval_helpers import smollm2_dir  # noqa: F401

from hfllm.evaluation import evaluate_model, load_model, main, scores, strided_perplexity
from hfllm.evaluation.tasks import shakespeare_passages

pytestmark = pytest.mark.slow


def test_offline_suite_on_smollm2(smollm2_dir, tmp_path):
    main([str(smollm2_dir), "--tasks", "hfllm_offline", "--limit", "20", "--batch_size", "4",
          "--apply_chat_template", "--output_path", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())["models"][0]["scores"]
    # a real model is far better than chance (random: 4-way choice 0.25, byte perplexity in the hundreds)
    assert result["hfllm_shakespeare_ppl"]["bits_per_byte"] < 2.0
    assert result["hfllm_shakespeare_next_line"]["acc"] > 0.3
    assert 0.0 <= result["hfllm_synth"]["exact_match"] <= 1.0


def test_strided_perplexity_within_one_percent_of_lm_eval_on_smollm2(smollm2_dir):
    model, tokenizer = load_model(str(smollm2_dir))
    lm_eval = scores(evaluate_model(model, tokenizer, ["hfllm_shakespeare_ppl"], limit=4))["hfllm_shakespeare_ppl"]
    ours = strided_perplexity(model, tokenizer, shakespeare_passages()[:4], max_length=2048, stride=512)
    assert ours["byte_perplexity"] == pytest.approx(lm_eval["byte_perplexity"], rel=0.01)
