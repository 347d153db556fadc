"""stack/ stays sans-IO: no module in it imports I/O, a clock or randomness."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

STACK = Path(__file__).resolve().parent.parent / "stack"
BANNED = {
    "trio",
    "socket",
    "os",
    "time",
    "random",
    "threading",
    "asyncio",
    "select",
    "selectors",
    "secrets",
    "relay",
    "pytun",
    "pyroute2",
    "subprocess",
    "datetime",
    "signal",
    "io",
}
FILES = sorted(STACK.rglob("*.py"))


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_stack_has_modules() -> None:
    assert len(FILES) >= 10


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(STACK)))
def test_no_banned_import(path: Path) -> None:
    found = _imports(ast.parse(path.read_text(), str(path))) & BANNED
    assert not found, f"{path} imports {sorted(found)}"


def test_checker_catches_a_banned_import() -> None:
    assert _imports(ast.parse("import time\nfrom trio import lowlevel\n")) == {"time", "trio"}
