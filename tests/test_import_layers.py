"""The import graph of stack/ and relay/: no cycles, and each layer imports only
the layers below it.

Every import counts, wherever it is written: at module level, inside a
function, or under ``TYPE_CHECKING``. A cycle hidden behind ``TYPE_CHECKING``
still means a leaf module depends on the module that composes it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stack", "relay")

# What each part of relay/ may import (besides itself and stack). The lab
# builds namespaces and drives `tunrelay run` as a program, so it needs the
# host and analysis layers but never the data path or the service.
ALLOWED = {
    "relay.host": set(),
    "relay.analysis": set(),
    "relay.datapath": {"relay.analysis", "relay.host"},
    "relay.service": {"relay.analysis", "relay.datapath", "relay.host"},
    "relay.lab": {"relay.analysis", "relay.host"},
    "relay.cli": {"relay.service", "relay.datapath", "relay.lab"},
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(
    source: str, module: str, known: Iterable[str], is_package: bool = False
) -> set[str]:
    """The project modules `source` (the text of `module`) imports, anywhere in it."""
    known = set(known)
    found: set[str] = set()

    def add(name: str) -> None:
        # `import a.b.c` imports a, a.b and a.b.c: count the deepest project module.
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, is_package)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                add(sub if sub in known else target)
    return found


def project_graph() -> dict[str, set[str]]:
    paths = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    names = {module_name(p): p for p in paths}
    return {
        name: imports_of(p.read_text(), name, names, p.name == "__init__.py")
        for name, p in names.items()
    }


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def layer(module: str) -> str | None:
    for name in ALLOWED:
        if module == name or module.startswith(name + "."):
            return name
    return None


def layer_violations(graph: Mapping[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        if module.startswith("stack"):
            bad += [f"{module} -> {t}" for t in sorted(targets) if not t.startswith("stack")]
            continue
        own = layer(module)
        for t in sorted(targets):
            theirs = layer(t)
            if t.startswith("stack") or theirs == own or t == "relay":
                continue
            if own is None or theirs not in ALLOWED[own]:
                bad.append(f"{module} -> {t}")
    return bad


GRAPH = project_graph()


def test_graph_sees_the_project() -> None:
    assert len(GRAPH) >= 40
    assert "relay.datapath.engine" in GRAPH
    assert "relay.datapath.tcpflow" in GRAPH["relay.datapath.engine"]


def test_no_import_cycles() -> None:
    assert cycles(GRAPH) == []


def test_layers_import_only_downwards() -> None:
    assert layer_violations(GRAPH) == []


def test_every_relay_module_has_a_layer() -> None:
    assert [m for m in GRAPH if m.startswith("relay.") and layer(m) is None] == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # A TYPE_CHECKING import back up is a cycle too.
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p.a import X\n", {"p.a"}),
        ("def f():\n    import p.a\n", {"p.a"}),
        ("from . import a\n", {"p.a"}),
        ("from .a import X\n", {"p.a"}),
        ("import os\n", set()),
    ],
)
def test_imports_of_finds_every_kind(source: str, expected: set[str]) -> None:
    assert imports_of(source, "p.b", {"p", "p.a", "p.b"}) == expected


def test_cycles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
