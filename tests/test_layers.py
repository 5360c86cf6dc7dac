"""The house's import graph: no circles, the foundation imports nothing above it, registries are filled
from above, and the in-process server does not import the Flower engine.

The graph is read from the source with :mod:`ast`: every ``import`` statement counts, wherever it stands
(module level, inside a function, under ``if TYPE_CHECKING``). A lazy import only postpones a circle
to the first call; it does not remove it. An edge goes to the module the statement names
(``from flsec.fl import checkpoint`` -> ``flsec.fl.checkpoint``, ``from flsec.aggregation import X``
-> ``flsec.aggregation``). Python also runs a package's ``__init__`` before any module inside it; that
implicit step is not an edge, because a package assembling its own parts is not a circle between layers
(``flsec.models`` imports ``flsec.models.cnn``, which imports ``flsec.models.registry``).
"""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "flsec"

# The bottom layers: errors, files and paths, then the configuration. They import nothing above them.
FOUNDATION = {"flsec", "flsec.errors", "flsec.faults", "flsec.io", "flsec.paths", "flsec.lock", "flsec.registry",
              "flsec.runtime", "flsec.config"}


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {imported flsec module: line of the first statement importing it}."""
    mods = modules(root)
    top = root.name

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names if a.name.split(".")[0] == top]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                if base.split(".")[0] != top:
                    continue
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else resolve(base) for a in node.names]
            for target in targets:
                if target is not None and target != mod:
                    graph[mod].setdefault(target, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One circle (a list of modules, first == last) per strongly connected component of the graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_circle_in(graph, comp) for comp in components]


def _circle_in(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest circle through the first module of a strongly connected component (breadth first)."""
    inside, start = set(component), component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w in inside and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no circle through {start}")


def describe(graph: dict[str, dict[str, int]], circle: list[str]) -> str:
    mods = modules()
    steps = [f"{a} ({mods[a].relative_to(SRC)}:{graph[a][b]})" for a, b in itertools.pairwise(circle)]
    return " -> ".join([*steps, circle[-1]])


def test_the_import_graph_has_no_circles() -> None:
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import circles:\n" + "\n".join(describe(graph, c) for c in found)


def test_the_walker_sees_every_kind_of_import(tmp_path: Path) -> None:
    """A circle made only of a lazy import, a relative import and a TYPE_CHECKING import is found."""
    pkg = tmp_path / "flsec"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import low\n")
    (pkg / "base.py").write_text("def f():\n    from flsec.sub import high\n")
    (pkg / "sub" / "low.py").write_text("from ..base import f\n")
    (pkg / "sub" / "high.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import flsec.base\n")
    graph = import_graph(pkg)
    assert graph["flsec.sub.low"] == {"flsec.base": 1} and graph["flsec.sub"] == {"flsec.sub.low": 1}
    assert cycles(graph) == [["flsec.base", "flsec.sub.high", "flsec.base"]]
    (pkg / "sub" / "high.py").write_text("import os\n")
    assert cycles(graph := import_graph(pkg)) == [] and graph["flsec.base"] == {"flsec.sub.high": 2}


def test_the_foundation_imports_nothing_above_it() -> None:
    graph = import_graph()
    above = {m: sorted(set(graph[m]) - FOUNDATION) for m in sorted(FOUNDATION)}
    assert {m: t for m, t in above.items() if t} == {}


def test_the_in_process_server_does_not_import_flower() -> None:
    graph = import_graph()
    assert [t for t in graph["flsec.fl.server"] if t.startswith("flsec.flower")] == []
    assert "flsec.flower.engine" in graph["flsec.fl.engines"]  # the engine choice lives with the engines


def test_built_in_names_are_the_registries() -> None:
    """The configuration checks names against :data:`flsec.registry.BUILT_IN` without importing the
    families; this keeps that list equal to what flsec's own modules register."""
    from flsec.aggregation import AGGREGATORS
    from flsec.attacks.registry import load_builtin
    from flsec.data import DATASETS
    from flsec.detection import DETECTORS
    from flsec.inversion import METHODS
    from flsec.models import MODELS
    from flsec.registry import BUILT_IN

    registries = {r.kind: r for r in (DATASETS, MODELS, AGGREGATORS, load_builtin(), METHODS, DETECTORS)}
    assert set(registries) == set(BUILT_IN)
    for kind, registry in registries.items():
        own = sorted(n for n in registry.names() if registry.get(n).__module__.startswith("flsec."))
        assert own == sorted(BUILT_IN[kind]), f"flsec.registry.BUILT_IN[{kind!r}] must list {own}"
    from flsec.models import has_width
    from flsec.registry import BUILT_IN_WITH_WIDTH

    assert sorted(BUILT_IN_WITH_WIDTH) == sorted(n for n in BUILT_IN["model"] if has_width(n))


@pytest.mark.parametrize(("setting", "kind"), [("aggregation.name=zeno", "aggregator"), ("model.name=vgg", "model"),
                                               ("data.name=imagenet", "dataset"), ("attack.kind=ghost", "attack")])
def test_config_alone_knows_every_built_in_name(setting: str, kind: str) -> None:
    """A bare ``flsec.config`` validates plug-in names (and lists them) without importing a family."""
    code = ("import sys\nfrom flsec.config import load_config\nfrom flsec.errors import ConfigError\n"
            "load_config(None)\n"
            f"try:\n    load_config(None, [{setting!r}])\nexcept ConfigError as e:\n    print(e)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['flsec', 'aggregation'], ['flsec', 'attacks'],"
            " ['flsec', 'models'], ['flsec', 'data'], ['flsec', 'inversion'])))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    message, loaded = proc.stdout.strip().splitlines()
    from flsec.registry import BUILT_IN

    assert message.startswith(setting.split("=")[0] + f": unknown {kind} ")
    assert message.endswith("allowed: " + ", ".join(sorted(BUILT_IN[kind])))
    assert loaded == "[]"
