"""The control link between the supervisor and one worker: snapshots up, commands down.

Theory of operation: each worker gets one end of a ``socketpair`` (a Unix
stream). Frames are a 4-byte big-endian length and a payload, both ways:

* worker → supervisor: JSON objects. Every ``SNAPSHOT_INTERVAL`` the worker
  sends a *snapshot*: a small dict of the counters it already keeps (the
  engine's ``RelayStats``, the stack's ``StackStats``, memory budget and
  ``StackGauges`` (timer heap, bytes buffered: a walk over the connections), the
  TUN queue's ``PacketStats``, the flow counts of ``FlowCounts``, the
  packet-loop pass histogram, GC counters). The snapshot task runs in the
  worker's trio run, on the thread of the packet loop, which yields to the
  scheduler on every pass: a snapshot that arrives says the loop is turning.
  Sending awaits only that task: a supervisor that stops reading stalls the
  snapshots, never a packet. The worker also answers commands here
  (``{"type": "done", ...}``). The supervisor trusts none of it: JSON (never
  pickle), each frame at most ``MAX_FRAME`` bytes, a bad frame ends the link.
* supervisor → worker: pickled commands (the worker trusts its supervisor):
  ``("reload", Reload)`` and ``("reopen",)``.

The supervisor keeps the last snapshot of each worker and when it came
(``WorkerView``); the metrics endpoint, /healthz and the systemd watchdog
read those, so a scrape never reaches into a worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from relay.datapath.egress import EgressPolicy
from relay.service.logsetup import set_level

if TYPE_CHECKING:
    from relay.analysis.flowcounts import FlowCounts
    from relay.datapath.engine import Relay
    from relay.datapath.packet_source import PacketStats
    from relay.datapath.tun import TunDevice
    from relay.service.gcstats import GcStats
    from stack import Stack

__all__ = [
    "HEARTBEAT_TIMEOUT",
    "MAX_FRAME",
    "SNAPSHOT_INTERVAL",
    "LinkError",
    "Reload",
    "WorkerLink",
    "WorkerView",
    "socket_pair",
]

log = logging.getLogger("tunrelay")

SNAPSHOT_INTERVAL = 1.0  # seconds between a worker's snapshots
HEARTBEAT_TIMEOUT = 3.0  # no snapshot for this long: the worker's loop is not turning
MAX_FRAME = 1 << 20  # a snapshot is a few KiB
_HEADER = struct.Struct(">I")


class LinkError(Exception):
    """The peer sent something that is not a frame of this protocol."""


@dataclass(frozen=True, slots=True)
class Reload:
    """What a reload may change in a running worker (``relay.service.reload``)."""

    analyzers: tuple[str | tuple[str, dict[str, object]], ...]  # run.AnalyzerSpec
    block_rules: tuple[tuple[str, str], ...]
    egress: EgressPolicy  # already with the host's addresses (run.localize)
    stats_interval: float
    log_level: str  # the root logger's (relay.service.logsetup.LOG_LEVELS)


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor's end, worker's end), both close-on-exec (the worker's is passed
    to it by multiprocessing, not inherited)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


async def _read_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


async def read_frame(sock: trio.socket.SocketType, limit: int) -> bytes:
    """One frame's payload.

    Raises:
        EOFError: the peer closed the link.
        LinkError: the frame is longer than ``limit``.
    """
    (n,) = _HEADER.unpack(await _read_exactly(sock, _HEADER.size))
    if n > limit:
        raise LinkError(f"a frame of {n} bytes (at most {limit})")
    return await _read_exactly(sock, n)


async def write_frame(sock: trio.socket.SocketType, payload: bytes) -> None:
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        sent = await sock.send(data)
        data = data[sent:]


# --- in the worker -----------------------------------------------------------------------


def snapshot(
    index: int,
    relay: Relay,
    stack: Stack,
    tun: PacketStats,
    gc: GcStats,
    counts: FlowCounts,
    fail_closed: bool,
) -> dict[str, Any]:
    """The worker's counters as one JSON-able dict (what ``relay.service.metrics`` reads)."""
    held = stack.gauges()
    return {
        "type": "snapshot",
        "worker": index,
        "pid": os.getpid(),
        "relay": dataclasses.asdict(relay.stats),
        "stack": dataclasses.asdict(stack.stats),
        "tun": dataclasses.asdict(tun),
        "gc": dataclasses.asdict(gc),
        "opened": dict(counts.opened),
        "ended": [[proto, how, n] for (proto, how), n in counts.ended.items()],
        # used: bytes reserved (buffer sizes); buffered: bytes the buffers hold now
        "memory": {"used": held.reserved, "limit": held.limit, "buffered": held.buffered},
        "timers": {"heap": held.timer_heap, "live": held.timers},
        "loop": {"counts": list(relay.loop_latency.counts), "sum": relay.loop_latency.total},
        "fail_closed": fail_closed,
    }


