"""Connection set-up through `tunrelay run`: refused, unreachable, and many at once.

Bounds: a closed port is refused at the client within ``REFUSE_WITHIN`` (1 s);
an unrouted destination gets EHOSTUNREACH/ENETUNREACH or a timeout of the
client's own ``UNREACH_TIMEOUT`` (3 s), never a connection; 200 concurrent
connections each move 1 MiB both ways within ``CONCURRENT_LIMIT`` (60 s).

The 200 connections print their slowest five and, when one is still unfinished
``TAIL_AFTER`` s after 90% were done, its state (``ss``, capture, the relay's
dump): such a tail was a Linux client's BBR taking losses at the full TUN queue
for a policer and pacing at a few kbit/s, which the relay's receive-window
budget (``relay.service.run.window_budget``) now keeps from happening.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import socket
import struct
import time
from dataclasses import dataclass

import pytest
import trio

from relay.lab.lab import Lab
from relay.lab.topology import Topology

from relay_harness import (
    MIB,
    TUN,
    RelayProcess,
    addrs,
    diagnose,
    expected_digest,
    listener,
    pattern_chunks,
    tcp_counters,
)

V4_V6 = pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
REFUSE_WITHIN = 1.0
UNREACH_TIMEOUT = 3.0
UNROUTED = {socket.AF_INET: "198.18.99.1", socket.AF_INET6: "fd00:99::1"}
CONCURRENT = 200
CONCURRENT_LIMIT = 60.0
CONNECT_ALL_LIMIT = 20.0
TAIL_AFTER = 3.0  # a connection unfinished this long after 90% finished: dump its state
STALL_LIMIT = 10.0  # no byte moving on any connection for this long is a stall
HEADER = struct.Struct("!I")  # the connection's number, first on the wire


def closed_port(topo: Topology, family: int) -> int:
    """A port in the server namespace that is bound (so no one else takes it) but not
    listening: the server's kernel answers a SYN with RST."""
    holder = topo.socket("srv", family)
    holder.bind((addrs(topo, family)[1], 0))
    port: int = holder.getsockname()[1]
    return port


@V4_V6
def test_closed_port_is_refused_within_1s(tunrelay_lab: Lab, family: int) -> None:
    topology, relay = tunrelay_lab.topology, RelayProcess.of(tunrelay_lab)
    server = addrs(topology, family)[1]
    port = closed_port(topology, family)
    client = topology.socket("cli", family)
    client.settimeout(5.0)
    t0 = time.perf_counter()
    with pytest.raises(ConnectionRefusedError):
        client.connect((server, port))
    seconds = time.perf_counter() - t0
    print(f"\n[refused] {server}:{port}: ECONNREFUSED after {seconds * 1000:.1f} ms")
    assert seconds < REFUSE_WITHIN, f"refused only after {seconds:.3f} s"
    rec = relay.flow_of(client.getsockname()[1])
    assert (rec["id.resp_h"], rec["id.resp_p"], rec["ended"]) == (server, port, "refused"), rec


@V4_V6
def test_unrouted_destination_is_unreachable_never_connected(
    tunrelay_lab: Lab, family: int
) -> None:
    topology, relay = tunrelay_lab.topology, RelayProcess.of(tunrelay_lab)
    target = UNROUTED[family]
    client = topology.socket("cli", family)
    client.settimeout(UNREACH_TIMEOUT)
    t0 = time.perf_counter()
    try:
        client.connect((target, 80))
    except TimeoutError:
        outcome = "timeout"
    except OSError as exc:
        assert exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH), (
            f"connect to unrouted {target} failed with {exc!r}, expected unreachable"
        )
        outcome = errno.errorcode[exc.errno]
    else:
        pytest.fail(f"connect to unrouted {target} succeeded: the relay faked a SYN-ACK")
    seconds = time.perf_counter() - t0
    print(f"\n[unreachable] {target}:80: {outcome} after {seconds * 1000:.1f} ms")
    rec = relay.flow_of(client.getsockname()[1])
    assert (rec["id.resp_h"], rec["id.resp_p"]) == (target, 80), rec
    assert rec["ended"] in ("unreachable", "connect_timeout"), rec
    # Exactly one flow: the relay's own upstream SYN must not come back through its
    # TUN. Stopped first, so every flow it had is in the log (ended "shutdown").
    relay.check_running()
    relay.stop()  # also asserts no flow came from anywhere but the client
    flows = relay.flow_records()
    assert len(flows) == 1, f"{len(flows)} flows for one client connection: {flows[:3]}"


@dataclass
class Conn:
    """Progress of one of the concurrent connections (bytes, not counting the header)."""

    client_port: int = 0
    upstream_port: int = 0  # the relay's socket, as the server sees it
    client_sent: int = 0
    client_got: int = 0
    server_sent: int = 0
    server_got: int = 0
    client_sha: str = ""
    server_sha: str = ""
    done_at: float = math.nan  # the client's side finished
    server_done_at: float = math.nan

    def finished(self) -> bool:
        return not (math.isnan(self.done_at) or math.isnan(self.server_done_at))

    def finished_at(self) -> float:
        """When both sides were done (``inf`` while either is not)."""
        return math.inf if not self.finished() else max(self.done_at, self.server_done_at)

    def progress(self) -> str:
        return (
            f"port {self.client_port}: c2s sent {self.client_sent} got {self.server_got}, "
            f"s2c sent {self.server_sent} got {self.client_got}"
        )


