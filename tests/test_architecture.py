"""The package's layout: no import circle (deferred imports inside functions included), and each
module opens with a docstring saying its one idea (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "stellarlm"
MAX_LINES = 520  # "about 500": a longer module says why in its docstring


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its text (top level or in a function)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            edges |= {c for c in candidates if c in modules and c != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 40 and "stellarlm.training.loop" in graph  # the walk saw the whole package
    assert cycles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_layers_point_down():
    """The vocabulary imports nothing from data/; what answers questions (predictor), calibrates
    and fine-tunes imports neither the public face (query) nor the command line."""
    graph = import_graph()
    assert not {m for m in graph["stellarlm.vocab"] if m.startswith("stellarlm.data")}
    for low in ("stellarlm.predictor", "stellarlm.calibration", "stellarlm.finetune.run"):
        assert "stellarlm.query" not in graph[low] and "stellarlm.cli" not in graph[low], low
    # the benchmark finds the default model through stellarlm.pretrained, not the command line
    assert not {m for m in graph["stellarlm.bench"] | graph["stellarlm.bench.speed"] if m == "stellarlm.cli"}


@pytest.mark.parametrize("name", sorted(_modules()))
def test_each_module_opens_with_its_one_idea(name):
    path = _modules()[name]
    text = path.read_text()
    doc = ast.get_docstring(ast.parse(text))
    assert doc and len(doc.splitlines()[0]) > 20, f"{path}: no docstring saying what the module is"
    lines = text.count("\n")
    if lines > MAX_LINES:
        assert "past 500 lines" in doc, f"{path}: {lines} lines, and its docstring does not say why"
