"""The relay side of one datagram flow (UDP or ICMP echo): the shared machinery.

Theory of operation: the stack keeps the flow table (``stack.datagram``: idle
timeouts, limits) and reports ``DatagramFlowOpened``, ``DatagramReceived``
and ``DatagramFlowClosed``; ``relay.datapath.datagrams.DatagramRelay`` turns them into
calls on one ``DatagramFlow`` per flow (``UdpFlow`` in ``relay.datapath.udpflow``, ``EchoFlow`` in
``relay.datapath.echo``).
The flow's task asks the analyzers for a verdict and opens its socket;
datagrams that arrive meanwhile wait in a small bounded queue. Then:

* client -> server: with no analyzer watching data, each ``DatagramReceived``
  is one non-blocking ``send`` straight from the packet loop (one parse, one
  dict lookup, one send per datagram). With data hooks, a pump task runs them
  and sends. A full queue or socket buffer drops the datagram, as a full link
  would: UDP has no backpressure to give.
* server -> client: the task waits for the socket to be readable, reads what
  is there (analyzers, then ``stack.send_datagram``) and kicks the loop once.
* errors: the sockets have ``IP_RECVERR``/``IPV6_RECVERR`` on, so every ICMP
  destination unreachable the kernel gets for them (a closed port, a router's
  host unreachable) is read from the error queue and relayed to the client
  with its code, quoting the datagram (ECONNREFUSED at a connected client
  socket comes from exactly that). Errors raised locally (no route) become
  the ICMP error a router would have sent.
* denial: a flow the egress policy (``relay.datapath.egress``) denies is refused
  with ICMP administratively prohibited before the analyzers are asked, and
  never gets a socket.
* refusal: a REJECT verdict answers the client with ICMP port unreachable
  (the UDP counterpart of TCP's RST from a closed port); a socket that cannot
  be opened (no route) answers with the matching unreachable code. The stack
  then answers later datagrams itself, and the flow stays refused until it
  idles out (so the analyzers are asked once per flow, not per datagram).
* end: ``DatagramFlowClosed`` (idle, or aborted) cancels the task, closes the
  socket and reports ``flow_end`` with byte and datagram counts.
* dissection (UDP, only when some analyzer has a record hook:
  ``env.dissection``; ``relay.datapath.dissection``): while the flow's
  ``DatagramDissection`` is active, client datagrams go through the pump
  task, which shows the records each completes (a DNS query, a QUIC
  ClientHello) before sending it; server datagrams are dissected as they are
  read, their records shown once the datagram went to the client. Once
  detection gave up or the dissector is done, the flow drops it and sends
  from the packet loop again.
"""

from __future__ import annotations

import collections
import logging
import socket
import sys
import time
from typing import TYPE_CHECKING, ClassVar, NoReturn

import trio

from relay.analysis.hooks import Block, Direction, EndReason, FlowEnd, FlowInfo, Stop, Verdict
from relay.analysis.ratelimit import RateLimitedLog
from relay.datapath.env import DatagramEnv, end_reason
from relay.datapath.icmp_errors import LOCAL_ERRORS, read_socket_errors
from stack import CloseReason, FlowId, Unreachable

if TYPE_CHECKING:
    from relay.datapath.dissection import DatagramDissection, Named

__all__ = ["DatagramFlow"]

log = logging.getLogger(__name__)
_errors = RateLimitedLog(log)  # lines a client can provoke: one per kind per interval

RECV_SIZE = 65536  # the largest datagram
RECV_BATCH = 64  # datagrams read per wakeup before letting other tasks run
_C2S = Direction.CLIENT_TO_SERVER
_S2C = Direction.SERVER_TO_CLIENT
_S2C = Direction.SERVER_TO_CLIENT


