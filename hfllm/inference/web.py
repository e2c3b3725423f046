"""`hfllm chat MODEL --web`: the chat as a browser page built with Gradio; `--compare` puts models side by side.

    hfllm chat runs/sft --web                                        # one model: http://127.0.0.1:7860
    hfllm chat runs/base --web --compare runs/sft --compare runs/dpo  # each message goes to every model

One model is a `gr.ChatInterface`; with `--compare` the page has a chatbot per model, one message box, and every
model streams its own answer at the same time. An answer is `ChatSession.stream` (session.py) over the page's history
and system prompt, with the decoding flags of the terminal chat. Nothing reaches the internet: Gradio's analytics and
version check are off, the default theme's fonts are local, and `--share` (a public link through Gradio's servers)
is off unless asked for.
"""

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # read by gradio: no telemetry, no version check

import argparse  # noqa: E402
import contextvars  # noqa: E402
import errno  # noqa: E402
import queue  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import TypeVar  # noqa: E402

import gradio as gr  # noqa: E402
from transformers import set_seed  # noqa: E402

from ..checkpoint import spec_kind  # noqa: E402
from ..errors import HfllmError  # noqa: E402
from ..generation import chat_messages  # noqa: E402
from .engine import Engine  # noqa: E402
from .options import Decoding, load_for_inference, quantization_from_args  # noqa: E402
from .session import ChatSession  # noqa: E402
from .transformers_engine import TransformersEngine  # noqa: E402

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
T = TypeVar("T")


@dataclass
class WebChat:
    """One model on the page."""

    name: str  # the MODEL spec, shown above its answers
    engine: Engine
    decoding: Decoding
    trim: bool = False  # drop the oldest turns when the conversation outgrows the context window
    show_prompt: bool = False  # print each rendered prompt on standard error

    def respond(self, message: str, history: list[dict], system: str | None) -> Iterator[str]:
        """The answer to `message` after `history` (Gradio's messages), growing as tokens come: the function of
        `gr.ChatInterface`. Notes about the context window appear as warnings on the page."""
        if not message.strip():
            raise gr.Error("empty message; type some text")
        session = ChatSession(self.engine, self.decoding, system=(system or "").strip() or None)
        session.turns = chat_messages(message, turns=plain_messages(history))
        for note in session.prepare(self.trim):
            print(note, file=sys.stderr, flush=True)
            gr.Warning(note)
        if self.show_prompt:
            print(f"--- prompt ({self.name}) ---\n{session.render()}\n--- end of prompt ---", file=sys.stderr,
                  flush=True)
        answer = ""
        for piece in session.stream():
            answer += piece
            yield answer
        if not answer:  # the model ended its turn at once
            yield answer


def plain_messages(history: list[dict]) -> list[dict[str, str]]:
    """Gradio's chat history (content a string or a list of parts such as {"type": "text", "text": ...}) -> the
    user and assistant messages as plain text, the form chat templates read."""
    messages = []
    for message in history:
        content = message["content"]
        if not isinstance(content, str):
            parts = content if isinstance(content, list) else [content]
            content = "".join(part.get("text", "") for part in parts if isinstance(part, dict))
        if message["role"] in ("user", "assistant"):
            messages.append({"role": message["role"], "content": content})
    return messages


def interleave(streams: list[Iterator[T]]) -> Iterator[tuple[int, T]]:
    """(index, item) from several iterators as each produces them, each read in its own thread. An error in one is
    raised here; closing this generator closes them all (so generation stops)."""
    items: queue.Queue = queue.Queue()
    closing = threading.Event()
    done = object()

    def read(index: int, stream: Iterator[T]) -> None:
        error = None
        try:
            for item in stream:
                if closing.is_set():
                    break
                items.put((index, item, None))
        except BaseException as raised:  # re-raised in the reading generator
            error = raised
        finally:
            if hasattr(stream, "close"):
                stream.close()
        items.put((index, done, error))

    for index, stream in enumerate(streams):  # in the caller's context: Gradio's gr.Warning finds its event there
        threading.Thread(target=contextvars.copy_context().run, args=(read, index, stream), daemon=True).start()
    running = len(streams)
    try:
        while running:
            index, item, error = items.get()
            if error is not None:
                raise error
            if item is done:
                running -= 1
            else:
                yield index, item
    finally:
        closing.set()


