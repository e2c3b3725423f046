"""`hfllm push RUN_DIR REPO_ID`: upload a run's model to the Hugging Face Hub with huggingface_hub.

    hfllm push runs/sft me/tiny-sft --dry_run staged/     # write exactly the folder that would be uploaded
    hfllm push runs/sft me/tiny-sft --private             # create the repo (if needed) and upload that folder

What goes up: the weights (safetensors, or a PEFT adapter), config and generation config, the tokenizer and chat
template, GGUF files with their Ollama `Modelfile`, the recipe, run metadata, samples, evaluation results, the loss
curve, and a model card (hfllm/shipping/card.py). Optimizer states, intermediate checkpoints and logs stay home.

`--format auto` (the default) publishes an hfllm checkpoint as the native transformers class it maps to exactly
(`exact_native`: no remote code needed), and with its own model code (`modeling_hfllm.py`) when none does; `native`
and `hfllm` force one. Before anything leaves, the staged folder is loaded by transformers alone in a fresh process
and every GGUF file by llama.cpp, and both must answer a few chats as the source model does (verify.py).

The token comes from huggingface_hub (`HF_TOKEN` or `hf auth login`), is handed only to the Hub client, and is never
written to a file or printed; a staged file that contains it stops the upload.

In Python: `hfllm.push("runs/sft", "me/tiny-sft", dry_run="staged/")` -> a `Pushed` (the folder or URL and the files).
"""

import dataclasses
import fnmatch
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..checkpoint import HUB_ID, atomic_output, check_output_dir, find_checkpoint, spec_kind
from ..errors import ArgumentParser, HfllmError
from ..files import sha256
from . import verify
from .card import RunFacts, build_card, read_json

# files of a run folder that are uploaded (top level only); anything else stays home
UPLOAD = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "adapter_config.json",
    "configuration_*.py", "modeling_*.py", "*_hfllm.py", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "*.gguf", "Modelfile", "recipe.yaml", "run_info.json", "samples.txt", "loss_curve.png",
    "eval_results.json", "all_results.json", "results.json", "results.md",
)
MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "configuration_*.py", "modeling_*.py", "*_hfllm.py")  # replaced by the native model's own when publishing native
FORMATS = ("auto", "native", "hfllm")
LICENSES = ("apache-2.0", "mit", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "openrail", "llama3", "other")


def run_facts(run_dir: Path, name: str) -> RunFacts:
    """Read what the run folder says about itself (see RunFacts)."""
    adapter = read_json(run_dir / "adapter_config.json")
    config = read_json(run_dir / "config.json") or {}
    kind = folder_kind(run_dir)
    recipe_file = run_dir / "recipe.yaml"
    recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) if recipe_file.is_file() else {}
    state_dir = run_dir if (run_dir / "trainer_state.json").is_file() else find_checkpoint(run_dir, warn=False)
    state = read_json(Path(state_dir) / "trainer_state.json") if state_dir else None
    scores = (read_json(run_dir / "results.json") or {}).get("models", [{}])
    eval_scores = scores[0].get("scores", {}) if len(scores) == 1 else {}
    samples = run_dir / "samples.txt"
    return RunFacts(
        name=name,
        kind=kind,
        recipe=recipe or {},
        run_info=read_json(run_dir / "run_info.json") or {},
        config=config,
        base_model=(adapter or {}).get("base_model_name_or_path") or (recipe or {}).get("model_name_or_path"),
        log_history=(state or {}).get("log_history", []),
        eval_scores=eval_scores,
        weight_hashes={path.name: sha256(path) for path in sorted(run_dir.glob("*.safetensors"))},
        gguf_files=sorted(path.name for path in run_dir.glob("*.gguf")),
        has_loss_curve=(run_dir / "loss_curve.png").is_file() or bool(state),
        samples=_last_samples(samples.read_text(encoding="utf-8")) if samples.is_file() else None,
    )


def native_model(run_dir: Path, fmt: str):
    """The native transformers model to publish an hfllm checkpoint as (None: publish hfllm's own code), and the
    sentence for the card saying which and why. Other folders are published as they are."""
    kind = folder_kind(run_dir)
    if kind != "hfllm":
        if fmt != "auto" and (kind == "adapter" or fmt == "hfllm"):
            raise HfllmError(f"--format {fmt} applies to hfllm checkpoints; '{run_dir}' is a "
                             f"{'PEFT adapter' if kind == 'adapter' else 'native transformers'} folder, published as "
                             "it is: drop --format")
        return None, None
    if fmt == "hfllm":
        return None, "Published with hfllm's own model code (`--format hfllm`); it loads with `trust_remote_code=True`."
    from ..checkpoint import load
    from ..models.convert import exact_native

    model, _ = load(run_dir, with_tokenizer=False)
    try:
        native = exact_native(model)
    except HfllmError as error:
        if fmt == "native":
            raise HfllmError(f"--format native: {error}; publish it with --format hfllm (or auto)") from None
        return None, (f"Published with hfllm's own model code (it loads with `trust_remote_code=True`), not as a native "
                      f"transformers class: {error}.")
    return native, (f"Published as the native transformers class `{type(native).__name__}` (`--format {fmt}`): the "
                    "same weights, and its float32 logits equal the hfllm model's bit for bit on the checked inputs, "
                    "so it loads without `trust_remote_code` and without hfllm.")


