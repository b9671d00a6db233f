"""The import graph keeps the layout of docs/design.md: a core (`sslbench`) at the bottom, stage
packages above it that never import each other, and no import circle anywhere.

Read with `ast`, not by importing, so optional dependencies (detectron2, mmseg) need not be
installed and imports inside functions count like any other. A relative import is resolved
against its module's package; `from pkg import name` is an edge to `pkg.name` when that is a
module, else to `pkg`. Modules loaded by name through importlib (the CLI's sub-command dispatch)
are not import statements and are not edges.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from helpers import ROOT

CORE = "sslbench"
STAGES = ("pretrain", "evaluators", "transfer", "leaderboard")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module
    where: str  # file:line, for failure messages


def module_names(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under root/<package> (packages that exist)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: dict[str, Path]
) -> list[str]:
    """The project modules one import statement names (third-party ones are left out)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            anchor = package[: len(package) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        names = [
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
            for alias in node.names
        ]
    return [name for name in names if name in known and name != module]


def import_graph(root: Path, packages: tuple[str, ...]) -> list[Import]:
    """Every import between project modules under root/<packages>, at any depth in the file."""
    known = module_names(root, packages)
    edges = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                where = f"{path.relative_to(root)}:{node.lineno}"
                edges += [
                    Import(module, target, where)
                    for target in _imported(node, module, path.name == "__init__.py", known)
                ]
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the directed graph as [a, b, ..., a], or None when it has none."""
    done: set[str] = set()
    for start in sorted(graph):
        cycle = _cycle_from(graph, [start], done)
        if cycle:
            return cycle
    return None


def _cycle_from(graph: dict[str, set[str]], path: list[str], done: set[str]) -> list[str] | None:
    """Depth-first from path[-1]: a circle through a node on `path`, or None; adds every node
    it finishes without one to `done`."""
    for nxt in sorted(graph.get(path[-1], ())):
        if nxt in path:
            return path[path.index(nxt) :] + [nxt]
        if nxt not in done:
            cycle = _cycle_from(graph, [*path, nxt], done)
            if cycle:
                return cycle
    done.add(path[-1])
    return None


def as_graph(edges: list[Import]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
    return graph


def top(module: str) -> str:
    return module.split(".")[0]


EDGES = import_graph(ROOT, (CORE, *STAGES))


def test_the_graph_covers_every_package():
    sources = {top(e.source) for e in EDGES}
    assert sources == {p for p in (CORE, *STAGES) if (ROOT / p).is_dir()}


def test_no_import_cycles():
    cycle = find_cycle(as_graph(EDGES))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_stage_imports_a_sibling_stage():
    crossing = [
        f"{e.where}: {e.source} imports {e.target}"
        for e in EDGES
        if top(e.source) in STAGES and top(e.target) in STAGES and top(e.source) != top(e.target)
    ]
    assert not crossing, "stages import each other:\n" + "\n".join(crossing)


def test_the_core_imports_no_stage():
    upward = [
        f"{e.where}: {e.source} imports {e.target}"
        for e in EDGES
        if top(e.source) == CORE and top(e.target) in STAGES
    ]
    assert not upward, "the core imports a stage:\n" + "\n".join(upward)


# --- the checks can fail ---------------------------------------------------------------------


def test_find_cycle_on_hand_made_graphs():
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None  # a diamond
    cycle = find_cycle({"entry": {"a"}, "a": {"b"}, "b": {"c"}, "c": {"a", "leaf"}})
    assert cycle == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_a_circle_hidden_in_a_function_through_a_relative_import_is_caught(tmp_path):
    # the shape of the circle detection's data.py and voc.py had: one direction at module level,
    # the other hidden inside a function
    package = tmp_path / "stage" / "detection"
    package.mkdir(parents=True)
    for init in (tmp_path / "stage" / "__init__.py", package / "__init__.py"):
        init.write_text("")
    (package / "data.py").write_text(
        "class DataError(ValueError):\n    pass\n\n\n"
        "def load():\n    from .voc import parse\n    return parse()\n"
    )
    (package / "voc.py").write_text(
        "from .data import DataError\n\n\ndef parse():\n    raise DataError\n"
    )
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("from stage.detection import voc\n")
    edges = import_graph(tmp_path, ("core", "stage"))
    data, voc = "stage.detection.data", "stage.detection.voc"
    assert find_cycle(as_graph(edges)) in ([data, voc, data], [voc, data, voc])
    assert Import("core", "stage.detection.voc", "core/__init__.py:1") in edges
