"""`hfllm chat MODEL`: a terminal chat through the model's chat template, answers streamed as they are generated
(`--web`: the same chat in a browser page, web.py).

Each line read from standard input is a user turn; lines starting with `/` are commands:
  /reset        forget the conversation (the system message stays)
  /system TEXT  set the system message (`/system` alone removes it)
  /save FILE    write the messages as JSON
  /trim         drop the oldest turns until the conversation fits the context window
  /exit         leave (end of input does too)
"""

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from transformers import PreTrainedModel, set_seed

from ..errors import HfllmError
from .options import (Decoding, Parser, add_decoding_arguments, add_engine_arguments, add_model_arguments,
                      engine_threads, load_assistant, load_for_inference, quantization_from_args,
                      require_chat_template)
from .stream import StreamedGeneration

HELP = "commands: /reset, /system TEXT, /save FILE, /trim, /exit"


class ChatSession:
    """A conversation: the messages so far, rendered with the chat template, answered by streaming generate()."""

    def __init__(self, model: PreTrainedModel, tokenizer: Any, decoding: Decoding, system: str | None = None,
                 assistant_model: PreTrainedModel | None = None):
        self.model, self.tokenizer, self.decoding = model, tokenizer, decoding
        self.assistant_model = assistant_model  # the draft model of decoding.assistant
        self.config = decoding.generation_config(model, tokenizer)
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.system: str | None = system
        self.turns: list[dict[str, str]] = []  # user and assistant messages, oldest first

    @property
    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def render(self) -> str:
        """The conversation as the model reads it, ready for the assistant's answer."""
        return self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)

    def prompt_tokens(self) -> int:
        return len(self.tokenizer(self.render(), add_special_tokens=False)["input_ids"])

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

    def reply(self, text: str, out: TextIO) -> str:
        """Add the user turn, then `answer`."""
        self.turns.append({"role": "user", "content": text})
        return self.answer(out)

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
        inputs = self.tokenizer([self.render()], return_tensors="pt", add_special_tokens=False).to(self.model.device)
        answer = []
        for piece in StreamedGeneration(self.model, self.tokenizer, dict(inputs), self.config, self.decoding.stop,
                                        assistant_model=self.assistant_model):
            answer.append(piece)
            yield piece
        self.turns.append({"role": "assistant", "content": "".join(answer)})

    def answer(self, out: TextIO) -> str:
        """Stream the assistant's answer to the conversation to `out`; add it to the history and return it."""
        for piece in self.stream():
            out.write(piece)
            out.flush()
        out.write("\n")
        return self.turns[-1]["content"]

    def save(self, path: str) -> None:
        Path(path).write_text(json.dumps(self.messages, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str], prog: str) -> int:
    """`hfllm chat MODEL [--system TEXT] [--trim] [decoding options]`: chat on standard input / output."""
    args = _parser(prog).parse_args(argv)
    decoding = Decoding.from_args(args)
    threads = engine_threads(args)
    if args.web and args.engine == "torch":
        try:
            from .web import serve
        except ModuleNotFoundError as missing:
            raise HfllmError(f"--web needs {missing.name}: pip install 'hfllm[web]'") from None
        return serve(args, decoding)
    if given := [flag for flag in ("compare", "host", "port", "share") if getattr(args, flag)]:
        raise HfllmError(f"--{given[0]} is for the web page; add --web")
    if args.engine == "llama.cpp":
        from .llama_cpp_engine import LlamaCppChatSession, open_engine

        engine = open_engine(args, threads)
        engine.require_chat_template(args.model)
        return _converse(LlamaCppChatSession(engine, decoding, system=args.system), args)
    model, tokenizer = load_for_inference(args.model, args.dtype, quantization_from_args(args),
                                          float16_weights=decoding.float16_weights)
    require_chat_template(tokenizer, args.model)
    assistant = load_assistant(decoding.assistant, model, tokenizer, args.dtype) if decoding.assistant else None
    if decoding.seed is not None:
        set_seed(decoding.seed)
    return _converse(ChatSession(model, tokenizer, decoding, system=args.system, assistant_model=assistant), args)


def _converse(session: ChatSession, args) -> int:
    """Read turns and commands from standard input until /exit or its end."""
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {args.model}; {HELP}", file=sys.stderr)
    try:
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line or line.strip() in ("/exit", "/quit"):
                return 0
            if line.strip():
                _handle(session, line.strip(), args)
    except KeyboardInterrupt:  # Ctrl-C leaves quietly
        print(file=sys.stderr)
        return 130


def _handle(session: ChatSession, line: str, args) -> None:
    """One line of input: a command, or a user turn answered on stdout (notes and warnings go to stderr)."""
    command, _, rest = line.partition(" ")
    if command == "/reset":
        session.turns.clear()
        _note("conversation cleared")
    elif command == "/system":
        session.system = rest.strip() or None
        _note(f"system message {'set' if session.system else 'removed'}")
    elif command == "/save":
        if not rest.strip():
            _note("give a file: /save FILE")
            return
        try:
            session.save(rest.strip())
        except OSError as error:
            _note(f"could not save to {rest.strip()}: {error.strerror or error}")
            return
        _note(f"saved {len(session.messages)} messages to {rest.strip()}")
    elif command == "/trim":
        _note(f"dropped {session.trim()} messages")
    elif command.startswith("/") and command[1:].isalpha():
        _note(f"unknown command {command}; {HELP}")
    else:
        _answer(session, line, args)


def _answer(session: ChatSession, text: str, args) -> None:
    session.turns.append({"role": "user", "content": text})
    for note in session.prepare(args.trim):
        _note(note)
    if args.show_prompt:
        _note(f"--- prompt ---\n{session.render()}\n--- end of prompt ---")
    session.answer(sys.stdout)


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _parser(prog: str) -> Parser:
    parser = Parser(prog=prog, description="Chat with a model in the terminal (its chat template, streamed answers). "
                    + HELP)
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--trim", action="store_true",
                        help="drop the oldest turns when the conversation outgrows the context window")
    parser.add_argument("--show_prompt", action="store_true", help="print each rendered prompt on standard error")
    web = parser.add_argument_group("web page")
    web.add_argument("--web", action="store_true", help="chat in a browser page (Gradio) instead of the terminal")
    web.add_argument("--compare", action="append", default=[], metavar="MODEL",
                     help="another model answering side by side (repeatable), e.g. a fine-tuned one next to its base")
    web.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1: this machine only)")
    web.add_argument("--port", type=int, default=None, help="port to listen on (default 7860)")
    web.add_argument("--share", action="store_true",
                     help="also publish a temporary public link through Gradio's servers (off: nothing leaves)")
    add_decoding_arguments(parser, max_new_tokens=256)
    add_engine_arguments(parser)
    return parser
