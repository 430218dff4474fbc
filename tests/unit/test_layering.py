"""The package's layers: each imports only the layers below it, and no modules import each other in a circle.

Every import statement counts, at the top of a module, inside a function or under `TYPE_CHECKING`: a lazy or
type-only import upward is still a dependency upward (and breaks the day someone uses the type at run time).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"
# Bottom to top. A module may import its own layer and any layer listed before it.
LAYERS = ("captioning", "config", "io", "table", "engine", "run", "exports", "testing", "cli")
# The root package holds the version only; `python -m pipeline` is the very top.
ROOT_RANK, MAIN_RANK = -1, len(LAYERS)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def rank(module: str) -> int:
    parts = module.split(".")
    if parts == ["pipeline"]:
        return ROOT_RANK
    if parts[1] == "__main__":
        return MAIN_RANK
    return LAYERS.index(parts[1])


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The pipeline modules `path` imports (`from pipeline.x import y` counts `pipeline.x.y` when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pipeline"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline") and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if f"{node.module}.{alias.name}" in known)
    return found & known


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    known = set(paths)
    return {name: imported_modules(path, known) - {name} for name, path in paths.items()}


def test_every_package_is_a_known_layer():
    packages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    assert packages == set(LAYERS), f"add a new package to LAYERS (and to the README's layout): {packages}"


def test_no_layer_imports_a_layer_above_it():
    upward = sorted(f"{source} imports {target}" for source, targets in import_graph().items()
                    for target in targets if rank(target) > rank(source))
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module: each is an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_import_circles():
    graph = {name: {target for target in targets if not graph_package_init(target, name)}
             for name, targets in import_graph().items()}
    assert not strongly_connected(graph), strongly_connected(graph)


def graph_package_init(target: str, source: str) -> bool:
    """A package's `__init__` re-exporting its own modules is not a circle with them."""
    return source.startswith(target + ".")


@pytest.mark.parametrize("graph, circles", [
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
])
def test_the_circle_finder_finds_circles(graph, circles):
    assert strongly_connected(graph) == circles


def test_the_layer_check_sees_lazy_and_type_only_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.cli import main\n"
                      "def f():\n    import pipeline.run.driver\n")
    assert imported_modules(module, {"pipeline.cli", "pipeline.cli.main", "pipeline.run.driver"}) == {
        "pipeline.cli", "pipeline.cli.main", "pipeline.run.driver"}
