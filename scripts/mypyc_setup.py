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
# compiled module is initialised, before its globals exist: a crash at import),
# stack/config.py (frozen dataclasses: compiled, unpickling one raises
# FrozenInstanceError, and the relay pickles its configuration for spawned workers),
# and every package's __init__.py: the group's library lives inside stack/ (below),
# and mypyc derives a compiled package's __path__ from that library's directory as if
# it were the top level (stack/stack/tcp). They only re-export names.
EXCLUDE = {"stack/config.py"}


def modules() -> list[str]:
    chosen = os.environ.get("MYPYC_MODULES", "").split()
    if chosen:
        return chosen
    return sorted(
        str(p)
        for p in Path("stack").rglob("*.py")
        if str(p) not in EXCLUDE and p.name != "__init__.py"
    )


setup(
    name="tunrelay-stack-compiled",
    packages=[],
    py_modules=[],
    ext_modules=mypycify(
        modules(),
        opt_level=os.environ.get("MYPYC_OPT_LEVEL", "3"),
        # The group's shared library, stack/native__mypyc.*.so, inside the package: the
        # editable install finds only the packages, not a top-level module beside them.
        group_name="stack.native",
        multi_file=bool(os.environ.get("MYPYC_MULTI_FILE")),
    ),
)
