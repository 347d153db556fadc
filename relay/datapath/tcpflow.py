"""One relayed TCP flow: the kernel-socket side (connect, two pumps, close).

Theory of operation: the packet loop (``relay.datapath.engine``) owns the stack and
turns its events into calls of the sync ``on_*`` methods here; those only
update the flow's state and wake its task (a one-slot ``Waiter``).
The flow's own task (``run``) does everything that waits:

1. the egress policy (``relay.datapath.egress``: a denied flow gets ICMP
   administratively prohibited and never an upstream socket), analyzers'
   ``flow_start`` verdicts, then connect upstream (connect before accept):
   success -> ``stack.accept``; a connect error -> ``stack.reject`` the way
   the network would have answered (RST, ICMP, silence).
2. two pumps. client -> server: queued ``DataReceived`` bytes go through the
   analyzers (which may rewrite, drop or RESET them) and ``sock.send``; only
   then ``stack.consumed(n)`` (n: the client's bytes, whatever the rewrite's
   length), so a slow server or analyzer closes this flow's window. server -> client: ``recv``
   only while ``stack.send_space()`` > 0, at most that many bytes (a 0 from
   ``send_space()`` arms ``SendSpace``, which wakes the pump), analyzers,
   ``stack.send``. The server -> client pump is the flow task itself; the
   client -> server one is a task only while bytes wait for it (most go
   straight from ``on_data``), in the flow task's parent nursery under a
   cancel scope that every cancel of the flow also cancels. No nursery per
   flow: an idle connection holds one task, one scope, one frame chain.
3. close. FIN is relayed as a half-close each way (``PeerFinished`` ->
   ``shutdown(SHUT_WR)`` after the queue is written; upstream EOF ->
   ``stack.close``). RST as RST: the client's reset closes the upstream
   socket with ``SO_LINGER`` 0; an upstream error ``stack.abort``\\ s the flow.
   ``Closed`` ends the task: socket closed (abortively unless both directions
   finished cleanly), analyzers' ``flow_end``.

Dissection (only when some analyzer has a record hook: ``env.dissection``;
``relay.datapath.dissection``): the client's bytes go to the flow's
``StreamDissection`` in ``on_data``, before they are sent, and the server's in
the s2c pump, right after they are read. A chunk that completes records (a
ClientHello, a request's header block) waits in the c2s queue until their
hooks ran, so an analyzer sees a record before the bytes that completed it
go upstream; every other chunk takes the usual path, the direct one included.
Records from the server's bytes are shown once those bytes went to the stack.
Once detection gave up or the dissector is done, the flow drops it.

The flow also keeps Zeek's conn.log ``history`` (``FlowEnd.history``): the
client's letters (upper case) from the stack's events, the server's (lower
case) from the upstream socket; ``relay.analysis.zeeklog`` has the table.

Every stack call that can produce packets is followed by ``kick()`` so the
packet loop flushes them, or by ``flush()``, which writes them at once, where
a reply is waited for: the SYN-ACK and the server's bytes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING

import trio

from relay.analysis.hooks import Block, Direction, EndReason, FlowEnd, FlowInfo, Stop, Verdict
from relay.analysis.ratelimit import RateLimitedLog
from relay.datapath.config import RelayConfig
from relay.datapath.env import Connector, FlowEnv, end_reason
from relay.datapath.waiter import Waiter
from stack import CloseReason, FlowId, Reject, Unreachable

if TYPE_CHECKING:
    from relay.datapath.dissection import Named, StreamDissection

__all__ = ["TcpFlow", "classify_connect_error", "make_connector"]

log = logging.getLogger(__name__)
_errors = RateLimitedLog(log)  # lines a client can provoke: one per kind per interval

_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_C2S = Direction.CLIENT_TO_SERVER
_S2C = Direction.SERVER_TO_CLIENT

# errno of a failed upstream connect -> how the client is answered.
_CONNECT_ERRORS: dict[int, tuple[Reject, Unreachable, EndReason]] = {
    errno.ECONNREFUSED: (Reject.RST, Unreachable.HOST, EndReason.REFUSED),
    errno.EHOSTUNREACH: (Reject.ICMP, Unreachable.HOST, EndReason.UNREACHABLE),
    errno.EHOSTDOWN: (Reject.ICMP, Unreachable.HOST, EndReason.UNREACHABLE),
    errno.ENETUNREACH: (Reject.ICMP, Unreachable.NET, EndReason.UNREACHABLE),
    errno.ENETDOWN: (Reject.ICMP, Unreachable.NET, EndReason.UNREACHABLE),
    errno.EACCES: (Reject.ICMP, Unreachable.ADMIN, EndReason.UNREACHABLE),
    errno.EPERM: (Reject.ICMP, Unreachable.ADMIN, EndReason.UNREACHABLE),
    errno.ETIMEDOUT: (Reject.SILENT, Unreachable.HOST, EndReason.CONNECT_TIMEOUT),
}


# An established upstream socket failing with these was reset by the server: ECONNRESET
# reports the RST itself; once a read took the server's FIN first, a later send sees
# EPIPE and shutdown() ENOTCONN instead (the RST answered bytes sent after the FIN).
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN})


def classify_connect_error(exc: OSError) -> tuple[Reject, Unreachable, EndReason]:
    """How to answer the client when the upstream connect failed with ``exc``.

    Anything unlisted (EADDRNOTAVAIL: out of local ports, ...) is an RST.
    """
    return _CONNECT_ERRORS.get(exc.errno or 0, (Reject.RST, Unreachable.HOST, EndReason.ERROR))


def _established(sock: socket.socket) -> bool:
    """Whether a non-blocking connect() has completed: getpeername(2) fails with
    ENOTCONN while the socket is in SYN-SENT (and on a failed connect, which the
    wait then reports through SO_ERROR)."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def make_connector(config: RelayConfig) -> Connector:
    """The default connector: a kernel TCP socket to the original destination."""

    upstream = config.upstream

    async def connect(flow: FlowId) -> trio.socket.SocketType:
        # trio's sock.connect, unrolled: the destination is a numeric address, so
        # its resolver step (a getaddrinfo call) and wrapper layers are per-flow
        # cost for nothing. The syscalls and the one checkpoint are the same.
        family = socket.AF_INET if flow.version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            upstream.prepare(sock, family, stream=True)  # IPV6_V6ONLY, mark, source
            # Buffer sizes before connect: the window scale is fixed in the SYN.
            if config.upstream_sndbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.upstream_sndbuf)
            if config.upstream_rcvbuf is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, config.upstream_rcvbuf)
            if config.upstream_timeout:
                ms = max(1, int(config.upstream_timeout * 1000))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, ms)
            await trio.lowlevel.checkpoint_if_cancelled()
            err = sock.connect_ex((flow.server_ip, flow.server_port))
            if err == errno.EINPROGRESS and not _established(sock):
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            elif err == errno.EINPROGRESS:
                # The handshake completed within connect() itself, as it does when
                # the server's SYN-ACK is processed in the same softirq run (a
                # server on this host or a veth away): no wait, no scheduler pass.
                err = 0
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
            if err:
                raise OSError(err, os.strerror(err))
        except BaseException:
            sock.close()
            raise
        return trio.socket.from_stdlib_socket(sock)

    return connect


