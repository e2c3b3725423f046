"""Trainer callbacks for pretraining, plus the sample generator they share with the script."""

from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..generation import generate_texts
from .distributed import parameters_sharded


class RouterLoadCallback(TrainerCallback):
    """MoE models: after every optimizer step, sum the routers' token counts over devices and call
    `model.update_router_bias()` (aux-loss-free balancing when `router_bias_update_rate > 0`). Keeps the load for the
    logs: `router_max_load` is the busiest expert's share of tokens times the number of experts, averaged over layers
    and steps (1.0 is perfect balance, num_experts means one expert takes everything)."""

    def __init__(self):
        self.max_loads: list[float] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        routers = model.routers()
        if dist.is_available() and dist.is_initialized():
            for router in routers:  # every device must apply the same bias update
                dist.all_reduce(router.tokens_per_expert)
        load = model.update_router_bias()  # (L_moe, E) fractions of the routed tokens
        if load is not None and load.sum() > 0:
            self.max_loads.append((load.max(dim=-1).values * load.shape[-1]).mean().item())

    def pop_metrics(self) -> dict[str, float]:
        if not self.max_loads:
            return {}
        metrics = {"router_max_load": round(sum(self.max_loads) / len(self.max_loads), 4)}
        self.max_loads = []
        return metrics


class StopAtStepCallback(TrainerCallback):
    """End the session after `args.stop_at_step` with a checkpoint (the schedule still follows max_steps), or at the
    first evaluation whose loss is at or below `args.stop_at_eval_loss` (the run is then complete)."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.stop_at_step is not None and state.global_step >= args.stop_at_step:
            control.should_save = True
            control.should_training_stop = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if reached_eval_loss(args, [metrics or {}]):
            control.should_training_stop = True


def reached_eval_loss(args, logs: list[dict]) -> dict | None:
    """The first of `logs` whose eval_loss is at or below `args.stop_at_eval_loss` (None: none, or no target)."""
    if args.stop_at_eval_loss is None:
        return None
    return next((log for log in logs if log.get("eval_loss", float("inf")) <= args.stop_at_eval_loss), None)


class SamplesCallback(TrainerCallback):
    """Print a few generated texts after each evaluation (`samples_at_eval: true`)."""

    def __init__(self, tokenizer, output_dir: str):
        self.tokenizer, self.output_dir = tokenizer, output_dir

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        if generates_here(args):
            samples = generate_samples(model, self.tokenizer, args)
            if state.is_world_process_zero:
                append_samples(samples, Path(self.output_dir) / "samples.txt", f"step {state.global_step}")


def generates_here(args) -> bool:
    """Whether this process generates the samples: the main process, or every process when each holds only a part
    of the weights (a sharded strategy, tensor parallel), since a forward pass then needs them all. Every process
    seeds the same sampling stream, so they draw the same tokens and make the same number of forward passes."""
    return args.should_save or parameters_sharded() or args.tp_size > 1


def generate_samples(model, tokenizer, args) -> list[str]:
    """`args.num_samples` texts of `args.sample_max_new_tokens` tokens (temperature 0.8, top-k 200), one per prompt
    in `args.sample_prompts` (cycled; none means starting from the bos token), the prompt included. Uses its own RNG
    stream, so sampling never changes the training run."""
    prompts = args.sample_prompts or [""]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        return generate_texts(model, tokenizer, [prompts[i % len(prompts)] for i in range(args.num_samples)],
                              with_prompt=True, max_new_tokens=args.sample_max_new_tokens, do_sample=True,
                              temperature=0.8, top_k=200)


def append_samples(samples: list[str], path: Path, title: str) -> None:
    """Print generated texts and append them to `path` under a title."""
    text = "".join(f"----- sample {i + 1} ({title}) -----\n{sample}\n" for i, sample in enumerate(samples))
    print(text, flush=True)
    with open(path, "a", encoding="utf-8") as file:
        file.write(text)
