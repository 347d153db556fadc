"""Bulk transfers through `tunrelay run` on an impaired path: byte-exact, and no stalls.

The client's link crosses a wire namespace (`relay.lab.impair.Wire`) whose seeded
userspace forwarder drops, duplicates, reorders and delays frames in one
direction at a time (client -> gateway, "c2g", or gateway -> client, "g2c";
the other direction only gets the delay). On one connection 32 MiB go each
way at once; every receiver's SHA-256 must equal the sender's and equal what
``StreamDigest`` in the relay saw in that direction.

No stalls: in the same test, on the same wire, with the same impairment and
seed, the same transfer first runs through plain kernel forwarding (the
baseline: the kernel's TCP end to end, with SACK, timestamps and window
scaling). The relay's transfer must then finish within

    BOUND_FACTOR * baseline_seconds + BOUND_CONSTANT   (3x + 5 s)

The 5 s is start-up slack (the relay's connect-before-accept and its own
slow start), not a tolerance for the transfer.

The same path, not just the same wire: a userspace relay adds its
processing time to every round trip (about 0.2-0.3 ms here under this load,
where kernel forwarding on the wire measures about 0.3 ms in all), and at
0 ms added delay with 5% loss a CUBIC sender is steeply sensitive to the
RTT. Measured with kernel forwarding alone (5% loss toward the gateway,
32 MiB, CUBIC): smoothed RTT 0.29-0.33 ms, 1.4-2.4 s and 1-6 RTOs; with
50 us more each way (0.56-0.61 ms) 5.4-6.0 s and 9-11 RTOs; with 200 us
more (1.0-1.1 ms) 11-15 s and 21-26 RTOs. At a flight of 1-2 segments a lost
fast retransmission has nothing sent after it to reveal it, so it waits
for the RTO (200 ms), and the longer the RTT, the longer the flight stays
that small. Through the relay the client's RTT is 0.5-0.64 ms, and the
transfer takes 5.5-6.6 s with 13-14 RTOs: Linux's own figures at that RTT.
So each case also measures the client's smoothed RTT (``tcpi_rtt``, sampled
every PROBE_INTERVAL) on both runs, and when the relay misses the bound, the
kernel baseline runs once more with the difference added to the wire's
delay (half each way, at most MATCH_CAP each way) and the relay must finish
within 3x + 5 s of that: the relay's TCP is held to Linux's on a path with
the relay's RTT. The cap keeps a relay that holds its ACKs (a delayed-ACK
bug adds 40 ms and more) from matching its own slowness; the relay's
processing latency itself is bench_netns's measure, not this test's.

The kernel endpoints use CUBIC (``TCP_CONGESTION`` on the test's sockets;
``TUNRELAY_LOSSY_CC`` overrides it, "" keeps the namespace default). New
namespaces inherit the host's default, which is BBR on the project machine:
BBR does not back off on random loss, so its baseline is 10-50x faster than
CUBIC's on a lossy 50 ms path (5% loss: 4-8 s against 274-305 s), a bar
that says nothing about stalls of a CUBIC relay, and that would change from
one machine to the next. The relay's own upstream sockets (in the gateway)
keep the default; that leg is not impaired.

The matrix: impairments x direction x RTT, where the RTT is added by the
forwarder as half the delay on each direction:

    loss1    1% loss          loss5     5% loss          dup2      2% duplication
    reorder  5% of frames held behind the next 3
    combined 5% loss + 2% duplication + 5% held behind 3

By default (CI): each impairment in each direction at 0 ms and at 50 ms
added RTT, each impairment x direction once over IPv4 and once over IPv6,
plus a control ("none": the wire only) at each RTT: 22 cases. 32 MiB go
each way, except in the six lossy cases at 50 ms (loss1, loss5, combined x
c2g, g2c), which move SLOW_SIZE (1 MiB, about 730 segments: at 5% loss some 37
recoveries each way) each way: with a CUBIC baseline the kernel alone needs
100-300 s for 32 MiB there, 2-10 s for 1 MiB. A case costs at most about
4 x baseline + 7 s whether the relay passes or not: it is stopped at the bound.
``TUNRELAY_LOSSY_FULL=1`` runs every case over both families (44 cases,
well over an hour). ``TUNRELAY_LOSSY_MEASURE=1`` lets a slow relay run on
past the bound (up to 15 min) so that the failure says how long it really
took.

Each case prints the baseline and relay times, the bound, the client's sender
counters (RTOs, loss probes) and the relay worker's CPU time and its time
waiting for a CPU (/proc/PID/schedstat), and the wire's counters for both
runs (frames lost, duplicated, held; any frame lost outside the model, e.g. a
full socket buffer, is printed as kernel_drops / queue_drops).
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from relay.lab.impair import Impairment, Wire, WireStats
from relay.lab.topology import Topology

from relay_harness import (
    MIB,
    Received,
    RelayProcess,
    Sent,
    addrs,
    counters_delta,
    diagnose,
    expected_digest,
    listener,
    recv_stream,
    run_threads,
    send_pattern,
    tcp_counters,
)

SIZE = 32 * MIB
# Lossy cases at 50 ms RTT in CI: the kernel's CUBIC alone needs 100-300 s for 32 MiB
# there (measured: loss1 103-109 s, loss5 274-289 s, combined 293-305 s).
SLOW_SIZE = 1 * MIB
BOUND_FACTOR = 3.0
BOUND_CONSTANT = 5.0
BASELINE_LIMIT = 240.0  # the kernel's own transfer must finish within this
C2S_STREAM, S2C_STREAM = 11, 12
# TUNRELAY_LOSSY_MEASURE=1: let the relay run past the bound (up to MEASURE_LIMIT) so
# a failure reports how long it really took, not just that it missed the bound.
MEASURE = os.environ.get("TUNRELAY_LOSSY_MEASURE") == "1"
MEASURE_LIMIT = 900.0
# The relay may run on past the plain bound up to this, for the matched-RTT check.
MATCHED_LIMIT = 60.0
MATCH_CAP = 0.001  # s, the most one-way delay the matched baseline adds
PROBE_INTERVAL = 0.01  # s between samples of the client's smoothed RTT
TCPI_RTT_OFFSET = 68  # struct tcp_info (linux/tcp.h): tcpi_rtt, us, after 8 bytes + 15 u32
# The kernel endpoints' congestion control (per socket; "" = the namespace default,
# which new namespaces inherit from the host: bbr on some machines, cubic on most).
KERNEL_CC = os.environ.get("TUNRELAY_LOSSY_CC", "cubic")

IMPAIRMENTS: dict[str, Impairment] = {
    "none": Impairment(),  # the control: the wire alone
    "loss1": Impairment(loss=0.01),
    "loss5": Impairment(loss=0.05),
    "dup2": Impairment(dup=0.02),
    "reorder": Impairment(reorder=0.05, reorder_gap=3),
    "combined": Impairment(loss=0.05, dup=0.02, reorder=0.05, reorder_gap=3),
}
DIRECTIONS = ("c2g", "g2c")
FAMILIES = {"v4": socket.AF_INET, "v6": socket.AF_INET6}


@dataclass(frozen=True)
class Case:
    impairment: str
    direction: str
    rtt_ms: int
    family: str

    @property
    def id(self) -> str:
        return f"{self.impairment}-{self.direction}-{self.rtt_ms}ms-{self.family}"

    @property
    def size(self) -> int:
        """Bytes each way: SLOW_SIZE where the kernel alone would take minutes."""
        return SLOW_SIZE if self.rtt_ms and self.impairment in SLOW and not FULL else SIZE

    @property
    def seed(self) -> int:
        return zlib.crc32(self.id.encode())

    def wire(self) -> tuple[Impairment, Impairment]:
        """(c2g, g2c): the impairment on one direction, half the RTT on each."""
        delay = self.rtt_ms / 2000
        imp = IMPAIRMENTS[self.impairment].with_delay(delay)
        plain = Impairment(delay=delay)
        return (imp, plain) if self.direction == "c2g" else (plain, imp)


# The lossy impairments at 50 ms RTT move SLOW_SIZE each way in CI (see SLOW_SIZE);
# TUNRELAY_LOSSY_FULL=1 moves the full 32 MiB there too.
SLOW = {"loss1", "loss5", "combined"}


def _ci_cases() -> list[Case]:
    cases = []
    for k, rtt in enumerate((0, 50)):
        cases.append(Case("none", "c2g", rtt, "v6" if k else "v4"))
        for i, name in enumerate(n for n in IMPAIRMENTS if n != "none"):
            for j, direction in enumerate(DIRECTIONS):
                # Every impairment x direction meets both families (one per RTT).
                cases.append(Case(name, direction, rtt, "v4" if (i + j + k) % 2 == 0 else "v6"))
    return cases


def _full_cases() -> list[Case]:
    return [
        Case(name, direction, rtt, family)
        for rtt in (0, 50)
        for name in IMPAIRMENTS
        for direction in (DIRECTIONS[:1] if name == "none" else DIRECTIONS)
        for family in FAMILIES
    ]


def _params(cases: list[Case]) -> list[Any]:
    return [pytest.param(c, id=c.id, marks=KNOWN_FAILURES.get(c.id, [])) for c in cases]


FULL = os.environ.get("TUNRELAY_LOSSY_FULL") == "1"
# Open problems, each marked xfail with what is known in its reason; not skipped:
# they run and report, and an unexpected pass shows as XPASS.
KNOWN_FAILURES: dict[str, list[Any]] = {
    # combined-c2g-0ms-v4 is not listed: its client's sender meets 28-42 RTOs (1-7
    # with kernel forwarding) when a D-SACK rides on every segment of a TSO batch
    # going the other way, as a Linux sender counts each one. That is why
    # TcpSender.segments_to_send sends a D-SACK once, on its own ACK; quick-ACK
    # mode (connection.py) takes out most of the remaining loss probes.
}
CASES = _params(_full_cases() if FULL else _ci_cases())


# --- one transfer ------------------------------------------------------------------------


@dataclass
class Transfer:
    seconds: float
    client_port: int
    upstream_port: int
    sent_c2s: Sent
    sent_s2c: Sent
    got_c2s: Received
    got_s2c: Received
    srtt_us: int  # the client's smoothed RTT, median of its samples


class RttProbe:
    """Samples a socket's smoothed RTT (``tcpi_rtt``) every PROBE_INTERVAL, in a thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(PROBE_INTERVAL):
            try:
                info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            except OSError:
                return
            (rtt,) = struct.unpack_from("I", info, TCPI_RTT_OFFSET)
            if rtt:
                self.samples.append(rtt)

    def stop(self) -> int:
        """Stop sampling; the median sample, us (0 if none)."""
        self._stop.set()
        self._thread.join()
        return int(statistics.median(self.samples)) if self.samples else 0


