"""Relayed UDP flows: one connected kernel UDP socket per flow.

``UdpFlow`` is the UDP kind of ``relay.datapath.datagram_flow.DatagramFlow``
(where the theory of operation is); this module adds its upstream socket and
how a datagram from the server reaches the client.
"""

from __future__ import annotations

import socket

import trio

from relay.analysis.hooks import Direction, Halt
from relay.datapath.datagram_flow import DatagramFlow
from relay.datapath.egress import Upstream
from relay.datapath.icmp_errors import IP_RECVERR, IPV6_RECVERR, SOL_IP, SOL_IPV6
from stack import FlowId

__all__ = ["UdpFlow", "open_udp_socket"]

_S2C = Direction.SERVER_TO_CLIENT
_PLAIN = Upstream()  # no mark, source or device: only IPV6_V6ONLY


def open_udp_socket(flow: FlowId, upstream: Upstream = _PLAIN) -> socket.socket:
    """The default: a non-blocking UDP socket with IP(V6)_RECVERR and ``upstream``'s
    options (IPV6_V6ONLY always), connected to the flow's original destination."""
    v4 = flow.version == 4
    family = socket.AF_INET if v4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        upstream.prepare(sock, family)
        sock.setsockopt(*((SOL_IP, IP_RECVERR) if v4 else (SOL_IPV6, IPV6_RECVERR)), 1)
        sock.connect((flow.server_ip, flow.server_port))
    except BaseException:
        sock.close()
        raise
    return sock


class UdpFlow(DatagramFlow):
    """A UDP flow: datagrams both ways, each shown to the analyzers' ``data``.

    The answer to a REJECT verdict is ICMP port unreachable, as from a closed port.
    """

    def on_datagram(self, data: bytes) -> None:
        self.on_item(data, len(data))

    async def deliver(self, data: bytes, now: float) -> bool:
        self.bytes_s2c += len(data)
        if self._stopped is not None:
            return True  # a verdict stopped the flow: the rest of this batch is dropped
        dx = self._dx
        records = None if dx is None else self.dissect(dx, _S2C, data)
        if self.hooks.has_data_hooks:
            out = await self.hooks.data(_S2C, data)
            if not isinstance(out, bytes):
                if out is Halt.FAILED:
                    return False
                await self._stop(out)
                return True
            data = out
        if self._closed is None and data:
            self._env.stack.send_datagram(self.flow, data, now)
            self.fwd_s2c += len(data)
        # Shown once the datagram is with the stack (written when the batch ends).
        return not records or (await self.hooks.records(records)) is None

    def reply(self, data: bytes) -> None:
        self._env.stack.send_datagram(self.flow, data, trio.current_time())
        self.fwd_s2c += len(data)
        self._env.kick()
