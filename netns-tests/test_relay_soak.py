"""Soak: mixed load through `tunrelay run` for a while; exact, back to idle, flat memory.

For ``TUNRELAY_SOAK_SECONDS`` (default ``CI_SECONDS``, 90 s; benchmarks/soak.py
runs it longer) client threads loop over a mix of flows, each bounded by
``IO_TIMEOUT``:

* short: a 200-byte request, its echo back, close (byte-exact);
* bulk: 256 KiB up and echoed back (byte-exact);
* abandoned: a request sent, then the client resets the connection (RST)
  without reading the answer;
* upstream reset: the server resets the connection after the request; the
  client must see the reset or EOF, never a hang;
* upstream stops reading: 64 KiB sent into a server that never reads, closed
  by the client after 1 s;
* UDP: a datagram to a UDP echo server (as a DNS query would), its echo back
  (lost ones are counted, not failed: UDP).

During the middle third the client's link drops 5% of its frames
(relay.lab.impair.Wire). Every ``SAMPLE_SECONDS`` are sampled and printed:
RSS, PSS (/proc/PID/smaps_rollup) and open fds of every process of the relay
(the supervisor and its worker), and the worker's own figures from its last
``--stats-interval`` line: connections in the table, flow tasks, UDP flows,
the stack's timer heap (entries, stale ones included, and live timers), the
bytes its TCP buffers hold and reserve, and how often the memory budget cut a
reservation short.

Pass: every checked transfer byte-exact; after the load, within
``IDLE_WITHIN`` (30 s), no connection, flow task or UDP flow is left in the
relay, its timer heap is back to ``IDLE_TIMER_HEAP`` entries (0: a stack
with no connection has no deadline; the heap drops stale entries when the
packet loop asks for the next deadline) and no byte is buffered or reserved;
the worker's RSS at the end within ``RSS_SLACK`` (10%) of its RSS at the end
of the first third (after warm-up).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable

from relay.lab.impair import Impairment, Wire
from relay.lab.topology import Topology

from relay_harness import IO_TIMEOUT, RelayProcess, addrs

CI_SECONDS = 90.0
SECONDS = float(os.environ.get("TUNRELAY_SOAK_SECONDS", CI_SECONDS))
SAMPLE_SECONDS = 10.0
CLIENT_THREADS = 6
IDLE_WITHIN = 30.0
IDLE_TIMER_HEAP = 0
RSS_SLACK = 0.10
BULK = 256 * 1024
LOSS = Impairment(loss=0.05)


def _echo_server(topo: Topology, family: int, stop: threading.Event) -> tuple[int, list[str]]:
    """TCP server in the server namespace; the first byte picks what it does."""
    lsock = topo.socket("srv", family)
    lsock.bind((addrs(topo, family)[1], 0))
    lsock.listen(256)
    lsock.settimeout(0.5)
    errors: list[str] = []

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(IO_TIMEOUT)
            try:
                mode = conn.recv(1)
                if mode == b"S":  # stop reading: hold the connection a while, unread
                    stop.wait(5.0)
                    return
                if mode == b"R":  # reset after the request
                    conn.recv(65536)
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                (size,) = struct.unpack("!I", _exact(conn, 4))
                conn.sendall(_exact(conn, size))
            except OSError:
                pass  # a client that reset (abandoned) or a closed lab

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                errors.append(repr(exc))
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return lsock.getsockname()[1], errors


def _udp_echo(topo: Topology, family: int, stop: threading.Event) -> int:
    sock = topo.socket("srv", family, socket.SOCK_DGRAM)
    sock.bind((addrs(topo, family)[1], 0))
    sock.settimeout(0.5)

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            sock.sendto(data, peer)

    threading.Thread(target=serve, daemon=True).start()
    port: int = sock.getsockname()[1]
    return port


def _exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(65536, n - len(buf)))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


# From the stats line: the stack's gauges (timer heap, buffered and reserved bytes),
# the memory budget's refusals, the relay's flow tasks and UDP flows.
STATS_FIELDS = (
    "timer_heap", "timers", "buffered", "reserved", "memory_budget_reached", "flows_active",
    "datagram_flows_active",
)  # fmt: skip


def _stats(relay: RelayProcess) -> dict[str, int]:
    """The relay's last ``--stats-interval`` line: connections and ``STATS_FIELDS``."""
    lines = [ln for ln in relay.log_text().splitlines() if " flows=" in ln]
    if not lines:
        return {}
    last = lines[-1]
    found = {"connections": int(re.search(r" flows=(\d+)", last).group(1))}  # type: ignore[union-attr]
    for name in STATS_FIELDS:
        m = re.search(rf"\b{name}=(\d+)", last)
        found[name] = int(m.group(1)) if m else -1
    return found


def _memory(relay: RelayProcess) -> dict[str, tuple[int, int, int]]:
    """(RSS KiB, PSS KiB, open fds) of the supervisor and of each worker."""
    found = {}
    for name, pid in (("supervisor", relay.pid), *(("worker", p) for p in relay.worker_pids())):
        with open(f"/proc/{pid}/smaps_rollup") as f:
            rollup = dict((k, v.split()[0]) for k, _, v in (ln.partition(":") for ln in f) if v)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        found[f"{name} {pid}"] = (int(rollup["Rss"]), int(rollup["Pss"]), fds)
    return found


