"""`hfllm chat MODEL`: a terminal chat through the model's chat template, answers streamed as they are generated
(`--web`: the same chat in a browser page, web.py).

Each line read from standard input is a user turn; lines starting with `/` are commands:
  /reset        forget the conversation (the system message stays)
  /system TEXT  set the system message (`/system` alone removes it)
  /save FILE    write the messages as JSON
  /trim         drop the oldest turns until the conversation fits the context window
  /exit         leave (end of input does too)

In Python: `hfllm.chat("runs/sft", "What is 2+3?")` -> a `ChatReply` (the answer and the messages); give its
`messages` as `history` to go on.
"""

import os
import sys
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel

from ..errors import HfllmError
from .generate import _model_argument, open_engine
from .options import Decoding, Parser, add_decoding_arguments, add_engine_arguments, add_model_arguments, engine_threads
from .session import ChatSession

HELP = "commands: /reset, /system TEXT, /save FILE, /trim, /exit"


PROG = "hfllm chat"  # the API's errors read as the command's
ROLES = ("system", "user", "assistant")


@dataclass
class ChatReply:
    """The assistant's answer and the whole conversation after it (the system message first, if any)."""

    reply: str
    messages: list[dict[str, str]]

    def __str__(self) -> str:
        return self.reply


def chat(model: str | os.PathLike | tuple[PreTrainedModel, Any], message: str | list[dict[str, str]], *,
         history: list[dict[str, str]] | None = None, system: str | None = None, stream: bool = False,
         **options: Any) -> ChatReply:
    """Answer one user message through the model's chat template, after the conversation so far (`hfllm chat`'s
    answer to a line of input).

    Args:
        model: an hfllm or transformers folder, a PEFT adapter folder, a .gguf file or a Hub id; or a loaded
            `(model, tokenizer)` pair, which a long conversation should give so that the model is loaded once.
        message: the user's text, or a list of messages ({"role": ..., "content": ...}) ending with a user turn.
        history: the messages so far (`ChatReply.messages` of the previous turn); a system message may lead it.
        system: the system message (replaces the history's).
        stream: also print the answer to stdout as it is generated.
        **options: the command's flags as keywords: `max_new_tokens` (256), `do_sample`, `temperature`, `top_p`,
            `seed`, `stop`, `trim` (drop the oldest turns that outgrow the context window), `dtype`, `engine`
            ("torch" or "llama.cpp") ... (`hfllm chat --help` lists them).

    Returns:
        A `ChatReply`: `.reply` (the answer) and `.messages` (the conversation with the answer added).
        Bad input raises `HfllmError` with the line the command prints.

    Example:
        >>> first = hfllm.chat("runs/sft", "What is 2+3?"); hfllm.chat("runs/sft", "And 4+4?", history=first.messages)
    """
    spec, loaded = _model_argument(model)
    turns = _messages(history or []) + _messages([{"role": "user", "content": message}] if isinstance(message, str)
                                                 else message)
    if not turns or turns[-1]["role"] != "user":
        raise HfllmError("the conversation must end with a user message; give the user's text as `message`")
    if web := [flag for flag in ("web", "compare", "host", "port", "share") if options.get(flag)]:
        raise HfllmError(f"{web[0]} is for the web page: run `hfllm chat MODEL --web` in a terminal")
    args = _parser(PROG).parse_options([spec], {**options, "system": system})
    session = open_session(args, loaded)
    if system is None and turns[0]["role"] == "system":
        session.system = turns[0]["content"]
    session.turns = [turn for turn in turns if turn["role"] != "system"]
    for note in session.prepare(args.trim):
        _note(note)
    if stream:
        answer = session.answer(sys.stdout)
    else:
        answer = "".join(session.stream())
    return ChatReply(answer, session.messages)


def _messages(messages: list) -> list[dict[str, str]]:
    """`messages` checked: each a {"role", "content"} mapping with a known role and text content."""
    checked = []
    for message in messages:
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise HfllmError(f"a message must be {{'role': one of {', '.join(ROLES)}, 'content': TEXT}}; got "
                             f"{str(message)[:80]}")
        checked.append({"role": message["role"], "content": message["content"]})
    return checked


def open_session(args, loaded: tuple[PreTrainedModel, Any] | None = None) -> ChatSession:
    """The parsed flags of `hfllm chat` (without --web) -> a conversation with MODEL (or `loaded`) on its engine."""
    decoding = Decoding.from_args(args)
    threads = engine_threads(args)
    if given := [flag for flag in ("compare", "host", "port", "share") if getattr(args, flag)]:
        raise HfllmError(f"--{given[0]} is for the web page; add --web")
    engine = open_engine(args, decoding, threads, chat=True, loaded=loaded)
    return ChatSession(engine, decoding, system=args.system)


def main(argv: list[str], prog: str) -> int:
    """`hfllm chat MODEL [--system TEXT] [--trim] [decoding options]`: chat on standard input / output."""
    args = _parser(prog).parse_args(argv)
    if args.web and args.engine == "torch":
        decoding = Decoding.from_args(args)
        engine_threads(args)
        try:
            from .web import serve
        except ModuleNotFoundError as missing:
            raise HfllmError(f"--web needs {missing.name}: pip install 'hfllm[web]'") from None
        return serve(args, decoding)
    return _converse(open_session(args), args)


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
