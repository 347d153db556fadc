"""Analyzers for the UDP netns tests (``test_relay_udp.py``).

``tunrelay run`` loads them by ``udp_analyzers:DnsRecorder`` with this
directory on its PYTHONPATH (the tests arrange that).

``DnsRecorder`` writes one JSON line per UDP datagram on flows to port 53, in
each direction, to the path in ``TUNRELAY_UDP_LOG``: the flow, the direction
and the datagram in hex, so the test can parse it with dnspython.
"""

from __future__ import annotations

import json
import os

from relay.analysis.hooks import Direction, FlowInfo

UDP_LOG_ENV = "TUNRELAY_UDP_LOG"


class DnsRecorder:
    """Records the datagrams of UDP flows to port 53."""

    def __init__(self) -> None:
        self._stream = open(os.environ[UDP_LOG_ENV], "a", encoding="utf-8")  # noqa: SIM115

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
        if flow.proto != "udp" or flow.server_port != 53:
            return
        record = {
            "uid": flow.uid,
            "proto": flow.proto,
            "version": flow.version,
            "client_port": flow.client_port,
            "server_ip": flow.server_ip,
            "server_port": flow.server_port,
            "direction": direction.value,
            "data": data.hex(),
        }
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()