def _show(memory: dict[str, tuple[int, int, int]]) -> str:
    return ", ".join(f"{who} rss={r} pss={p} KiB fds={n}" for who, (r, p, n) in memory.items())


def test_soak_mixed_load_stays_exact_returns_to_idle_and_keeps_its_memory(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    family = socket.AF_INET
    wire = Wire.insert(topology)
    # UDP flows idle out in 5 s (60 s by default) so the end can be checked for idle.
    relay = start_relay(args=["--stats-interval", "2", "--udp-idle-timeout", "5"])
    wire.start(Impairment(), Impairment(), seed=7)  # the wire forwards only when started
    stop = threading.Event()
    tcp_port, server_errors = _echo_server(topology, family, stop)
    udp_port = _udp_echo(topology, family, stop)
    server = addrs(topology, family)[1]
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    deadline = t0 + SECONDS

    def note(kind: str, problem: str | None = None) -> None:
        with lock:
            outcomes[kind] += 1
            if problem is not None:
                failures.append(f"{kind}: {problem}")

    def one(rng: random.Random) -> None:
        kind = rng.choice(("short", "short", "short", "bulk", "abandoned", "reset", "stuck", "udp"))
        if kind == "udp":
            s = topology.socket("cli", family, socket.SOCK_DGRAM)
            with s:
                s.settimeout(2.0)
                data = rng.randbytes(rng.randint(20, 500))
                s.sendto(data, (server, udp_port))
                try:
                    got, _ = s.recvfrom(2048)
                except TimeoutError:
                    note("udp lost")  # UDP: counted, not failed
                    return
                note(kind, None if got == data else "wrong echo")
            return
        s = topology.socket("cli", family)
        with s:
            s.settimeout(IO_TIMEOUT)
            s.connect((server, tcp_port))
            if kind in ("short", "bulk"):
                data = rng.randbytes(200 if kind == "short" else BULK)
                s.sendall(b"E" + struct.pack("!I", len(data)) + data)
                note(kind, None if _exact(s, len(data)) == data else "echo differs")
            elif kind == "abandoned":
                s.sendall(b"E" + struct.pack("!I", 1000) + bytes(500))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                note(kind)
            elif kind == "reset":
                s.sendall(b"R" + bytes(100))
                try:
                    got = s.recv(100)
                except ConnectionResetError:
                    got = b""
                note(kind, None if got == b"" else f"got {got!r}")
            else:  # the server never reads
                s.sendall(b"S")
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    for _ in range(64):
                        s.send(bytes(1024))
                time.sleep(1.0)
                note(kind)

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            try:
                one(rng)
            except OSError as exc:
                with lock:
                    failures.append(f"{exc!r}")

    samples: list[tuple[float, dict[str, tuple[int, int, int]], dict[str, int]]] = []
    threads = [
        threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENT_THREADS)
    ]
    for t in threads:
        t.start()
    third = SECONDS / 3
    loss_on = False
    warm_rss = 0
    try:
        while time.monotonic() < deadline:
            time.sleep(min(SAMPLE_SECONDS, max(0.0, deadline - time.monotonic())))
            elapsed = time.monotonic() - t0
            if not loss_on and third <= elapsed < 2 * third:
                wire.stop()
                wire.start(LOSS, Impairment(), seed=7)
                loss_on = True
            elif loss_on and elapsed >= 2 * third:
                wire.stop()
                wire.start(Impairment(), Impairment(), seed=7)
                loss_on = False
            sample = (elapsed, _memory(relay), _stats(relay))
            samples.append(sample)
            if not warm_rss and elapsed >= third:
                warm_rss = relay.rss_kib()
            print(f"  soak t={elapsed:.0f}s {_show(sample[1])}; {sample[2]}")
        for t in threads:
            t.join(timeout=IO_TIMEOUT + 5)
        assert not any(t.is_alive() for t in threads), "a client thread hung"
    finally:
        stop.set()
    print(f"  soak {SECONDS:.0f} s: {dict(outcomes)}; failures {len(failures)}")
    assert not failures, failures[:10]
    assert not server_errors, server_errors
    assert outcomes["short"] > 0 and outcomes["bulk"] > 0
    # Back to idle: nothing left in the relay once the clients are gone: no
    # connection, flow task, UDP flow, deadline, buffered or reserved byte.
    idle_by = time.monotonic() + IDLE_WITHIN
    idle_after = 0.0
    while True:
        now = _stats(relay)
        idle = now and now["connections"] == 0 and now["flows_active"] == 0
        idle = idle and now["datagram_flows_active"] == 0
        idle = idle and now["timer_heap"] == IDLE_TIMER_HEAP and now["timers"] == 0
        if idle and now["buffered"] == 0 and now["reserved"] == 0:
            idle_after = time.monotonic() - deadline
            break
        if time.monotonic() > idle_by:
            raise AssertionError(f"not idle {IDLE_WITHIN} s after the load: {now}")
        time.sleep(1.0)
    end_rss = relay.rss_kib()
    print(f"  soak idle {idle_after:.0f} s after the load: {_show(_memory(relay))}; {now}")
    print(f"  soak: RSS after warm-up {warm_rss} KiB, at the end {end_rss} KiB")
    assert warm_rss and end_rss <= warm_rss * (1 + RSS_SLACK), (warm_rss, end_rss, samples)
    relay.check_running()
    relay.stop()
    wire.stop()
