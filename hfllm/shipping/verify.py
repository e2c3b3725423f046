"""The checks `hfllm push` runs on the staged folder before anything leaves (upload and --dry_run alike).

- The folder as transformers alone loads it: a fresh Python process where hfllm cannot be imported loads the staged
  model and tokenizer (remote code only for an hfllm-format folder), renders a few chats with the staged chat
  template and greedy-decodes them; the prompt ids, the end-of-sequence ids and the answers must equal the source
  model's (hfllm, in this process), all in float32.
- Every GGUF file: its header is read (`check_gguf`); then llama.cpp renders the same chats through the file's own
  chat template and tokenizer, and its prompt ids must equal the source's and its end-of-generation token be one of
  the source's. Its greedy answer is checked token by token against the file's own (dequantized) weights in torch:
  each token llama.cpp picks must be torch's top token, or within a small margin of it (quantized weights round).
  Without llama.cpp this part is skipped with one line that says so.

A mismatch is one line naming the file and the first differing token.
"""

import inspect
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import torch

from ..errors import HfllmError

CHATS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Say it again, please."}],
]
NEW_TOKENS = 16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
MARGIN = {"float": 1e-3, "quantized": 0.1}  # of the top logit's lead over the mean logit (teacher-forced greedy check)


def transcript(model: Any, tokenizer: Any, chats: list, new_tokens: int) -> dict:
    """The chats rendered with the tokenizer's chat template (plain last user turns without one), their prompt ids,
    the end-of-sequence ids and `new_tokens` greedy tokens each. Runs in a process without hfllm too (its source is
    sent there), so it uses torch and transformers only."""
    import torch

    eos = model.generation_config.eos_token_id
    result = {"chat_template": bool(tokenizer.chat_template),
              "eos": sorted(eos if isinstance(eos, list) else [] if eos is None else [eos]), "chats": []}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (result["eos"] or [0])[0]
    for chat in chats:
        if result["chat_template"]:
            text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False).input_ids
        else:
            ids = tokenizer(chat[-1]["content"]).input_ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad)
        answer = out[0, len(ids):].tolist()
        result["chats"].append({"prompt": ids, "answer": answer, "prompt_pieces": tokenizer.convert_ids_to_tokens(ids),
                                "answer_pieces": tokenizer.convert_ids_to_tokens(answer)})
    return result


CHILD = """
import json, sys
sys.modules["hfllm"] = None  # transformers alone, as for someone who downloads the repo
from typing import Any
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

{source}

folder, remote = sys.argv[1], sys.argv[2] == "remote"
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=remote)
print(json.dumps(transcript(model, tokenizer, json.loads(sys.argv[3]), int(sys.argv[4]))))
"""


def staged_transcript(folder: Path, remote: bool) -> dict:
    """`transcript` of the staged folder, computed by a fresh Python process without hfllm."""
    script = textwrap.dedent(CHILD).format(source=inspect.getsource(transcript))
    with tempfile.TemporaryDirectory(prefix="hfllm-check-") as home:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(Path(home) / "modules")}
        result = subprocess.run([sys.executable, "-c", script, str(folder.resolve()), "remote" if remote else "native",
                                 json.dumps(CHATS), str(NEW_TOKENS)], capture_output=True, text=True, cwd=home,
                                env=env, timeout=900)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise HfllmError(f"the staged folder does not load with transformers alone ({last}); nothing was pushed")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _token(pieces: list[str], ids: list[int], i: int) -> str:
    return f"{pieces[i]!r} (id {ids[i]})" if i < len(ids) else "the end"


def first_difference(source: dict, staged: dict, what: str) -> tuple[str, str] | None:
    """Where `staged` first departs from `source` (two `transcript`s): the part ("template", "eos", "prompt" or
    "answer") and the words, or None when they agree. `what` names the staged side ("the staged model", "llama.cpp")."""
    if source["chat_template"] != staged["chat_template"]:
        has = "has" if staged["chat_template"] else "has no"
        return "template", f"{what} {has} a chat template, the source {'has' if source['chat_template'] else 'none'}"
    if source["eos"] != staged["eos"]:
        return "eos", f"{what} ends a sequence at token ids {staged['eos']}, the source at {source['eos']}"
    for n, (want, got) in enumerate(zip(source["chats"], staged["chats"]), start=1):
        for part in ("prompt", "answer"):
            ids, mine = got[part], want[part]
            if ids != mine:
                i = next((i for i, (a, b) in enumerate(zip(ids, mine)) if a != b), min(len(ids), len(mine)))
                return part, (f"chat {n}'s {'rendered prompt' if part == 'prompt' else 'greedy answer'} differs at "
                              f"token {i}: {what} has {_token(got[part + '_pieces'], ids, i)}, the source "
                              f"{_token(want[part + '_pieces'], mine, i)}")
    return None


