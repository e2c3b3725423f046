"""Trainer callbacks for pretraining, plus the sample generator and the loss-curve plot they share with the script."""

from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..checkpoint import eval_mode
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
    of the weights (a sharded engine, tensor parallel), since a forward pass then needs them all. Every process
    seeds the same sampling stream, so they draw the same tokens and make the same number of forward passes."""
    return args.should_save or parameters_sharded() or args.tp_size > 1


@torch.no_grad()
def generate_samples(model, tokenizer, args) -> list[str]:
    """`args.num_samples` texts of `args.sample_max_new_tokens` tokens (temperature 0.8, top-k 200), one per prompt
    in `args.sample_prompts` (cycled; none means starting from the bos token). Uses its own RNG stream, so sampling
    never changes the training run."""
    prompts = args.sample_prompts or [""]
    samples = []
    with torch.random.fork_rng(devices=[]), eval_mode(model):
        torch.manual_seed(args.seed)
        for i in range(args.num_samples):
            prompt = prompts[i % len(prompts)]
            input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, T)
            if input_ids.shape[1] == 0:
                input_ids = torch.tensor([[tokenizer.bos_token_id or tokenizer.eos_token_id]])
            output = model.generate(
                input_ids.to(model.device),
                attention_mask=torch.ones_like(input_ids).to(model.device),
                max_new_tokens=args.sample_max_new_tokens,
                do_sample=True,
                temperature=0.8,
                top_k=200,
                pad_token_id=tokenizer.pad_token_id,
            )  # (1, T + new)
            samples.append(tokenizer.decode(output[0], skip_special_tokens=True))
    return samples


def append_samples(samples: list[str], path: Path, title: str) -> None:
    """Print generated texts and append them to `path` under a title."""
    text = "".join(f"----- sample {i + 1} ({title}) -----\n{sample}\n" for i, sample in enumerate(samples))
    print(text, flush=True)
    with open(path, "a", encoding="utf-8") as file:
        file.write(text)


def plot_loss_curve(log_history: list[dict], path: Path) -> None:
    """Training and validation loss against the optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    validation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    figure, axis = plt.subplots(figsize=(7, 4.5))
    if train:
        axis.plot(*zip(*train), label="train")
    if validation:
        axis.plot(*zip(*validation), "o-", label="validation")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
