"""The notebooks run: every code cell but the set-up cell, in one namespace, in quick mode."""

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted(Path(__file__).resolve().parents[1].joinpath("notebooks").glob("*.ipynb"))
# what each notebook must print: the converted chat model answered (and, in chat.ipynb, kept the history)
PRINTED = {
    "quickstart.ipynb": ["HfllmForCausalLM -> ", "Paris"],
    "chat.ipynb": ["HfllmForCausalLM", "Paris", "<|im_start|>user\nWhat is it famous for?", "stop at the first comma: "],
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(path.parents[1])
    monkeypatch.setenv("HFLLM_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("HFLLM_NOTEBOOK_RUN", str(tmp_path / "run"))
    cells = json.loads(path.read_text())["cells"]
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code" and "setup" not in cell["metadata"].get("tags", []):
            exec(compile("".join(cell["source"]), f"{path.name}:{cell['id']}", "exec"), namespace)
    printed = capsys.readouterr().out
    for text in PRINTED[path.name]:
        assert text in printed, printed
