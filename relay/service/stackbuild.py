"""Which build of ``stack/`` this installation imports: the pure-Python reference,
or modules compiled with mypyc in place (``scripts/build-compiled``).

Python imports a compiled module in preference to the ``.py`` beside it, so a
``.so`` left over from an earlier build would run old code after the source
changed (a ``git pull``, an edit). :func:`stack_build` finds such stale modules
without importing the stack (the supervisor never does); ``tunrelay run``
refuses to start with one, and pytest too.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = ["StackBuild", "stack_build"]


def _stack_dir() -> Path:
    spec = importlib.util.find_spec("stack")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the stack package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class StackBuild:
    compiled: tuple[Path, ...]  # the extension modules found under stack/
    stale: tuple[Path, ...]  # those older than their source, or whose source is gone

    def describe(self) -> str:
        if not self.compiled:
            return "pure Python"
        return f"compiled with mypyc ({len(self.compiled)} modules)"

    def problem(self) -> str | None:
        """Why this build must not run, or None."""
        if not self.stale:
            return None
        names = ", ".join(str(p) for p in self.stale)
        return (
            f"stack/ has compiled modules older than their source ({names}): run "
            "scripts/build-compiled again, or scripts/build-compiled --clean for pure Python"
        )


def _stem(so: Path) -> str:
    return so.name.split(".", 1)[0]  # core.cpython-311-x86_64-linux-gnu.so: core


def _is_stale(so: Path) -> bool:
    source = so.with_name(_stem(so) + ".py")
    try:
        return so.stat().st_mtime < source.stat().st_mtime
    except FileNotFoundError:
        return True  # a module whose source was removed: only the .so would import


def stack_build(root: Path | None = None) -> StackBuild:
    """The compiled modules under ``root`` (the installed stack/ by default)."""
    base = _stack_dir() if root is None else root
    # native__mypyc.*.so is the library the compiled modules share (no source of its own).
    built = tuple(sorted(p for p in base.rglob("*.so") if not _stem(p).endswith("__mypyc")))
    return StackBuild(compiled=built, stale=tuple(so for so in built if _is_stale(so)))
