"""Chat templates for training: shipped templates, the checks a training template must pass, and message checks.

A training-compatible template wraps each assistant reply (and its EOS) in `{% generation %}` markers so TRL's
`assistant_only_loss` can mask everything else. The template is set on the tokenizer, so it is saved with the model
and the same one renders prompts at evaluation and chat.
"""

from pathlib import Path

from trl.chat_template_utils import has_generation_markers

from ..errors import HfllmError

TEMPLATES_DIR = Path(__file__).parent / "templates"

# a conversation used to check a template: system, two user/assistant rounds
PROBE = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6"},
]


def load_template(name_or_path: str) -> str:
    """A shipped template by name (`smollm2`, `chatml`: hfllm/templates/NAME.jinja) or a .jinja file's text."""
    shipped = TEMPLATES_DIR / f"{name_or_path}.jinja"
    path = shipped if shipped.is_file() else Path(name_or_path)
    if not path.is_file():
        names = sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))
        raise HfllmError(f"chat template '{name_or_path}' is neither a shipped template ({', '.join(names)}) nor a file")
    return path.read_text()


def check_roles(messages: list[dict], where: str = "conversation") -> None:
    """An optional system message, then user/assistant turns alternating, starting with user."""
    roles = [m.get("role") for m in messages]
    if roles[:1] == ["system"]:
        roles = roles[1:]
    expected = ["user", "assistant"] * (len(roles) // 2 + 1)
    if not roles or roles != expected[: len(roles)]:
        raise HfllmError(
            f"{where} has roles {roles} which do not alternate user/assistant starting with user; "
            "fix the data (merge consecutive turns of the same role)"
        )


def check_template(tokenizer, assistant_only_loss: bool = True) -> None:
    """Check the tokenizer's chat template on a probe conversation; raise HfllmError naming the problem and the fix.

    - with `assistant_only_loss`, it has `{% generation %}` markers and they cover each reply and its EOS;
    - the EOS token follows every assistant reply;
    - the prompt rendered at inference (`add_generation_prompt=True`) is a prefix of the training rendering.
    """
    template = tokenizer.chat_template
    if not template:
        raise HfllmError("the tokenizer has no chat template; set `chat_template: smollm2` (or a .jinja path) in the recipe")
    if assistant_only_loss and not has_generation_markers(template):
        raise HfllmError(
            "assistant_only_loss needs a chat template with {% generation %} markers and this one has none; "
            "set `chat_template: smollm2` (or `chatml`, or a .jinja path with markers) in the recipe"
        )
    eos = tokenizer.eos_token
    full = tokenizer.apply_chat_template(PROBE, tokenize=False)
    for i, message in enumerate(PROBE):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(PROBE[:i], tokenize=False, add_generation_prompt=True)
        if not full.startswith(prompt):
            raise HfllmError(
                "the chat template's inference prompt is not a prefix of its training rendering; "
                "make `add_generation_prompt` emit exactly the assistant header the template writes before a reply"
            )
        reply = full[len(prompt) :]
        if not reply.startswith(message["content"] + eos):
            raise HfllmError(
                f"the chat template does not put the EOS token {eos!r} right after each assistant reply; "
                "end assistant turns with the tokenizer's eos_token"
            )
    if assistant_only_loss:
        encoded = tokenizer.apply_chat_template(PROBE, return_dict=True, return_assistant_tokens_mask=True)
        trained = [t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m]
        expected = tokenizer.encode("4" + eos + "6" + eos, add_special_tokens=False)
        if tokenizer.decode(trained) != tokenizer.decode(expected):
            raise HfllmError(
                "the chat template's {% generation %} markers do not cover exactly each assistant reply and its EOS; "
                "put {% generation %} ... {% endgeneration %} around the reply content and the eos token"
            )


# the token a shipped template ends every turn with; it becomes the tokenizer's EOS (so generation stops there)
TURN_END = {"chatml": "<|im_end|>", "smollm2": "<|im_end|>"}


def set_template(tokenizer, name_or_path: str | None, assistant_only_loss: bool) -> None:
    """Install the recipe's template (if any) on the tokenizer and check it. A shipped template's end-of-turn token
    becomes the EOS when the tokenizer has it as one special token (hfllm's pretraining tokenizers end documents with
    <|endoftext|> and carry ChatML's tokens for later fine-tuning)."""
    if name_or_path:
        tokenizer.chat_template = load_template(name_or_path)
        turn_end = TURN_END.get(name_or_path)
        if turn_end and tokenizer.eos_token != turn_end and turn_end in tokenizer.all_special_tokens:
            tokenizer.eos_token = turn_end
    check_template(tokenizer, assistant_only_loss)
