"""`hfllm plan RECIPE`: size, compute, memory and time of a pretraining recipe on given GPUs, without training.

    hfllm plan recipes/350m.yaml --gpu h100 --gpus 8
    hfllm plan recipes/1b.yaml --gpu a100-40g --gpus 4 --strategy zero3

Every formula is in docs/scaling.md. Memory per device, for P parameters sharded over N devices:

    weights + gradients + optimizer states      bytes per parameter by precision and strategy (PRECISION, STRATEGIES)
    + activations                               micro_batch x block_size x bytes per token (activation_bytes_per_token)
    + transients                                logits' gradient and one layer's recomputation (transient_bytes_per_token)

The activation and transient terms were derived from the tensors autograd saves for hfllm's decoder layer with
SDPA attention (saved-tensor hooks), and the whole estimate is checked against the measured peak RSS of CPU
training runs in tests/test_plan.py.

In Python: `hfllm.plan("recipes/350m.yaml", gpu="h100", gpus=8)` -> a `Plan` (`micro_batch()` is None when it does
not fit; `report(plan)` is the command's text).
"""

import contextlib
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ArgumentParser, HfllmError
from ..models import HfllmForCausalLM, parameter_counts
from ..recipe import RecipeInput, recipe_argv
from .arguments import global_batch_sequences, parse_recipe
from .distributed import STRATEGIES, SHARDED
from .mfu import flops_per_token

GIB = 1024**3
USABLE = 0.9  # share of a GPU's memory a run may plan for (CUDA context, allocator fragmentation)


@dataclass(frozen=True)
class Device:
    memory_gib: float
    bf16_flops: float  # dense bf16 tensor-core peak (fp16 on T4)


DEVICES = {
    "h100": Device(80, 989e12),
    "a100-80g": Device(80, 312e12),
    "a100-40g": Device(40, 312e12),
    "l4": Device(24, 121e12),
    "t4": Device(16, 65e12),
    "4090": Device(24, 165e12),
    "5090": Device(32, 209e12),
}


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter: weights as held, gradients, and the fp32 master copy optimizers keep (if separate)."""

    weights: int
    autocast_copies: int  # bf16 copies of the weights autocast makes during forward/backward
    gradients: int
    master: int


PRECISION = {
    "fp32": Precision(weights=4, autocast_copies=0, gradients=4, master=0),
    "bf16": Precision(weights=4, autocast_copies=2, gradients=4, master=0),  # Trainer/FSDP2: fp32 weights, autocast
    "bf16-deepspeed": Precision(weights=2, autocast_copies=0, gradients=2, master=4),  # bf16 weights, fp32 master
}


@dataclass
class Plan:
    """Everything `hfllm plan` prints; memory in bytes per device."""

    recipe: str
    model: str
    strategy: str
    device: str
    devices: int
    precision: str
    counts: dict[str, int]
    layers: int
    block_size: int
    flops_per_token: float
    tokens_planned: int
    global_batch: int  # sequences per optimizer step
    weights: float
    gradients: float
    optimizer: float
    host_memory: float  # what ZeRO-3 offload keeps in CPU RAM
    parameters_held: float  # the parameters a device holds between steps: its shard (zero3_offload: in CPU RAM)
    activation_per_sequence: float
    activation_per_sequence_checkpointed: float
    transient_per_sequence: float
    usable_memory: float
    peak_flops: float
    mfu: float
    activation_checkpointing: bool

    @property
    def static(self) -> float:
        return self.weights + self.gradients + self.optimizer

    def per_sequence(self, checkpointing: bool) -> float:
        activations = self.activation_per_sequence_checkpointed if checkpointing else self.activation_per_sequence
        return activations + self.transient_per_sequence

    def max_micro_batch(self, checkpointing: bool) -> int:
        return max(0, math.floor((self.usable_memory - self.static) / self.per_sequence(checkpointing)))

    def peak(self, micro_batch: int, checkpointing: bool) -> float:
        return self.static + micro_batch * self.per_sequence(checkpointing)

    def micro_batch(self) -> tuple[int, int] | None:
        """(micro batch, gradient accumulation) reaching the global batch exactly, largest micro batch that fits."""
        per_device = self.global_batch // self.devices
        if per_device < 1 or self.global_batch % self.devices:
            return None
        fits = self.max_micro_batch(self.activation_checkpointing)
        for micro in range(min(fits, per_device), 0, -1):
            if per_device % micro == 0:
                return micro, per_device // micro
        return None

    def train_seconds(self) -> float:
        return self.tokens_planned * self.flops_per_token / (self.devices * self.peak_flops * self.mfu)


# ----------------------------------------------------------------------------- the formulas


def optimizer_bytes(model: torch.nn.Module, optim: str) -> int:
    """Bytes of the optimizer state torch allocates for `optim`, per the parameters' element counts; the 0-d `step`
    tensor AdamW keeps per parameter tensor (4 bytes) included, so the figure is exact for fp32 weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    elements = sum(p.numel() for p in params)
    if optim in ("sgd",):
        return 0
    if optim.startswith("adamw") or optim in ("adam", "schedule_free_adamw"):
        return 8 * elements + 4 * len(params)
    if optim == "muon":  # momentum for the hidden matrices, AdamW for the rest
        from .optim import muon_parameter_names

        names = muon_parameter_names(model)
        muon = sum(p.numel() for n, p in model.named_parameters() if n in names)
        rest = [p for n, p in model.named_parameters() if p.requires_grad and n not in names]
        return 4 * muon + 8 * sum(p.numel() for p in rest) + 4 * len(rest)
    if optim == "soap":  # Adam's two moments, plus two d x d matrices (statistics, eigenbasis) per side of a matrix
        return 8 * elements + 8 * sum(d * d for p in params if p.ndim == 2 for d in p.shape if d <= 10_000)
    if "8bit" in optim:
        return 2 * elements
    raise HfllmError(f"hfllm plan does not know the memory of optimizer '{optim}'; use adamw_torch, adamw_torch_fused, "
                     "schedule_free_adamw, muon, soap, sgd or an 8-bit AdamW")


