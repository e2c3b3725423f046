"""Strided (sliding-window) perplexity over texts, hfllm's own validation measurement.

Each text is tokenized the way lm-eval's `loglikelihood_rolling` does (the tokenizer's own special tokens, plus a
prefix token, bos or else eos, so the first token is predicted too). Windows of `max_length` tokens move by `stride`;
each scores only the tokens no earlier window scored, so every token is predicted once, with up to
`max_length - stride` tokens of extra context. With `stride == max_length` this is lm-eval's computation exactly; a
smaller stride gives each token more context (slightly lower perplexity).
"""

import math
import re

import torch
import torch.nn.functional as F


def _token_ids(tokenizer, text: str) -> list[int]:
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    bos_text = tokenizer.decode(prefix)
    add_special = not text.startswith(bos_text)  # as lm-eval: no second bos when the text already starts with it
    return [prefix] + tokenizer.encode(text, add_special_tokens=add_special)


@torch.no_grad()
def text_nll(model, tokenizer, text: str, max_length: int, stride: int) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, number of predicted tokens) of one text."""
    ids = torch.tensor(_token_ids(tokenizer, text), device=model.device)  # (N+1,) prefix + N text tokens
    total, scored = 0.0, 1  # position 0 is the prefix: never predicted
    while scored < len(ids):
        end = min(scored + stride, len(ids))
        start = max(0, end - max_length - 1)  # the window holds inputs ids[start:end-1], predicts ids[start+1:end]
        logits = model(ids[start : end - 1].unsqueeze(0)).logits[0].float()  # (T, V)
        targets = ids[start + 1 : end]  # (T,)
        nll = F.cross_entropy(logits, targets, reduction="none")  # (T,)
        total += nll[-(end - scored) :].sum().item()  # only the tokens not scored before
        scored = end
    return total, len(ids) - 1


def strided_perplexity(model, tokenizer, texts: list[str], max_length: int = 2048, stride: int | None = None) -> dict:
    """Token, word and byte perplexity and bits per byte over `texts` (lm-eval's word and byte counts)."""
    stride = stride or max_length
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in (0, max_length={max_length}], got {stride}")
    was_training = model.training
    model.eval()
    nll, tokens, words, nbytes = 0.0, 0, 0, 0
    for text in texts:
        text_nll_, text_tokens = text_nll(model, tokenizer, text, max_length, stride)
        nll, tokens = nll + text_nll_, tokens + text_tokens
        words += len(re.split(r"\s+", text))
        nbytes += len(text.encode("utf-8"))
    model.train(was_training)
    return {
        "token_perplexity": math.exp(nll / tokens),
        "word_perplexity": math.exp(nll / words),
        "byte_perplexity": math.exp(nll / nbytes),
        "bits_per_byte": nll / nbytes / math.log(2),
        "tokens": tokens,
    }


def validation_perplexity(model, tokenizer, limit: int | None = None, max_length: int = 2048, stride: int | None = None) -> dict:
    """`strided_perplexity` over the held-out Shakespeare passages (the `hfllm_shakespeare_ppl` task's documents)."""
    from .tasks import shakespeare_passages

    return strided_perplexity(model, tokenizer, shakespeare_passages()[:limit], max_length, stride)
