"""Stream capture (``tunrelay run --capture-dir DIR``): each flow's bytes, to files.

``Capture`` is a built-in analyzer, the first of the chain, so its ``data``
hook sees every chunk of each direction as the relay received it: before any
analyzer's rewrite, drop or verdict (it returns ``None``: it never changes a
byte). For each TCP flow it writes, named by the flow's ``uid`` (the uid of
the flow log and conn.log):

* ``DIR/<uid>.c2s``, ``DIR/<uid>.s2c``: the exact bytes of each direction,
  as the analyzers saw them. Bytes an analyzer never saw are not there: those
  a record hook's ``Block`` or ``RESET`` held back (the chunk that completed
  the blocked record), and, once a flow is blocked, what followed.
* ``DIR/<uid>.pcap``: the same bytes as one clean synthetic TCP connection
  between the original addresses and ports (``relay.analysis.pcapwriter``):
  handshake, segments with both directions' interleaving and arrival times,
  then the FINs or RST in the order the flow's history recorded them (written
  when the flow ends, after its last bytes).

A UDP flow gets ``DIR/<uid>.pcap`` only: each datagram a UDP packet. ICMP echo
flows are not captured.

Selection (``--capture-filter``, ``parse_capture_filter``): terms ``port N``,
``net CIDR`` or a bare ``CIDR`` (or address); a flow is captured when any term
matches either of its ends (the client's or the original destination's
address or port). No filter: every TCP and UDP flow.

Writing never waits in the packet loop: each captured flow buffers its files
in memory and, once ``flush_at`` bytes wait, hands them to one writer thread
per worker (a queue; batches are written in order). A flow waits only when
more than ``backlog_limit`` bytes are handed over and not yet written (the
disk is behind): that flow's TCP window closes, as with any slow analyzer,
and the packet loop goes on. ``flow_end`` waits for the flow's last batch, so
its files are complete by the time the flow log and conn.log (later in the
chain) have its row. Each write opens the file with ``O_APPEND`` relative to
the directory's file descriptor (opened by the worker before it dropped its
privileges), writes, and closes it: no descriptor stays open per flow. The
first ``OSError`` (``ENOSPC``, ``EDQUOT``, ...) stops capture for every flow
of this worker, logged once; the relay goes on.

Why a thread of its own rather than ``trio.to_thread`` per write: a flow that
awaited each write waited for the thread hop and the GIL hand-overs too
(``benchmarks/bench_capture.py``: 110-290 us for an empty hop, and a p99
write of 8-16 ms on a busy machine), which capped a captured flow near 0.3
Gbit/s in ``bench_netns.py`` configuration j (benchmarks/README.md).

Cost: with capture every flow has a ``data`` hook, so its client bytes take
the analyzers' queue rather than the direct write (``TcpFlow.on_data``); flows
the filter leaves out pay that and a dict lookup per chunk. Without
``--capture-dir`` nothing of this exists.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from relay.analysis.direction import Direction
from relay.analysis.hooks import EndReason, FlowEnd, FlowInfo
from relay.analysis.pcapwriter import TcpConversation, UdpConversation, file_header

__all__ = [
    "FLUSH_AT",
    "Capture",
    "CaptureFilter",
    "CaptureFilterError",
    "CaptureStats",
    "DirectorySink",
    "Sink",
    "parse_capture_filter",
]

log = logging.getLogger(__name__)

FLUSH_AT: Final = 256 << 10  # bytes a flow buffers (all its files) before writing them
BACKLOG_LIMIT: Final = 64 << 20  # bytes handed to the writer thread and not yet written
_BACKLOG_POLL: Final = 0.005  # seconds between looks at the backlog, while over its limit
_S2C: Final = Direction.SERVER_TO_CLIENT
_FILE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC

# How a flow that never connected upstream ended, when the client got an RST for its
# SYN (relay.datapath.tcpflow: an analyzer's REJECT, a refused or failed connect). A
# connect timeout is silence; an unreachable server an ICMP error, not written.
_RESET_WITHOUT_CONNECTION: Final = frozenset(
    {EndReason.REJECTED, EndReason.REFUSED, EndReason.ERROR}
)

_Batch = list[tuple[str, list[bytes]]]  # (file name, buffers to append)
_IOV_MAX: Final = 1024  # buffers per writev (Linux's UIO_MAXIOV)
_Net = ipaddress.IPv4Network | ipaddress.IPv6Network


class CaptureFilterError(ValueError):
    """A ``--capture-filter`` term that does not parse; the message says which."""


@dataclass(frozen=True, slots=True)
class CaptureFilter:
    """Ports and networks; a flow matches when either end matches any of them.
    Empty: every flow matches."""

    ports: frozenset[int] = frozenset()
    nets: tuple[_Net, ...] = ()

    def matches(self, info: FlowInfo) -> bool:
        if not self.ports and not self.nets:
            return True
        if info.client_port in self.ports or info.server_port in self.ports:
            return True
        if self.nets:
            ends = (ipaddress.ip_address(info.client_ip), ipaddress.ip_address(info.server_ip))
            return any(ip in net for net in self.nets for ip in ends)
        return False

    def describe(self) -> str:
        terms = [f"port {p}" for p in sorted(self.ports)] + [f"net {n}" for n in self.nets]
        return " or ".join(terms) or "every TCP and UDP flow"


def _net(text: str) -> _Net:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise CaptureFilterError(f"{text!r} is not an address or CIDR network") from None


def parse_capture_filter(texts: Sequence[str]) -> CaptureFilter:
    """Parse ``--capture-filter`` values (repeatable; each may be a comma list).

    Terms: ``port N`` (1..65535), ``net CIDR``, or a bare ``CIDR`` or address
    (``198.18.0.0/15``, ``fd00::/8``, ``198.18.1.2``). Terms are or-ed.

    Raises:
        CaptureFilterError: naming the term that is wrong.
    """
    ports: set[int] = set()
    nets: list[_Net] = []
    for text in texts:
        for term in text.split(","):
            words = term.split()
            if not words:
                raise CaptureFilterError(f"empty term in {text!r}")
            keyword = words[0].lower()
            if keyword == "port" and len(words) == 2:
                if not words[1].isdigit() or not 1 <= int(words[1]) <= 65535:
                    raise CaptureFilterError(f"{term.strip()!r}: the port must be 1..65535")
                ports.add(int(words[1]))
            elif keyword == "net" and len(words) == 2:
                nets.append(_net(words[1]))
            elif len(words) == 1 and keyword not in ("port", "net"):
                nets.append(_net(words[0]))
            else:
                raise CaptureFilterError(
                    f"{term.strip()!r} is not 'port N', 'net CIDR' or a bare CIDR"
                )
    return CaptureFilter(frozenset(ports), tuple(dict.fromkeys(nets)))


class Sink(Protocol):
    """Where the files go: ``append`` (the buffers, in order, to the end of file
    ``name``) runs in the writer thread and may raise OSError."""

    def append(self, name: str, data: Sequence[bytes]) -> None: ...


class DirectorySink:
    """Files in a directory, by its descriptor: created ``0600``, never through a
    symlink, appended to, closed after each write."""

    __slots__ = ("dir_fd",)

    def __init__(self, dir_fd: int) -> None:
        self.dir_fd = dir_fd

    @classmethod
    def open(cls, path: str) -> DirectorySink:
        """Open ``path`` (a directory, not a symlink to one). Raises OSError."""
        return cls(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC))

    def append(self, name: str, data: Sequence[bytes]) -> None:
        fd = os.open(name, _FILE_FLAGS, 0o600, dir_fd=self.dir_fd)
        try:
            for i in range(0, len(data), _IOV_MAX):
                group = data[i : i + _IOV_MAX]
                done = os.writev(fd, group)
                if done < sum(map(len, group)):  # short (rare for a file): the rest in turn
                    rest = memoryview(b"".join(group))[done:]
                    while rest:
                        rest = rest[os.write(fd, rest) :]
        finally:
            os.close(fd)

    def close(self) -> None:
        os.close(self.dir_fd)


@dataclass(slots=True)
class CaptureStats:
    flows: int = 0  # flows captured (the filter matched)
    bytes_written: int = 0  # to all files
    stopped: str = ""  # why capture stopped ("" while it runs)


class _Flow:
    """One captured flow's buffers and conversation."""

    __slots__ = ("c2s", "c2s_size", "conv", "info", "last", "s2c", "s2c_size", "started", "tcp")

    def __init__(self, info: FlowInfo) -> None:
        self.info = info
        self.tcp = info.proto == "tcp"
        # Random ISNs, as a real connection's: a reader must not rely on them.
        isn = secrets.randbits(64)
        self.conv: TcpConversation | UdpConversation = (
            TcpConversation(
                info.client_ip, info.client_port, info.server_ip, info.server_port,
                client_isn=isn & 0xFFFFFFFF, server_isn=isn >> 32,
            )
            if self.tcp
            else UdpConversation(info.client_ip, info.client_port, info.server_ip, info.server_port)
        )  # fmt: skip
        self.conv.out.append(file_header())
        self.conv.size += len(self.conv.out[0])
        # Each direction's chunks as they came: references, not copies.
        self.c2s: list[bytes] = []
        self.s2c: list[bytes] = []
        self.c2s_size = self.s2c_size = 0
        self.started = False  # nothing written yet: the first write creates every file
        self.last = info.start  # the latest timestamp written

    def pending(self) -> int:
        return self.c2s_size + self.s2c_size + self.conv.size

    def add(self, direction: Direction, data: bytes, ts: float) -> None:
        from_server = direction is _S2C
        self.last = ts = max(ts, self.last)
        conv = self.conv
        if isinstance(conv, UdpConversation):
            conv.datagram(from_server, data, ts)
            return
        if not conv.opened:
            conv.handshake(self.info.start, ts)
        conv.data(from_server, data, ts)
        if from_server:
            self.s2c.append(data)
            self.s2c_size += len(data)
        else:
            self.c2s.append(data)
            self.c2s_size += len(data)

    def end(self, end: FlowEnd, ts: float) -> None:
        """The close as the history recorded it (zeeklog's letters, in order)."""
        conv = self.conv
        if not isinstance(conv, TcpConversation):
            return
        ts = max(ts, self.last)
        history = end.history
        if not conv.opened:
            if "h" not in history:  # never connected: answered with an RST, or not at all
                reset = "r" in history or end.how in _RESET_WITHOUT_CONNECTION
                conv.unanswered(self.info.start, ts if reset else None)
                return
            conv.handshake(self.info.start, ts)
        for letter in history:
            if letter in "Ff":
                conv.fin(letter == "f", ts)
            elif letter in "Rr":
                conv.reset(letter == "r", ts)
        if end.how is not EndReason.FIN and not conv.ended:
            # The relay ended it (a limit, a verdict, an error, its shutdown): the
            # client saw an RST from the server's address.
            conv.reset(True, ts)

    def take(self) -> _Batch:
        """The buffered bytes per file name; the buffers start anew (handed over:
        the writer thread owns them from here)."""
        uid = self.info.uid
        files: _Batch = [(f"{uid}.pcap", self.conv.take())]
        if self.tcp:
            if self.c2s or not self.started:
                files.append((f"{uid}.c2s", self.c2s))
                self.c2s, self.c2s_size = [], 0
            if self.s2c or not self.started:
                files.append((f"{uid}.s2c", self.s2c))
                self.s2c, self.s2c_size = [], 0
        self.started = True
        return files