async def test_200_concurrent_connections_1mib_each_way(tunrelay_lab: Lab) -> None:
    """200 connections open at the same time (a barrier: no byte moves until all are
    connected), each sending 1 MiB each way, every stream byte-exact."""
    topology, relay = tunrelay_lab.topology, RelayProcess.of(tunrelay_lab)
    family = socket.AF_INET
    server_addr = addrs(topology, family)[1]
    lsock, port = listener(topology, family, backlog=CONCURRENT + 16)
    srv = trio.socket.from_stdlib_socket(lsock)
    client_socks = [
        trio.socket.from_stdlib_socket(topology.socket("cli", family)) for _ in range(CONCURRENT)
    ]
    conns = [Conn() for _ in range(CONCURRENT)]
    connected = 0
    all_connected = trio.Event()

    async def send(sock: trio.socket.SocketType, stream: int, conn: Conn, attr: str) -> None:
        for piece in pattern_chunks(stream, MIB, 64 * 1024):
            view = memoryview(piece)
            while view:
                n = await sock.send(view)
                view = view[n:]
                setattr(conn, attr, getattr(conn, attr) + n)
        sock.shutdown(socket.SHUT_WR)

    async def receive(sock: trio.socket.SocketType, conn: Conn, attr: str) -> str:
        h = hashlib.sha256()
        while data := await sock.recv(65536):
            h.update(data)
            setattr(conn, attr, getattr(conn, attr) + len(data))
        return h.hexdigest()

    async def serve(sock: trio.socket.SocketType) -> None:
        with sock:
            header = b""
            while len(header) < HEADER.size:
                chunk = await sock.recv(HEADER.size - len(header))
                assert chunk, "EOF before the header"
                header += chunk
            (i,) = HEADER.unpack(header)
            conns[i].upstream_port = sock.getpeername()[1]
            async with trio.open_nursery() as n:
                n.start_soon(send, sock, 1000 + i, conns[i], "server_sent")
                conns[i].server_sha = await receive(sock, conns[i], "server_got")
            conns[i].server_done_at = time.perf_counter()

    async def accept_loop(nursery: trio.Nursery) -> None:
        for _ in range(CONCURRENT):
            sock, _ = await srv.accept()
            nursery.start_soon(serve, sock)

    async def client(i: int) -> None:
        nonlocal connected
        sock, conn = client_socks[i], conns[i]
        with sock:
            await sock.connect((server_addr, port))
            conn.client_port = sock.getsockname()[1]
            connected += 1
            if connected == CONCURRENT:
                all_connected.set()
            await all_connected.wait()
            await sock.send(HEADER.pack(i))  # 4 bytes: a fresh socket takes them whole
            async with trio.open_nursery() as n:
                n.start_soon(send, sock, 2000 + i, conn, "client_sent")
                conn.client_sha = await receive(sock, conn, "client_got")
            conn.done_at = time.perf_counter()

    def moved() -> int:
        return sum(c.client_sent + c.client_got + c.server_sent + c.server_got for c in conns)

    stall: list[str] = []

    async def unfinished() -> str:
        """The unfinished connections' progress, and ss, a capture and the relay's
        state for the first of them."""
        stuck = [c for c in conns if not c.finished()]
        port, upstream = stuck[0].client_port, stuck[0].upstream_port or None
        where = await trio.to_thread.run_sync(diagnose, topology, port, upstream)
        state = await trio.to_thread.run_sync(relay.state_dump, port)
        return (
            f"{len(stuck)} unfinished, e.g.\n"
            + "\n".join(s.progress() for s in stuck[:10])
            + f"\n{where}\n{state}"
        )

    async def watchdog(scope: trio.CancelScope) -> None:
        # No byte moved for STALL_LIMIT s while some connection is unfinished: capture
        # the state of a stuck one while its sockets are still open, then stop.
        last, since = -1, time.monotonic()
        while True:
            await trio.sleep(0.5)
            if moved() != last:
                last, since = moved(), time.monotonic()
            elif time.monotonic() - since > STALL_LIMIT:
                stall.append(f"no progress for {STALL_LIMIT} s; " + await unfinished())
                scope.cancel()
                return

    slow: list[str] = []

    async def deadline_dump() -> None:
        # Some connection still moves, too slowly to finish (the watchdog sees no
        # stall): capture the state of the first unfinished one before the limit.
        await trio.sleep(CONCURRENT_LIMIT - 2.0)
        if any(not c.finished() for c in conns):
            slow.append(await unfinished())

    tail: list[str] = []

    async def tail_dump() -> None:
        # A long tail is the flake's signal even when the test passes: once most
        # connections are done, a straggler TAIL_AFTER s later gets its state captured.
        while sum(c.finished() for c in conns) < CONCURRENT * 9 // 10:
            await trio.sleep(0.1)
        await trio.sleep(TAIL_AFTER)
        if any(not c.finished() for c in conns):
            tail.append(f"{TAIL_AFTER} s after 90% finished: " + await unfinished())

    cpu0, relay_cpu0 = os.times(), relay.cpu_seconds()
    t0 = time.perf_counter()
    t_connected = math.nan
    with trio.move_on_after(CONCURRENT_LIMIT) as timer:
        async with trio.open_nursery() as outer:
            outer.start_soon(watchdog, outer.cancel_scope)
            outer.start_soon(deadline_dump)
            outer.start_soon(tail_dump)
            async with trio.open_nursery() as servers:
                servers.start_soon(accept_loop, servers)
                async with trio.open_nursery() as clients:
                    for i in range(CONCURRENT):
                        clients.start_soon(client, i)
                    with trio.move_on_after(CONNECT_ALL_LIMIT):
                        await all_connected.wait()
                    t_connected = time.perf_counter()
            outer.cancel_scope.cancel()  # all done: stop the watchdog
    seconds = time.perf_counter() - t0
    cpu1, relay_cpu = os.times(), relay.cpu_seconds() - relay_cpu0
    test_cpu = cpu1.user + cpu1.system - cpu0.user - cpu0.system
    finished = sorted(max(c.done_at, c.server_done_at) - t0 for c in conns if c.finished())
    summary = (
        f"{CONCURRENT} connections: {connected} connected after {t_connected - t0:.2f} s; "
        f"{len(finished)} finished, the first after {finished[0] if finished else math.nan:.2f} "
        f"s, the median after {finished[len(finished) // 2] if finished else math.nan:.2f} s, "
        f"the last after {finished[-1] if finished else math.nan:.2f} s; "
        f"{moved() / 2 / seconds / 1e6:.1f} MB/s both directions together; CPU seconds: relay "
        f"{relay_cpu:.2f}, test process {test_cpu:.2f}"
    )
    summary += f"; TUN queue drops {topology.tx_dropped('gw', TUN)}"
    sender = tcp_counters(topology, "cli")  # the namespace is this test's: counts from 0
    summary += (
        f"; client segments out {sender.get('OutSegs', 0)}, retransmitted "
        f"{sender.get('RetransSegs', 0)}, RTOs {sender.get('TCPTimeouts', 0)}"
    )
    slowest = sorted(conns, key=Conn.finished_at, reverse=True)[:5]
    summary += "\nslowest: " + "; ".join(
        f"{c.finished_at() - t0:.2f} s {c.progress()}" for c in slowest
    )
    print(f"\n[concurrency] {summary}")
    if tail:
        print(f"[concurrency] long tail: {tail[0]}")
    if stall:
        pytest.fail(f"stalled: {summary}\n{stall[0]}\n{relay.describe()}")
    if timer.cancelled_caught:
        stuck = [c for c in conns if not c.finished()]
        pytest.fail(
            f"not done after {CONCURRENT_LIMIT} s: {summary}\n{len(stuck)} unfinished, e.g.\n"
            + "\n".join(c.progress() for c in stuck[:10])
            + (f"\nthe first, 2 s before the limit:\n{slow[0]}" if slow else "")
            + f"\n{relay.describe()}"
        )
    bad = []
    for i, c in enumerate(conns):
        if (c.client_got, c.client_sha) != (MIB, expected_digest(1000 + i, MIB)):
            bad.append(f"conn {i}: client got {c.client_got} bytes, {c.client_sha}")
        if (c.server_got, c.server_sha) != (MIB, expected_digest(2000 + i, MIB)):
            bad.append(f"conn {i}: server got {c.server_got} bytes, {c.server_sha}")
    assert not bad, bad[:10]
    # Every flow is in the flow log, ended by FIN, with every byte counted; and
    # StreamDigest saw exactly the bytes of each direction.
    ports = {c.client_port: i for i, c in enumerate(conns)}
    records = relay.wait_records("flow", lambda r: r.get("id.orig_p") in ports, CONCURRENT)
    wrong = [
        r
        for r in records
        if (r["id.resp_h"], r["id.resp_p"], r["ended"], r["orig_bytes"], r["resp_bytes"])
        != (server_addr, port, "fin", HEADER.size + MIB, MIB)
    ]
    assert not wrong, "flow-log records not as expected:\n" + "\n".join(
        json.dumps(r) for r in wrong[:10]
    )
    digests = relay.wait_records("digest", lambda r: r.get("id.orig_p") in ports, CONCURRENT)
    for rec in digests:
        i = ports[rec["id.orig_p"]]
        h = hashlib.sha256(HEADER.pack(i))
        for piece in pattern_chunks(2000 + i, MIB):
            h.update(piece)
        assert rec["c2s"] == {"bytes": HEADER.size + MIB, "sha256": h.hexdigest()}, rec
        assert rec["s2c"] == {"bytes": MIB, "sha256": expected_digest(1000 + i, MIB)}, rec
