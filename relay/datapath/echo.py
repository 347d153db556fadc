"""Relayed ICMP and ICMPv6 echo: one unprivileged ICMP socket per echo flow.

Theory of operation: an echo flow is (client, destination, the client's echo
identifier); the stack opens it on the first echo request and idles it out
(``DatagramConfig.echo_idle_timeout``). ``EchoFlow`` sends each request to the
real destination through its own ICMP datagram socket
(``socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)``, or ICMPV6), which the kernel
treats like a UDP socket whose "port" is the echo identifier: it rewrites the
identifier to the socket's own, computes the checksum, and delivers only the
replies to that identifier. Each reply's sequence number and data go back to
the client through ``stack.send_echo_reply``, which restores the client's
identifier. The relay never answers an echo itself: no reply upstream, no
reply to the client.

Errors: a destination the kernel cannot route to fails ``connect`` (no route:
ICMP net unreachable to the client, as the router would have sent); ICMP
errors about the requests (host unreachable after a failed neighbour lookup,
a router's unreachable) arrive on the socket's error queue (``IP_RECVERR``)
and are relayed with their code, quoting the client's request. So a ping to
an unreachable address fails as it would without a relay.

Permissions: these sockets need the process's group inside
``net.ipv4.ping_group_range`` (per network namespace; it also governs
ICMPv6). The default, "1 0", allows nobody -- root included (root could use
raw sockets, a service user could not). ``enable_ping_sockets``
(``relay.host.netconfig``, in the process that sets up the network) widens the
range to the relay's group at start-up, undone on exit with the rest of its
network set-up. Without it, echo requests are dropped silently (logged once).

Analyzers see echo flows through ``flow_start`` (a REJECT answers with ICMP
administratively prohibited, as does the egress policy's denial) and
``flow_end`` (so the flow log has them, with ``proto`` "icmp" and the echo
identifier as the client port), not ``data``.
"""

from __future__ import annotations

import logging
import socket
import struct

from relay.analysis.hooks import EndReason
from relay.datapath.datagram_flow import DatagramFlow
from relay.datapath.egress import Upstream
from relay.datapath.icmp_errors import IP_RECVERR, IPV6_RECVERR, SOL_IP, SOL_IPV6
from stack import FlowId, Unreachable
from stack.wire import ECHO_REPLY, ECHO_REQUEST, ICMP6_ECHO_REPLY, ICMP6_ECHO_REQUEST

__all__ = ["EchoFlow", "PingSocketsUnavailable", "open_ping_socket"]

log = logging.getLogger(__name__)

PING_GROUP_RANGE = "net.ipv4.ping_group_range"
_ECHO = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
_U16 = struct.Struct("!H")
_PLAIN = Upstream()  # no mark, source or device: only IPV6_V6ONLY


class PingSocketsUnavailable(PermissionError):
    """The process's group is outside ``net.ipv4.ping_group_range``."""


def open_ping_socket(flow: FlowId, upstream: Upstream = _PLAIN) -> socket.socket:
    """The default: a non-blocking ICMP/ICMPv6 datagram socket with IP(V6)_RECVERR
    and ``upstream``'s options (IPV6_V6ONLY always), connected to the flow's
    original destination.

    Raises:
        PingSocketsUnavailable: ICMP sockets are not allowed for this process.
        OSError: e.g. ENETUNREACH from ``connect`` (no route).
    """
    v4 = flow.version == 4
    family, proto = (
        (socket.AF_INET, socket.IPPROTO_ICMP) if v4 else (socket.AF_INET6, socket.IPPROTO_ICMPV6)
    )
    try:
        sock = socket.socket(
            family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, proto
        )
    except PermissionError as exc:
        msg = f"ICMP sockets not allowed: {PING_GROUP_RANGE}"
        raise PingSocketsUnavailable(exc.errno, msg) from exc
    try:
        upstream.prepare(sock, family)
        sock.setsockopt(*((SOL_IP, IP_RECVERR) if v4 else (SOL_IPV6, IPV6_RECVERR)), 1)
        sock.connect((flow.server_ip, 0))
    except BaseException:
        sock.close()
        raise
    return sock


class EchoFlow(DatagramFlow):
    """One echo flow: the client's requests to one destination with one identifier."""

    reject_code = Unreachable.ADMIN
    watch_data = False
    _warned = False  # "ICMP sockets not allowed", once per process

    def on_echo(self, seq: int, data: bytes) -> None:
        # The kernel fills in the identifier (the socket's own) and the checksum.
        request = ECHO_REQUEST if self.flow.version == 4 else ICMP6_ECHO_REQUEST
        self.on_item(_ECHO.pack(request, 0, 0, 0, seq) + data, len(data))

    def history(self) -> str:
        return ""  # Zeek has no history for ICMP

    def payload_size(self, item: bytes) -> int:
        return len(item) - _ECHO.size

    def open_socket(self) -> socket.socket:
        return self._env.echo_socket(self.flow)

    def refusal(self, exc: OSError) -> tuple[Unreachable | None, EndReason]:
        if isinstance(exc, PingSocketsUnavailable):
            if not EchoFlow._warned:
                EchoFlow._warned = True
                log.warning("echo requests are dropped: %s", exc)
            return None, EndReason.ERROR
        return super().refusal(exc)

    async def deliver(self, data: bytes, now: float) -> bool:
        reply = ECHO_REPLY if self.flow.version == 4 else ICMP6_ECHO_REPLY
        if len(data) < 8 or data[0] != reply:
            return True  # not a reply (the kernel delivers only replies to our id)
        self.bytes_s2c += len(data) - 8
        if self._closed is None:
            seq = _U16.unpack_from(data, 6)[0]
            self._env.stack.send_echo_reply(self.flow, seq, data[8:], now)
            self.fwd_s2c += len(data) - 8
        return True