class WorkerLink:
    """The worker's end: sends snapshots, runs the supervisor's commands.

    Args:
        sock: the worker's end of ``socket_pair``.
        index: the worker's number.
        counts: the ``FlowCounts`` analyzer in its chain.
        rebuild: the analyzers for a reload's (specs, block rules); raises
            ``ValueError`` (``ConfigError``) when one cannot be loaded.
        reopen: called on ``("reopen",)``: each reopens a log file.
        stats_interval: the ``--stats-interval`` at start.
    """

    def __init__(
        self,
        sock: socket.socket,
        index: int,
        counts: FlowCounts,
        rebuild: Callable[[Reload], list[object]],
        reopen: Sequence[Callable[[], None]],
        stats_interval: float,
        fail_closed: bool,
    ) -> None:
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._index = index
        self._counts = counts
        self._rebuild = rebuild
        self._reopen = list(reopen)
        self._fail_closed = fail_closed
        self.stats_interval = stats_interval
        self._send_lock = trio.Lock()

    def add_reopen(self, fn: Callable[[], None]) -> None:
        """One more file to reopen on SIGUSR2/SIGHUP (e.g. a capture file)."""
        self._reopen.append(fn)

    def start(
        self, nursery: trio.Nursery, relay: Relay, stack: Stack, tun: TunDevice, gc: GcStats
    ) -> None:
        """Run the link beside the packet loop (``relay_queue``'s ``on_running``)."""
        nursery.start_soon(self._send_snapshots, relay, stack, tun, gc)
        nursery.start_soon(self._commands, relay)

    async def _send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await write_frame(self._sock, json.dumps(message, separators=(",", ":")).encode())

    async def _send_snapshots(
        self, relay: Relay, stack: Stack, tun: TunDevice, gc: GcStats
    ) -> None:
        while True:
            message = snapshot(
                self._index, relay, stack, tun.stats, gc, self._counts, self._fail_closed
            )
            try:
                await self._send(message)
            except OSError:
                return  # the supervisor is gone; PR_SET_PDEATHSIG stops us
            await trio.sleep(SNAPSHOT_INTERVAL)

    async def _commands(self, relay: Relay) -> None:
        while True:
            try:
                command = pickle.loads(await read_frame(self._sock, 1 << 30))
            except (EOFError, OSError):
                return
            done: dict[str, Any] = {"type": "done", "worker": self._index, "what": command[0]}
            if command[0] == "reload":
                done["error"] = self._reload(relay, command[1])
            elif command[0] == "reopen":
                done["error"] = self.reopen()
            try:
                await self._send(done)
            except OSError:
                return

    def _reload(self, relay: Relay, reload: Reload) -> str | None:
        try:
            analyzers = self._rebuild(reload)
            relay.reconfigure(egress=reload.egress, analyzers=analyzers)
        except (ValueError, TypeError) as exc:
            log.error("reload: %s; keeping the running settings", exc)
            return str(exc)
        self.stats_interval = reload.stats_interval
        set_level(reload.log_level)
        return None

    def reopen(self) -> str | None:
        """Reopen every log file; the first error, if any (the others are still tried)."""
        error = None
        for fn in self._reopen:
            try:
                fn()
            except OSError as exc:
                log.error("cannot reopen a log: %s; still writing to the old file", exc)
                error = error or str(exc)
        return error


# --- in the supervisor -------------------------------------------------------------------


class WorkerView:
    """The supervisor's end: the worker's last snapshot and when it came."""

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self._sock = trio.socket.from_stdlib_socket(sock)
        self.snapshot: dict[str, Any] | None = None
        self.received_at: float | None = None  # trio.current_time() of the last snapshot
        self.snapshots = 0
        self.closed = False
        self.done: trio.MemorySendChannel[dict[str, Any]]
        self.answers: trio.MemoryReceiveChannel[dict[str, Any]]
        self.done, self.answers = trio.open_memory_channel(16)

    async def run(self) -> None:
        """Read the worker's frames until it closes the link or breaks the protocol."""
        try:
            while True:
                message = json.loads(await read_frame(self._sock, MAX_FRAME))
                if not isinstance(message, dict):
                    raise LinkError("a frame that is not a JSON object")
                if message.get("type") == "snapshot":
                    self.snapshot = message
                    self.received_at = trio.current_time()
                    self.snapshots += 1
                elif message.get("type") == "done":
                    with contextlib.suppress(trio.WouldBlock):  # nobody waits for it now
                        self.done.send_nowait(message)
        except EOFError:
            pass
        except (LinkError, ValueError, UnicodeDecodeError, OSError) as exc:
            log.error("worker %d: control link closed: %s", self.index, exc)
        finally:
            self.closed = True
            self._sock.close()

    async def command(self, *command: object) -> None:
        """Send a command (``"reload", Reload`` or ``"reopen"``)."""
        await write_frame(self._sock, pickle.dumps(command))

    def close(self) -> None:
        self.closed = True
        self._sock.close()

    def age(self, now: float) -> float | None:
        """Seconds since the last snapshot (None before the first)."""
        return None if self.received_at is None else now - self.received_at