def folder_kind(run_dir: Path) -> str:
    """"adapter", "hfllm" (remote code) or "transformers" (a native architecture)."""
    if (run_dir / "adapter_config.json").is_file():
        return "adapter"
    return "hfllm" if (read_json(run_dir / "config.json") or {}).get("model_type") == "hfllm" else "transformers"


def stage(run_dir: Path, repo_id: str, out: Path, license_id: str, fmt: str = "auto") -> list[str]:
    """Write into the empty folder `out` exactly what is uploaded, in format `fmt` (FORMATS); returns the names."""
    native, published = native_model(run_dir, fmt)
    names = sorted(path.name for path in run_dir.iterdir()
                   if path.is_file() and any(fnmatch.fnmatch(path.name, pattern) for pattern in UPLOAD)
                   and not (native is not None and any(fnmatch.fnmatch(path.name, p) for p in MODEL_FILES)))
    for name in names:
        shutil.copy2(run_dir / name, out / name)
    facts = run_facts(run_dir, repo_id.split("/")[-1])
    if native is not None:
        native.save_pretrained(out)
        facts = dataclasses.replace(facts, kind="transformers", config=read_json(out / "config.json"),
                                    weight_hashes={path.name: sha256(path) for path in sorted(out.glob("*.safetensors"))})
    facts.published = published
    if facts.has_loss_curve and not (out / "loss_curve.png").is_file():
        from ..plots import plot_loss_curve

        plot_loss_curve(facts.log_history, out / "loss_curve.png")
    build_card(facts, repo_id, license_id).save(out / "README.md")
    return sorted(path.name for path in out.iterdir())


def stage_checked(run_dir: Path, repo_id: str, out: Path, license_id: str, fmt: str) -> list[str]:
    """`stage`, then the checks of verify.py on what was staged (one line on a mismatch); returns the names."""
    names = stage(run_dir, repo_id, out, license_id, fmt)
    source = None
    if folder_kind(run_dir) != "adapter" and (run_dir / "config.json").is_file():
        source = verify.source_transcript(run_dir)
        verify.check_staged(out, source, remote=any(out.glob("modeling_*.py")))
    notice = verify.check_gguf_files(sorted(out.glob("*.gguf")), source)
    if notice:
        print(f"note: {notice}", file=sys.stderr, flush=True)
    return names


def check_run_dir(run_dir: Path) -> None:
    kind = spec_kind(run_dir)  # one line when it is no checkpoint
    if kind in ("hub", "gguf") or not run_dir.is_dir():
        raise HfllmError(f"'{run_dir}' is not a run folder; give a folder written by an hfllm command (a checkpoint "
                         "with config.json, or a PEFT adapter)")
    if not (any(run_dir.glob("*.safetensors")) or any(run_dir.glob("*.gguf"))):
        raise HfllmError(f"'{run_dir}' holds no weights (*.safetensors or *.gguf); push the folder the training "
                         "command saved its final model to")


def check_repo_id(repo_id: str) -> None:
    if not (HUB_ID.match(repo_id) and repo_id.count("/") == 1) or ".." in repo_id or repo_id.endswith((".", "-")):
        raise HfllmError(f"repo id '{repo_id}' is not valid; use NAMESPACE/NAME with letters, digits, '-', '_', '.'")


def leaked_token(folder: Path, token: str) -> list[str]:
    """The staged files that contain the token."""
    return [path.name for path in sorted(folder.rglob("*")) if path.is_file() and token.encode() in path.read_bytes()]


