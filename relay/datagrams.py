"""Plumbing shared by the relay's UDP and echo flows (``relay.udpflow``, ``relay.echo``).

``DatagramRelay`` turns the stack's datagram events (``DatagramFlowOpened``,
``DatagramReceived``, ``EchoRequest``, ``DatagramFlowClosed``) into calls on
one flow object per flow, started as a task in the relay's nursery; the
packet loop registers its ``handlers()``. ``DatagramEnv`` is what the flows
share. ``read_socket_errors`` reads what the kernel learnt about a socket's
datagrams from ICMP (``IP_RECVERR``/``IPV6_RECVERR``, the error queue).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from relay.egress import EgressPolicy
from relay.hooks import AnalyzerChain
from stack import (
    DatagramFlowClosed,
    DatagramFlowOpened,
    DatagramReceived,
    EchoRequest,
    FlowId,
    Unreachable,
)

if TYPE_CHECKING:
    from relay.engine import RelayStats
    from relay.udpflow import DatagramFlow

__all__ = [
    "LOCAL_ERRORS",
    "DatagramEnv",
    "DatagramRelay",
    "DatagramStack",
    "SocketFactory",
    "read_socket_errors",
]

SocketFactory = Callable[[FlowId], socket.socket]

QUEUE_LIMIT = 256 * 1024  # bytes waiting for a verdict, a socket or the analyzers, per flow

# <linux/in.h>, <linux/in6.h>, <linux/errqueue.h>
SOL_IP = 0
SOL_IPV6 = 41
IP_RECVERR = 11
IPV6_RECVERR = 25
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # errno, origin, type, code, pad, info, data
_ICMP_DEST_UNREACH = 3
_ICMP_FRAG_NEEDED = 4  # path MTU: the kernel's business for the relay's own socket
_ICMP6_DEST_UNREACH = 1

# errno raised by the relay's own socket -> what a router would have told the client.
LOCAL_ERRORS = {
    errno.ENETUNREACH: Unreachable.NET,
    errno.ENETDOWN: Unreachable.NET,
    errno.EHOSTUNREACH: Unreachable.HOST,
    errno.EHOSTDOWN: Unreachable.HOST,
    errno.ECONNREFUSED: Unreachable.PORT,
    errno.EACCES: Unreachable.ADMIN,
    errno.EPERM: Unreachable.ADMIN,
}


class DatagramStack(Protocol):
    """The part of ``stack.Stack`` the datagram flows use."""

    def send_datagram(self, flow: FlowId, data: bytes, now: float) -> bool: ...
    def send_echo_reply(self, flow: FlowId, seq: int, data: bytes, now: float) -> bool: ...
    def datagram_unreachable(
        self,
        flow: FlowId,
        code: Unreachable | int,
        now: float,
        *,
        src: str | None = ...,
        quote: bytes = ...,
    ) -> bool: ...
    def refuse_datagrams(self, flow: FlowId, code: Unreachable | int | None) -> None: ...
    def end_datagram_flow(self, flow: FlowId) -> None: ...


@dataclass(slots=True)
class DatagramEnv:
    """What every datagram flow of one relay shares."""

    stack: DatagramStack
    chain: AnalyzerChain
    kick: Callable[[], None]  # wake the packet loop: the stack has packets to flush
    stats: RelayStats
    udp_socket: SocketFactory  # opens the connected upstream socket of a UDP flow
    echo_socket: SocketFactory  # the same for an echo flow (relay.echo)
    egress: EgressPolicy = field(default_factory=EgressPolicy)  # judged before either
    flow_end_timeout: float = 5.0
    queue_limit: int = QUEUE_LIMIT


def read_socket_errors(sock: socket.socket, limit: int = 32) -> list[tuple[int, bytes]]:
    """Drain the socket's error queue (MSG_ERRQUEUE, up to ``limit`` entries).

    Returns:
        (destination-unreachable code, quoted payload) for each ICMP/ICMPv6
        destination unreachable; other entries (fragmentation needed, packet too
        big, time exceeded, local errors) are the relay's own and are skipped.
    """
    found = []
    for _ in range(limit):
        try:
            data, ancillary, _, _ = sock.recvmsg(2048, 512, socket.MSG_ERRQUEUE)
        except OSError:  # EAGAIN: empty
            break
        for level, kind, cdata in ancillary:
            if (level, kind) not in ((SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR)):
                continue
            if len(cdata) < _EXTENDED_ERR.size:
                continue
            _, origin, type_, code, _, _, _ = _EXTENDED_ERR.unpack_from(cdata)
            if origin == SO_EE_ORIGIN_ICMP and type_ == _ICMP_DEST_UNREACH:
                if code != _ICMP_FRAG_NEEDED:
                    found.append((code, data))
            elif origin == SO_EE_ORIGIN_ICMP6 and type_ == _ICMP6_DEST_UNREACH:
                found.append((code, data))
    return found


class DatagramRelay:
    """Dispatches the stack's datagram events to one flow object per flow.

    Args:
        env: what the flows share.
        kinds: the flow class for each ``FlowId.proto`` ("udp", "icmp").
    """

    def __init__(self, env: DatagramEnv, kinds: dict[str, type[DatagramFlow]]) -> None:
        self.env = env
        self.nursery: trio.Nursery | None = None  # set while the relay runs
        self._kinds = kinds
        self._flows: dict[FlowId, DatagramFlow] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def handlers(self) -> dict[type[Any], Callable[[Any], None]]:
        """Event type -> handler, for the packet loop's dispatch table."""
        return {
            DatagramFlowOpened: self._on_opened,
            DatagramReceived: self._on_datagram,
            EchoRequest: self._on_echo,
            DatagramFlowClosed: self._on_closed,
        }

    def _on_opened(self, event: DatagramFlowOpened) -> None:
        assert self.nursery is not None
        kind = self._kinds.get(event.flow.proto)
        if event.flow in self._flows:  # the stack promises DatagramFlowClosed first
            self.env.stats.stray_events += 1
            return
        if kind is None:
            self.env.stats.stray_events += 1
            self.env.stack.end_datagram_flow(event.flow)
            return
        flow = kind(self.env, event.flow)
        self._flows[event.flow] = flow
        self.nursery.start_soon(flow.run)

    def _on_datagram(self, event: DatagramReceived) -> None:
        flow = self._flows.get(event.flow)
        if flow is None:
            self.env.stats.stray_events += 1
        else:
            flow.on_datagram(event.data)

    def _on_echo(self, event: EchoRequest) -> None:
        flow = self._flows.get(event.flow)
        if flow is None:
            self.env.stats.stray_events += 1
        else:
            flow.on_echo(event.seq, event.data)

    def _on_closed(self, event: DatagramFlowClosed) -> None:
        flow = self._flows.pop(event.flow, None)
        if flow is None:
            self.env.stats.stray_events += 1
        else:
            flow.on_closed(event.reason)