def build_app(chats: list[WebChat], system: str | None = None) -> gr.Blocks:
    """The page: a system prompt box, then one `gr.ChatInterface` (API `/chat`), or with several models a chatbot
    each, answering the same message side by side (API `/compare`)."""
    with gr.Blocks(title="hfllm chat", analytics_enabled=False, fill_height=True) as app:
        system_box = gr.Textbox(system or "", label="System prompt", placeholder="none", lines=1)
        if len(chats) == 1:
            [chat] = chats
            gr.ChatInterface(chat.respond, additional_inputs=[system_box], description=_describe(chat),
                             api_name="chat", analytics_enabled=False, fill_height=True)
        else:
            _compare(chats, system_box)
    return app


def _compare(chats: list[WebChat], system_box: gr.Textbox) -> None:
    with gr.Row(equal_height=True):
        chatbots = [gr.Chatbot(label=_describe(chat), height=520) for chat in chats]
    textbox = gr.Textbox(show_label=False, placeholder="Type a message (every model answers it)", submit_btn=True,
                         autofocus=True)

    def answer_all(message: str, system: str, *histories: list[dict]) -> Iterator[tuple]:
        """Yields ("", history per model): the message box cleared, each model's answer growing as it streams."""
        histories = tuple([*plain_messages(history), {"role": "user", "content": message},
                           {"role": "assistant", "content": ""}] for history in histories)
        yield "", *histories
        streams = [chat.respond(message, history[:-2], system) for chat, history in zip(chats, histories)]
        for index, answer in interleave(streams):
            histories[index][-1]["content"] = answer
            yield "", *histories

    textbox.submit(answer_all, [textbox, system_box, *chatbots], [textbox, *chatbots], api_name="compare")
    gr.ClearButton([textbox, *chatbots], value="Clear")


def _describe(chat: WebChat) -> str:
    d = chat.decoding
    mode = "sampling" if d.do_sample else "greedy"
    if d.do_sample and d.temperature is not None:
        mode += f", temperature {d.temperature}"
    return f"{chat.name} ({mode}, max {d.max_new_tokens} new tokens)"


def check_port(host: str, port: int) -> None:
    """One line when nothing can listen on host:port (in use, or a bad host), before any model is loaded."""
    if not 0 < port < 65536:
        raise HfllmError(f"--port must be in 1..65535 (got {port})")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: only a listener conflicts
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise HfllmError(f"port {port} on {host} is in use; pick another with --port") from None
            raise HfllmError(f"cannot listen on {host}:{port} ({error.strerror or error}); check --host and --port") \
                from None


def serve(args: argparse.Namespace, decoding: Decoding) -> int:
    """`hfllm chat MODEL --web [--compare MODEL]... [--host H] [--port P] [--share]`: serve the page until Ctrl-C."""
    host, port = args.host or DEFAULT_HOST, args.port or DEFAULT_PORT
    check_port(host, port)
    specs = [args.model, *args.compare]
    for spec in specs:  # one line for a model that does not exist, before loading any
        spec_kind(spec)
    chats = []
    for spec in specs:
        engine = TransformersEngine(*load_for_inference(spec, args.dtype, quantization_from_args(args),
                                                        float16_weights=decoding.float16_weights))
        engine.require_chat_template(spec)
        chats.append(WebChat(spec, engine, decoding, trim=args.trim, show_prompt=args.show_prompt))
    if decoding.seed is not None:
        set_seed(decoding.seed)
    app = build_app(chats, args.system)
    try:
        app.queue().launch(server_name=host, server_port=port, share=args.share, show_error=True)
    except OSError as error:  # the port was taken between the check and the launch
        raise HfllmError(f"cannot serve on {host}:{port} ({error}); pick another with --port") from None
    return 0
