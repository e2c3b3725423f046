"""A conversation over any engine: the system message, the turns so far, the engine's chat template, answers streamed.
`hfllm chat` (terminal), its web page and notebooks hold one.

    session = ChatSession(TransformersEngine(model, tokenizer), Decoding(max_new_tokens=64), system="Be terse.")
    session.reply("What is 2+3?", sys.stdout)        # streamed to stdout, added to the history
"""

import json
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import TextIO

from ..generation import chat_messages
from .engine import Engine
from .options import Decoding


class ChatSession:
    """A conversation: the messages so far, rendered with the engine's chat template, answered by streaming."""

    def __init__(self, engine: Engine, decoding: Decoding, system: str | None = None):
        engine.check(decoding)
        self.engine, self.decoding = engine, decoding
        self.context = engine.context
        self.system: str | None = system
        self.turns: list[dict[str, str]] = []  # user and assistant messages, oldest first

    @property
    def messages(self) -> list[dict[str, str]]:
        return chat_messages(None, self.system, self.turns)

    def render(self) -> str:
        """The conversation as the model reads it, ready for the assistant's answer."""
        return self.engine.render(self.messages)

    def prompt_tokens(self) -> int:
        return self.engine.count_tokens(self.render(), chat=True)

    def fits(self) -> bool:
        """Whether the rendered conversation plus max_new_tokens fits the context window (always without one)."""
        return self.context is None or self.prompt_tokens() + self.decoding.max_new_tokens <= self.context

    def trim(self) -> int:
        """Drop the oldest exchanges until the conversation fits; the newest user turn (and its answer) stay.
        Returns the number of messages dropped."""
        dropped = 0
        newest_user = max((i for i, m in enumerate(self.turns) if m["role"] == "user"), default=0)
        while newest_user > 0 and not self.fits():
            exchange = next((i + 1 for i, m in enumerate(self.turns) if m["role"] == "assistant"), 1)
            exchange = min(exchange, newest_user)  # a user turn and its answer
            del self.turns[:exchange]
            dropped, newest_user = dropped + exchange, newest_user - exchange
        return dropped

    def prepare(self, trim: bool) -> list[str]:
        """Before an answer: drop the oldest turns if `trim` and the conversation outgrows the context window.
        Returns the notes for the user (what was dropped, or a warning that it does not fit)."""
        notes = []
        if trim and (dropped := self.trim()):
            notes.append(f"dropped the {dropped} oldest messages to fit the context window of {self.context} tokens")
        if not self.fits():
            notes.append(f"warning: the conversation ({self.prompt_tokens()} tokens) plus --max_new_tokens "
                         f"{self.decoding.max_new_tokens} outgrows the context window of {self.context} tokens; "
                         "/trim drops the oldest turns (or start with --trim)")
        return notes

    def stream(self) -> Iterator[str]:
        """The assistant's answer to the conversation, piece by piece as it is generated; added to the history once
        complete. Generation stops when the iteration is abandoned."""
        rendered = self.render()
        answer = []
        with closing(self.engine.stream(rendered, rendered, self.decoding, chat=True)) as run:
            for piece in run:
                answer.append(piece)
                yield piece
        self.turns.append({"role": "assistant", "content": "".join(answer)})

    def reply(self, text: str, out: TextIO) -> str:
        """Add the user turn, then `answer`."""
        self.turns.append({"role": "user", "content": text})
        return self.answer(out)

    def answer(self, out: TextIO) -> str:
        """Stream the assistant's answer to the conversation to `out`; add it to the history and return it."""
        for piece in self.stream():
            out.write(piece)
            out.flush()
        out.write("\n")
        return self.turns[-1]["content"]

    def save(self, path: str) -> None:
        Path(path).write_text(json.dumps(self.messages, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