class DatagramFlow:
    """The relay side of one UDP or echo flow; subclasses say how to talk upstream.

    Items are ``bytes`` ready for ``sock.send``: a UDP payload, or an ICMP echo
    request message. Created on ``DatagramFlowOpened``; ``run`` is its task.
    """

    reject_code: ClassVar[Unreachable] = Unreachable.PORT  # the answer to a REJECT verdict
    watch_data: ClassVar[bool] = True  # show payloads to the analyzers' ``data``

    def __init__(self, env: DatagramEnv, flow: FlowId) -> None:
        self.flow = flow
        self.hooks = env.chain.open(FlowInfo.from_flow(flow, proto=flow.proto))
        self.bytes_c2s = 0  # payload bytes from the client
        self.bytes_s2c = 0  # payload bytes from the server
        self.packets_c2s = 0  # datagrams (echo requests) from the client
        self.packets_s2c = 0  # datagrams (echo replies) from the server
        self.fwd_c2s = 0  # payload bytes sent upstream (after the analyzers)
        self.fwd_s2c = 0  # payload bytes sent to the client (a Block's reply included)
        self._stopped: tuple[Unreachable | None, EndReason] | None = None  # refuse when set
        self._pumps: trio.CancelScope | None = None  # the pumps' nursery, once open
        self._env = env
        self._t0 = trio.current_time()
        self._scope = trio.CancelScope()
        self._sock: socket.socket | None = None
        self._direct = False  # send from the packet loop: socket open, no data hooks
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._closed: CloseReason | None = None  # set by DatagramFlowClosed: never call the stack
        self._hint: EndReason | None = None  # set when the relay decided how the flow ends
        self._rule: str | None = None  # the egress rule that denied the flow
        # Detection and dissection (UDP only); None when off, and once done.
        factory = env.dissection if self.watch_data else None
        self._dx: DatagramDissection | None = None if factory is None else factory()
        self._service: str | None = None  # the dissector's, kept when it is dropped

    # --- events from the packet loop (sync) -------------------------------------

    def on_item(self, item: bytes, size: int) -> None:
        """A client datagram (``size`` payload bytes) to send upstream."""
        self.bytes_c2s += size
        self.packets_c2s += 1
        self._env.stats.datagrams_c2s += 1
        if self._direct:
            if self._send(item):
                self.fwd_c2s += size
            return
        if self._queued + len(item) > self._env.queue_limit:
            self._env.stats.datagram_drops += 1
            return
        self._queue.append(item)
        self._queued += len(item)
        self._lot.unpark_all()

    def on_closed(self, reason: CloseReason) -> None:
        self._closed = reason
        self._direct = False
        self._scope.cancel()

    def on_datagram(self, data: bytes) -> None:
        """A UDP payload from the client (UDP flows)."""
        self._env.stats.stray_events += 1

    def on_echo(self, seq: int, data: bytes) -> None:
        """An echo request from the client (echo flows)."""
        self._env.stats.stray_events += 1

    # --- subclasses ---------------------------------------------------------------

    def open_socket(self) -> socket.socket:
        return self._env.udp_socket(self.flow)

    def refusal(self, exc: OSError) -> tuple[Unreachable | None, EndReason]:
        """How to answer the client when ``open_socket`` failed with ``exc``."""
        code = LOCAL_ERRORS.get(exc.errno or 0)
        return code, EndReason.UNREACHABLE if code is not None else EndReason.ERROR

    async def deliver(self, data: bytes, now: float) -> bool:
        """Hand one message read from the socket to the client; False aborts the flow."""
        raise NotImplementedError

    # --- the task -------------------------------------------------------------------

    async def run(self) -> None:
        """The flow task. Never raises anything but cancellation."""
        stats = self._env.stats
        stats.datagram_flows_active += 1
        try:
            with self._scope:
                await self._serve()
        except Exception:
            stats.flow_errors += 1  # a bug, not traffic: contain it to this flow
            _errors.exception(
                ("failed", sys.exc_info()[0]),
                "flow %s failed; ending it",
                self.hooks.info.describe(),
            )
            self._end(EndReason.ERROR)
        finally:
            stats.datagram_flows_active -= 1
            with trio.CancelScope(shield=True, relative_deadline=self._env.flow_end_timeout):
                await self._finish()

    async def _serve(self) -> None:
        rule = self._env.egress.denied_by(self.flow)
        if rule is not None:
            self._env.stats.flows_denied += 1
            self._rule = rule
            log.debug("flow %s: denied by %s", self.hooks.info.describe(), rule)
            await self._refuse(Unreachable.ADMIN, EndReason.DENIED)
        if await self.hooks.start() is Verdict.REJECT:
            self._env.stats.flows_rejected += 1
            await self._refuse(self.reject_code, EndReason.REJECTED)
        try:
            sock = self.open_socket()
        except OSError as exc:
            log.debug("flow %s: no socket: %s", self.hooks.info.describe(), exc)
            await self._refuse(*self.refusal(exc))
        self._sock = sock
        if self._closed is not None:
            return
        async with trio.open_nursery() as nursery:
            self._pumps = nursery.cancel_scope
            if self._dx is not None or (self.watch_data and self.hooks.has_data_hooks):
                nursery.start_soon(self._pump_c2s)
            else:
                while self._queue:
                    item = self._queue.popleft()
                    if self._send(item):
                        self.fwd_c2s += self.payload_size(item)
                self._queued = 0
                self._direct = True
            await self._pump_s2c()
        if self._stopped is not None:
            # An analyzer's verdict: the socket goes, later datagrams are refused.
            sock, self._sock = self._sock, None
            if sock is not None:
                sock.close()
            await self._refuse(*self._stopped)

    async def _refuse(self, code: Unreachable | None, end: EndReason) -> NoReturn:
        """Answer queued and later datagrams with ``code`` (None: silence) until idle."""
        self._hint = end
        env = self._env
        if self._closed is None:
            env.stack.refuse_datagrams(self.flow, code)
            if code is not None:
                now = trio.current_time()
                for item in self._queue:
                    env.stack.datagram_unreachable(self.flow, code, now, quote=item)
            env.kick()
        self._queue.clear()
        await trio.sleep_forever()  # until DatagramFlowClosed cancels the scope
        raise AssertionError("unreachable")

    def _end(self, end: EndReason) -> None:
        """The relay ends the flow itself; DatagramFlowClosed(ABORTED) follows."""
        if self._hint is None:
            self._hint = end
        if self._closed is None:
            self._direct = False
            self._env.stack.end_datagram_flow(self.flow)
            self._env.kick()
        self._scope.cancel()

    def payload_size(self, item: bytes) -> int:
        """The payload bytes of ``item`` (an echo request has a header)."""
        return len(item)

    def _send(self, item: bytes) -> bool:
        """Send without waiting; False when the datagram was dropped."""
        sock = self._sock
        assert sock is not None
        try:
            sock.send(item)
        except BlockingIOError:
            self._env.stats.datagram_drops += 1
            return False
        except OSError as exc:
            # A pending error from an earlier ICMP message (reported by the error
            # queue, relayed there) fails this send without sending: retry once.
            if self._socket_error(exc, item):
                try:
                    sock.send(item)
                except OSError:
                    self._env.stats.datagram_drops += 1
                    return False
                return True
            return False
        return True

    async def _stop(self, stop: Stop) -> bool:
        """An analyzer's verdict on a client datagram (dropped by the caller).

        Returns:
            True when the flow goes on (a ``Block`` with ``keep_open``).
        """
        env = self._env
        if isinstance(stop, Block):
            env.stats.flows_blocked += 1
            self._hint, self._rule = EndReason.BLOCKED, stop.rule
            log.debug("flow %s: blocked by %s", self.hooks.info.describe(), stop.rule)
            if stop.reply and self._closed is None:
                self.reply(stop.reply)
                dx = self._dx
                if dx is not None:
                    # The protocol logs see the relay's answer as the server's.
                    records = self.dissect(dx, _S2C, stop.reply)
                    if records:
                        await self.hooks.records(records)
            if stop.keep_open:
                return True
            self._stopped = (None, EndReason.BLOCKED)  # silence, as a dropped flow
        elif stop is Verdict.RESET:
            env.stats.flows_reset += 1
            self._stopped = (self.reject_code, EndReason.REJECTED)
        else:
            self._end(EndReason.ABORTED)
            return False
        self._queue.clear()
        self._queued = 0
        if self._pumps is not None:
            self._pumps.cancel()
        return False

    def reply(self, data: bytes) -> None:
        """Send ``data`` to the client as if from the server (a Block's reply)."""
        raise NotImplementedError

    def _socket_error(self, exc: OSError, item: bytes = b"") -> bool:
        """Relay what the socket reported; True when it came from the error queue."""
        sock, env = self._sock, self._env
        assert sock is not None
        queued = read_socket_errors(sock)
        errors: list[tuple[Unreachable | int, bytes]] = list(queued)
        if not errors:
            local = LOCAL_ERRORS.get(exc.errno or 0)
            if local is None:
                env.stats.datagram_drops += 1
                log.debug("flow %s: %r", self.hooks.info.describe(), exc)
                return False
            errors.append((local, item))
        if self._closed is None:
            now = trio.current_time()
            for code, quote in errors:
                env.stack.datagram_unreachable(self.flow, code, now, quote=quote)
                env.stats.icmp_relayed += 1
            env.kick()
        return bool(queued)

    async def _pump_c2s(self) -> None:
        sock, queue, lot = self._sock, self._queue, self._lot
        assert sock is not None
        while True:
            while not queue:
                await lot.park()
            item = queue.popleft()
            self._queued -= len(item)
            dx = self._dx
            if dx is not None:
                records = self.dissect(dx, _C2S, item)
                if records and (stop := await self.hooks.records(records)) is not None:
                    if not await self._stop(stop):
                        return
                    item = b""  # blocked, the flow goes on: this datagram is dropped
            if item and self.hooks.has_data_hooks:
                out = await self.hooks.data(_C2S, item)
                if not isinstance(out, bytes):
                    await self._stop(out)
                    return
                item = out
            if item:
                sent = True
                try:
                    sock.send(item)
                except BlockingIOError:
                    # The socket buffer is full: wait for room (the queue bounds the wait).
                    await trio.lowlevel.wait_writable(sock)
                    sent = self._send(item)
                except OSError as exc:
                    sent = self._socket_error(exc, item) and self._send(item)
                if sent:
                    self.fwd_c2s += self.payload_size(item)
            if (
                self._dx is None
                and not self.hooks.has_data_hooks
                and not queue
                and self._closed is None
            ):
                self._direct = True  # nothing left to show anyone: the packet loop sends
                return

    def dissect(self, dx: DatagramDissection, direction: Direction, data: bytes) -> list[Named]:
        """``data`` through the flow's dissection; drops it once done."""
        records = dx.datagram(direction, data, time.time())
        if not dx.active:
            self._dx = None
            self._service = dx.service
        return records

    async def _pump_s2c(self) -> None:
        sock, env = self._sock, self._env
        assert sock is not None
        stats = env.stats
        while True:
            await trio.lowlevel.wait_readable(sock)
            got = False
            for _ in range(RECV_BATCH):
                try:
                    data = sock.recv(RECV_SIZE)
                except BlockingIOError:
                    break
                except OSError as exc:
                    self._socket_error(exc)
                    continue
                stats.datagrams_s2c += 1
                self.packets_s2c += 1
                if not await self.deliver(data, trio.current_time()):
                    self._end(EndReason.ABORTED)
                    return
                if self._closed is not None:
                    return
                got = True
            if got:
                env.kick()

    async def _finish(self) -> None:
        sock, self._sock = self._sock, None
        self._direct = False
        if sock is not None:
            sock.close()
        end_time = trio.current_time()
        how = end_reason(self._hint, self._closed)
        dx, self._dx = self._dx, None
        if dx is not None:
            records = dx.close(time.time())
            self._service = dx.service
            if records:
                await self.hooks.records(records)  # the flow is over: errors only detach
        end = FlowEnd(
            how, self.bytes_c2s, self.bytes_s2c, end_time - self._t0, self._rule,
            self.packets_c2s, self.packets_s2c, self.history(),
            (self._service,) if self._service is not None else (),
            self.fwd_c2s, self.fwd_s2c,
        )  # fmt: skip
        log.debug("flow %s ended: %s", self.hooks.info.describe(), end)
        await self.hooks.end(end)

    def history(self) -> str:
        """Zeek's conn.log history: ``D`` the client sent, ``d`` the server did
        (the client's always came first: it opened the flow)."""
        return ("D" if self.packets_c2s else "") + ("d" if self.packets_s2c else "")