def source_transcript(run_dir: Path) -> dict:
    """`transcript` of the run folder's model (through hfllm's loader), in float32."""
    from ..checkpoint import load

    model, tokenizer = load(run_dir, dtype=torch.float32)
    return transcript(model, tokenizer, CHATS, NEW_TOKENS)


def check_staged(folder: Path, source: dict, remote: bool) -> None:
    """One line when the staged folder, loaded by transformers alone, does not answer as the source does."""
    difference = first_difference(source, staged_transcript(folder, remote), "the staged model")
    if difference is not None:
        part, words = difference
        tokenizer_files = ", ".join(name for name in TOKENIZER_FILES if (folder / name).is_file())
        culprit = {"template": tokenizer_files, "prompt": tokenizer_files, "eos": "generation_config.json"}.get(
            part, "the weights and config.json")
        raise HfllmError(f"the staged folder ({culprit}) does not reproduce the source model: {words}; nothing was "
                         "pushed")


# ----------------------------------------------------------------------------- GGUF files


def check_gguf_files(paths: list[Path], source: dict | None) -> str | None:
    """Check every GGUF file (header, then llama.cpp against `source`, the run model's `transcript`); returns the
    one-line notice when llama.cpp is not there and that part was skipped, else None."""
    from ..assets import llama_cpp
    from ..checkpoint import check_gguf

    for path in paths:
        check_gguf(path)
    if not paths or source is None:
        return None
    try:
        llama_cpp(build=False)
    except HfllmError as error:
        return (f"GGUF check skipped for {', '.join(path.name for path in paths)}: "
                f"{str(error).split(';')[0]}; its build command is in docs/push.md")
    for path in paths:
        difference = gguf_difference(path, source)
        if difference is not None:
            raise HfllmError(f"{path.name} does not answer as the source model: {difference}; nothing was pushed")
    return None


def gguf_difference(path: Path, source: dict) -> str | None:
    """`first_difference` of llama.cpp on the GGUF file (its template, tokenizer and greedy answers; the answers
    checked against the file's own weights in torch) from `source`."""
    from ..checkpoint import check_gguf, load
    from ..inference.llama_cpp_engine import LlamaCppEngine

    engine = LlamaCppEngine(path, threads=max(1, min(4, os.cpu_count() or 1)))
    llama = engine.llama
    pieces = lambda ids: [llama._model.token_get_text(i) for i in ids]  # noqa: E731
    got = {"chat_template": bool(engine.chat_template), "eos": source["eos"], "chats": []}
    eos = llama.token_eos()
    if eos not in source["eos"]:
        return (f"llama.cpp ends a sequence at {llama._model.token_get_text(eos)!r} (id {eos}), the source at token "
                f"ids {source['eos']}")
    for chat in CHATS:
        if engine.chat_template:
            ids = engine.tokenize(engine.render(chat), chat=True)
        else:
            ids = engine.tokenize(chat[-1]["content"], chat=False)
        llama.reset()
        answer = []
        for token in llama.generate(ids, temp=0.0, repeat_penalty=1.0):
            answer.append(token)
            if token in source["eos"] or len(answer) == NEW_TOKENS:
                break
        got["chats"].append({"prompt": ids, "answer": answer, "prompt_pieces": pieces(ids),
                             "answer_pieces": pieces(answer)})
    prompts_only = {**got, "chats": [{**c, "answer": s["answer"], "answer_pieces": s["answer_pieces"]}
                                     for c, s in zip(got["chats"], source["chats"])]}
    difference = first_difference(source, prompts_only, "llama.cpp")
    if difference is not None:
        return difference[1]
    file_type = check_gguf(path).fields.get("general.file_type")
    floating = file_type is None or int(file_type.contents()) in (0, 1, 32)  # ALL_F32, MOSTLY_F16, MOSTLY_BF16
    model, _ = load(path, dtype=torch.float32, with_tokenizer=False)
    for n, chat in enumerate(got["chats"], start=1):
        ids = chat["prompt"] + chat["answer"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, len(chat["prompt"]) - 1: len(ids) - 1]  # (answer, vocab)
        for i, (token, row) in enumerate(zip(chat["answer"], logits)):
            top = int(row.argmax())
            margin = MARGIN["float" if floating else "quantized"] * float(row.max() - row.mean())
            if token != top and float(row[token]) < float(row[top]) - margin:
                return (f"chat {n}'s greedy answer differs at token {i}: llama.cpp has "
                        f"{_token(chat['answer_pieces'], chat['answer'], i)}, hfllm {pieces([top])[0]!r} (id {top})")
    return None
