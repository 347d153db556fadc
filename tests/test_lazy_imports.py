"""The supervisor's imports stay light: the stack, the data path and the analysis
load only in workers, and of pyroute2 only its rtnetlink part (memory: every
process holds what it imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import stack

REPO = Path(__file__).resolve().parent.parent


def _loaded_after(code: str) -> set[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", f"import sys\n{code}\nprint(' '.join(sys.modules))"],
        check=True, capture_output=True, text=True, env=env, timeout=60,
    ).stdout  # fmt: skip
    return set(out.split())


def test_every_name_of_stack_resolves() -> None:
    for name in stack.__all__:
        assert getattr(stack, name) is not None, name
    assert set(stack.__all__) <= set(dir(stack))


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        stack.NoSuchThing  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("no AttributeError")


def test_the_supervisors_imports_leave_out_the_stack_and_the_data_path() -> None:
    loaded = _loaded_after(
        "import relay.cli, relay.service.workers, relay.service.reload, relay.host.netconfig"
    )
    assert "stack.config" in loaded
    heavy = {"stack.stack", "stack.tcp.connection", "relay.datapath.engine",
             "relay.datapath.tcpflow", "relay.datapath.echo", "relay.analysis.hooks"}  # fmt: skip
    assert not heavy & loaded, heavy & loaded


def test_the_supervisor_loads_only_the_rtnetlink_part_of_pyroute2() -> None:
    loaded = _loaded_after(
        "import relay.cli, relay.host.netconfig\n"
        "from relay.host.pyroute import iproute\n"
        "import pyroute2.iproute"
    )
    assert "pyroute2.iproute.linux" in loaded
    unused = {"pyroute2.ndb.main", "pyroute2.ipdb", "pyroute2.ipset", "sqlite3"}
    assert not unused & loaded, unused & loaded


def test_the_rest_of_pyroute2_is_there_when_asked_for() -> None:
    loaded = _loaded_after(
        "import relay.host.netconfig\n"
        "import pyroute2\n"
        "assert pyroute2.iproute.IPRoute is not None\n"  # a submodule: no __init__ yet
        "assert 'pyroute2.ndb.main' not in sys.modules\n"
        "from pyroute2 import NDB, IPRoute, NetlinkError\n"
        "assert NDB.__module__ == 'pyroute2.ndb.main' and pyroute2.__version__\n"
        "assert relay.host.netconfig.NetlinkError is NetlinkError\n"
        "try:\n    pyroute2.NoSuchThing\nexcept AttributeError:\n    pass\n"
        "else:\n    raise AssertionError('no AttributeError')"
    )
    assert "pyroute2.ndb.main" in loaded
