"""Every notebook runs top to bottom in a real Jupyter kernel (nbclient + ipykernel), its install cell included, at
tiny size (HFLLM_NOTEBOOK_TINY=1), from a folder outside the checkout.

The kernel's Python is a virtual environment over this Python's packages (`--system-site-packages`), so the install
cell (`pip install "$HFLLM_SOURCE[extras]"`, HFLLM_SOURCE = this checkout) installs hfllm itself into the kernel's
environment as a user's would, without touching the development install; each notebook prints where hfllm came from.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
from nbclient import NotebookClient  # noqa: E402
from nbclient.exceptions import CellExecutionError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "hfllm-notebook-test"
# what each notebook must print at tiny size on this CPU: that each stage did its work
PRINTED = {
    "quickstart.ipynb": ["final validation loss:", "HfllmForCausalLM", "Paris"],
    "fine-tune.ipynb": ["held-out: ", "QLoRA skipped: no GPU", "4 messages in the conversation"],
    "align.ipynb": ["exact match: base "],
    "evaluate.ipynb": ["byte perplexity"],
    "ship.ipynb": ["staged ", "FROM ./"],
    "chat.ipynb": ["assistant:"],
}
# what a training notebook shows as rich output: transformers' notebook progress bar and the RunResult's loss curve
SHOWN = {name: ["<progress", "data:image/png;base64,"] for name in ("quickstart.ipynb", "fine-tune.ipynb")}


class NotebookFailed(Exception):
    """A cell raised: the message names the notebook, the cell and the error."""


@pytest.fixture(scope="session")
def jupyter_path(tmp_path_factory) -> str:
    """A folder holding the kernel spec KERNEL, whose Python is a fresh virtual environment over this one's packages."""
    root = tmp_path_factory.mktemp("jupyter")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [str(venv / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    return str(root)


def run_notebook(notebook, cwd: Path, timeout: int = 600):
    """Execute `notebook` (a NotebookNode) top to bottom in the KERNEL kernel, in `cwd`; returns it with its outputs.
    Raises NotebookFailed naming the cell and its error."""
    client = NotebookClient(notebook, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}})
    try:
        client.execute()
    except CellExecutionError as error:
        failed = next((i for i, cell in enumerate(notebook.cells) if any(
            output.get("output_type") == "error" for output in cell.get("outputs", []))), None)
        where = f"cell {failed} (id {notebook.cells[failed].get('id')})" if failed is not None else "a cell"
        source = notebook.cells[failed].source if failed is not None else ""
        raise NotebookFailed(f"{where} raised {error.ename}: {error.evalue}\n--- the cell:\n{source}") from None
    return notebook


def printed(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
                   if output.get("output_type") == "stream")


@pytest.fixture
def kernel_env(jupyter_path, monkeypatch, tmp_path) -> Path:
    """The kernel's environment: the spec, tiny size, hfllm installed from this checkout; returns its working folder."""
    monkeypatch.setenv("JUPYTER_PATH", jupyter_path)
    monkeypatch.setenv("HFLLM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("HFLLM_SOURCE", str(ROOT))
    # a user's kernel: conftest points subprocesses at the checkout (PYTHONPATH) and quiets transformers, which would
    # also turn Trainer's progress bar off (disable_tqdm defaults to on above the warning level)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    work = tmp_path / "elsewhere"
    work.mkdir()
    return work


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_a_kernel(path, kernel_env):
    notebook = nbformat.read(path, as_version=4)
    try:
        run_notebook(notebook, kernel_env)
    except NotebookFailed as error:
        pytest.fail(f"{path.name}: {error}", pytrace=False)
    text = printed(notebook)
    installed = str(Path(os.environ["JUPYTER_PATH"]) / "venv")  # the kernel's environment, not the checkout
    setup_line = next((line for line in text.splitlines() if line.startswith("hfllm ")), "")
    assert f" from {installed}/" in setup_line, f"hfllm was not installed into the kernel:\n{text[:800]}"
    for expected in PRINTED.get(path.name, []):
        assert expected in text, f"{path.name} did not print {expected!r}:\n{text[-3000:]}"
    html = "".join(output.get("data", {}).get("text/html", "") for cell in notebook.cells
                   for output in cell.get("outputs", []))
    for expected in SHOWN.get(path.name, []):
        assert expected in html, f"{path.name} did not show {expected!r} inline"


def test_the_runner_reports_the_cell_that_raised(kernel_env):
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("print('first cell ran')"),
        nbformat.v4.new_code_cell("x = 1\nraise ValueError('broken on purpose')"),
        nbformat.v4.new_code_cell("print('never reached')"),
    ])
    with pytest.raises(NotebookFailed, match=r"(?s)cell 1 .*raised ValueError: broken on purpose.*raise ValueError"):
        run_notebook(notebook, kernel_env, timeout=60)
    assert printed(notebook) == "first cell ran\n"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_are_clean_and_colab_ready(path):
    """No outputs or execution counts; the Colab badge of this notebook; the first code cell is the shared install
    cell (tagged setup), the same in every notebook but for its extras."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code), f"{path.name} has outputs"
    assert f"colab.research.google.com/github/hfllm/hfllm/blob/main/notebooks/{path.name}" in notebook.cells[0].source
    assert "setup" in code[0].metadata.get("tags", []) and "HFLLM_SOURCE" in code[0].source
    reference = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4).cells[1].source
    strip_extras = lambda source: "\n".join(line for line in source.splitlines() if not line.startswith("EXTRAS ="))
    assert strip_extras(code[0].source) == strip_extras(reference), f"{path.name}'s install cell differs"
