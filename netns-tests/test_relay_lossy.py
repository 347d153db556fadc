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
c2g, g2c), which move SLOW_SIZE (2 MiB) each way: with a CUBIC baseline the
kernel alone needs 100-300 s for 32 MiB there. A case costs at most about
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
SLOW_SIZE = 2 * MIB
BOUND_FACTOR = 3.0
BOUND_CONSTANT = 5.0
BASELINE_LIMIT = 240.0  # the kernel's own transfer must finish within this
C2S_STREAM, S2C_STREAM = 11, 12
# TUNRELAY_LOSSY_MEASURE=1: let the relay run past the bound (up to MEASURE_LIMIT) so
# a failure reports how long it really took, not just that it missed the bound.
MEASURE = os.environ.get("TUNRELAY_LOSSY_MEASURE") == "1"
MEASURE_LIMIT = 900.0
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
# loss5-c2g-0ms (open): a CUBIC client at 5% loss keeps a flight of 2-5 segments,
# so a lost fast retransmit with nothing sent after it ends in an RTO (>= 200 ms),
# and its rate follows the ACK delay. Through the relay the client meets more RTOs
# than through kernel forwarding in the same run: 4-11 against 0-3 with the
# machine idle (worker waiting 0.1-0.5 s for a CPU; c2s 65-108 against 176-350
# Mbit/s, the client's flight pinned at 2 segments per ACK), 14-20 against 3-7 at
# load 6-10 (worker waiting 4-7 s for a CPU while running 1.2-2.1 s). So CPU
# starvation of the worker makes it worse but does not explain it all. The case
# prints both numbers; a miss of the bound is most likely when the kernel's run
# had no RTO (0.8 s) and the relay's had ten.


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
    return Transfer(seconds, client.getsockname()[1], peer[1], sent_c2s, sent_s2c, got_c2s, got_s2c)


def check_exact(t: Transfer, size: int) -> None:
    assert (t.got_c2s.count, t.got_c2s.sha256) == (size, expected_digest(C2S_STREAM, size))
    assert (t.got_s2c.count, t.got_s2c.sha256) == (size, expected_digest(S2C_STREAM, size))
    assert t.sent_c2s.sha256 == t.got_c2s.sha256
    assert t.sent_s2c.sha256 == t.got_s2c.sha256
    assert t.got_c2s.eof and t.got_s2c.eof


def rate(t: Transfer) -> str:
    return (
        f"{t.seconds:.2f} s (c2s {t.got_c2s.mbps() * 8:.0f} Mbit/s, "
        f"s2c {t.got_s2c.mbps() * 8:.0f} Mbit/s)"
    )


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
    forwarding = topology.enable_forwarding()
    wire.start(c2g, g2c, seed=case.seed)
    client_before = tcp_counters(topology, "cli")
    try:
        base = transfer(topology, family, case.size, BASELINE_LIMIT)
    finally:
        base_wire = wire.stop()
        forwarding.close()
    check_exact(base, case.size)
    client_after = tcp_counters(topology, "cli")
    print(
        f"  kernel: {rate(base)}\n  {base_wire.summary()}"
        f"\n  client kernel: {counters_delta(client_before, client_after)}",
        flush=True,
    )
    client_before = client_after

    # 2. The relay, bounded by the baseline.
    bound = BOUND_FACTOR * base.seconds + BOUND_CONSTANT
    limit = max(bound, MEASURE_LIMIT) if MEASURE else bound
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
            f"{case.id}: the relay's transfer did not finish within the bound "
            f"{bound:.1f} s = {BOUND_FACTOR:g} x kernel {base.seconds:.2f} s + "
            f"{BOUND_CONSTANT:g} s: {exc}",
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
    # Only reached past the bound with TUNRELAY_LOSSY_MEASURE=1.
    assert got.seconds <= bound, (
        f"{case.id}: the relay took {got.seconds:.1f} s, over the bound {bound:.1f} s "
        f"({BOUND_FACTOR:g} x kernel {base.seconds:.2f} s + {BOUND_CONSTANT:g} s)"
    )
