"""PEFT adapters: configs from a recipe, and merging an adapter into its base (`hfllm merge`).

PEFT methods (recipe key `peft_type`, used when `use_peft: true`): `lora` (DoRA with `use_dora: true`, QLoRA with
`load_in_4bit: true`), `prefix` (prefix tuning), `prompt` (prompt tuning), `p_tuning` and `ia3`.
"""

import importlib.util
from pathlib import Path

import torch
from peft import IA3Config, LoraConfig, PeftConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

from ..checkpoint import atomic_output, check_output_dir, load
from ..errors import ArgumentParser, HfllmError

PEFT_TYPES = ("lora", "prefix", "prompt", "p_tuning", "ia3")
ATTENTION_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "c_attn", "query", "key", "value", "out_proj")
MERGEABLE = ("LORA", "IA3")  # prompt-learning adapters add virtual tokens and have no weights to merge


def check_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise HfllmError(
            "load_in_4bit/load_in_8bit need bitsandbytes, which is not installed; "
            "run `pip install 'hfllm[qlora]'` or set load_in_4bit: false"
        )


# ----------------------------------------------------------------------------- PEFT configs


def attention_targets(model) -> list[str] | str:
    """The attention projection names present in the model (LoRA's default targets), else every linear layer."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    found = [name for name in ATTENTION_NAMES if name in names]
    return found or "all-linear"


def build_peft_config(model_args, peft_type: str, num_virtual_tokens: int, model) -> PeftConfig | None:
    """The recipe's PEFT config, or None for full fine-tuning (`use_peft: false`)."""
    if not model_args.use_peft:
        return None
    if peft_type not in PEFT_TYPES:
        raise HfllmError(f"unknown peft_type '{peft_type}'; choose from: {', '.join(PEFT_TYPES)}")
    if peft_type != "lora" and (model_args.load_in_4bit or model_args.load_in_8bit):
        raise HfllmError(f"load_in_4bit/8bit (QLoRA) works with peft_type: lora, not '{peft_type}'; set peft_type: lora")
    targets = model_args.lora_target_modules or attention_targets(model)
    if peft_type == "lora":
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=targets,
            modules_to_save=model_args.lora_modules_to_save,
            use_rslora=model_args.use_rslora,
            use_dora=model_args.use_dora,
            bias="none",
        )
    if peft_type == "ia3":
        linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        feedforward = [name for name in ("down_proj", "fc2", "c_proj") if name in linear]
        targets = model_args.lora_target_modules or [n for n in ("k_proj", "v_proj") if n in linear] + feedforward
        return IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward)
    prompt_learning = {"prefix": PrefixTuningConfig, "prompt": PromptTuningConfig, "p_tuning": PromptEncoderConfig}
    return prompt_learning[peft_type](task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens)


# ----------------------------------------------------------------------------- merge


def merge_main(argv: list[str], prog: str) -> int:
    """`hfllm merge ADAPTER OUT`: fold a LoRA/DoRA/IA3 adapter into its base model; OUT loads without peft."""
    parser = ArgumentParser(prog=prog, description="Merge a PEFT adapter into a full checkpoint.")
    parser.add_argument("adapter", help="adapter folder (adapter_config.json), e.g. the output_dir of `hfllm sft`")
    parser.add_argument("out", help="folder for the merged checkpoint (must not exist or be empty)")
    parser.add_argument("--base", default=None, help="base model folder (default: the one recorded in the adapter)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)

    adapter, out = Path(args.adapter), Path(args.out)
    if not (adapter / "adapter_config.json").is_file():
        raise HfllmError(f"{adapter} has no adapter_config.json; give the output folder of a run with use_peft: true")
    check_output_dir(out)
    config = PeftConfig.from_pretrained(adapter)
    peft_type = getattr(config.peft_type, "value", config.peft_type)  # "LORA", "IA3", "PREFIX_TUNING", ...
    if peft_type not in MERGEABLE:
        raise HfllmError(
            f"{adapter} is a {peft_type} adapter, which adds virtual tokens and cannot be merged into weights; "
            "load it with peft (AutoPeftModelForCausalLM) instead"
        )
    merged, tokenizer = load(adapter, base=args.base, merge_adapter=True, dtype=getattr(torch, args.dtype))
    with atomic_output(out) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"merged {peft_type} adapter {adapter} into {args.base or config.base_model_name_or_path} -> {out}")
    return 0