def layer_elements_per_token(config, attn_implementation: str, block_size: int) -> int:
    """Activations one decoder layer saves for backward, per token (elements): 8h (norm inputs and outputs,
    q, attention output, residuals) + 2 x kv width (k, v) + 4 x MLP width (gate, up, SiLU, product), + 6 scalars
    (norm statistics); eager attention adds its probabilities (heads x context) and one more h."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv_width = config.num_key_value_heads * head_dim
    if getattr(config, "num_experts", 0):
        mlp_width = (config.num_experts_per_tok + config.num_shared_experts) * config.moe_intermediate_size
        mlp_width += config.num_experts  # router logits
    else:
        mlp_width = config.intermediate_size
    elements = 8 * hidden + 2 * kv_width + 4 * mlp_width + 6
    if attn_implementation == "eager":
        window = getattr(config, "sliding_window", None)
        elements += config.num_attention_heads * min(block_size, window or block_size) + hidden
    return elements


def activation_bytes_per_token(config, attn_implementation: str, block_size: int, precision: str,
                               checkpointing: bool) -> float:
    """Bytes autograd keeps per token through the forward pass: every layer's activations (only the layer input
    with activation checkpointing), the embedding output and final norm (3h), and the fp32 logits (V). Under bf16
    autocast, matmul outputs are bf16 (2 bytes) while the residual stream and the logits stay fp32."""
    layer = layer_elements_per_token(config, attn_implementation, block_size)
    hidden, vocab = config.hidden_size, config.vocab_size
    layers = getattr(config, "unrolled_num_layers", config.num_hidden_layers)  # Mixture-of-Recursions: every pass
    if precision == "fp32":
        layer_bytes = 4 * layer
        logits = 4 * vocab
    else:
        layer_bytes = 4 * 2 * hidden + 2 * (layer - 2 * hidden)
        logits = 6 * vocab  # bf16 logits and their fp32 upcast for the loss
    kept = layers * (4 * hidden if checkpointing else layer_bytes)
    recompute = layer_bytes if checkpointing else 0  # one layer's activations rebuilt during backward
    return kept + recompute + logits + 4 * 3 * hidden


def transient_bytes_per_token(config, attn_implementation: str, block_size: int, precision: str) -> float:
    """Short-lived tensors at the peak: the logits' gradient, log-softmax and its gradient (3 x 4V), and gradients
    flowing through one layer (2 x a layer's activations)."""
    layer = layer_elements_per_token(config, attn_implementation, block_size)
    return 3 * 4 * config.vocab_size + 2 * (4 if precision == "fp32" else 2) * layer


def state_bytes(model: torch.nn.Module, optim: str, precision: str, strategy: str, devices: int) -> tuple[float, float, float, float]:
    """(weights, gradients, optimizer, host) bytes per device."""
    bytes_per = PRECISION[precision]
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layer_parameters = max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers)
    weights = bytes_per.weights * parameters + bytes_per.autocast_copies * parameters
    gradients = bytes_per.gradients * trainable
    optimizer = optimizer_bytes(model, optim) + bytes_per.master * trainable
    gathered = 2 * layer_parameters * (2 if precision != "fp32" else 4)  # a layer in use and the next prefetched
    if strategy == "ddp":
        return weights, gradients, optimizer, 0.0
    if strategy == "zero2":
        return weights, gradients / devices, optimizer / devices, 0.0
    if strategy in ("fsdp2", "zero3"):
        return weights / devices + gathered, gradients / devices, optimizer / devices, 0.0
    # zero3_offload: parameters, fp32 master and optimizer states in CPU RAM; the GPU holds the layers in use and a
    # layer's gradients on their way out
    return gathered, gathered / 2, 0.0, (weights + gradients + optimizer) / devices