class Stalled(AssertionError):
    pass


def cpu_wait(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of ``pid`` so far.

    From /proc/PID/schedstat. The relay's ACKs need its worker on a CPU, the
    kernel's do not (softirq): on a busy machine the wait, not the relay's work,
    is what stretches the client's ACK clock, so each case prints both.
    """
    with open(f"/proc/{pid}/schedstat") as f:
        ran, waited, _ = f.read().split()
    return int(ran) / 1e9, int(waited) / 1e9


def transfer(
    topo: Topology,
    family: int,
    size: int,
    limit: float,
    on_stall: Callable[[], str] = str,
    cc: str = KERNEL_CC,
) -> Transfer:
    """``size`` bytes each way at once on one connection; Stalled if not done in `limit` s.

    On a stall, ``on_stall()`` (state dumps, counters) is called while the
    connection is still open, and its text goes into the message.
    """
    srv, port = listener(topo, family)
    srv.settimeout(min(limit, 30.0))
    client = topo.socket("cli", family)
    if cc:  # the accepted socket inherits it from the listener
        for sock in (srv, client):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
    client.settimeout(limit + 5.0)
    progress = {"c2s": 0, "s2c": 0}
    t0 = time.perf_counter()
    client.connect((addrs(topo, family)[1], port))
    conn, peer = srv.accept()
    conn.settimeout(limit + 5.0)
    socks = (client, conn)
    probe = RttProbe(client)

    def client_send() -> Sent:
        return send_pattern(client, C2S_STREAM, size)

    def client_recv() -> Received:
        return recv_stream(client, progress=lambda n: progress.__setitem__("s2c", n))

    def server_send() -> Sent:
        return send_pattern(conn, S2C_STREAM, size)

    def server_recv() -> Received:
        return recv_stream(conn, progress=lambda n: progress.__setitem__("c2s", n))

    results, errors, stuck = run_threads(
        client_send, client_recv, server_send, server_recv, timeout=limit
    )
    srtt_us = probe.stop()
    if not stuck:
        for exc in errors:
            if exc is not None:
                raise exc
    seconds = time.perf_counter() - t0
    if stuck:
        where = (
            f"not done after {limit:.1f} s (still running: {stuck}); received "
            f"c2s {progress['c2s']:,} and s2c {progress['s2c']:,} of {size:,} bytes"
        )
        details = on_stall()
        for s in socks:  # wake the blocked threads
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        raise Stalled(f"{where}\n{details}")
    sent_c2s, got_s2c, sent_s2c, got_c2s = results
    return Transfer(
        seconds, client.getsockname()[1], peer[1], sent_c2s, sent_s2c, got_c2s, got_s2c, srtt_us
    )


def check_exact(t: Transfer, size: int) -> None:
    assert (t.got_c2s.count, t.got_c2s.sha256) == (size, expected_digest(C2S_STREAM, size))
    assert (t.got_s2c.count, t.got_s2c.sha256) == (size, expected_digest(S2C_STREAM, size))
    assert t.sent_c2s.sha256 == t.got_c2s.sha256
    assert t.sent_s2c.sha256 == t.got_s2c.sha256
    assert t.got_c2s.eof and t.got_s2c.eof


def rate(t: Transfer) -> str:
    return (
        f"{t.seconds:.2f} s (c2s {t.got_c2s.mbps() * 8:.0f} Mbit/s, "
        f"s2c {t.got_s2c.mbps() * 8:.0f} Mbit/s; client srtt {t.srtt_us} us)"
    )


def kernel_baseline(
    topology: Topology, wire: Wire, case: Case, extra_delay: float = 0.0
) -> tuple[Transfer, WireStats]:
    """The case's transfer through plain kernel forwarding, `extra_delay` s added each way."""
    c2g, g2c = case.wire()
    if extra_delay:
        c2g, g2c = c2g.with_delay(c2g.delay + extra_delay), g2c.with_delay(g2c.delay + extra_delay)
    forwarding = topology.enable_forwarding()
    wire.start(c2g, g2c, seed=case.seed)
    try:
        base = transfer(topology, FAMILIES[case.family], case.size, BASELINE_LIMIT)
    finally:
        stats = wire.stop()
        forwarding.close()
    check_exact(base, case.size)
    return base, stats


# --- the test ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_lossy_32mib_each_way(
    topology: Topology, start_relay: Callable[..., RelayProcess], case: Case
) -> None:
    family = FAMILIES[case.family]
    wire = Wire.insert(topology)
    c2g, g2c = case.wire()
    print(
        f"\n[{case.id}] seed {case.seed}; c2g: {c2g.describe()}; g2c: {g2c.describe()}; "
        f"kernel endpoints: {KERNEL_CC or 'namespace default'} congestion control",
        flush=True,
    )

    # 1. The baseline: kernel forwarding in the gateway, the same wire and seed.
    client_before = tcp_counters(topology, "cli")
    base, base_wire = kernel_baseline(topology, wire, case)
    client_after = tcp_counters(topology, "cli")
    print(
        f"  kernel: {rate(base)}\n  {base_wire.summary()}"
        f"\n  client kernel: {counters_delta(client_before, client_after)}",
        flush=True,
    )
    client_before = client_after

    # 2. The relay, bounded by the baseline.
    bound = BOUND_FACTOR * base.seconds + BOUND_CONSTANT
    limit = max(bound, MEASURE_LIMIT if MEASURE else MATCHED_LIMIT)
    relay = start_relay()
    wire.start(c2g, g2c, seed=case.seed)
    relay_wire: list[WireStats] = []

    worker = relay.worker_pid
    cpu_before = cpu_wait(worker)

    def worker_cpu() -> str:
        ran, waited = (b - a for a, b in zip(cpu_before, cpu_wait(worker), strict=True))
        return f"relay worker: on a CPU {ran:.2f} s, waiting for one {waited:.2f} s"

    def on_stall() -> str:
        relay_wire.append(wire.stop())
        # How the client got slow (RTOs, loss probes) and whether the worker starved.
        sender = counters_delta(client_before, tcp_counters(topology, "cli"))
        return (
            f"{relay_wire[0].summary()}\nclient kernel: {sender}\n{worker_cpu()}\n"
            f"{relay.state_dump()}\n{relay.describe()}"
        )

    size = case.size
    digest: dict[str, Any] | None = None
    try:
        got = transfer(topology, family, case.size, limit, on_stall)
        # The flow's last ACKs and FINs cross the wire too: stopping the forwarder
        # before the flow ends would drop them (they wait out the added delay).
        digest = relay.digest_of(got.client_port)
    except Stalled as exc:
        pytest.fail(
            f"{case.id}: the relay's transfer did not finish within {limit:.1f} s "
            f"(the bound: {bound:.1f} s = {BOUND_FACTOR:g} x kernel {base.seconds:.2f} s + "
            f"{BOUND_CONSTANT:g} s): {exc}",
            pytrace=False,
        )
    finally:
        if not relay_wire:
            relay_wire.append(wire.stop())
    client_after = tcp_counters(topology, "cli")
    print(
        f"  relay:  {rate(got)}; bound {bound:.2f} s ({got.seconds / base.seconds:.2f}x kernel)"
        f"\n  {relay_wire[0].summary()}"
        f"\n  client kernel: {counters_delta(client_before, client_after)}"
        f"\n  {worker_cpu()}",
        flush=True,
    )
    try:
        check_exact(got, case.size)
    except AssertionError:
        print(diagnose(topology, got.client_port, got.upstream_port))
        raise
    assert digest is not None
    assert digest["c2s"] == {"bytes": size, "sha256": got.got_c2s.sha256}, digest
    assert digest["s2c"] == {"bytes": size, "sha256": got.got_s2c.sha256}, digest
    flow = relay.flow_of(got.client_port)
    assert (flow["orig_bytes"], flow["resp_bytes"]) == (size, size), flow
    if got.seconds <= bound:
        return
    # 3. Over the plain bound: Linux on a path with the relay's RTT (module docstring).
    relay.stop()
    extra = min(max(0.0, (got.srtt_us - base.srtt_us) / 2e6), MATCH_CAP)
    matched, matched_wire = kernel_baseline(topology, wire, case, extra)
    matched_bound = BOUND_FACTOR * matched.seconds + BOUND_CONSTANT
    print(
        f"  kernel, {extra * 1e6:.0f} us more each way: {rate(matched)}; bound "
        f"{matched_bound:.2f} s\n  {matched_wire.summary()}",
        flush=True,
    )
    assert got.seconds <= matched_bound, (
        f"{case.id}: the relay took {got.seconds:.1f} s (client srtt {got.srtt_us} us), "
        f"over the bound {bound:.1f} s ({BOUND_FACTOR:g} x kernel {base.seconds:.2f} s + "
        f"{BOUND_CONSTANT:g} s, srtt {base.srtt_us} us) and over {matched_bound:.1f} s, "
        f"the same from the kernel with {extra * 1e6:.0f} us more each way "
        f"({matched.seconds:.2f} s, srtt {matched.srtt_us} us)"
    )
