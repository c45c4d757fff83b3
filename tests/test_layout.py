"""The package's shape: which part may import which (docs/architecture.md).

Read from the source, every import counted: top level, inside functions and
under ``if TYPE_CHECKING:`` alike, since an annotation-only cycle is a cycle
for a reader too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import asyncbg

PACKAGE = Path(asyncbg.__file__).parent


def _module_name(path: Path) -> str:
    parts = ["asyncbg", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from . import loop` names a module, `from .x import y` a name in x.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _external(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.partition(".")[0])
    return found


def test_the_scan_sees_the_package() -> None:
    graph = _graph()
    assert {"asyncbg.extension", "asyncbg.engine.loop", "asyncbg.web.blueprint"} <= set(graph)
    assert "asyncbg.engine.loop" in graph["asyncbg.lifecycle"]


def test_no_import_cycles_not_even_annotation_only_ones() -> None:
    graph = _graph()
    # The package's __init__ re-exports the public names: importing it is
    # importing everything, so edges *to* it (``from asyncbg import X`` in the
    # demo) are left out; edges from it are real.
    graph = {m: {d for d in deps if d != "asyncbg"} for m, deps in graph.items()}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert cycles == []


@pytest.mark.parametrize("part", ["engine", "backends"])
def test_the_engine_and_the_backends_import_no_flask(part: str) -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(_external(path) & {"flask", "werkzeug", "jinja2"})
        for path in sorted((PACKAGE / part).rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


@pytest.mark.parametrize(
    ("part", "allowed"),
    [
        ("asyncbg.engine", ("asyncbg.engine", "asyncbg.errors")),
        # a backend sees the records, never the glue
        ("asyncbg.backends", ("asyncbg.backends", "asyncbg.engine", "asyncbg.errors")),
    ],
)
def test_a_part_depends_only_on_what_it_may(part: str, allowed: tuple[str, ...]) -> None:
    graph = _graph()
    outside = {
        module: sorted(d for d in deps if not d.startswith(allowed))
        for module, deps in graph.items()
        if module.startswith(part)
    }
    assert {k: v for k, v in outside.items() if v} == {}


def test_the_surfaces_read_the_state_view_not_the_extension() -> None:
    graph = _graph()
    glue = {"asyncbg.extension", "asyncbg.lifecycle", "asyncbg"}
    surfaces = [m for m in graph if m.startswith("asyncbg.web") or m == "asyncbg.cli"]
    assert surfaces
    assert {m: sorted(graph[m] & glue) for m in surfaces if graph[m] & glue} == {}
