"""Limits of `tunrelay run`: bounded memory under backpressure, analyzer isolation.

Bounded memory: one side stops reading while the other pushes as fast as it
can (non-blocking). The pusher must stall (the relay closed its window instead
of buffering), and the relay's RSS (/proc/PID/status VmRSS) must stay within
``RSS_GROWTH_LIMIT`` (16 MiB) of what it was before the push, sampled every
0.1 s over ``HOLD_SECONDS`` (3 s) of stall. The pusher's send is "stalled"
after ``STALL_SECONDS`` (1 s) without progress; by then it must have pushed
less than ``PUSH_LIMIT`` (16 MiB: the client's and server's socket buffers are
set to 256 KiB, the kernel doubles them, and the relay's upstream socket
autotunes to at most tcp_wmem/tcp_rmem max, 4-6 MiB). Then the reader resumes
and all 64 MiB must arrive byte-exact within 60 s.

Analyzer isolation: ``Failing`` raises on every flow (logged, detached, the flow
goes on) and ``Slow`` sleeps 2 s per data call on flows to one port. Flows to
other ports, started while the slow flow is held up, complete within
``FAST_LIMIT`` (1.5 s, all of them), byte-exact; the slow flow completes too;
the flow log lists each flow with its destination and how it ended.
"""

from __future__ import annotations

import hashlib
import math
import select
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import trio

from relay.lab.topology import Topology

from relay_harness import (
    MIB,
    RelayProcess,
    addrs,
    expected_digest,
    listener,
    pattern_chunks,
    recv_stream,
    run_parallel,
)

TOTAL = 64 * MIB
SOCK_BUF = 256 * 1024
PUSH_LIMIT = 16 * MIB
PUSH_MAX_SECONDS = 20.0  # the push phase gives up (and fails) after this
STALL_SECONDS = 1.0
HOLD_SECONDS = 3.0
RSS_GROWTH_LIMIT = 16 * 1024  # KiB
HOLD_PROGRESS_LIMIT = 256 * 1024  # bytes the pusher may still get in while stalled
RESUME_LIMIT = 60.0


class Pusher:
    """Sends one pattern stream from a non-blocking socket, as far as it goes."""

    def __init__(self, sock: socket.socket, stream: int, total: int) -> None:
        self.sock = sock
        self.total = total
        self.sent = 0
        self._pieces = pattern_chunks(stream, total, 64 * 1024)
        self._pending = memoryview(b"")

    def push(self, until: float) -> None:
        """Send whatever the socket takes until the monotonic time ``until``."""
        self.sock.setblocking(False)
        while self.sent < self.total and time.monotonic() < until:
            if not self._pending:
                self._pending = memoryview(next(self._pieces))
            try:
                n = self.sock.send(self._pending)
            except BlockingIOError:
                select.select([], [self.sock], [], max(0.0, min(0.05, until - time.monotonic())))
                continue
            self._pending = self._pending[n:]
            self.sent += n

    def finish(self) -> None:
        """Send the rest, blocking (per-call timeout), then shut the write side."""
        self.sock.settimeout(20.0)
        while self.sent < self.total:
            if not self._pending:
                self._pending = memoryview(next(self._pieces))
            self.sock.sendall(self._pending)
            self.sent += len(self._pending)
            self._pending = memoryview(b"")
        self.sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("direction", ["c2s", "s2c"])
