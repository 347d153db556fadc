"""Build ``stack/`` as C extensions with mypyc, in place (see scripts/build-compiled).

Run from the repository root: ``python scripts/mypyc_setup.py build_ext --inplace``.
The pure-Python package stays the reference: this only adds ``.so`` files next to
the ``.py`` files, which Python then imports instead; ``scripts/build-compiled
--clean`` removes them. ``MYPYC_MODULES`` (space-separated paths) compiles a subset.
"""

from __future__ import annotations

import os
from pathlib import Path

from mypyc.build import mypycify
from setuptools import setup

# Not compiled: stack/__init__.py (its module __getattr__, PEP 562, is called while the
# compiled module is initialised, before its globals exist: a crash at import), and
# stack/config.py (frozen dataclasses: compiled, unpickling one raises
# FrozenInstanceError, and the relay pickles its configuration for spawned workers).
EXCLUDE = {"stack/__init__.py", "stack/config.py"}


def modules() -> list[str]:
    chosen = os.environ.get("MYPYC_MODULES", "").split()
    if chosen:
        return chosen
    return sorted(str(p) for p in Path("stack").rglob("*.py") if str(p) not in EXCLUDE)


setup(
    name="tunrelay-stack-compiled",
    packages=[],
    py_modules=[],
    ext_modules=mypycify(
        modules(),
        opt_level=os.environ.get("MYPYC_OPT_LEVEL", "3"),
        group_name="stack",
        multi_file=bool(os.environ.get("MYPYC_MULTI_FILE")),
    ),
)