# ----------------------------------------------------------------------------- a recipe's plan


def plan_recipe(argv: list, *, strategy: str, device: str, devices: int, mfu: float, prog: str = "hfllm plan") -> Plan:
    """`RECIPE [--key value ...]` (the recipe may be a mapping) planned on `devices` x `device` with `strategy`."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # no warnings about this machine: the plan is for the devices named
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            recipe = parse_recipe(argv, prog)
    finally:
        transformers_logging.set_verbosity(verbosity)
    model_args, data_args, args = recipe.args
    from .pretrain import resolve_config

    config = resolve_config(model_args.model, recipe.free, data_args.block_size)
    if not Path(model_args.model).is_dir():
        config.vocab_size = vocab_size(data_args)
    with torch.device("meta"):
        model = HfllmForCausalLM(config) if config.model_type == "hfllm" else _meta_model(config)
    mixed = recipe.value("bf16") or recipe.value("fp16")  # as written: the hardware fallback applies to this machine
    precision = "fp32" if not mixed else "bf16-deepspeed" if strategy.startswith("zero") else "bf16"
    if device == "cpu":
        memory, flops = _cpu_memory(), _cpu_flops(precision)
    else:
        memory, flops = DEVICES[device].memory_gib * GIB * USABLE, DEVICES[device].bf16_flops
    global_batch = _global_batch(args, data_args.block_size, devices)
    optim = str(recipe.value("optim") or "adamw_torch")
    weights, gradients, optimizer, host = state_bytes(model, optim, precision, strategy, devices)
    parameters_held = PRECISION[precision].weights * sum(p.numel() for p in model.parameters()) / (
        devices if strategy in SHARDED else 1)
    attn, block = model_args.attn_implementation, data_args.block_size
    per_token = activation_bytes_per_token(config, attn, block, precision, False)
    per_token_checkpointed = activation_bytes_per_token(config, attn, block, precision, True)
    return Plan(
        recipe=argv[0] if isinstance(argv[0], str) else "the recipe mapping",
        model=model_args.model, strategy=strategy, device=device, devices=devices, precision=precision,
        counts=parameter_counts(model), layers=config.num_hidden_layers, block_size=block,
        flops_per_token=flops_per_token(model, block), tokens_planned=global_batch * block * args.max_steps,
        global_batch=global_batch, weights=weights, gradients=gradients, optimizer=optimizer, host_memory=host,
        parameters_held=parameters_held,
        activation_per_sequence=block * per_token, activation_per_sequence_checkpointed=block * per_token_checkpointed,
        transient_per_sequence=block * transient_bytes_per_token(config, attn, block, precision),
        usable_memory=memory, peak_flops=flops, mfu=mfu,
        activation_checkpointing=bool(recipe.value("activation_checkpointing")),
    )


def vocab_size(data_args) -> int:
    """The vocabulary a recipe's tokenizer will have: `vocab_size` for a trained BPE, a tokenizer folder's own size,
    or 128 for a character tokenizer (the distinct characters of typical text, plus specials)."""
    if data_args.tokenizer == "bpe":
        return data_args.vocab_size
    if data_args.tokenizer == "char":
        return 128
    from ..checkpoint import load_tokenizer

    return len(load_tokenizer(data_args.tokenizer))


def _meta_model(config):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def _global_batch(args, block_size: int, devices: int) -> int:
    sequences = global_batch_sequences(args, block_size)
    return sequences if sequences is not None else args.per_device_train_batch_size * args.gradient_accumulation_steps * devices


def _cpu_memory() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 * USABLE
    raise HfllmError("cannot read the available memory from /proc/meminfo; give --gpu")


def _cpu_flops(precision: str) -> float:
    from .mfu import measure_matmul_flops

    return measure_matmul_flops("cpu", torch.float32 if precision == "fp32" else torch.bfloat16)


# ----------------------------------------------------------------------------- the command


def _parser(prog: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("recipe", help="a pretraining recipe (YAML); --key value overrides after it are allowed")
    parser.add_argument("--gpus", type=int, default=1, help="number of devices (default 1)")
    parser.add_argument("--gpu", default="h100", choices=[*DEVICES, "cpu"], help="device type (default h100)")
    parser.add_argument("--strategy", default="ddp", choices=STRATEGIES, help="how training is spread (default ddp)")
    parser.add_deprecated_alias("--engine", "--strategy", choices=STRATEGIES)
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    return parser


PROG = "hfllm plan"  # the API's errors read as the command's


def plan(recipe: RecipeInput, *, strategy: str = "ddp", gpu: str = "h100", gpus: int = 1, mfu: float = 0.4,
         **overrides: Any) -> Plan:
    """Size, compute, memory per device, micro-batch and time of a pretraining recipe on `gpus` x `gpu`, without
    training or allocating anything (`hfllm plan`; the formulas are in docs/scaling.md).

    Args:
        recipe: a pretraining recipe (a YAML path or its mapping).
        strategy: how training is spread: ddp, fsdp2, zero2, zero3, zero3_offload, ...
        gpu: h100, a100-80g, a100-40g, l4, t4, 4090, 5090, or cpu (this machine's memory and FLOPs).
        gpus: the number of devices.
        mfu: the assumed model FLOPs utilisation, in (0, 1].
        **overrides: recipe keys (e.g. `max_steps=1000`, `block_size=2048`).

    Returns:
        A `Plan` (memory in bytes per device): `.counts`, `.flops_per_token`, `.tokens_planned`, `peak(...)`,
        `train_seconds()`, and `micro_batch()`: (micro-batch, accumulation), or None when the recipe does not fit;
        a recipe that does not fit raises nothing. `hfllm.training.plan.report(plan)` is the command's text.
        Bad input raises `HfllmError` with the line the command prints.

    Example:
        >>> hfllm.plan("recipes/350m.yaml", gpu="t4", strategy="zero3").micro_batch()
    """
    args = _parser(PROG).parse_options(["RECIPE"], dict(strategy=strategy, gpu=gpu, gpus=gpus, mfu=mfu))
    return checked_plan(recipe_argv(recipe, overrides), args, PROG)


def checked_plan(argv: list, args, prog: str) -> Plan:
    """`RECIPE [--key value ...]` planned with the checked device flags `args` of `_parser`."""
    if args.gpus < 1:
        raise HfllmError(f"--gpus must be at least 1 (got {args.gpus})")
    if not 0 < args.mfu <= 1:
        raise HfllmError(f"--mfu must be in (0, 1] (got {args.mfu})")
    if not isinstance(argv[0], Mapping) and not Path(argv[0]).is_file():
        raise HfllmError(f"recipe '{argv[0]}' does not exist; give a pretraining recipe YAML file")
    return plan_recipe(argv, strategy=args.strategy, device=args.gpu, devices=args.gpus, mfu=args.mfu, prog=prog)


def main(argv: list[str], prog: str = "hfllm plan") -> int:
    args, overrides = _parser(prog).parse_known_args(argv)
    result = checked_plan([args.recipe, *overrides], args, prog)
    print(report(result))
    if result.micro_batch() is None:
        raise HfllmError(refusal(result, [args.recipe, *overrides]))
    return 0


def report(plan: Plan) -> str:
    counts, gib = plan.counts, GIB
    device = f"{plan.devices} x {plan.device}" + (f" ({plan.usable_memory / gib:.1f} GiB usable each)")
    chinchilla = 20 * counts["total"]
    lines = [
        f"plan for {plan.recipe}: {plan.model} on {device}, strategy {plan.strategy}, {plan.precision}",
        f"parameters   {counts['total'] / 1e6:,.1f}M total, {counts['active'] / 1e6:,.1f}M active per token, "
        f"{counts['embedding'] / 1e6:,.1f}M embedding",
        f"compute      {plan.flops_per_token:.3g} FLOPs/token (6N + attention); {plan.tokens_planned / 1e9:.3g}B tokens "
        f"planned = {plan.tokens_planned / counts['total']:.1f} per parameter (Chinchilla ~20: {chinchilla / 1e9:.3g}B)",
        f"memory/device weights {plan.weights / gib:.2f} GiB, gradients {plan.gradients / gib:.2f} GiB, optimizer "
        f"{plan.optimizer / gib:.2f} GiB" + (f"; CPU RAM for offload {plan.host_memory / gib:.1f} GiB" if plan.host_memory else ""),
        f"activations  {plan.per_sequence(False) / gib:.3f} GiB per sequence of {plan.block_size} tokens "
        f"({plan.per_sequence(True) / gib:.3f} GiB with activation checkpointing)",
    ]
    for checkpointing in (False, True):
        fits = plan.max_micro_batch(checkpointing)
        label = "with" if checkpointing else "without"
        lines.append(f"largest micro-batch {label} activation checkpointing: {fits}"
                     + (f" (peak {plan.peak(fits, checkpointing) / gib:.1f} GiB)" if fits else " (does not fit)"))
    choice = plan.micro_batch()
    if choice:
        micro, accumulation = choice
        hours = plan.train_seconds() / 3600
        lines.append(f"global batch {plan.global_batch} sequences = micro-batch {micro} x accumulation {accumulation} x "
                     f"{plan.devices} device(s) (activation checkpointing {'on' if plan.activation_checkpointing else 'off'}"
                     f" as in the recipe)")
        lines.append(f"time         {hours:.3g} h at {plan.mfu:.0%} MFU of {plan.peak_flops / 1e12:.4g} TFLOP/s per device")
    return "\n".join(lines)


def refusal(plan: Plan, argv: list[str]) -> str:
    """One line: what does not fit, and the first strategy/option that would."""
    need = plan.peak(1, plan.activation_checkpointing)
    problem = (f"{plan.recipe} does not fit {plan.devices} x {plan.device} with {plan.strategy}: micro-batch 1 needs "
               f"{need / GIB:.1f} GiB of {plan.usable_memory / GIB:.1f} GiB usable")
    if plan.global_batch % plan.devices or plan.global_batch < plan.devices:
        return (f"global batch {plan.global_batch} cannot be split over {plan.devices} devices; change --gpus or the "
                "recipe's global batch")
    options = []
    for strategy in STRATEGIES[STRATEGIES.index(plan.strategy) + 1:] if plan.strategy in STRATEGIES else STRATEGIES:
        other = plan_recipe(argv, strategy=strategy, device=plan.device, devices=plan.devices, mfu=plan.mfu)
        for checkpointing in (plan.activation_checkpointing, True):
            other.activation_checkpointing = checkpointing
            if other.micro_batch() is not None:
                options.append(f"--strategy {strategy}" + (" with activation_checkpointing: true" if checkpointing and not plan.activation_checkpointing else ""))
                break
        if options:
            break
    hint = f"it fits with {options[0]}" if options else "no strategy fits: use more or larger GPUs, or a smaller model"
    return f"{problem}; {hint}"


# ----------------------------------------------------------------------------- the table in docs/scaling.md

TABLE_RECIPES = ("125m", "350m", "mistral-350m", "moe-350m", "1b")
TABLE_SETUPS = (("h100", 8, "ddp"), ("a100-40g", 8, "fsdp2"), ("4090", 1, "ddp"), ("4090", 2, "zero3"), ("t4", 1, "zero3_offload"))


def recipes_table(root: Path = Path(__file__).resolve().parents[2]) -> str:
    """Markdown: each shipped GPU recipe on common setups (tests/test_plan.py keeps docs/scaling.md equal to it)."""
    lines = ["| recipe | parameters | tokens | setup | strategy | memory/GPU | micro-batch x accumulation | time at 40% MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for name in TABLE_RECIPES:
        for device, devices, strategy in TABLE_SETUPS:
            result = plan_recipe([str(root / "recipes" / f"{name}.yaml")], strategy=strategy, device=device, devices=devices, mfu=0.4)
            choice = result.micro_batch()
            fit = (f"{result.peak(choice[0], result.activation_checkpointing) / GIB:.1f} GiB", f"{choice[0]} x {choice[1]}",
                   f"{result.train_seconds() / 3600:.3g} h") if choice else ("does not fit", "–", "–")
            lines.append(f"| {name} | {result.counts['total'] / 1e6:.0f}M | {result.tokens_planned / 1e9:.3g}B | "
                         f"{devices} x {device} | {strategy} | " + " | ".join(fit) + " |")
    return "\n".join(lines)
