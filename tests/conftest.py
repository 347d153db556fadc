"""Fixtures for the unit tests.

``private_netns``: the test runs in a fresh network namespace of its own, so
tests that open real sockets never touch the host's network, not even its
loopback (where a real resolver may listen on 127.0.0.1:53).

Theory of operation: Linux keeps the network namespace per thread, and
pytest, pytest-trio and trio run the fixture, the test and every trio task on
the main thread. The fixture ``unshare(CLONE_NEWNET)``s that thread (Python
3.11 has no ``os.unshare``, so through ctypes) into a namespace that has only
a ``lo``, brings ``lo`` up and puts one test address per IP version on it
(``PRIVATE_ADDRS``, from 198.18.0.0/15 and fd00::/8). Sockets created during
the test belong to that namespace for their whole life. At tear-down the
thread ``setns()``es back to the namespace it came from; the private one has
no name and vanishes with the last socket created in it. Needs root
(CAP_SYS_ADMIN); without it the test is skipped.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.host import netns
from relay.service.stackbuild import stack_build

NEEDS_ROOT = "needs root for a private network namespace"
PRIVATE_ADDRS = {4: "198.18.2.2", 6: "fd00:2::2"}
HAS_IPV6 = os.path.exists("/proc/sys/net/ipv6")  # the kernel has IPv6 (not disabled at boot)

_IFA_F_NODAD = 0x02
_RTN_LOCAL = 2
_THREAD_NS = "/proc/thread-self/ns/net"
_libc = ctypes.CDLL(None, use_errno=True)
_STACK = Path(__file__).resolve().parent.parent / "stack"


def pytest_report_header() -> str:
    """Which build of stack/ the tests run: pure Python, or compiled with mypyc
    (scripts/build-compiled) -- and not one whose .so is older than its .py, which
    Python would import instead of the edited source."""
    build = stack_build(_STACK)
    if (problem := build.problem()) is not None:
        raise pytest.UsageError(problem)
    if build.compiled:
        return f"stack: {build.describe()}; scripts/build-compiled --clean for pure Python"
    return f"stack: {build.describe()}"


def _unshare_net() -> None:
    if _libc.unshare(netns.CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")


def _set_up_lo(addrs: dict[int, str]) -> None:
    ipr = netns.ipr_here()
    try:
        (lo,) = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=lo, state="up")
        for version, address in addrs.items():
            # NODAD: IPv6 addresses are usable at once (DAD, even skipped on lo,
            # completes asynchronously).
            ipr.addr("add", index=lo, address=address, prefixlen=32 if version == 4 else 128,
                     flags=_IFA_F_NODAD)  # fmt: skip
        # Their local routes appear asynchronously too (IPv6's from a workqueue);
        # until then packets to the address are dropped.
        deadline = time.monotonic() + 5.0
        for address in addrs.values():
            while ipr.route("get", dst=address)[0]["type"] != _RTN_LOCAL:
                assert time.monotonic() < deadline, f"no local route to {address}"
                time.sleep(0.001)
    finally:
        ipr.close()


@pytest.fixture
def private_netns() -> Iterator[dict[int, str]]:
    """Run the test in a private network namespace; yields the address on its ``lo``
    for each IP version (``{4: ..., 6: ...}``; no 6 if the kernel has no IPv6)."""
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)
    addrs = {v: a for v, a in PRIVATE_ADDRS.items() if v == 4 or HAS_IPV6}
    own = os.open(_THREAD_NS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _unshare_net()
        try:
            _set_up_lo(addrs)
            yield addrs
        finally:
            netns.setns_fd(own, "<original>")
            assert os.stat(_THREAD_NS).st_ino == os.fstat(own).st_ino, "not back home"
    finally:
        os.close(own)
