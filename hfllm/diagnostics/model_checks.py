"""Model checks on the shrunk architecture: loss at init, no causal-mask leak, next-token labels, one batch overfits,
seeded runs bitwise equal, a resumed run equal to the uninterrupted one."""

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

from .checks import Check, verdict
from .subjects import STEPS

OVERFIT_STEPS = 150
OVERFIT_TARGET = 0.5  # nats per token after OVERFIT_STEPS on one batch
INIT_LOSS_TOLERANCE = 0.1  # |loss - ln V| / ln V
LEAK_TOLERANCE = 1e-5  # largest change of an earlier logit when a later token changes
LABEL_LOGIT = 30.0  # logit of the one token a copy / oracle model predicts


def _lm_loss(model, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = model.loss_function(logits=logits, labels=batch["labels"], vocab_size=logits.shape[-1])
    return float(loss)


def check_init_loss(model, batch: dict[str, torch.Tensor], vocab_size: int) -> Check:
    """A new model predicts nearly uniformly: its loss is close to ln(vocab)."""
    expected = math.log(vocab_size)
    loss = _lm_loss(model.eval(), batch)
    ok = abs(loss - expected) <= INIT_LOSS_TOLERANCE * expected
    return Check("loss at init", f"{loss:.3f}", f"ln {vocab_size} = {expected:.3f} ± {INIT_LOSS_TOLERANCE:.0%}", verdict(ok))


def check_causal_mask(model, batch: dict[str, torch.Tensor]) -> Check:
    """Changing the token at position t must leave the logits before t unchanged (and change some at or after t)."""
    row = {k: v[:1] for k, v in batch.items() if k != "labels"}  # (1, T)
    length = row["input_ids"].shape[1]
    at = length // 2
    changed = {k: v.clone() for k, v in row.items()}
    changed["input_ids"][0, at:] = (changed["input_ids"][0, at:] + 1) % model.config.vocab_size
    with torch.no_grad():
        before, after = model.eval()(**row).logits, model(**changed).logits  # (1, T, V)
    leak = float((before[0, :at] - after[0, :at]).abs().max())
    reaches = float((before[0, at:] - after[0, at:]).abs().max())
    ok = leak <= LEAK_TOLERANCE and reaches > LEAK_TOLERANCE
    return Check("causal mask (no future leak)", f"max |Δ earlier logit| {leak:.2g}", f"≤ {LEAK_TOLERANCE:g}", verdict(ok))


@contextlib.contextmanager
def replaced_logits(model, make_logits: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the block, the model's head outputs `make_logits(input_ids)` (the loss path itself is untouched)."""
    current: dict[str, torch.Tensor] = {}
    pre = model.register_forward_pre_hook(lambda module, args, kwargs: current.update(ids=kwargs["input_ids"]),
                                          with_kwargs=True)
    head = model.get_output_embeddings().register_forward_hook(lambda module, args, output: make_logits(current["ids"]))
    try:
        yield
    finally:
        pre.remove()
        head.remove()


def check_label_shift(model, batch: dict[str, torch.Tensor]) -> Check:
    """The training loss targets the next token: a model that copies its input scores badly, one that predicts the
    true next token scores ~0. Runs the model's own forward with the batch's labels (from the training collator)."""
    vocab_size = model.config.vocab_size

    def one_hot(ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return torch.nn.functional.one_hot(ids, vocab_size).float() * LABEL_LOGIT

    def next_tokens(ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)

    losses = {}
    model.eval()
    router_losses = getattr(model.config, "output_router_logits", None)
    for name, make in (("copy", lambda ids: one_hot(ids)), ("next", lambda ids: one_hot(next_tokens(ids)))):
        try:  # the LM loss alone: MoE load-balancing terms off
            if router_losses is not None:
                model.config.output_router_logits = False
            with replaced_logits(model, make), torch.no_grad():
                losses[name] = float(model(**batch).loss)
        finally:
            if router_losses is not None:
                model.config.output_router_logits = router_losses
    floor = math.log(vocab_size)
    ok = losses["copy"] > floor and losses["next"] < 0.01
    return Check("label shift (next-token targets)", f"copy-input loss {losses['copy']:.2f}, next-token "
                 f"loss {losses['next']:.3f}", f"copy > {floor:.2f}, next < 0.01", verdict(ok))


def check_overfit(model, batch: dict[str, torch.Tensor], steps: int = OVERFIT_STEPS, lr: float = 1e-2) -> Check:
    """A few hundred AdamW steps on one batch take its loss near zero (the model can learn and gradients flow)."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    first = loss = None
    for _ in range(steps):
        loss = model(**batch).loss
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    final = _lm_loss(model.eval(), batch)
    return Check("overfit one batch", f"{first:.2f} -> {final:.3f} in {steps} steps", f"< {OVERFIT_TARGET}",
                 verdict(final < OVERFIT_TARGET))


def _max_difference(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def check_reproducible(first: tuple[list[float], dict], second: tuple[list[float], dict]) -> Check:
    """Two runs with the recipe's seed give the same losses and bitwise-equal weights."""
    (losses_a, weights_a), (losses_b, weights_b) = first, second
    difference = _max_difference(weights_a, weights_b)
    ok = losses_a == losses_b and difference == 0.0
    return Check("seeded runs bitwise equal", f"{len(losses_a)} steps, losses {'equal' if losses_a == losses_b else 'differ'}, "
                 f"max |Δw| {difference:.2g}", "equal, 0", verdict(ok))


def check_resume(full: tuple[list[float], dict], resumed: tuple[list[float], dict]) -> Check:
    """A run resumed from its step-STEPS//2 checkpoint continues exactly: same later losses, bitwise-equal weights."""
    (losses_full, weights_full), (losses_resumed, weights_resumed) = full, resumed
    tail = losses_full[len(losses_full) - len(losses_resumed):]
    difference = _max_difference(weights_full, weights_resumed)
    ok = bool(losses_resumed) and tail == losses_resumed and difference == 0.0
    return Check("checkpoint resume exact", f"steps {STEPS // 2 + 1}-{STEPS} losses "
                 f"{'equal' if ok or tail == losses_resumed else 'differ'}, max |Δw| {difference:.2g}", "equal, 0",
                 verdict(ok))
