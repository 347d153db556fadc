"""The packet loop: one per packet source, driving one sans-IO ``Stack``.

Theory of operation: each iteration drains up to ``max_batch``
packets, feeds them to the stack with one ``now``, fires the stack's timers,
dispatches every event, and writes whatever the stack wants sent. There is no
trio checkpoint or channel hop per packet. Then it sleeps until the earliest
of: the source is readable, the stack's next deadline, or a *kick*.

A kick comes from a flow task that called ``stack.consumed/close/abort``
(or ``accept``/``reject``): the stack now has packets to flush. The kick is a
flag plus ``cancel()`` of the cancel scope the loop sleeps in: one wakeup
owned by the engine, no channel and no extra task, and any number of kicks
between two iterations coalesce into one flush. When the source stays busy
(a full batch) the loop yields once per iteration so flow tasks get to run.
One flow gets at most ``RelayConfig.flow_pass_bytes`` of a pass
(``relay.datapath.fairshare``); the rest of its packets go first in the next
pass, so a request read beside a burst of GRO super-segments is not received
(nor answered) only after all of them.

Two shortcuts save a scheduler pass each on the request/response path: the
server's bytes, once handed to ``stack.send``, are written by the flow task
itself (``flush``: packets out now, and the loop's wake-up moved earlier if
the stack armed an earlier timer), and the client's bytes go straight to the
upstream socket from the ``DataReceived`` handler when nothing is queued
before them and no analyzer may change them (``TcpFlow.on_data``).

Events become sync calls on the flow's ``TcpFlow`` (UDP and echo events go to
``relay.datapath.datagrams.DatagramRelay``); everything that waits
(connect, socket I/O, analyzers) runs in that flow's tasks, in the engine's
nursery. Malformed packets are the stack's business (it counts and drops
them); an exception out of ``stack.receive`` is a stack bug, and is counted
and contained here as well. So is one out of the stack's timers
(``timer_errors``), out of building or writing a batch toward the clients
(``write_errors``: that batch is lost, which TCP repairs), or out of an event
handler (``dispatch_errors``: that flow is reset); the loop goes on.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import resource
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio

from relay.analysis.hooks import AnalyzerChain
from relay.analysis.streams import adapt_stream_analyzers
from relay.datapath import fairshare
from relay.datapath.config import RelayConfig
from relay.datapath.datagrams import DatagramRelay
from relay.datapath.echo import EchoFlow, open_ping_socket
from relay.datapath.egress import EgressPolicy
from relay.datapath.env import (
    Connector,
    DatagramEnv,
    FlowEnv,
    RelayStack,
    RelayStats,
    SocketFactory,
)
from relay.datapath.isn import IsnGenerator
from relay.datapath.looptime import LoopLatency
from relay.datapath.packet_source import CsumPacketSource, PacketSource, RawPacket
from relay.datapath.tcpflow import TcpFlow, make_connector
from relay.datapath.udpflow import UdpFlow, open_udp_socket
from stack import (
    Closed,
    Connected,
    ConnectionRequest,
    ConnectionReset,
    DataReceived,
    Event,
    FlowId,
    PeerFinished,
    SendSpace,
)

if TYPE_CHECKING:
    from relay.datapath.dissection import DatagramDissection, StreamDissection

__all__ = ["Relay", "raise_nofile_limit"]

log = logging.getLogger(__name__)
# The flow tasks' name, one string for all (trio would format one per task).
_FLOW_TASK = "tunrelay TcpFlow.run"


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit: one fd per relayed flow.

    Returns:
        The soft limit now in effect.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        # Linux refuses a soft limit above fs.nr_open.
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
            return soft
        return target
    return soft


def _dissection_factories(
    chain: AnalyzerChain,
) -> tuple[Callable[[], StreamDissection] | None, Callable[[], DatagramDissection] | None]:
    """The flows' dissection factories for the protocols some analyzer wants records
    of (TCP, UDP); None where there are none, and then nothing is imported."""
    protocols = chain.record_protocols
    if not protocols:
        return None, None
    from relay.datapath.dissection import (
        DATAGRAM_PROTOCOLS,
        STREAM_PROTOCOLS,
        DatagramDissection,
        StreamDissection,
    )

    stream = protocols & STREAM_PROTOCOLS
    datagram = protocols & DATAGRAM_PROTOCOLS
    hooks = frozenset(chain.record_hooks)
    return (
        functools.partial(StreamDissection, stream, hooks) if stream else None,
        functools.partial(DatagramDissection, datagram, hooks) if datagram else None,
    )


class Relay:
    """Relays every TCP flow the stack terminates to its original destination.

    Args:
        source: where client packets come from and go to (TUN device, memory).
        stack: the sans-IO stack; this relay is its only caller.
        config: relay settings.
        analyzers: objects implementing some of ``relay.analysis.hooks.Analyzer``,
            or stream analyzers (``relay.analysis.streams``).
        connector: opens the upstream socket for a flow; the default connects
            a kernel TCP socket to the original destination.
        isn: initial sequence numbers; defaults to RFC 6528 (``IsnGenerator``).
        udp_socket: opens the connected upstream socket of a UDP flow; defaults
            to ``open_udp_socket`` with ``config.upstream``'s options.
        echo_socket: opens the ICMP socket of an echo flow; defaults to
            ``open_ping_socket`` with ``config.upstream``'s options.

    Every flow is judged by ``config.egress`` before any of these is called.

    Raises:
        TypeError: an analyzer has a hook that is not an async method, or a
            stream analyzer is not a valid one.
    """

    def __init__(
        self,
        source: PacketSource,
        *,
        stack: RelayStack,
        config: RelayConfig,
        analyzers: Sequence[object] = (),
        connector: Connector | None = None,
        isn: Callable[[FlowId], int] | None = None,
        udp_socket: SocketFactory | None = None,
        echo_socket: SocketFactory | None = None,
    ) -> None:
        self.stats = RelayStats()
        self.loop_latency = LoopLatency()  # seconds per packet-loop pass
        self._source = source
        # TUN offloads: the source marks packets whose checksum the stack must not verify.
        self._drain_csum = (
            source.drain_csum
            if isinstance(source, CsumPacketSource) and source.csum_offload
            else None
        )
        self._stack = stack
        self._config = config
        # Stream analyzers (relay.analysis.streams) join the chain as adapters whose
        # stream tasks run in this relay's nursery.
        analyzers, self._stream_adapters = adapt_stream_analyzers(
            analyzers, fail_closed=config.fail_closed, on_error=self._count_analyzer_error
        )
        chain = AnalyzerChain(
            analyzers, fail_closed=config.fail_closed, on_error=self._count_analyzer_error
        )
        stream_dx, datagram_dx = _dissection_factories(chain)
        self._env = FlowEnv(
            stack=stack,
            config=config,
            chain=chain,
            connector=connector if connector is not None else make_connector(config),
            isn=isn if isn is not None else IsnGenerator(),
            kick=self.kick,
            flush=self.flush,
            stats=self.stats,
            dissection=stream_dx,
        )
        self._flows: dict[FlowId, TcpFlow] = {}
        self._nursery: trio.Nursery | None = None
        self._kicked = False
        self._carried: tuple[list[RawPacket], list[bool]] = ([], [])
        self._waiting = False  # the packet loop sleeps in _wait_scope
        self._wait_scope: trio.CancelScope | None = None
        up = config.upstream
        self._handlers: dict[type[Any], Callable[[Any], None]] = {
            ConnectionRequest: self._on_request,
            Connected: self._on_connected,
            DataReceived: self._on_data,
            PeerFinished: self._on_peer_finished,
            ConnectionReset: self._on_reset,
            SendSpace: self._on_send_space,
            Closed: self._on_closed,
        }
        self._datagrams = DatagramRelay(
            DatagramEnv(
                stack=stack,
                chain=chain,
                kick=self.kick,
                stats=self.stats,
                udp_socket=udp_socket or functools.partial(open_udp_socket, upstream=up),
                echo_socket=echo_socket or functools.partial(open_ping_socket, upstream=up),
                egress=config.egress,
                flow_end_timeout=config.flow_end_timeout,
                dissection=datagram_dx,
            ),
            {"udp": UdpFlow, "icmp": EchoFlow},
        )
        self._handlers.update(self._datagrams.handlers())

    def reconfigure(
        self, *, egress: EgressPolicy | None = None, analyzers: Sequence[object] | None = None
    ) -> None:
        """New flows are judged by ``egress`` and see ``analyzers`` (a reload); flows
        already open keep the policy decision and the analyzers they started with.

        Raises:
            TypeError: an analyzer has a hook that is not an async method, or a
                stream analyzer is not a valid one.
        """
        if analyzers is not None:
            analyzers, adapters = adapt_stream_analyzers(
                analyzers, fail_closed=self._config.fail_closed, on_error=self._count_analyzer_error
            )
            for adapter in adapters:
                adapter.nursery = self._nursery
            # The previous adapters keep serving the flows that started with them (an
            # adapter keeps its nursery; the list only resets it when the relay stops).
            self._stream_adapters = adapters + [a for a in self._stream_adapters if a.active_flows]
            chain = AnalyzerChain(
                analyzers, fail_closed=self._config.fail_closed, on_error=self._count_analyzer_error
            )
            self._env.chain = self._datagrams.env.chain = chain
            self._env.dissection, self._datagrams.env.dissection = _dissection_factories(chain)
        if egress is not None:
            self._config = dataclasses.replace(self._config, egress=egress)
            self._env.config = self._config
            self._datagrams.env.egress = egress

    @property
    def active_flows(self) -> int:
        """Flows the stack has not reported ``Closed`` yet."""
        return len(self._flows)

    @property
    def active_datagram_flows(self) -> int:
        """UDP and echo flows the stack has not reported ``DatagramFlowClosed`` yet."""
        return len(self._datagrams)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the packet loop until cancelled or the source is closed.

        On exit every flow task is cancelled: upstream sockets are reset and
        analyzers get ``flow_end`` with ``how="shutdown"``.
        """
        if self._nursery is not None:
            raise RuntimeError("Relay.run() is already running")
        raise_nofile_limit()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = self._datagrams.nursery = nursery
                for adapter in self._stream_adapters:
                    adapter.nursery = nursery
                task_status.started()
                try:
                    await self._packet_loop()
                except trio.ClosedResourceError:
                    log.info("packet source closed; stopping the relay")
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = self._datagrams.nursery = None
            for adapter in self._stream_adapters:
                adapter.nursery = None
            self._wait_scope = None

    def flush(self) -> None:
        """Write what the stack has for the clients now (from a flow task that
        just called ``stack.send``) rather than wake the packet loop for it."""
        self._write_out(trio.current_time())
        scope = self._wait_scope
        if scope is not None:  # the loop sleeps until the deadline it saw then
            deadline = self._stack.get_timer()
            if deadline is not None and deadline < scope.deadline:
                scope.deadline = deadline

    def _write_out(self, now: float) -> None:
        # Both steps are contained to the batch: a lost batch is a loss TCP repairs,
        # where an exception here would end the packet loop (or a flow task that
        # flushed), i.e. the service.
        try:
            out = self._stack.packets_to_send(now)
        except Exception:
            self._count_loop_error("write_errors", "stack.packets_to_send")
            return
        if out:
            self.stats.packets_out += len(out)
            try:
                self._source.write_all(out)
            except Exception:
                self._count_loop_error("write_errors", "the packet source's write_all")

    def kick(self) -> None:
        """Wake the packet loop to flush the stack's output; cheap, coalescing."""
        self._kicked = True
        if self._waiting and self._wait_scope is not None:
            self._wait_scope.cancel()

    async def _packet_loop(self) -> None:
        # One cancel scope serves many iterations: entering and leaving one with
        # a deadline costs ~6 us here, about a tenth of the relay's per-request
        # work. It is left only when cancelled (a kick, or the stack's deadline
        # passed), which can happen only at the two awaits below: the body in
        # between is synchronous, so leaving it there loses nothing.
        while True:
            with trio.CancelScope() as scope:
                self._wait_scope = scope
                await self._iterations(scope)

    async def _iterations(self, scope: trio.CancelScope) -> None:
        source, stack, stats = self._source, self._stack, self.stats
        max_batch = self._config.max_batch
        receive = stack.receive
        drain_csum = self._drain_csum
        latency = self.loop_latency
        budget = self._config.flow_pass_bytes
        while True:
            self._kicked = False  # everything kicked so far is flushed below
            now = trio.current_time()
            # What went over a flow's share of the last pass (fairshare.split) goes
            # first; kept on self, as the cancel scope may end this call at an await.
            carried, carried_ok = self._carried
            # Read on while little is carried: a request is read (and served within
            # one share) even while an upload's carried packets wait for theirs.
            room = max_batch if not carried or sum(map(len, carried)) < fairshare.CARRY_BYTES else 0
            trusted: list[bool] | None
            packets: list[RawPacket]
            if room <= 0:
                packets, trusted = [], None
            elif drain_csum is None:
                packets, trusted = list(source.drain(room)), None
            else:
                packets, trusted = drain_csum(room)
            read = len(packets)
            if budget and (carried or read > 1):
                if trusted is None:
                    trusted = [False] * read
                packets, trusted, carried, carried_ok = fairshare.split(
                    carried + packets, carried_ok + trusted, budget
                )
                self._carried = carried, carried_ok
            if trusted is None:
                for packet in packets:
                    try:
                        receive(packet, now, batch=True)
                    except Exception:
                        self._count_receive_error()
            else:
                for packet, ok in zip(packets, trusted, strict=True):
                    try:
                        receive(packet, now, csum_ok=ok, batch=True)
                    except Exception:
                        self._count_receive_error()
            try:
                stack.end_batch(now)  # the pure ACKs merged per flow (Stack.receive)
            except Exception:
                self._count_receive_error()
            stats.packets_in += read
            try:
                stack.handle_timer(now)
            except Exception:
                # A stack bug: the timer that raised was taken off the heap, so the
                # next pass does not meet it again; the others run then.
                self._count_loop_error("timer_errors", "stack.handle_timer")
            self._dispatch()
            self._write_out(now)
            stats.iterations += 1
            latency.observe(trio.current_time() - now)
            if carried or (room > 0 and read >= room) or self._kicked:
                await trio.lowlevel.checkpoint()  # busy: let flow tasks run, then go on
                continue
            # Moved only earlier: a deadline that moved later (the usual case, a
            # delayed ACK that a response has sent since) costs one spare pass when
            # the old one passes, where moving it costs ~3 us on every request.
            deadline = stack.get_timer()
            if deadline is not None and deadline < scope.deadline:
                scope.deadline = deadline
            # No checkpoint since _kicked was last cleared, so no kick is lost: a kick
            # from now on cancels the scope (a kick while the loop runs only sets the
            # flag, which the next pass sees).
            self._waiting = True
            try:
                await source.wait_readable()
            finally:
                self._waiting = False

    def _dispatch(self) -> None:
        next_event, handlers, stats = self._stack.next_event, self._handlers, self.stats
        while True:
            try:
                event = next_event()
            except Exception:
                self._count_loop_error("dispatch_errors", "stack.next_event")
                return  # the rest waits for the next pass
            if event is None:
                return
            stats.events += 1
            handler = handlers.get(type(event))
            if handler is None:
                log.debug("ignoring event %r", event)
                continue
            try:
                handler(event)
            except Exception:
                self._count_loop_error("dispatch_errors", f"the handler of {type(event).__name__}")
                self._end_flow_of(event)

    def _end_flow_of(self, event: Event) -> None:
        """Contain a failed event handler to its flow: the client gets an RST (a
        datagram flow is ended) and the flow's Closed event ends its task."""
        flow = getattr(event, "flow", None)
        if not isinstance(flow, FlowId):
            return
        try:
            if flow.proto == "tcp":
                self._stack.abort(flow)  # also for a request not decided yet
            else:
                self._stack.end_datagram_flow(flow)
        except Exception:
            self._count_loop_error("dispatch_errors", "ending the flow of a failed handler")

    def _flow(self, event: Event) -> TcpFlow | None:
        flow = self._flows.get(event.flow)
        if flow is None:
            self.stats.stray_events += 1
            log.debug("event for an unknown flow: %r", event)
        return flow

    def _on_request(self, event: ConnectionRequest) -> None:
        assert self._nursery is not None
        if event.flow in self._flows:  # the stack promises one Closed per request first
            self.stats.stray_events += 1
            log.warning("duplicate connection request for a live flow: %r", event.flow)
            return
        self.stats.flows_requested += 1
        flow = TcpFlow(self._env, event.flow)
        self._flows[event.flow] = flow
        self._nursery.start_soon(flow.run, name=_FLOW_TASK)

    def _on_connected(self, event: Connected) -> None:
        if (flow := self._flow(event)) is not None:
            flow.on_connected()

    def _on_data(self, event: DataReceived) -> None:
        if (flow := self._flow(event)) is not None:
            flow.on_data(event.data)

    def _on_peer_finished(self, event: PeerFinished) -> None:
        if (flow := self._flow(event)) is not None:
            flow.on_peer_finished()

    def _on_reset(self, event: ConnectionReset) -> None:
        if (flow := self._flow(event)) is not None:
            flow.on_reset()

    def _on_send_space(self, event: SendSpace) -> None:
        if (flow := self._flow(event)) is not None:
            flow.on_send_space()

    def _on_closed(self, event: Closed) -> None:
        flow = self._flows.pop(event.flow, None)
        if flow is None:
            self.stats.stray_events += 1
            return
        flow.on_closed(event.reason)

    def _count_analyzer_error(self) -> None:
        self.stats.analyzer_errors += 1

    def _count_loop_error(self, counter: str, where: str) -> None:
        """Count an exception the packet loop contained; log it at 1, 2, 4, 8... ."""
        n = getattr(self.stats, counter) + 1
        setattr(self.stats, counter, n)
        if n & (n - 1) == 0:
            log.exception("%s raised (%s: %d so far); the service goes on", where, counter, n)

    def _count_receive_error(self) -> None:
        self.stats.receive_errors += 1
        if self.stats.receive_errors & (self.stats.receive_errors - 1) == 0:  # 1, 2, 4, 8...
            log.exception(
                "stack.receive raised (%d so far); packet dropped", self.stats.receive_errors
            )
