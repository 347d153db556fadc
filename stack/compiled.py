"""What compiling ``stack/`` with mypyc (``scripts/build-compiled``) needs in the source.

``mypyc_attr`` sets a class's options for mypyc; where mypy_extensions is not
installed (mypy brings it) it is a no-op, so the pure-Python package needs nothing
new. ``COMPILED`` tells the two builds apart, for the few places that differ.
"""

from __future__ import annotations

from collections.abc import Callable

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # pragma: no cover

    def mypyc_attr(*_args: object, **_kwargs: object) -> Callable[[type], type]:  # type: ignore[misc]
        return lambda cls: cls


COMPILED = not __file__.endswith((".py", ".pyc"))

__all__ = ["COMPILED", "mypyc_attr"]