def upload(folder: Path, repo_id: str, *, private: bool, revision: str | None, token: str | None) -> str:
    """Create the repo (and branch) if needed and upload the staged folder as one commit; returns the commit URL."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                   commit_message="Upload model trained with hfllm")
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        hint = {401: "log in with `hf auth login` or set HF_TOKEN", 403: "the token cannot write to this repo; use a "
                "write token or your own namespace", 404: "check the namespace"}.get(status, "check the repo id and your connection")
        raise HfllmError(f"the Hub refused the upload to {repo_id} (HTTP {status}); {hint}") from None
    except (httpx2.TransportError, OSError) as error:  # no connection
        raise HfllmError(f"could not reach the Hugging Face Hub to upload {repo_id} ({type(error).__name__}); check "
                         "your connection, or use --dry_run OUT to stage the folder") from None
    return str(getattr(commit, "commit_url", commit))


def _last_samples(text: str, limit: int = 1500) -> str:
    """The newest block of samples.txt (the final model's), at most `limit` characters."""
    marker = "----- sample 1 "
    start = text.rfind(marker)
    return (text[start:] if start >= 0 else text)[:limit]


PROG = "hfllm push"  # the API's errors read as the command's


@dataclass
class Pushed:
    """What `hfllm push` did: the files staged, and where they are (a dry run's folder) or went (the commit URL)."""

    repo_id: str
    files: list[str]
    staged: Path | None = None  # dry run: the folder written
    url: str | None = None  # upload: the Hub commit
    revision: str | None = None

    def __str__(self) -> str:
        if self.staged is not None:
            return f"staged {len(self.files)} files for {self.repo_id} in {self.staged}: {', '.join(self.files)}"
        return (f"pushed {len(self.files)} files to {self.repo_id}" + (f" ({self.revision})" if self.revision else "")
                + f": {self.url}")


def push(run_dir: str | os.PathLike, repo_id: str, *, dry_run: str | os.PathLike | None = None, private: bool = False,
         format: str = "auto", license: str = "apache-2.0", token: str | None = None,
         revision: str | None = None) -> Pushed:
    """Publish a run's model on the Hugging Face Hub with a model card, after checking that the staged folder loads and
    answers as the run's model does (`hfllm push`).

    Args:
        run_dir: the folder a training command saved its final model to (hfllm, transformers or a PEFT adapter).
        repo_id: the Hub repository, NAMESPACE/NAME.
        dry_run: write the folder that would be uploaded there (a new or empty folder) and upload nothing.
        private: create the repository private.
        format: "auto" (the native transformers class when it is exact, else hfllm's own code), "native" or "hfllm".
        license: the card's license (apache-2.0, mit, cc-by-4.0, ...).
        token: the Hub token (default: huggingface_hub's, from HF_TOKEN or `hf auth login`); never written anywhere.
        revision: the branch to upload to (created if missing; default main).

    Returns:
        A `Pushed`: `.files` (the names staged), `.staged` (the dry run's folder) or `.url` (the Hub commit).
        Bad input raises `HfllmError` with the line the command prints; nothing is half-written.

    Example:
        >>> hfllm.push("runs/sft", "me/tiny-sft", dry_run="staged")
    """
    options = dict(dry_run=dry_run, private=private, format=format, license=license, revision=revision)
    args = _parser(PROG).parse_options([run_dir, repo_id], options)
    return run(args, token)


def run(args, token: str | None = None) -> Pushed:
    """The parsed arguments of `hfllm push` -> the folder staged (`--dry_run`) or uploaded with `token`."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the checks load models: their bars are noise here
    run_dir = Path(args.run_dir)
    check_run_dir(run_dir)
    check_repo_id(args.repo_id)
    if args.dry_run:
        check_output_dir(args.dry_run)
        with atomic_output(args.dry_run) as out:
            names = stage_checked(run_dir, args.repo_id, out, args.license, args.format)
        return Pushed(args.repo_id, names, staged=Path(args.dry_run))

    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise HfllmError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push, or use --dry_run OUT")
    token = token or get_token()
    if token is None:
        raise HfllmError("no Hugging Face token found; run `hf auth login` or set HF_TOKEN (or use --dry_run OUT)")
    with tempfile.TemporaryDirectory(prefix="hfllm-push-") as folder:
        names = stage_checked(run_dir, args.repo_id, Path(folder), args.license, args.format)
        leaks = leaked_token(Path(folder), token)
        if leaks:
            raise HfllmError(f"your Hub token is written in {', '.join(leaks)}; remove it from {run_dir} before pushing")
        url = upload(Path(folder), args.repo_id, private=args.private, revision=args.revision, token=token)
    return Pushed(args.repo_id, names, url=url, revision=args.revision)


def _parser(prog: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="folder with the final model of a run (hfllm, transformers or PEFT adapter)")
    parser.add_argument("repo_id", help="Hub repository, NAMESPACE/NAME")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, help="branch to upload to (created if missing; default main)")
    parser.add_argument("--license", default="apache-2.0", choices=LICENSES, help="the card's license (default apache-2.0)")
    parser.add_argument("--dry_run", metavar="OUT", default=None, help="write the folder that would be uploaded to OUT; upload nothing")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="hfllm checkpoints: auto (default) publishes the native transformers class when it is "
                             "exact, else hfllm's own code; native or hfllm force one")
    return parser


def main(argv: list[str], prog: str = "hfllm push") -> int:
    print(run(_parser(prog).parse_args(argv)))
    return 0
