"""Positional NamedTuple construction for the parse hot path.

A NamedTuple's own constructor is generated Python (argument binding, then
``tuple.__new__``): about twice the cost of calling ``tuple.__new__`` on the
values directly, and the parsers build two or three tuples per packet. But
``tuple.__new__`` takes values in field order and checks nothing, so a field
added to a class, or two swapped, would shift every value after it silently.

``positional(cls, *fields)`` therefore binds ``tuple.__new__`` to ``cls`` once,
at import, after checking that ``fields`` -- the order the call sites fill --
is exactly the class's. The bound builtin costs no more per call than the bare
one. Call sites pass a tuple literal (or a ``struct`` unpack) of that length;
tests/test_wire_positional.py checks every call site in ``stack``.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, TypeVar, cast

__all__ = ["constructed_class", "positional"]

T = TypeVar("T", bound=tuple[Any, ...])

_tuple_new = tuple.__new__


def positional(cls: type[T], *fields: str) -> Callable[[tuple[Any, ...]], T]:
    """A fast constructor for ``cls`` taking one tuple of values in ``fields`` order.

    Raises:
        TypeError: ``fields`` is not the class's field list (a field was added,
            removed, renamed or moved since the call sites were written).
    """
    declared = getattr(cls, "_fields", None)
    if declared != fields:
        raise TypeError(f"{cls.__name__} has fields {declared}, the call sites fill {fields}")
    return cast(Callable[[tuple[Any, ...]], T], types.MethodType(_tuple_new, cls))


def constructed_class(obj: object) -> type | None:
    """The class a ``positional`` constructor builds, or None for anything else."""
    if isinstance(obj, types.MethodType) and obj.__func__ is _tuple_new:
        built = obj.__self__
        return built if isinstance(built, type) else None
    return None
