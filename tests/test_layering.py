"""The library's layering: no import cycle, and no arrow from the library up into the
command line or the recipes (which are mounted through the ``kad.commands`` entry point)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UP = ("kad.cli", "kad_recipes")
#: ``python -m kad`` runs the command line: it belongs to it.
ENTRY = "kad.__main__"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (lazy imports are
    arrows too); imports under ``if TYPE_CHECKING:`` are annotations, not arrows."""
    tree = ast.parse(path.read_text())
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for folder in ("kad", "kad_plugins", "kad_recipes")
               for p in (ROOT / folder).rglob("*.py")}
    return {name: {d for d in _imports(path, name) if d in modules and d != name}
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = _graph()
    graph["kad.utils.specs"] = graph["kad.utils.specs"] | {"kad.registry"}  # registry imports specs
    assert ["kad.registry", "kad.utils.specs"] in _cycles(graph)


def test_no_library_module_imports_the_command_line_or_the_recipes():
    arrows = [(name, dep) for name, deps in _graph().items()
              if not name.startswith(UP) and name != ENTRY for dep in deps if dep.startswith(UP)]
    assert arrows == []


LIBRARY = sorted(name for name in _graph()
                 if name.startswith("kad") and not name.startswith(UP) and name != ENTRY)


@pytest.mark.tf
def test_importing_the_library_pulls_in_neither_the_command_line_nor_the_recipes():
    code = (
        "import importlib, sys\n"
        f"up = {UP!r}\n"
        "bad = {}\n"
        f"for name in {LIBRARY!r}:\n"
        "    importlib.import_module(name)\n"
        "    pulled = [m for m in sys.modules if m.startswith(up)]\n"
        "    if pulled:\n"
        "        bad[name] = pulled\n"
        "        for m in pulled: del sys.modules[m]\n"
        "print(bad)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "{}"


#: kad's floors, bottom first: a module may import from its own floor and those below.
FLOORS = ("kad.errors", "kad.utils", "kad.registry", "kad.data", "kad.features",
          "kad.detectors", "kad.screening", "kad.serve", "kad.cli")


def _floor(module: str) -> int | None:
    for level in range(len(FLOORS) - 1, -1, -1):
        if module == FLOORS[level] or module.startswith(FLOORS[level] + "."):
            return level
    return None


def _upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((name, dep) for name, deps in graph.items() for dep in deps
                  if _floor(name) is not None and _floor(dep) is not None
                  and _floor(dep) > _floor(name))


def test_each_floor_imports_only_from_its_own_and_the_floors_below():
    assert _upward(_graph()) == []


def test_the_floor_check_finds_a_planted_arrow_up():
    graph = _graph()
    graph["kad.features.cache"] = graph["kad.features.cache"] | {"kad.screening.pipeline"}
    assert ("kad.features.cache", "kad.screening.pipeline") in _upward(graph)


def test_every_public_name_resolves_without_importing_tensorflow():
    code = ("import sys, kad\n"
            "missing = [n for n in kad.__all__ if not hasattr(kad, n)]\n"
            "print(missing, 'tensorflow' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[] False"


def test_no_module_needs_a_posix_only_import():
    """kad runs where Python runs: no module imports ``fcntl`` (POSIX only); locks go
    through ``filelock`` or exclusive creation."""
    posix_only = {"fcntl", "termios", "pwd", "grp", "resource"}
    found = sorted((name, dep) for name, path in
                   ((_module_name(p), p) for folder in ("kad", "kad_plugins", "kad_recipes")
                    for p in (ROOT / folder).rglob("*.py"))
                   for dep in _imports(path, name) if dep.split(".")[0] in posix_only)
    assert found == []
