"""pyroute2's ``IPRoute`` and ``NetlinkError`` without the rest of pyroute2.

Importing any part of pyroute2 imports the package first, and its
``__init__`` imports every part of the library: NDB (with sqlite3), IPDB,
IPSet, IPVS, WireGuard, nl80211, conntrack, plan9, ``unittest.mock``, ...:
about 300 modules and 9 MiB of heap in the process that does it, the
supervisor of ``tunrelay run`` included, which needs rtnetlink only. Here the
package's module is made without running its ``__init__`` (``_lean``), so that
importing ``pyroute2.iproute`` loads what ``IPRoute`` needs (about 140
modules, 4 MiB). The first time anything asks the package itself for a name
that is not a submodule (``from pyroute2 import NDB``, ``pyroute2.__version__``)
its ``__init__`` runs after all, once, and the name is there as usual.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Any

__all__ = ["NetlinkError", "iproute"]


def _lean() -> None:
    """Put pyroute2's package module in ``sys.modules``, its ``__init__`` not yet
    run; run it on the first name asked of the package that is not a submodule.
    Nothing if pyroute2 is imported already (or cannot be found: the import
    below then says so)."""
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader
    lock = threading.Lock()  # another thread asking meanwhile waits for the __init__

    def __getattr__(name: str) -> Any:  # PEP 562
        if not name.startswith("__"):
            try:
                return importlib.import_module(f"pyroute2.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"pyroute2.{name}":
                    raise
        # A name of the package itself: its __init__, now (once).
        with lock:
            if package.__dict__.pop("__getattr__", None) is not None:
                loader.exec_module(package)
        return ModuleType.__getattribute__(package, name)

    package.__dict__["__getattr__"] = __getattr__
    sys.modules["pyroute2"] = package


_lean()

from pyroute2.netlink.exceptions import NetlinkError  # noqa: E402


def iproute(**kwargs: Any) -> Any:
    """``pyroute2.iproute.IPRoute(**kwargs)``."""
    from pyroute2.iproute import IPRoute

    return IPRoute(**kwargs)
