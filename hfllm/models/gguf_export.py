"""hfllm checkpoint -> one GGUF file for llama.cpp / Ollama, with its tokenizer and an Ollama `Modelfile`.

    hfllm export SRC OUT --to gguf [--quant f32|f16|bf16|q8_0|q4_0|q4_k_m]

The model is first turned into the native transformers architecture `--to transformers` picks (`to_native`, which
refuses what no native class computes), then written with the `gguf` package under llama.cpp's names for it: Llama and
Mixtral -> `llama`, Qwen2 -> `qwen2`, Qwen3 -> `qwen3`, Qwen3-MoE -> `qwen3moe`. What llama.cpp would compute
differently is refused with the reason (sliding windows, rope scaling, dense layers in a Qwen3-MoE, ...).
f32/f16/bf16/q8_0/q4_0 are written by gguf-py's own quantizers; q4_k_m by llama.cpp's quantizer (`llama-cpp-python`,
built once from PyPI's source archive, see `hfllm.assets.llama_cpp`) from an f16 file. OUT is a folder holding
`<SRC name>.<QUANT>.gguf` and `Modelfile`, written atomically.
"""

import json
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import LlamaConfig, MixtralConfig, PreTrainedConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

from ..checkpoint import atomic_output, check_output_dir, load
from ..errors import HfllmError