class Capture:
    """The ``--capture-dir`` analyzer (see the module docstring).

    Args:
        sink: where the files go (``DirectorySink``); written by one thread.
        selection: which flows (``parse_capture_filter``); default: all.
        flush_at: bytes a flow buffers before it hands them to the writer.
        backlog_limit: bytes handed over and not yet written, at most; above it
            a flow that has more waits until the writer catches up.
    """

    __slots__ = (
        "_error",
        "_flows",
        "_queue",
        "_queued",
        "_sink",
        "_thread",
        "_written",
        "backlog_limit",
        "flush_at",
        "selection",
        "stats",
    )

    def __init__(
        self,
        sink: Sink,
        selection: CaptureFilter | None = None,
        *,
        flush_at: int = FLUSH_AT,
        backlog_limit: int = BACKLOG_LIMIT,
    ) -> None:
        self._sink = sink
        self.selection = selection or CaptureFilter()
        self.flush_at = flush_at
        self.backlog_limit = backlog_limit
        self._flows: dict[str, _Flow] = {}
        self.stats = CaptureStats()
        # The writer thread, started with the first batch. Each counter has one
        # writer: _queued this (trio) thread, _written the writer thread.
        self._queue: queue.SimpleQueue[tuple[_Batch, Callable[[], None] | None] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._queued = 0
        self._written = 0
        self._error: OSError | None = None  # the writer's first failure

    @property
    def stopped(self) -> bool:
        return bool(self.stats.stopped) or self._error is not None

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (at most ``timeout`` s), then close the sink; once the
        relay stopped (every flow_end has run)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)
            if thread.is_alive():
                log.error("capture: the writer did not finish within %g s", timeout)
                return  # the sink stays open under it; the process is ending
        close = getattr(self._sink, "close", None)
        if close is not None:
            close()

    async def flow_start(self, flow: FlowInfo) -> None:
        if self.stopped or flow.proto not in ("tcp", "udp"):
            self._check()
            return
        if self.selection.matches(flow):
            self._flows[flow.uid] = _Flow(flow)
            self.stats.flows += 1

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
        f = self._flows.get(flow.uid)
        if f is None:
            return
        try:
            f.add(direction, data, time.time())
        except ValueError:  # a datagram too large for a packet (it was reassembled)
            log.debug("capture: flow %s: datagram of %d bytes skipped", flow.uid, len(data))
            return
        if f.pending() >= self.flush_at and self._check():
            self._submit(f.take(), None)
            # The disk is behind: this flow waits (its window closes), the others
            # and the packet loop go on.
            while self._queued - self._written > self.backlog_limit and self._error is None:
                await trio.sleep(_BACKLOG_POLL)

    async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
        f = self._flows.pop(flow.uid, None)
        if f is None or not self._check():
            return
        f.end(end, flow.start + end.duration)
        # Wait for this flow's last write: its files are complete when the flow log
        # and conn.log (later in the chain) have its row.
        written = trio.Event()
        token = trio.lowlevel.current_trio_token()

        def done() -> None:  # in the writer thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(written.set)

        self._submit(f.take(), done)
        await written.wait()

    def _check(self) -> bool:
        """Capture goes on; the writer's first failure stops it (logged once)."""
        if self.stats.stopped:
            return False
        exc = self._error
        if exc is None:
            return True
        why = errno.errorcode.get(exc.errno or 0, "error")
        self.stats.stopped = f"{why}: {exc.strerror or exc}"
        log.error(
            "capture stopped for every flow: cannot write %s: %s; the relay goes on",
            exc.filename or "a capture file", exc.strerror or exc,
        )  # fmt: skip
        self._flows.clear()
        return False

    def _submit(self, files: _Batch, done: Callable[[], None] | None) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._write, name="capture", daemon=True)
            self._thread.start()
        self._queued += sum(len(b) for _, buffers in files for b in buffers)
        self._queue.put((files, done))

    def _write(self) -> None:
        """The writer thread: batches in order (so each file's bytes stay in order),
        until ``close``. After a failure it only drops them."""
        while (item := self._queue.get()) is not None:
            files, done = item
            for name, buffers in files:
                n = sum(map(len, buffers))
                if self._error is None:
                    try:
                        self._sink.append(name, buffers)
                        self.stats.bytes_written += n
                    except OSError as exc:
                        self._error = exc
                self._written += n
            if done is not None:
                done()
