"""The package's import graph keeps its layers: no import from a lower layer to a higher one, no loops.

Layers, bottom to top (docs/layout.md): errors < recipe < checkpoint < assets and the other top-level helpers, then
data/ < models/ < training/ < evaluation/ < inference/ < shipping/, then diagnostics/ (it spans stages) and the entry
files (cli.py, __main__.py, run_*.py, the package's __init__). Imports are read with `ast`, at module level and inside
functions (a function-level import is still an arrow). `python3 tests/test_layers.py` prints the graph's upward
arrows and loops; the test fails on an arrow that `KNOWN` does not list and on any loop (the report also names the
KNOWN arrows that are gone).
"""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hfllm"
BASE = {"errors": 0, "files": 0, "recipe": 1, "checkpoint": 2, "assets": 3}  # the bottom floor, in this order
# (files.py: file digests, importing nothing of hfllm; checkpoint/provenance.py hashes weights with it)
BASE_HELPERS = 3  # any other top-level module of helpers (files.py, ...) stands beside assets.py
STAGES = {"data": 10, "models": 20, "training": 30, "evaluation": 40, "inference": 50, "shipping": 60}
SPANNING = {"diagnostics": 70, "experiments": 70}
ENTRY = 80  # cli.py, __main__.py, run_*.py, hfllm/__init__.py

# (importer, imported): why the arrow is still there. Empty once every leak is gone.
KNOWN: dict[tuple[str, str], str] = {
    ("hfllm.training.align", "hfllm.evaluation.exact_match"): "GRPO's reward is evaluation's exact match",
    ("hfllm.training.tracking", "hfllm.evaluation.callback"): "a recipe's eval_tasks run EvalCallback during training "
                                                            "(imported when a recipe asks for it)",
}


def module_name(path: Path) -> str:
    parts = ("hfllm", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The floor of `hfllm.<...>`: higher floors may import lower ones, not the other way round."""
    parts = module.split(".")
    if len(parts) == 1:
        return ENTRY
    top = parts[1]
    if top in STAGES:
        return STAGES[top]
    if top in BASE:
        return BASE[top]
    if top in SPANNING:
        return SPANNING[top]
    if top in ("cli", "__main__") or top.startswith("run_"):
        return ENTRY
    return BASE_HELPERS


def imports(path: Path, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported hfllm module, line, at module level) for every import in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from .x import y`: y may be a submodule of x
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target.startswith("hfllm") and target != name:
                found.append((target, node.lineno, id(node) in top_level))
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in files}
    return {module_name(path): imports(path, modules) for path in files}


def upward_arrows(edges) -> list[tuple[str, str, int, bool]]:
    return [(source, target, line, top) for source, targets in edges.items() for target, line, top in targets
            if layer(target) > layer(source)]


def loops(edges, module_level_only: bool) -> list[list[str]]:
    """The import cycles (strongly connected components of two or more modules, Tarjan's algorithm), the KNOWN
    arrows left out."""
    adjacency = {source: sorted({target for target, _, top in targets
                                 if (top or not module_level_only) and (source, target) not in KNOWN})
                 for source, targets in edges.items()}
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in adjacency.get(node, []):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(adjacency):
        if node not in index:
            visit(node)
    return sorted(components)


def report() -> str:
    edges = graph()
    lines = []
    for source, target, line, top in upward_arrows(edges):
        where = "module level" if top else "in a function"
        reason = KNOWN.get((source, target), "NOT KNOWN")
        lines.append(f"upward: {source}:{line} -> {target} ({where}): {reason}")
    for kind, module_level_only in (("module-level loop", True), ("loop", False)):
        for component in loops(edges, module_level_only):
            lines.append(f"{kind}: {' <-> '.join(component)}")
    arrows = {(source, target) for source, target, _, _ in upward_arrows(edges)}
    lines += [f"gone (drop it from KNOWN): {source} -> {target}" for source, target in sorted(set(KNOWN) - arrows)]
    return "\n".join(lines) or "no upward arrows, no loops"


def test_no_import_from_a_lower_layer_to_a_higher_one_and_no_loops():
    edges = graph()
    arrows = {(source, target) for source, target, _, _ in upward_arrows(edges)}
    assert arrows - set(KNOWN) == set(), report()
    assert loops(edges, module_level_only=False) == [], report()


if __name__ == "__main__":
    print(report())