def test_backpressure_bounds_relay_memory(
    topology: Topology, relay: RelayProcess, direction: str
) -> None:
    """c2s: the server stops reading while the client pushes; s2c: the mirror."""
    family = socket.AF_INET
    srv, port = listener(topology, family)
    client = topology.socket("cli", family)
    # Small socket buffers at the test's ends, so the stall comes soon; the relay's
    # own upstream socket keeps its defaults.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
    client.settimeout(20.0)
    client.connect((addrs(topology, family)[1], port))
    conn, _ = srv.accept()
    conn.settimeout(20.0)
    pusher_sock, reader_sock = (client, conn) if direction == "c2s" else (conn, client)

    # Warm up the relay's code paths with 1 MiB, then take the baseline.
    warm = b"w" * MIB
    run_parallel(
        lambda: pusher_sock.sendall(warm), lambda: recv_stream(reader_sock, MIB), timeout=20.0
    )
    time.sleep(0.3)
    baseline = relay.rss_kib()

    pusher = Pusher(pusher_sock, 11, TOTAL)
    samples: list[int] = []
    t_push = time.monotonic()
    last_sent, last_progress = 0, t_push
    while time.monotonic() - last_progress < STALL_SECONDS:
        assert time.monotonic() - t_push < PUSH_MAX_SECONDS, (
            f"still pushing after {PUSH_MAX_SECONDS} s, {pusher.sent} bytes: no stall"
        )
        pusher.push(time.monotonic() + 0.1)
        samples.append(relay.rss_kib())
        if pusher.sent != last_sent:
            last_sent, last_progress = pusher.sent, time.monotonic()
        assert pusher.sent < TOTAL, "the relay took all 64 MiB while the reader was stopped"
    stalled_at = pusher.sent
    t_stall = time.monotonic()
    hold = []
    while time.monotonic() - t_stall < HOLD_SECONDS:
        pusher.push(time.monotonic() + 0.1)  # keeps trying: the window stays shut
        hold.append(relay.rss_kib())
    held_progress = pusher.sent - stalled_at
    peak = max(samples + hold)
    report = (
        f"{direction}: relay RSS baseline {baseline} KiB, peak {peak} KiB "
        f"(+{peak - baseline} KiB), during the 3 s stall {min(hold)}..{max(hold)} KiB; "
        f"pushed {stalled_at / MIB:.2f} MiB before the stall ({t_stall - t_push:.2f} s), "
        f"{held_progress} bytes during it"
    )
    print(f"\n[memory] {report}")
    assert stalled_at < PUSH_LIMIT, report
    assert held_progress <= HOLD_PROGRESS_LIMIT, report
    assert peak - baseline < RSS_GROWTH_LIMIT, report
    relay.check_running()

    # The reader resumes; everything arrives, byte-exact.
    t0 = time.monotonic()
    got, _ = run_parallel(lambda: recv_stream(reader_sock), pusher.finish, timeout=RESUME_LIMIT)
    print(f"[memory] {direction}: resumed, {got.count} bytes in {time.monotonic() - t0:.2f} s")
    assert got.eof and (got.count, got.sha256) == (TOTAL, expected_digest(11, TOTAL)), got


SLOW_SECONDS = 2.0
SLOW_SIZE = 4096  # each way; Slow sleeps in each data call, so keep it to a few calls
FAST_FLOWS = 8
FAST_SIZE = 256 * 1024  # each way
FAST_LIMIT = 1.5
SLOW_LIMIT = 30.0
INJECTED = "relay.lab.analyzers.InjectedFailure"
HEADER = struct.Struct("!II")  # flow number, size: the server answers with as many bytes


@dataclass
class Flow:
    """One client connection of the isolation test."""

    number: int
    dst_port: int
    size: int
    client_port: int = 0
    client_got: tuple[int, str] | None = None
    server_got: tuple[int, str] | None = None
    seconds: float = math.nan

    @property
    def c2s_stream(self) -> int:
        return 100 + self.number

    @property
    def s2c_stream(self) -> int:
        return 200 + self.number