T = gguf.GGMLQuantizationType
QUANTS: dict[str, tuple[T, gguf.LlamaFileType]] = {
    "f32": (T.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (T.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (T.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_k_m": (T.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),  # written by llama.cpp's quantizer from an f16 file
}
ARCHITECTURES: dict[type, gguf.MODEL_ARCH] = {  # native config class -> llama.cpp architecture
    LlamaConfig: gguf.MODEL_ARCH.LLAMA,
    MixtralConfig: gguf.MODEL_ARCH.LLAMA,  # llama.cpp runs Mixtral as `llama` with experts
    Qwen2Config: gguf.MODEL_ARCH.QWEN2,
    Qwen3Config: gguf.MODEL_ARCH.QWEN3,
    Qwen3MoeConfig: gguf.MODEL_ARCH.QWEN3MOE,
}
CHATML_STOP = "<|im_end|>"


def _refuse(reason: str) -> HfllmError:
    return HfllmError(f"cannot export to GGUF: {reason}; `hfllm export SRC OUT --to transformers` keeps the model exact")


def gguf_architecture(config: PreTrainedConfig) -> gguf.MODEL_ARCH:
    """llama.cpp's architecture for a native config, or an HfllmError naming what llama.cpp would compute otherwise."""
    arch = ARCHITECTURES.get(type(config))
    if arch is None:  # Mistral: the one native class picked only for a sliding window
        raise _refuse(f"{type(config).__name__.removesuffix('Config')} needs a sliding window, which llama.cpp's "
                      "llama architecture does not apply")
    layer_types = getattr(config, "layer_types", None) or []
    window = getattr(config, "sliding_window", None)
    if "sliding_attention" in layer_types or (isinstance(config, MixtralConfig) and window):
        if window < config.max_position_embeddings:
            raise _refuse(f"sliding-window attention (window {window} < context {config.max_position_embeddings}) "
                          f"is not applied by llama.cpp's {arch.name.lower()} architecture")
    if config.rope_parameters.get("rope_type", "default") != "default":
        raise _refuse(f"rope scaling '{config.rope_parameters['rope_type']}' is not written by hfllm's GGUF export")
    if isinstance(config, LlamaConfig) and (config.attention_bias or config.mlp_bias):
        raise _refuse("attention or MLP biases in a Llama-style model are not read back from GGUF by transformers")
    if isinstance(config, Qwen3Config) and config.attention_bias:
        raise _refuse("attention biases in a Qwen3-style (qk_norm) model are not part of llama.cpp's qwen3")
    if isinstance(config, Qwen3MoeConfig):
        if config.mlp_only_layers:
            raise _refuse(f"dense layers {config.mlp_only_layers} in a MoE model: llama.cpp's qwen3moe has experts "
                          "in every layer")
        if not config.norm_topk_prob:
            raise _refuse("norm_topk_prob=False: llama.cpp's qwen3moe always renormalises the top-k expert weights")
    if config.hidden_act != "silu":
        raise _refuse(f"activation '{config.hidden_act}': llama.cpp's {arch.name.lower()} uses SiLU")
    return arch


# --------------------------------------------------------------------------- weights


def _permute_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """(heads * head_dim, hidden): each head's two rotary halves interleaved, llama.cpp's llama layout."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def gguf_tensors(model: torch.nn.Module, arch: gguf.MODEL_ARCH) -> dict[str, np.ndarray]:
    """The native model's weights (float32) under llama.cpp's tensor names and layouts."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tensors = {}
    for key, value in model.state_dict().items():
        array = value.detach().float().numpy()
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd when output.weight is absent
        if key.endswith("mlp.experts.gate_up_proj"):  # (E, 2I, H): gate rows, then up rows
            block = key.split(".")[2]
            gate, up = np.split(array, 2, axis=1)
            tensors[f"blk.{block}.ffn_gate_exps.weight"] = gate
            tensors[f"blk.{block}.ffn_up_exps.weight"] = up
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise _refuse(f"tensor '{key}' has no llama.cpp name in the {arch.name.lower()} architecture")
        if name.endswith("_exps"):
            name += ".weight"
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith("attn_q.weight"):
            array = _permute_rotary(array, config.num_attention_heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and name.endswith("attn_k.weight"):
            array = _permute_rotary(array, config.num_key_value_heads)
        tensors[name] = array
    return tensors


def _encode(name: str, array: np.ndarray, qtype: T) -> tuple[np.ndarray, T]:
    """A tensor in the chosen format; norms, biases and routers stay F32, rows the block size does not divide F16."""
    if array.ndim == 1 or name.endswith("ffn_gate_inp.weight") or qtype == T.F32:
        return array.astype(np.float32), T.F32
    if qtype == T.F16:
        return array.astype(np.float16), T.F16
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block_size:
        return array.astype(np.float16), T.F16
    return gguf.quants.quantize(array, qtype), qtype


# --------------------------------------------------------------------------- metadata and tokenizer


def _add_hyperparameters(writer: gguf.GGUFWriter, config: PreTrainedConfig, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads or isinstance(config, (Qwen3Config, Qwen3MoeConfig)):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if isinstance(config, MixtralConfig):
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    elif isinstance(config, Qwen3MoeConfig):
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE as llama.cpp's `gpt2` model with the GPT-2 pre-tokenizer: tokens, types, merges, special ids,
    add_bos/add_eos and the chat template (gguf-py's SpecialVocab reads the saved tokenizer files)."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        backend = json.loads((Path(folder) / "tokenizer.json").read_text())
        pre = backend.get("pre_tokenizer") or {}
        if backend["model"]["type"] != "BPE" or backend.get("normalizer") or pre.get("type") != "ByteLevel" \
                or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
            raise _refuse("only byte-level BPE tokenizers with the GPT-2 pre-tokenizer (hfllm's `bpe`, SmolLM2) map "
                          f"to llama.cpp's tokenizers; this one has model {backend['model']['type']}, pre-tokenizer "
                          f"{pre.get('type')}, normalizer {(backend.get('normalizer') or {}).get('type')}")
        tokens = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        if [index for _, index in tokens] != list(range(len(tokens))) or len(tokens) > vocab_size:
            raise _refuse(f"the tokenizer's {len(tokens)} ids are not 0..n-1 within the model's vocab_size {vocab_size}")
        added = {token.content: token.special for token in tokenizer.added_tokens_decoder.values()}
        types = [gguf.TokenType.CONTROL if added.get(token) else
                 gguf.TokenType.USER_DEFINED if token in added else gguf.TokenType.NORMAL for token, _ in tokens]
        padding = range(len(tokens), vocab_size)  # embedding rows beyond the tokenizer
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list([token for token, _ in tokens] + [f"[PAD{i}]" for i in padding])
        writer.add_token_types(types + [gguf.TokenType.UNUSED] * len(padding))
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
        ids = tokenizer("a")["input_ids"]
        special.add_special_token = {"bos": ids[0] == tokenizer.bos_token_id,
                                     "eos": tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id}
        special.add_to_gguf(writer, quiet=True)


# --------------------------------------------------------------------------- Ollama Modelfile

OLLAMA_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}{{ if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}{{ end }}<|im_start|>assistant
"""


def _chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def ollama_template(tokenizer) -> tuple[str | None, str | None]:
    """(Go TEMPLATE, default SYSTEM) equivalent to the tokenizer's chat template: ChatML with an optional default
    system prompt (checked by rendering probe conversations), the bare prompt for a model without a chat template,
    (None, None) for any other template."""
    if tokenizer.chat_template is None:
        return "{{ .Prompt }}", None
    probe = [{"role": "system", "content": "S1"}, {"role": "user", "content": "U1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"}]

    def render(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    if render(probe) != _chatml(probe):
        return None, None
    without_system, expected = render(probe[1:]), _chatml(probe[1:])
    if without_system == expected:
        return OLLAMA_CHATML, None
    head = without_system.removesuffix(expected)
    if without_system.endswith(expected) and head.startswith("<|im_start|>system\n") and head.endswith("<|im_end|>\n"):
        return OLLAMA_CHATML, head.removeprefix("<|im_start|>system\n").removesuffix("<|im_end|>\n")
    return None, None


def modelfile(gguf_name: str, tokenizer) -> str:
    """An Ollama Modelfile: FROM the file, TEMPLATE and SYSTEM matching the chat template, stop tokens."""
    template, system = ollama_template(tokenizer)
    lines = [f"FROM ./{gguf_name}"]
    if template is None:
        lines.append("# no TEMPLATE: the chat template is not ChatML; Ollama falls back to the GGUF's own template")
    else:
        lines.append(f'TEMPLATE """{template}"""')
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    stops = ([CHATML_STOP] if template == OLLAMA_CHATML else []) + [tokenizer.eos_token]
    for stop in dict.fromkeys(s for s in stops if s):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- writing


def write_gguf(model: torch.nn.Module, tokenizer, path: Path, quant: str, name: str) -> None:
    """Write the native `model` (one of ARCHITECTURES) and its tokenizer as a GGUF file at `path`."""
    arch = gguf_architecture(model.config)
    qtype, file_type = QUANTS[quant]
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    _add_hyperparameters(writer, model.config, name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, tokenizer, model.config.vocab_size)
    for tensor_name, array in gguf_tensors(model, arch).items():
        data, raw_dtype = _encode(tensor_name, array, qtype)
        writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _quantize_with_llama_cpp(src: Path, dst: Path, file_type: gguf.LlamaFileType) -> None:
    from ..assets import llama_cpp

    llama = llama_cpp()
    params = llama.llama_model_quantize_default_params()
    params.ftype = int(file_type)
    status = llama.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if status != 0:
        raise HfllmError(f"llama.cpp's quantizer failed ({status}) on {src}")


def export_gguf(model: torch.nn.Module, tokenizer, out: Path, quant: str, name: str) -> Path:
    """Write `out/<name>.<QUANT>.gguf` and `out/Modelfile` for a native `model`; returns the GGUF path."""
    if quant not in QUANTS:
        raise HfllmError(f"unknown GGUF quantization '{quant}'; choose from: {', '.join(QUANTS)}")
    gguf_architecture(model.config)  # refuse before writing anything
    file_name = f"{name}.{quant.upper()}.gguf"
    check_output_dir(out)
    with atomic_output(out) as tmp:
        if quant == "q4_k_m":
            with tempfile.TemporaryDirectory(dir=tmp.parent) as scratch:
                f16 = Path(scratch) / "f16.gguf"
                write_gguf(model, tokenizer, f16, "f16", name)
                _quantize_with_llama_cpp(f16, tmp / file_name, QUANTS[quant][1])
        else:
            write_gguf(model, tokenizer, tmp / file_name, quant, name)
        (tmp / "Modelfile").write_text(modelfile(file_name, tokenizer))
    return out / file_name