class TcpFlow:
    """The relay side of one TCP flow. Created on ``ConnectionRequest``."""

    __slots__ = (
        "_accepted",
        "_c2s",
        "_c2s_done",
        "_c2s_held",
        "_c2s_pumping",
        "_c2s_scope",
        "_closed",
        "_connected",
        "_done_at",
        "_doomed",
        "_dx",
        "_env",
        "_hint",
        "_history",
        "_outer",
        "_packets",
        "_peer_fin",
        "_records",
        "_relaying",
        "_reply",
        "_rule",
        "_scope",
        "_service",
        "_sock",
        "_t0",
        "_wake",
        "bytes_c2s",
        "bytes_s2c",
        "flow",
        "fwd_c2s",
        "fwd_s2c",
        "hooks",
    )

    def __init__(self, env: FlowEnv, flow: FlowId) -> None:
        self.flow = flow
        self.hooks = env.chain.open(FlowInfo.from_flow(flow))
        self.bytes_c2s = 0  # from the client (DataReceived)
        self.bytes_s2c = 0  # from the server (recv)
        self.fwd_c2s = 0  # written upstream (after the analyzers' rewrites)
        self.fwd_s2c = 0  # given to the stack for the client
        self._reply: bytes | None = None  # a Block's answer, sent by the s2c pump
        self._env = env
        self._t0 = trio.current_time()
        self._done_at: float | None = None  # both directions finished cleanly
        # The flow task's cancel scope, the whole flow's (Closed cancels it). None
        # until the task runs; a cancel that comes before sets _doomed. No nursery
        # per flow (memory per idle flow): the c2s writer, a task only while it has
        # bytes to write, runs in the task's own parent nursery (_outer) under a
        # scope of its own (_c2s_scope) that every cancel of the flow cancels too.
        self._scope: trio.CancelScope | None = None
        self._outer: trio.Nursery | None = None
        self._c2s_scope: trio.CancelScope | None = None
        self._doomed = False
        self._relaying = False  # between accept and both directions done
        self._sock: trio.socket.SocketType | None = None
        # Client bytes waiting for the upstream socket, written by _pump_c2s, a task
        # that runs only while there are some (idle flows cost memory per task). The
        # list is made for the first bytes held (memory per idle flow), then kept.
        self._c2s: list[bytes] | None = None
        self._c2s_held = 0  # bytes received from the client, not yet written upstream
        self._c2s_pumping = False  # _pump_c2s has bytes to write (or is starting)
        self._c2s_done = False  # the client's FIN went upstream
        # The flow task parks here for: connected, send space, c2s done, Closed.
        # One slot for all (never more than one waiter): memory per idle flow.
        self._wake = Waiter()
        self._accepted = False
        self._connected = False
        self._peer_fin = False
        # Set by Closed. From then on the FlowId may name a *new* connection in the
        # stack (a SYN reusing the 4-tuple), so this flow never calls the stack again.
        self._closed: CloseReason | None = None
        self._hint: EndReason | None = None  # set when the relay itself ends the flow
        self._rule: str | None = None  # the egress rule that denied the flow
        # Zeek's conn.log history, from the client's SYN; interned as it grows, so
        # that flows share the few histories there are (memory per idle flow).
        self._history = "S"
        self._packets = env.stack.packet_counts(flow)  # the stack counts, live
        # Dissection: None when off, and once detection or the dissector is done.
        self._dx: StreamDissection | None = None if env.dissection is None else env.dissection()
        self._records: list[Named] | None = None  # completed by client bytes still held
        self._service: str | None = None  # the dissector's, kept when it is dropped

    # --- events from the packet loop (sync: state + wakeups only) --------------

    def _mark(self, letter: str) -> None:
        """Add a letter to the history, once (Zeek keeps each letter's first time)."""
        if letter not in self._history:
            self._history = sys.intern(self._history + letter)

    def on_connected(self) -> None:
        self._connected = True
        self._mark("A")  # the client's ACK of the SYN-ACK
        self._wake.unpark_all()

    def on_data(self, data: bytes) -> None:
        n = len(data)
        self.bytes_c2s += n
        self._env.stats.bytes_c2s += n
        if "D" not in self._history:
            self._history = sys.intern(self._history + "D")
        if self._reply is not None:  # blocked: nothing more goes upstream
            self._env.stack.consumed(self.flow, n)
            self._env.kick()
            return
        if self._c2s_held + n > self._env.config.max_c2s_queue:
            _errors.warning(
                "c2s_queue",
                "flow %s: client->server queue over its limit",
                self.hooks.info.describe(),
            )
            self._abort(EndReason.LIMIT)
            return
        dx = self._dx
        if dx is not None:
            self._dissected(dx.feed(_C2S, data, time.time()), dx)
        if (
            not self._c2s_held
            and self._relaying
            and not self.hooks.has_data_hooks
            and self._records is None
        ):
            sent = self._send_now(data)
            if sent:
                self.fwd_c2s += sent
                self._env.stack.consumed(self.flow, sent)  # flushed by the packet loop
                if sent == n:
                    return
                data = data[sent:]
        self._c2s_held += len(data)
        if self._c2s is None:
            self._c2s = [data]
        else:
            self._c2s.append(data)
        self._start_c2s()

    def _dissected(self, records: list[Named], dx: StreamDissection) -> None:
        """Hold the records client bytes completed for the c2s pump; drop a finished
        dissection."""
        if records:
            if self._records is None:
                self._records = list(records)
            else:
                self._records += records
        if not dx.active:
            self._dx = None
            self._service = dx.service

    def _start_c2s(self) -> None:
        if not self._c2s_pumping and self._relaying and self._outer is not None:
            self._c2s_pumping = True
            self._c2s_scope = trio.CancelScope(deadline=self._scope_deadline())
            self._outer.start_soon(self._c2s_task, self._c2s_scope)

    def _scope_deadline(self) -> float:
        return self._scope.deadline if self._scope is not None else float("inf")

    async def _c2s_task(self, scope: trio.CancelScope) -> None:
        """The c2s writer's task: as a child of the flow's nursery would be, its
        failure fails the flow, and the flow task ends only after it did."""
        try:
            with scope:
                if self._scope is None or self._scope.cancel_called:
                    scope.cancel()
                await self._pump_c2s()
        except Exception:
            self._failed()
        finally:
            if self._c2s_scope is scope:
                self._c2s_scope = None
            self._wake.unpark_all()

    def _send_now(self, data: bytes) -> int:
        """Write to the upstream socket without waiting (nothing is queued before
        ``data``); how much the kernel took. Errors are left to the c2s pump,
        which meets them again on its own send."""
        sock = self._sock
        if sock is None:
            return 0
        try:
            return os.write(sock.fileno(), data)
        except OSError:
            return 0

    def on_peer_finished(self) -> None:
        self._peer_fin = True
        self._mark("F")
        if self._reply is not None:
            self._c2s_done = True
            self._wake.unpark_all()
            return
        dx = self._dx
        if dx is not None:
            self._dissected(dx.end(_C2S, time.time()), dx)
        if not self._c2s_pumping:
            self._finish_c2s()

    def on_send_space(self) -> None:
        self._wake.unpark_all()

    def on_reset(self) -> None:
        # The client's RST: drop everything; _finish closes upstream with SO_LINGER 0.
        self._mark("R")
        self._cancel()

    def on_closed(self, reason: CloseReason) -> None:
        self._closed = reason
        if reason is CloseReason.RESET:
            self._mark("R")
        self._wake.unpark_all()
        if reason is CloseReason.FINISHED and self._relaying and self._scope is not None:
            # Both FINs were exchanged with the client, but queued bytes may still be
            # on their way upstream: let the pumps finish, within a bound.
            deadline = trio.current_time() + self._env.config.close_drain_timeout
            for scope in (self._scope, self._c2s_scope):
                if scope is not None:
                    scope.deadline = min(scope.deadline, deadline)
        elif self._done_at is None:
            self._cancel()
        # else both directions finished cleanly and the task only waits for Closed,
        # woken above: a cancel would raise through it for nothing (per connection).

    def _cancel(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            if self._c2s_scope is not None:
                self._c2s_scope.cancel()
        else:
            self._doomed = True

    # --- the flow task --------------------------------------------------------

    async def run(self) -> None:
        """The flow task; started by the engine in its nursery. Never raises
        anything but cancellation."""
        stats = self._env.stats
        stats.flows_active += 1
        try:
            self._outer = trio.lowlevel.current_task().parent_nursery
            with trio.CancelScope() as scope:
                self._scope = scope
                if self._doomed:
                    scope.cancel()
                if await self._open():
                    # Relaying, in this task itself (one task, one frame less, per
                    # idle flow): server -> client here, client -> server by
                    # on_data or its writer task; then wait for Closed.
                    try:
                        if self._c2s:  # (the analyzers' or a full socket's)
                            self._start_c2s()
                        await self._pump_s2c()
                        while not self._c2s_done:
                            await self._wake.park()
                    finally:
                        self._relaying = False
                    if self._hint is None:
                        # Both directions finished cleanly: FINs went both ways upstream.
                        self._done_at = trio.current_time()
                        self._close_socket(abortive=False)
                    while self._closed is None:
                        await self._wake.park()
                while self._c2s_scope is not None:  # as a nursery waits for its children
                    await self._wake.park()
        except Exception:
            self._failed()
        finally:
            stats.flows_active -= 1
            stats.flows_ended += 1
            with trio.CancelScope(shield=True, relative_deadline=self._env.config.flow_end_timeout):
                while self._c2s_scope is not None:  # cancelled, so it ends at once
                    self._c2s_scope.cancel()
                    await self._wake.park()
                await self._finish()

    def _failed(self) -> None:
        """A bug, not traffic (an exception out of either pump): contain it to this
        flow."""
        self._env.stats.flow_errors += 1
        _errors.exception(
            ("failed", sys.exc_info()[0]),
            "flow %s failed; aborting it",
            self.hooks.info.describe(),
        )
        self._hint = self._hint or EndReason.ERROR
        if self._closed is None:
            if self._accepted:
                self._env.stack.abort(self.flow)
            else:
                self._env.stack.reject(self.flow, Reject.RST)
            self._env.kick()
        self._cancel()

    async def _open(self) -> bool:
        """Egress policy, analyzers' verdicts, connect upstream, accept: whether
        the flow is now relaying. (A coroutine that returns before the flow
        idles: its frame is not held by every idle connection.)"""
        env = self._env
        rule = env.config.egress.denied_by(self.flow)
        if rule is not None:
            env.stats.flows_denied += 1
            self._rule = rule
            log.debug("flow %s: denied by %s", self.hooks.info.describe(), rule)
            self._reject(Reject.ICMP, Unreachable.ADMIN, EndReason.DENIED)
            return False
        if await self.hooks.start() is Verdict.REJECT:
            env.stats.flows_rejected += 1
            self._reject(Reject.RST, Unreachable.HOST, EndReason.REJECTED)
            return False
        sock: trio.socket.SocketType | None = None
        try:
            with trio.move_on_after(env.config.connect_timeout):
                sock = await env.connector(self.flow)
        except OSError as exc:
            env.stats.connect_failed += 1
            log.debug("flow %s: connect failed: %s", self.hooks.info.describe(), exc)
            if exc.errno == errno.ECONNREFUSED:
                self._mark("r")  # the server answered the SYN with an RST
            self._reject(*classify_connect_error(exc))
            return False
        if sock is None:
            env.stats.connect_failed += 1
            self._reject(Reject.SILENT, Unreachable.HOST, EndReason.CONNECT_TIMEOUT)
            return False
        self._sock = sock
        self._mark("h")  # the server's SYN-ACK
        if self._closed is not None:
            return False  # the client went away meanwhile; _finish closes the socket
        with contextlib.suppress(OSError):  # OSError: not TCP (a test's socketpair)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # relay what we have
        env.stack.accept(self.flow, isn=env.isn(self.flow))
        self._accepted = True
        env.flush()  # the SYN-ACK now, not on the packet loop's next pass
        env.stats.flows_accepted += 1
        self._relaying = True
        return True

    def _reject(self, how: Reject, unreachable: Unreachable, end: EndReason) -> None:
        self._hint = end
        if self._closed is None:
            self._env.stack.reject(self.flow, how, unreachable=unreachable)
            self._env.flush()  # the answer now (and in the flow's packet counts)...
            self._env.kick()  # ...and the loop dispatches the Closed that followed

    def _abort(self, end: EndReason) -> None:
        """The relay ends the flow: RST to the client; Closed(ABORTED) follows."""
        if self._hint is None:
            self._hint = end
        if self._closed is None:
            self._env.stack.abort(self.flow)
            self._env.kick()
        self._cancel()

    def _upstream_failed(self, exc: BaseException) -> None:
        self._env.stats.upstream_errors += 1
        reset = isinstance(exc, OSError) and exc.errno in _RESET_ERRNOS
        if reset:
            self._mark("r")
        log.debug("flow %s: upstream failed: %r", self.hooks.info.describe(), exc)
        self._abort(EndReason.RST if reset else EndReason.ERROR)

    async def _pump_c2s(self) -> None:
        """Write the queued client bytes upstream, in order, then return (on_data
        starts it again); the FIN follows if the client's came meanwhile."""
        sock = self._sock
        assert sock is not None
        queue = self._c2s
        while queue:
            # Records the queued bytes completed are shown before those bytes go up.
            # Nothing awaits between this loop and taking the queue, so no chunk
            # whose records are still to be shown can slip out with it.
            while (records := self._records) is not None:
                self._records = None
                stop = await self.hooks.records(records)
                if stop is not None:
                    self._stop(stop)
                    return
            data = queue[0] if len(queue) == 1 else b"".join(queue)
            queue.clear()
            out = data
            if self.hooks.has_data_hooks:
                judged = await self.hooks.data(_C2S, data)
                if not isinstance(judged, bytes):
                    self._stop(judged)
                    return
                out = judged
            # Unchanged bytes reopen the client's window as the kernel takes them; a
            # rewrite holds the client's bytes until all of it is upstream.
            unchanged = out is data
            view = memoryview(out)
            while view:
                try:
                    n = await sock.send(view)
                except (OSError, trio.ClosedResourceError) as exc:
                    self._upstream_failed(exc)
                    return
                view = view[n:]
                self.fwd_c2s += n
                if unchanged:
                    self._release_c2s(n)
            if not unchanged:
                self._release_c2s(len(data))
        self._c2s_pumping = False
        if self._peer_fin:
            self._finish_c2s()

    def _release_c2s(self, n: int) -> None:
        """``n`` held client bytes are disposed of: reopen the client's window by n."""
        self._c2s_held -= n
        if self._closed is None:
            self._env.stack.consumed(self.flow, n)
            self._env.kick()

    def _stop(self, stop: Stop) -> None:
        """An analyzer's verdict (or a fail-closed failure) ends the flow."""
        if isinstance(stop, Block):
            self._block(stop)
        elif stop is Verdict.RESET:
            self._env.stats.flows_reset += 1
            self._abort(EndReason.REJECTED)
        else:
            self._abort(EndReason.ABORTED)

    def _block(self, block: Block) -> None:
        """Answer in the server's place (or reset both sides, without a reply)."""
        self._env.stats.flows_blocked += 1
        self._rule = block.rule
        log.debug("flow %s: blocked by %s", self.hooks.info.describe(), block.rule)
        if not block.reply:
            self._abort(EndReason.BLOCKED)
            return
        self._hint = EndReason.BLOCKED
        self._reply = block.reply
        # The held client bytes are dropped, and acknowledged so the client can close.
        if self._c2s is not None:
            self._c2s.clear()
        if self._c2s_held and self._closed is None:
            self._env.stack.consumed(self.flow, self._c2s_held)
            self._env.kick()
        self._c2s_held = 0
        self._c2s_pumping = False
        self._c2s_done = True
        # Reads now see EOF, so the s2c pump sends the reply and the FIN; the
        # server sees a FIN and never the bytes held back.
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._wake.unpark_all()

    def _finish_c2s(self) -> None:
        """Everything the client sent is upstream: pass its FIN on (SHUT_WR)."""
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._upstream_failed(exc)
                return
        self.hooks.finished(_C2S)  # end of the client's stream, for stream analyzers
        self._c2s_done = True
        self._wake.unpark_all()

    async def _pump_s2c(self) -> None:
        sock = self._sock
        assert sock is not None
        env = self._env
        stack, flush, flow, lot = env.stack, env.flush, self.flow, self._wake
        recv_size = env.config.recv_size
        fd = sock.fileno()
        pending = b""  # read but not yet taken by the stack
        records: list[Named] | None = None  # completed by what was just read
        waited = False  # since the last read: that wait was this read's checkpoint
        # The socket had no more at the last read (a short read, or EAGAIN). A new
        # upstream connection has usually nothing yet (the client speaks first):
        # wait first.
        drained = True
        while self._closed is None:
            if drained and not pending:
                # The one place this pump waits for the upstream. After a short read
                # the socket was empty, so the wait comes first: the read that would
                # fail with EAGAIN (a syscall and an exception, ~2.5 us per response)
                # is skipped; bytes that came meanwhile make the wait return at once.
                # Ahead of send_space, which is then asked once per response, not twice.
                drained = False
                try:
                    await trio.lowlevel.wait_readable(fd)
                except trio.ClosedResourceError as exc:
                    self._upstream_failed(exc)
                    return
                waited = True
                continue
            if not self._connected:
                # The server spoke before the client ACKed our SYN-ACK: its bytes
                # (or its EOF) stay unread until the client is there. This wait
                # comes after the wait for the server, not before it: where the
                # client speaks first (most protocols) the handshake is over by the
                # time the response comes, and on_connected has no task to wake,
                # a scheduler pass less per connection.
                await lot.park()
                continue
            space = stack.send_space(flow)
            if space <= 0:
                await lot.park()  # a 0 from send_space() arms the SendSpace event
                continue
            if not pending:
                # sock.recv, unrolled: an idle flow waits here, and trio's socket
                # wrappers add frames (memory) to every waiting flow. The reads
                # and the checkpoints are theirs: a read that had to wait has had
                # its checkpoint (one scheduler pass less per response). The wait
                # is the loop's, outside the except clause, which would keep the
                # exception and its traceback alive while the flow waits.
                want = min(space, recv_size)
                # Whole super-segments: a read of 512 KiB is 8.2 of 63,712 bytes (the
                # MSS with timestamps, 44 per GSO write), and its short ninth would cost
                # a TUN write of its own on every step of a bulk flow. What is left in
                # the socket starts the next read.
                burst = stack.send_burst(flow)
                if want > burst > 0:
                    want -= want % burst
                try:
                    pending = os.read(fd, want)
                except BlockingIOError:
                    drained = True  # the wait at the top of the loop, then this read again
                    continue
                except OSError as exc:
                    self._upstream_failed(exc)
                    return
                if not waited:  # a busy upstream: let the other tasks run
                    await trio.lowlevel.checkpoint()
                waited = False
                drained = 0 < len(pending) < want
                if not pending:  # upstream EOF: FIN to the client once the send buffer drains
                    if self._reply is not None:
                        await self._send_reply()
                        return
                    self._mark("f")
                    self.hooks.finished(_S2C)
                    if self._closed is None:
                        stack.close(flow)
                        flush()
                    dx = self._dx
                    if dx is not None:
                        end = dx.end(_S2C, time.time())
                        if not dx.active:
                            self._dx, self._service = None, dx.service
                        if end and (stop := await self.hooks.records(end)) is not None:
                            self._stop(stop)
                    return
                self.bytes_s2c += len(pending)
                env.stats.bytes_s2c += len(pending)
                if "d" not in self._history:
                    self._history = sys.intern(self._history + "d")
                if self._reply is not None:
                    pending = b""  # blocked: the server's bytes are dropped
                    continue
                dx = self._dx
                if dx is not None:
                    records = dx.feed(_S2C, pending, time.time()) or None
                    if not dx.active:
                        self._dx, self._service = None, dx.service
                if self.hooks.has_data_hooks:
                    # The dissector saw what the server sent; the client gets the rewrite.
                    out = await self.hooks.data(_S2C, pending)
                    if not isinstance(out, bytes):
                        self._stop(out)
                        return
                    pending = out
            if self._closed is not None:
                return
            if pending:
                # The space only grew while we waited (nobody else sends on this flow);
                # a rewrite longer than it keeps its remainder for the next pass.
                n = stack.send(flow, pending)
                self.fwd_s2c += n
                pending = pending[n:]
                flush()
            if records is not None:
                done, records = records, None
                if (stop := await self.hooks.records(done)) is not None:
                    self._stop(stop)
                    return

    async def _send_reply(self) -> None:
        """A Block's reply to the client, as send space allows, then the FIN."""
        reply, self._reply = self._reply or b"", b""
        sent = reply
        stack, flow = self._env.stack, self.flow
        while reply and self._closed is None:
            space = stack.send_space(flow)
            if space <= 0:
                await self._wake.park()
                continue
            n = stack.send(flow, reply[:space])
            self.fwd_s2c += n
            reply = reply[n:]
            self._env.flush()
        if self._closed is None:
            stack.close(flow)
            self._env.flush()
        dx = self._dx
        if dx is not None:
            # The protocol logs see the relay's answer as the server's (a 403, an NXDOMAIN).
            records = dx.feed(_S2C, sent, time.time())
            if records:
                await self.hooks.records(records)  # verdicts on answers mean nothing

    async def _finish(self) -> None:
        if self._closed is CloseReason.FINISHED and self._sock is not None and self._hint is None:
            # The client closed cleanly, but its last bytes never made it upstream.
            log.info("flow %s: close_drain_timeout expired", self.hooks.info.describe())
            self._hint = EndReason.ERROR
        self._close_socket(abortive=True)
        end_time = self._done_at if self._done_at is not None else trio.current_time()
        how = end_reason(self._hint, self._closed)
        await self._close_dissection()
        packets = self._packets
        end = FlowEnd(
            how, self.bytes_c2s, self.bytes_s2c, end_time - self._t0, self._rule,
            packets.received if packets is not None else 0,
            packets.sent if packets is not None else 0,
            self._history, (self._service,) if self._service is not None else (),
            self.fwd_c2s, self.fwd_s2c,
        )  # fmt: skip
        log.debug("flow %s ended: %s", self.hooks.info.describe(), end)
        await self.hooks.end(end)

    async def _close_dissection(self) -> None:
        """Show the records still held, and those the dissector had pending."""
        records, self._records = self._records or [], None
        dx, self._dx = self._dx, None
        if dx is not None:
            records += dx.close(time.time())
            self._service = dx.service
        if records:
            await self.hooks.records(records)  # the flow is over: errors only detach

    def _close_socket(self, *, abortive: bool) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if abortive:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        sock.close()
