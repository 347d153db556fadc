"""What the data path's parts share: the stack they drive, the counters, and the
environment each flow is given.

These types live here, not in the modules that compose them (the engine, the
datagram dispatcher), so that a flow module depends only on what it uses.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trio

from relay.analysis.hooks import AnalyzerChain, EndReason
from relay.datapath.config import RelayConfig
from relay.datapath.egress import EgressPolicy
from stack import CloseReason, Event, FlowId, Reject, Unreachable

if TYPE_CHECKING:
    # Imported by the engine only when some analyzer wants records: the dissectors
    # (httptools; dnspython and cryptography when the first DNS message and QUIC
    # Initial come) are ~11 MiB a worker need not carry.
    from relay.datapath.dissection import DatagramDissection, StreamDissection
    from stack import PacketCounts  # (stack.stack: not loaded by the supervisor)

__all__ = [
    "QUEUE_LIMIT",
    "Connector",
    "DatagramEnv",
    "DatagramStack",
    "FlowEnv",
    "RelayStack",
    "RelayStats",
    "SocketFactory",
    "end_reason",
]

SocketFactory = Callable[[FlowId], socket.socket]
Connector = Callable[[FlowId], Awaitable[trio.socket.SocketType]]

QUEUE_LIMIT = 256 * 1024  # bytes waiting for a verdict, a socket or the analyzers, per flow


_FROM_CLOSE = {
    CloseReason.FINISHED: EndReason.FIN,
    CloseReason.RESET: EndReason.RST,
    CloseReason.ABORTED: EndReason.ABORTED,
    CloseReason.TIMED_OUT: EndReason.TIMEOUT,
    CloseReason.REJECTED: EndReason.REJECTED,
    CloseReason.IDLE: EndReason.IDLE,
    CloseReason.LIMIT: EndReason.LIMIT,
}


def end_reason(hint: EndReason | None, closed: CloseReason | None) -> EndReason:
    """How a flow ended, for ``FlowEnd.how``: the relay's own decision if it made
    one, else what the stack reported, else the relay shut down under it."""
    if hint is not None:
        return hint
    if closed is not None:
        return _FROM_CLOSE.get(closed, EndReason.ERROR)
    return EndReason.SHUTDOWN


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
    echo_socket: SocketFactory  # the same for an echo flow (relay.datapath.echo)
    egress: EgressPolicy = field(default_factory=EgressPolicy)  # judged before either
    flow_end_timeout: float = 5.0
    queue_limit: int = QUEUE_LIMIT
    # A new UDP flow's detection and dissection; None: dissection is off.
    dissection: Callable[[], DatagramDissection] | None = None


class RelayStack(DatagramStack, Protocol):
    """The part of ``stack.Stack`` the relay uses (with ``DatagramStack``'s)."""

    def receive(
        self, packet: bytes | memoryview, now: float, *, csum_ok: bool = ..., batch: bool = ...
    ) -> None: ...
    def end_batch(self, now: float) -> None: ...
    def next_event(self) -> Event | None: ...
    def packets_to_send(self, now: float) -> list[bytes]: ...
    def get_timer(self) -> float | None: ...
    def handle_timer(self, now: float) -> None: ...
    def accept(self, flow: FlowId, *, isn: int) -> None: ...
    def reject(
        self, flow: FlowId, how: Reject = ..., *, unreachable: Unreachable = ...
    ) -> None: ...
    def send(self, flow: FlowId, data: bytes | bytearray | memoryview) -> int: ...
    def send_space(self, flow: FlowId) -> int: ...
    def send_burst(self, flow: FlowId) -> int: ...
    def consumed(self, flow: FlowId, n: int) -> None: ...
    def close(self, flow: FlowId) -> None: ...
    def abort(self, flow: FlowId) -> None: ...
    def packet_counts(self, flow: FlowId) -> PacketCounts | None: ...


@dataclass(slots=True)
class RelayStats:
    """Relay counters (the stack and the packet source keep their own)."""

    iterations: int = 0  # packet-loop iterations
    packets_in: int = 0
    packets_out: int = 0
    receive_errors: int = 0  # exceptions out of stack.receive (a stack bug); packet dropped
    timer_errors: int = 0  # exceptions out of stack.handle_timer (a stack bug), contained
    write_errors: int = 0  # building or writing a batch to the clients failed; batch dropped
    dispatch_errors: int = 0  # an event handler raised (a bug); that flow was reset
    events: int = 0
    stray_events: int = 0  # events for a flow the relay does not know
    flows_requested: int = 0
    flows_active: int = 0  # flow tasks running
    flows_accepted: int = 0
    flows_rejected: int = 0  # by an analyzer's verdict
    flows_denied: int = 0  # by the egress policy (TCP, UDP and echo): no upstream socket
    flows_reset: int = 0  # by an analyzer's RESET verdict mid-flow (data or a record hook)
    flows_blocked: int = 0  # by a record hook's Block (--block-domain, --block-list)
    connect_failed: int = 0  # refused, unreachable, timed out, other errors
    flows_ended: int = 0
    bytes_c2s: int = 0
    bytes_s2c: int = 0
    heap_trims: int = 0  # malloc_trim calls after bulk traffic ended (relay/service/run.py)
    upstream_errors: int = 0  # resets and other socket errors mid-stream
    analyzer_errors: int = 0
    flow_errors: int = 0  # unexpected exceptions in a flow task (a bug; flow aborted)
    # UDP and ICMP echo (udpflow, echo); flows_rejected counts them too.
    datagram_flows_active: int = 0  # UDP and echo flow tasks running
    datagrams_c2s: int = 0  # UDP datagrams and echo requests from clients
    datagrams_s2c: int = 0  # UDP datagrams and echo replies from servers
    datagram_drops: int = 0  # queue or socket buffer full, or a send error: dropped
    icmp_relayed: int = 0  # ICMP errors about the relay's sockets relayed to clients


@dataclass(slots=True)
class FlowEnv:
    """What every flow of one relay shares."""

    stack: RelayStack
    config: RelayConfig
    chain: AnalyzerChain
    connector: Connector
    isn: Callable[[FlowId], int]
    kick: Callable[[], None]  # wake the packet loop: the stack has packets to flush
    flush: Callable[[], None]  # write the stack's packets now (after stack.send)
    stats: RelayStats
    # A new TCP flow's detection and dissection; None: dissection is off.
    dissection: Callable[[], StreamDissection] | None = None
