"""Optimizers beyond Trainer's own list.

AdamW (fused) and Schedule-Free AdamW are Trainer's `optim: adamw_torch_fused` / `optim: schedule_free_adamw`;
learning-rate schedules are Trainer's `lr_scheduler_type` (cosine, cosine_with_min_lr, warmup_stable_decay,
constant_with_warmup). A `min_lr` becomes `min_lr_rate` before the arguments are built (`min_lr_as_rate`), so
the schedule builds on optimizers without `defaults['lr']` (DeepSpeed's, Muon's pair). This file adds `optim: muon`: `torch.optim.Muon` on the 2-D weight matrices of the hidden
layers and AdamW on everything else (embeddings, head, norms, biases, routers, 3-D expert tensors); and `optim: soap`:
SOAP (Adam in the eigenbasis of Shampoo's preconditioner, Vyas et al. 2024) from the `pytorch-optimizer` package on
every parameter (1-D ones get plain Adam), with `adam_beta1/2`, `adam_epsilon`, `weight_decay` and
`soap_precondition_frequency`.
"""

import torch
from torch import nn

from ..errors import HfllmError

MIN_LR_SCHEDULES = ("cosine_with_min_lr", "cosine_warmup_with_min_lr")  # transformers' schedules taking min_lr
OWN_OPTIMIZERS = ("muon", "soap")  # optimizers hfllm builds itself; Trainer builds all others from `optim`


def min_lr_as_rate(kwargs: dict) -> None:
    """A TrainingArguments' `lr_scheduler_kwargs: {min_lr: X}` as `{min_lr_rate: X / learning_rate}`, in place.

    transformers turns `min_lr` into that very ratio with `optimizer.defaults["lr"]`, which only a plain torch
    optimizer has: the scheduler built on DeepSpeed's ZeRO optimizer ("'DeepSpeedZeroOptimizer' object has no
    attribute 'defaults'") or on MuonWithAdamW failed. Trainer's optimizer takes `learning_rate` as its default lr,
    so the schedule is the same, number for number."""
    scheduler_kwargs = kwargs.get("lr_scheduler_kwargs")
    if kwargs.get("lr_scheduler_type") not in MIN_LR_SCHEDULES or not isinstance(scheduler_kwargs, dict):
        return
    if "min_lr" in scheduler_kwargs and "min_lr_rate" not in scheduler_kwargs:
        scheduler_kwargs = dict(scheduler_kwargs)
        scheduler_kwargs["min_lr_rate"] = scheduler_kwargs.pop("min_lr") / kwargs.get("learning_rate", 5e-5)
        kwargs["lr_scheduler_kwargs"] = scheduler_kwargs


class MuonWithAdamW(torch.optim.Optimizer):
    """Two optimizers stepping together, seen by Trainer and the LR scheduler as one: the param groups are the
    children's own group dicts, so a scheduler setting `lr` on a group sets it on the child."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__([*muon.param_groups, *adamw.param_groups], defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]  # the children made new dicts


def muon_parameter_names(model: nn.Module) -> set[str]:
    """Names of the 2-D hidden weight matrices: not the embeddings or the head, not router weights."""
    excluded = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        excluded.add(id(model.get_output_embeddings().weight))
    for module in model.modules():
        if "Router" in type(module).__name__:
            excluded.update(id(p) for p in module.parameters())
    return {name for name, p in model.named_parameters() if p.requires_grad and p.ndim == 2 and id(p) not in excluded}


def decay_groups(named: list[tuple[str, nn.Parameter]], decay_names: set[str], weight_decay: float) -> list[dict]:
    """Two param groups: weight decay on `decay_names` (Trainer's rule: not norms and biases), none on the rest."""
    return [
        {"params": [p for n, p in named if n in decay_names], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay_names], "weight_decay": 0.0},
    ]


def build_muon(model: nn.Module, args, decay_names: set[str]) -> MuonWithAdamW:
    """Muon (lr `args.muon_lr` or `args.learning_rate`, update RMS matched to AdamW's) + AdamW for the rest."""
    muon_names = muon_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = torch.optim.Muon(
        [p for n, p in named if n in muon_names],
        lr=args.muon_lr or args.learning_rate,
        weight_decay=args.weight_decay,
        adjust_lr_fn="match_rms_adamw",
    )
    rest = [(n, p) for n, p in named if n not in muon_names]
    adamw = torch.optim.AdamW(
        decay_groups(rest, decay_names, args.weight_decay),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    return MuonWithAdamW(muon, adamw)


def build_soap(model: nn.Module, args, decay_names: set[str]) -> torch.optim.Optimizer:
    """SOAP on every parameter, weight decay on `decay_names` only (Trainer's rule: no decay for norms and biases)."""
    try:
        from pytorch_optimizer import SOAP
    except ImportError:
        raise HfllmError("optim: soap needs the pytorch-optimizer package; pip install 'hfllm[soap]'") from None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return SOAP(
        decay_groups(named, decay_names, args.weight_decay),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        precondition_frequency=args.soap_precondition_frequency,
    )


def build_optimizer(name: str, model: nn.Module, args, decay_names: set[str]) -> torch.optim.Optimizer:
    """One of `OWN_OPTIMIZERS` for `model`."""
    return {"muon": build_muon, "soap": build_soap}[name](model, args, decay_names)
