"""`hfllm chat MODEL`: a terminal chat through the model's chat template, answers streamed as they are generated
(`--web`: the same chat in a browser page, web.py).

Each line read from standard input is a user turn; lines starting with `/` are commands:
  /reset        forget the conversation (the system message stays)
  /system TEXT  set the system message (`/system` alone removes it)
  /save FILE    write the messages as JSON
  /trim         drop the oldest turns until the conversation fits the context window
  /exit         leave (end of input does too)
"""

import sys

from ..errors import HfllmError
from .generate import open_engine
from .options import Decoding, Parser, add_decoding_arguments, add_engine_arguments, add_model_arguments, engine_threads
from .session import ChatSession

HELP = "commands: /reset, /system TEXT, /save FILE, /trim, /exit"


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
    engine = open_engine(args, decoding, threads, chat=True)
    return _converse(ChatSession(engine, decoding, system=args.system), args)


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