async def _send(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


async def _recv_to_eof(sock: trio.socket.SocketType) -> tuple[int, str]:
    """(bytes, SHA-256) of everything up to EOF."""
    h, count = hashlib.sha256(), 0
    while data := await sock.recv(65536):
        h.update(data)
        count += len(data)
    return count, h.hexdigest()


async def test_failing_and_slow_analyzers_affect_only_their_flows(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    family = socket.AF_INET
    server_ip = addrs(topology, family)[1]
    slow_l, slow_port = listener(topology, family)
    fast_l, fast_port = listener(topology, family)
    closed = topology.socket("srv", family)
    closed.bind((server_ip, 0))  # bound, not listening: the kernel refuses
    closed_port = closed.getsockname()[1]
    # In a thread: the harness polls for readiness with time.sleep.
    relay: RelayProcess = await trio.to_thread.run_sync(
        lambda: start_relay(
            analyzers=["relay.lab.analyzers:Failing", "relay.lab.analyzers:Slow"],
            env={"TUNRELAY_SLOW_PORT": str(slow_port), "TUNRELAY_SLOW_SECONDS": str(SLOW_SECONDS)},
            expected_tracebacks=[INJECTED],
            # Every failure logged: the count below checks one per flow (detached after).
            args=["--error-log-interval", "0"],
        )
    )
    flows = [Flow(0, slow_port, SLOW_SIZE)]
    flows += [Flow(i, fast_port, FAST_SIZE) for i in range(1, FAST_FLOWS + 1)]

    async def serve_one(conn: trio.socket.SocketType) -> None:
        # The header names the flow; read its stream to EOF, then answer.
        with conn:
            header = b""
            while len(header) < HEADER.size:
                data = await conn.recv(HEADER.size - len(header))
                assert data, "EOF inside the header"
                header += data
            number, size = HEADER.unpack(header)
            flow = flows[number]
            flow.server_got = await _recv_to_eof(conn)
            for piece in pattern_chunks(flow.s2c_stream, size, 65536):
                await _send(conn, piece)

    async def server(lsock: trio.socket.SocketType, count: int) -> None:
        async with trio.open_nursery() as n:
            for _ in range(count):
                conn, _ = await lsock.accept()
                n.start_soon(serve_one, conn)

    async def client(flow: Flow) -> None:
        sock = trio.socket.from_stdlib_socket(topology.socket("cli", family))
        with sock:
            t0 = trio.current_time()
            await sock.connect((server_ip, flow.dst_port))
            flow.client_port = sock.getsockname()[1]
            header = HEADER.pack(flow.number, flow.size)
            for i, piece in enumerate(pattern_chunks(flow.c2s_stream, flow.size, 65536)):
                await _send(sock, header + piece if i == 0 else piece)
            sock.shutdown(socket.SHUT_WR)
            flow.client_got = await _recv_to_eof(sock)
            flow.seconds = trio.current_time() - t0

    slow_done = trio.Event()

    async def slow_client() -> None:
        await client(flows[0])
        slow_done.set()

    with trio.fail_after(SLOW_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server, trio.socket.from_stdlib_socket(slow_l), 1)
            nursery.start_soon(server, trio.socket.from_stdlib_socket(fast_l), FAST_FLOWS)
            nursery.start_soon(slow_client)
            await trio.sleep(0.3)  # the slow flow's first data call is asleep by now
            t0 = trio.current_time()
            async with trio.open_nursery() as fast:
                for flow in flows[1:]:
                    fast.start_soon(client, flow)
            fast_seconds = trio.current_time() - t0
            slow_was_done = slow_done.is_set()
    # And a refused connection, to see it in the flow log.
    refused = topology.socket("cli", family)
    refused.settimeout(5.0)
    with pytest.raises(ConnectionRefusedError):
        refused.connect((server_ip, closed_port))
    refused_port = refused.getsockname()[1]

    print(
        f"\n[isolation] {FAST_FLOWS} flows of {FAST_SIZE >> 10} KiB each way done in "
        f"{fast_seconds:.3f} s (bound {FAST_LIMIT} s) while the slow flow slept; the slow "
        f"flow ({SLOW_SIZE} B each way, {SLOW_SECONDS} s per data call) took "
        f"{flows[0].seconds:.2f} s"
    )
    assert not slow_was_done, "the slow flow finished first: Slow did not slow it?"
    assert fast_seconds < FAST_LIMIT, f"fast flows took {fast_seconds:.2f} s: {relay.describe()}"
    assert flows[0].seconds >= SLOW_SECONDS, flows[0]
    for flow in flows:
        assert flow.server_got == (flow.size, expected_digest(flow.c2s_stream, flow.size)), flow
        assert flow.client_got == (flow.size, expected_digest(flow.s2c_stream, flow.size)), flow

    # The flow log: every flow, with its destination and how it ended.
    expected = {f.client_port: (server_ip, f.dst_port, "fin") for f in flows}
    expected[refused_port] = (server_ip, closed_port, "refused")
    records = await trio.to_thread.run_sync(
        lambda: relay.wait_records("flow", lambda r: r["id.orig_p"] in expected, len(expected))
    )
    assert {r["id.orig_p"]: (r["id.resp_h"], r["id.resp_p"], r["ended"]) for r in records} == (
        expected
    )
    # StreamDigest, first in the chain, saw every byte of every flow.
    digests = {r["id.orig_p"]: r for r in relay.digest_records()}
    for flow in flows:
        h = hashlib.sha256(HEADER.pack(flow.number, flow.size))
        for piece in pattern_chunks(flow.c2s_stream, flow.size):
            h.update(piece)
        want_c2s = {"bytes": HEADER.size + flow.size, "sha256": h.hexdigest()}
        want_s2c = {"bytes": flow.size, "sha256": expected_digest(flow.s2c_stream, flow.size)}
        got = digests[flow.client_port]
        assert (got["c2s"], got["s2c"]) == (want_c2s, want_s2c), (flow, got)
    # Failing raised once per flow with data (then it was detached from that flow).
    log = relay.log_text()
    assert log.count("raised in data") == len(flows), relay.describe()
    assert log.count(INJECTED + ":") == len(flows), relay.describe()
