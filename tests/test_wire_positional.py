"""The positional NamedTuple constructors of the parse hot path
(``stack.wire.positional``) cannot silently shift values: the field list is
checked when the constructor is made, and every call site in ``stack`` passes
exactly one value per field."""

from __future__ import annotations

import ast
import importlib
import struct
from pathlib import Path
from typing import NamedTuple

import pytest

import stack
from stack.wire.positional import constructed_class, positional
from stack.wire.tcp import TcpOptions

ROOT = Path(stack.__file__).parent


class Pair(NamedTuple):
    a: int
    b: str


class PairGrown(NamedTuple):  # Pair with a field added in the middle
    a: int
    c: float
    b: str


def test_it_builds_the_tuple_in_field_order() -> None:
    make = positional(Pair, "a", "b")
    assert make((1, "x")) == Pair(1, "x")
    assert type(make((1, "x"))) is Pair
    assert constructed_class(make) is Pair


@pytest.mark.parametrize(
    "fields",
    [
        ("a", "b"),  # a field was added: the call sites fill two of three
        ("a", "b", "c"),  # the order the call sites fill is not the class's
        ("a", "c", "b", "d"),  # one too many
    ],
)
def test_a_wrong_field_list_is_caught_at_import(fields: tuple[str, ...]) -> None:
    with pytest.raises(TypeError, match="PairGrown has fields"):
        positional(PairGrown, *fields)


def test_the_stack_options_constructor_matches_the_class() -> None:
    with pytest.raises(TypeError):
        positional(TcpOptions, "mss", "wscale", "sack_permitted", "timestamps")


def _width(node: ast.expr, module: object) -> int | None:
    """How many values an argument holds: a tuple literal, or a struct unpack."""
    if isinstance(node, ast.Tuple):
        if any(isinstance(e, ast.Starred) for e in node.elts):
            return None
        return len(node.elts)
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("unpack", "unpack_from")
        and isinstance(node.func.value, ast.Name)
    ):
        s = getattr(module, node.func.value.id, None)
        if isinstance(s, struct.Struct):
            return len(s.unpack(bytes(s.size)))
    return None


def call_site_errors(source: str, module: object) -> list[str]:
    """Every call of a positional constructor in ``source`` whose argument does
    not hold one value per field of the class (``module`` holds the names)."""
    errors = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        cls = constructed_class(getattr(module, node.func.id, None))
        if cls is None:
            continue
        width = _width(node.args[0], module) if len(node.args) == 1 else None
        fields: tuple[str, ...] = cls._fields  # type: ignore[attr-defined]
        if node.keywords or width != len(fields):
            errors.append(f"line {node.lineno}: {node.func.id} gets {width}, needs {len(fields)}")
    return errors


def test_every_call_site_passes_one_value_per_field() -> None:
    sites = 0
    for path in sorted(ROOT.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        module = importlib.import_module(name)
        source = path.read_text()
        assert call_site_errors(source, module) == [], path
        sites += sum(
            1
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and constructed_class(getattr(module, node.func.id, None)) is not None
        )
    assert sites >= 10  # the parsers' and the connection's call sites were found


class _Module:
    make = positional(Pair, "a", "b")
    layout = struct.Struct("!HB")
    wide = struct.Struct("!HBB")


def test_a_call_site_with_the_wrong_width_is_caught() -> None:
    good = "make((1, 'x'))\nmake(layout.unpack_from(buf))"
    assert call_site_errors(good, _Module) == []
    bad = "make((1, 'x', 2.0))\nmake(wide.unpack_from(buf))\nmake((1,))\nmake(values)"
    assert len(call_site_errors(bad, _Module)) == 4
