"""Generate and decode with transformers' `generate()`: the one helper under every caller that turns prompts into
text (samples during and at the end of training, eval-time regression prompts, exact match, `hfllm generate`, `hfllm
chat` and its web page through `hfllm.inference`). A module of its own below `training/`, `evaluation/` and
`inference/`, so each of them may import it.

    texts = generate_texts(model, tokenizer, ["What is 2+3?"], chat=True, max_new_tokens=32, do_sample=False)
    inputs, new_tokens = generate_ids(model, tokenizer, [render_prompt(tokenizer, "Once", chat=False)], chat=False)
"""

import copy
from typing import Any

import torch
from transformers import BatchEncoding, PreTrainedModel

from .checkpoint import eval_mode

DECODE_KWARGS = {"skip_special_tokens": True}


def chat_messages(prompt: str | None, system: str | None = None,
                  turns: list[dict[str, str]] | None = None) -> list[dict[str, str]]:
    """A chat as chat templates read it: the system message (if any), the earlier `turns`, then `prompt` as the user
    turn (`prompt` None: the turns end the chat)."""
    system_message = [{"role": "system", "content": system}] if system else []
    user = [{"role": "user", "content": prompt}] if prompt is not None else []
    return system_message + list(turns or []) + user


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """`messages` through the tokenizer's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_prompt(tokenizer: Any, prompt: str, chat: bool, system: str | None = None) -> str:
    """The text the model reads: `prompt` as is, or as a user turn (after `system`) in the chat template."""
    return render_chat(tokenizer, chat_messages(prompt, system)) if chat else prompt


def encode_prompts(tokenizer: Any, texts: list[str], chat: bool) -> BatchEncoding:
    """Left-padded input_ids / attention_mask (B, T); a rendered chat already holds its special tokens. Prompts that
    are all empty start from the BOS token (EOS where the BOS id is None or 0)."""
    inputs = tokenizer(texts, return_tensors="pt", padding=len(texts) > 1, padding_side="left",
                       add_special_tokens=not chat)
    if inputs["input_ids"].shape[1] == 0:
        start = tokenizer.bos_token_id or tokenizer.eos_token_id
        inputs["input_ids"] = torch.full((len(texts), 1), start)  # (B, 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs


@torch.no_grad()
def generate_ids(model: PreTrainedModel, tokenizer: Any, texts: list[str], /, *, chat: bool,
                 **generate_kwargs: Any) -> tuple[BatchEncoding, torch.Tensor]:
    """`model.generate` on the left-padded `texts` (already rendered) in eval mode -> (the inputs, the new tokens
    (B * num_return_sequences, new), padded after their end). Without a generation config or pad_token_id, padding
    is the tokenizer's pad token, else its EOS. `generate_kwargs` may hold generate()'s own `tokenizer` (stop
    strings)."""
    inputs = encode_prompts(tokenizer, texts, chat).to(model.device)
    if "generation_config" not in generate_kwargs:
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                   else tokenizer.eos_token_id)
    with eval_mode(model):
        sequences = model.generate(**inputs, **generate_kwargs)  # (B * n, T + new)
    return inputs, sequences[:, inputs["input_ids"].shape[1]:]


def generate_texts(model: PreTrainedModel, tokenizer: Any, prompts: list[str], /, *, chat: bool = False,
                   system: str | None = None, batch_size: int = 1, with_prompt: bool = False,
                   **generate_kwargs: Any) -> list[str]:
    """The generated text of each prompt (rendered with the chat template when `chat`), in batches of `batch_size`,
    special tokens skipped; `with_prompt`: the prompt's tokens decoded too. `generate_kwargs` go to `generate()`."""
    if tokenizer.pad_token is None and batch_size > 1:  # batches need padding: EOS, on a copy of the caller's tokenizer
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    texts = []
    for start in range(0, len(prompts), batch_size):
        batch = [render_prompt(tokenizer, prompt, chat, system) for prompt in prompts[start: start + batch_size]]
        inputs, new_tokens = generate_ids(model, tokenizer, batch, chat=chat, **generate_kwargs)
        if with_prompt:
            new_tokens = torch.cat([inputs["input_ids"].repeat_interleave(len(new_tokens) // len(batch), 0),
                                    new_tokens], dim=1)  # (B * n, T + new)
        texts += tokenizer.batch_decode(new_tokens, **DECODE_KWARGS)
    return texts
