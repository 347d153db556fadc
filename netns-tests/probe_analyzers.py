"""An analyzer that tries what a compromised analyzer would (``test_relay_security.py``).

``tunrelay run`` loads it by ``probe_analyzers:PrivilegeProbe`` with this
directory on its PYTHONPATH. In ``flow_start`` it tries to open a raw IP
socket and a packet socket and to become root again, and appends one JSON
line with the outcomes (``"ok"`` or the exception) to ``TUNRELAY_PROBE_LOG``.
It never rejects a flow.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable

from relay.analysis.hooks import FlowInfo

PROBE_LOG_ENV = "TUNRELAY_PROBE_LOG"


def _attempt(action: Callable[[], object]) -> str:
    try:
        result = action()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror}"
    if isinstance(result, socket.socket):
        result.close()
    return "ok"


class PrivilegeProbe:
    """Records whether privileged operations work from inside a worker."""

    def __init__(self) -> None:
        self._path = os.environ[PROBE_LOG_ENV]

    async def flow_start(self, flow: FlowInfo) -> None:
        record = {
            "pid": os.getpid(),
            "uid": os.getuid(),
            "proto": flow.proto,
            "raw_socket": _attempt(
                lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            ),
            "packet_socket": _attempt(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW)),
            "setuid_root": _attempt(lambda: os.setuid(0)),
        }
        with open(self._path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
