"""Tests of the impairment harness itself (`relay.lab.impair`), without the relay.

(a) `Impairment` and `Fates` (no root): specs round-trip, bad values raise,
    fates are a pure function of (seed, direction, frame number), rates are
    right, and a higher loss rate drops a superset of the frames;
(b) the wire keeps the lab working (TCP over IPv4 and IPv6 through kernel
    forwarding) and turns the veths' offloads off; its capacity with no
    impairment is measured and printed;
(c) the forwarder does exactly what its seed says: paced UDP datagrams with
    loss, duplication and reordering arrive exactly in the order a model built
    from `Fates` predicts, the same on a second run, different with another
    seed; each direction separately;
(d) delay adds the configured RTT; the delay queue is bounded and counts
    what it drops; ARP and ND pass even at 100% loss;
(e) the nft engine drops and duplicates at about the configured rates and its
    counters agree with what arrived;
(f) tear-down removes the wire namespace and the forwarder.

Every wait is bounded (socket timeouts, thread joins); sockets live in the
lab's namespaces only.
"""

from __future__ import annotations

import os
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from relay.host import netns
from relay.lab.impair import DUP, HELD, LOST, Fates, Impairment, Wire, nft_ruleset
from relay.lab.topology import Topology

from relay_harness import addrs

V4_V6 = pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
CAPACITY_FLOOR_MBPS = 100.0  # measured ~900; far below means the forwarder is broken
SEQ = struct.Struct("!I")


# --- (a) no root ------------------------------------------------------------------------


def test_spec_round_trips_and_validates() -> None:
    imp = Impairment(
        loss=0.05, dup=0.02, reorder=0.1, reorder_gap=4, reorder_timeout=0.02, delay=0.025
    )
    assert Impairment.parse(imp.spec()) == imp
    assert Impairment.parse("") == Impairment()
    assert Impairment.parse("loss=0.5") == Impairment(loss=0.5)
    assert not Impairment().active and Impairment(delay=0.001).active
    assert imp.describe() == "5% loss, 2% dup, 10% held behind 4, 25 ms delay"
    assert imp.with_delay(0.0) == Impairment(
        loss=0.05, dup=0.02, reorder=0.1, reorder_gap=4, reorder_timeout=0.02
    )
    for bad in ("loss=1.5", "dup=-0.1", "reorder_gap=0", "delay=9", "bogus=1", "loss"):
        with pytest.raises(ValueError):
            Impairment.parse(bad)


def test_fates_are_a_function_of_seed_direction_and_index() -> None:
    imp = Impairment(loss=0.05, dup=0.02, reorder=0.05)
    first = Fates(imp, 7, "c2g").take(20_000)
    assert first == Fates(imp, 7, "c2g").take(20_000)
    assert first != Fates(imp, 8, "c2g").take(20_000)
    assert first != Fates(imp, 7, "g2c").take(20_000)
    n = 200_000
    fates = Fates(imp, 1, "c2g").take(n)
    lost = sum(1 for f in fates if f & LOST)
    kept = n - lost
    dup = sum(1 for f in fates if f & DUP)
    held = sum(1 for f in fates if f & HELD)
    assert all(f == LOST for f in fates if f & LOST)  # a lost frame is nothing else
    # Binomial: within 5 standard deviations.
    for count, p, trials in ((lost, 0.05, n), (dup, 0.02, kept), (held, 0.05, kept)):
        assert abs(count - p * trials) < 5 * (trials * p * (1 - p)) ** 0.5, (count, p, trials)


def test_more_loss_drops_a_superset() -> None:
    # Three draws per frame whatever the rates: the same seed at a higher loss
    # rate drops every frame the lower rate dropped, and more.
    low = Fates(Impairment(loss=0.01), 3, "c2g").take(50_000)
    high = Fates(Impairment(loss=0.05), 3, "c2g").take(50_000)
    lost_low = {i for i, f in enumerate(low) if f & LOST}
    lost_high = {i for i, f in enumerate(high) if f & LOST}
    assert lost_low < lost_high


def test_nft_engine_refuses_delay_and_reordering() -> None:
    assert "numgen random mod 1000000 < 10000 counter drop" in nft_ruleset(
        Impairment(loss=0.01), Impairment()
    )
    with pytest.raises(ValueError):
        nft_ruleset(Impairment(delay=0.01), Impairment())
    with pytest.raises(ValueError):
        nft_ruleset(Impairment(), Impairment(reorder=0.1))


# --- helpers for the namespace tests -----------------------------------------------------


@pytest.fixture
def wire(topology: Topology) -> Iterator[Wire]:
    yield Wire.insert(topology)


def gw_addr(topo: Topology, family: int) -> str:
    return topo.gw_cli_v4 if family == socket.AF_INET else topo.gw_cli_v6


def udp_pair(
    topo: Topology, family: int, direction: str
) -> tuple[socket.socket, socket.socket, tuple[str, int]]:
    """(sender, receiver, receiver's address): client -> gateway for c2g, else back."""
    src_ns, dst_ns = ("cli", "gw") if direction == "c2g" else ("gw", "cli")
    dst_ip = gw_addr(topo, family) if direction == "c2g" else addrs(topo, family)[0]
    rx = topo.socket(dst_ns, family, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    rx.bind((dst_ip, 0))
    rx.settimeout(0.2)
    tx = topo.socket(src_ns, family, socket.SOCK_DGRAM)
    return tx, rx, (dst_ip, rx.getsockname()[1])


def send_paced(tx: socket.socket, dst: tuple[str, int], count: int, burst: int = 8) -> None:
    """`count` datagrams carrying their sequence number, `burst` at a time, 1 ms apart."""
    for seq in range(count):
        tx.sendto(SEQ.pack(seq) + bytes(60), dst)
        if seq % burst == burst - 1:
            time.sleep(0.001)


def receive_all(
    rx: socket.socket, quiet: float, limit: float, expect: int | None = None
) -> list[int]:
    """Sequence numbers in arrival order, until nothing came for `quiet` s (or `limit` s),
    or, given `expect`, as soon as that many came (the caller then checks the wire's
    ``sent`` counter: nothing more was sent, so nothing more can arrive)."""
    got: list[int] = []
    last = start = time.monotonic()
    while time.monotonic() - last < quiet and time.monotonic() - start < limit:
        if expect is not None and len(got) >= expect:
            break
        try:
            data = rx.recv(2048)
        except TimeoutError:
            continue
        got.append(SEQ.unpack_from(data)[0])
        last = time.monotonic()
    return got


def in_thread(fn: Callable[[], object]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


class Receiver:
    """`receive_all` in a thread; `join()` waits (bounded), then `result` holds it."""

    def __init__(
        self, rx: socket.socket, quiet: float, limit: float, expect: int | None = None
    ) -> None:
        self.limit = limit
        self._out: list[list[int]] = []
        self._thread = in_thread(lambda: self._out.append(receive_all(rx, quiet, limit, expect)))

    def join(self) -> None:
        self._thread.join(self.limit + 5.0)
        assert self._out, "the receiver did not finish"

    @property
    def result(self) -> list[int]:
        return self._out[0]


def expected_order(fates: list[int], gap: int) -> list[int]:
    """What the forwarder sends, by input index: the model of its reordering.

    A held frame goes out right after the `gap`-th later frame that is sent
    (dropped frames do not count); held frames still waiting at the end go
    out, in the order they were held, when their timeout expires.
    """
    out: list[int] = []
    held: list[list[int]] = []  # [frames still owed, index, copies]
    for i, fate in enumerate(fates):
        if fate & LOST:
            continue
        copies = 2 if fate & DUP else 1
        if fate & HELD:
            held.append([gap, i, copies])
            continue
        out += [i] * copies
        waiting = []
        for h in held:
            h[0] -= 1
            if h[0] == 0:
                out += [h[1]] * h[2]
            else:
                waiting.append(h)
        held = waiting
    for _, i, copies in held:
        out += [i] * copies
    return out


def sent_datagrams(d: dict[str, int]) -> int:
    """Datagrams the forwarder sent in direction ``d`` (its ``sent`` counter counts the
    ARP/ND frames it passed too), copies included; none left held or queued at its exit."""
    assert d["held_at_exit"] == 0 and d["queued_at_exit"] == 0, d
    return d["sent"] - d["control"]


def first_difference(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def tcp_echo_ok(topo: Topology, family: int) -> None:
    srv = topo.socket("gw", family)
    srv.bind((gw_addr(topo, family), 0))
    srv.listen(1)
    srv.settimeout(10)
    cli = topo.socket("cli", family)
    cli.settimeout(10)
    cli.connect((gw_addr(topo, family), srv.getsockname()[1]))
    conn, _ = srv.accept()
    conn.settimeout(10)
    cli.sendall(b"ping" * 1000)
    got = b""
    while len(got) < 4000:
        got += conn.recv(65536)
    assert got == b"ping" * 1000


# --- (b) the wire in the lab ------------------------------------------------------------


def test_wire_keeps_the_lab_working(topology: Topology, wire: Wire) -> None:
    assert netns.exists(wire.ns)
    assert all(not any(v.values()) for v in wire.offloads.values()), wire.offloads
    wire.start()
    for family in (socket.AF_INET, socket.AF_INET6):
        tcp_echo_ok(topology, family)
    stats = wire.stop()
    assert stats.uncontrolled_drops() == 0, stats.summary()
    # Stopped, the wire moves nothing.
    tx, rx, dst = udp_pair(topology, socket.AF_INET, "c2g")
    tx.sendto(b"x", dst)
    assert receive_all(rx, quiet=0.3, limit=1.0) == []


def _bulk_mbps(topo: Topology, family: int, direction: str, seconds: float) -> float:
    """One TCP stream for `seconds` (client -> server for c2g), kernel forwarding."""
    srv_ip = addrs(topo, family)[1]
    srv = topo.socket("srv", family)
    srv.bind((srv_ip, 0))
    srv.listen(1)
    srv.settimeout(10)
    cli = topo.socket("cli", family)
    cli.settimeout(10)
    cli.connect((srv_ip, srv.getsockname()[1]))
    conn, _ = srv.accept()
    conn.settimeout(10)
    sender, receiver = (cli, conn) if direction == "c2g" else (conn, cli)
    block = memoryview(bytes(1 << 20))
    received = [0]

    def receive() -> None:
        buf = bytearray(1 << 20)
        while n := receiver.recv_into(buf):
            received[0] += n

    t = in_thread(receive)
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        sender.sendall(block)
    sender.shutdown(socket.SHUT_WR)
    t.join(15)
    assert not t.is_alive()
    return received[0] * 8 / (time.monotonic() - t0) / 1e6


def test_capacity_without_impairment(topology: Topology, wire: Wire) -> None:
    """Measured and printed (pytest -s); only a floor far below it is asserted."""
    topology.enable_forwarding()
    results = {}
    # "pass-through": no impairment configured, frames are copied straight across;
    # "per-frame": an active impairment that never fires, so every frame takes the
    # full path (classify, three draws, send) that an impaired run takes.
    for label, imp in (("pass-through", None), ("per-frame", Impairment(loss=1e-12))):
        for direction in ("c2g", "g2c"):
            wire.start(imp, imp, seed=1)
            try:
                mbps = _bulk_mbps(topology, socket.AF_INET, direction, 1.0)
            finally:
                stats = wire.stop()
            results[f"{label} {direction}"] = mbps
            print(f"\n[capacity] {label} {direction}: {mbps:.0f} Mbit/s; {stats.summary()}")
    for key, mbps in results.items():
        assert mbps > CAPACITY_FLOOR_MBPS, (key, results)


# --- (c) exactly what the seed says ------------------------------------------------------


@V4_V6
@pytest.mark.parametrize("direction", ["c2g", "g2c"])
def test_forwarder_follows_its_fates_exactly(
    topology: Topology, wire: Wire, family: int, direction: str
) -> None:
    count = 1200
    imp = Impairment(loss=0.1, dup=0.1, reorder=0.1, reorder_gap=3, reorder_timeout=1.0)
    # The other direction is impaired too (with other rates), and carries nothing.
    other = Impairment(loss=0.5, dup=0.5)
    c2g, g2c = (imp, other) if direction == "c2g" else (other, imp)
    tx, rx, dst = udp_pair(topology, family, direction)
    # Resolve the neighbour first (ARP/ND pass unimpaired anyway; this keeps the first
    # datagrams from waiting in the neighbour queue, which holds only a few).
    wire.start()
    tx.sendto(SEQ.pack(count) + bytes(60), dst)
    assert receive_all(rx, quiet=0.3, limit=3.0) == [count]
    wire.stop()

    runs: dict[int, list[list[int]]] = {}
    for seed in (5, 5, 6):
        want = expected_order(Fates(imp, seed, direction).take(count), imp.reorder_gap)
        wire.start(c2g, g2c, seed=seed)
        try:
            # Done when the model's count arrived (the last held frames leave after
            # reorder_timeout); fewer: until 1.6 s of quiet, as without a count.
            box = Receiver(rx, quiet=1.6, limit=30.0, expect=len(want))
            send_paced(tx, dst, count)
            box.join()
        finally:
            stats = wire.stop()
        got = box.result
        d = getattr(stats, direction)
        assert stats.uncontrolled_drops() == 0, stats.summary()
        assert d["ip"] == count, stats.summary()
        # Everything the forwarder sent arrived: nothing more is on its way.
        assert sent_datagrams(d) == len(got), (d, len(got))
        runs.setdefault(seed, []).append(got)
        assert got == want, (
            f"seed {seed}: got {len(got)} datagrams, the model {len(want)}; first "
            f"difference at position {first_difference(got, want)}; {stats.summary()}"
        )
        assert d["lost"] == count - len(set(got)), stats.summary()
    assert runs[5][0] == runs[5][1]
    assert runs[5][0] != runs[6][0]
    got = runs[5][0]
    assert len(set(got)) < count and len(got) > len(set(got)) and got != sorted(got)


# --- (d) delay, the queue bound, control frames -------------------------------------------


def echo_rtts(tx: socket.socket, rx: socket.socket, dst: Any, n: int) -> list[float]:
    """Round trips of `n` datagrams from `tx` to `dst`, echoed back by `rx`; the
    first is left out (it waits for ARP/ND too)."""
    found = []
    for i in range(n):
        t0 = time.monotonic()
        tx.sendto(SEQ.pack(i), dst)
        data, peer = rx.recvfrom(2048)
        rx.sendto(data, peer)
        assert tx.recv(2048) == data
        found.append(time.monotonic() - t0)
    return found[1:]


@V4_V6
def test_delay_adds_the_rtt(topology: Topology, wire: Wire, family: int) -> None:
    tx, rx, dst = udp_pair(topology, family, "c2g")  # client -> gateway, echoed back
    rx.settimeout(2.0)
    wire.start(Impairment(delay=0.02), Impairment(delay=0.03), seed=0)
    tx.settimeout(2.0)
    try:
        rtts = echo_rtts(tx, rx, dst, 21)
    finally:
        stats = wire.stop()
    print(f"\n[delay] RTT min {min(rtts) * 1e3:.1f} ms, median {statistics.median(rtts) * 1e3:.1f}")
    assert min(rtts) >= 0.050
    assert statistics.median(rtts) < 0.050 + 0.020, rtts
    assert stats.c2g["max_queue"] >= 1 and stats.g2c["max_queue"] >= 1


def test_sub_millisecond_delay_is_kept(topology: Topology, wire: Wire) -> None:
    """200 us each way adds 0.4 ms to the RTT, not the 2 ms that epoll's millisecond
    timeout would make of it (relay.lab.impair.FINE_DELAY_BELOW)."""
    tx, rx, dst = udp_pair(topology, socket.AF_INET, "c2g")
    rx.settimeout(2.0)
    tx.settimeout(2.0)

    wire.start(Impairment(), Impairment(), seed=0)
    try:
        plain = echo_rtts(tx, rx, dst, 41)
    finally:
        wire.stop()
    wire.start(Impairment(delay=0.0002), Impairment(delay=0.0002), seed=0)
    try:
        delayed = echo_rtts(tx, rx, dst, 41)
    finally:
        wire.stop()
    added = statistics.median(delayed) - statistics.median(plain)
    print(
        f"\n[delay] 2 x 200 us: RTT median {statistics.median(plain) * 1e6:.0f} -> "
        f"{statistics.median(delayed) * 1e6:.0f} us (+{added * 1e6:.0f})"
    )
    assert min(delayed) >= 0.0004
    assert 0.0003 <= added < 0.0012, (plain, delayed)


def test_delay_queue_is_bounded(topology: Topology, wire: Wire) -> None:
    tx, rx, dst = udp_pair(topology, socket.AF_INET, "c2g")
    wire.start()
    tx.sendto(SEQ.pack(0), dst)  # resolve the neighbour
    assert receive_all(rx, quiet=0.3, limit=3.0) == [0]
    wire.stop()
    wire.start(Impairment(delay=0.5), None, seed=0, max_queue=50)
    try:
        for seq in range(200):  # well within 0.5 s
            tx.sendto(SEQ.pack(seq), dst)
        got = receive_all(rx, quiet=0.8, limit=5.0, expect=50)
    finally:
        stats = wire.stop()
    assert got == list(range(50)), got
    assert sent_datagrams(stats.c2g) == len(got), stats.c2g  # and nothing more is on its way
    assert stats.c2g["queue_drops"] == 150 and stats.c2g["max_queue"] == 50


def _neighbour_states(topo: Topology) -> dict[str, int]:
    ipr = netns.ipr(topo.cli)
    try:
        return {
            n.get_attr("NDA_DST"): n["state"]
            for family in (socket.AF_INET, socket.AF_INET6)
            for n in ipr.get_neighbours(family=family)
        }
    finally:
        ipr.close()


def test_arp_and_nd_pass_at_total_loss(topology: Topology, wire: Wire) -> None:
    nud_resolved = 0x02 | 0x04 | 0x08 | 0x10 | 0x40  # REACHABLE STALE DELAY PROBE NOARP
    wire.start(Impairment(loss=1.0), Impairment(loss=1.0), seed=0)
    try:
        for family in (socket.AF_INET, socket.AF_INET6):
            tx, rx, dst = udp_pair(topology, family, "c2g")
            for _ in range(3):
                tx.sendto(b"lost", dst)
                time.sleep(0.1)
            assert receive_all(rx, quiet=0.3, limit=1.0) == []
        deadline = time.monotonic() + 5.0
        while True:
            states = _neighbour_states(topology)
            ok = all(
                states.get(a, 0) & nud_resolved for a in (topology.gw_cli_v4, topology.gw_cli_v6)
            )
            if ok or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        stats = wire.stop()
    assert ok, f"neighbour states in the client: {states}; {stats.summary()}"
    assert stats.c2g["control"] >= 2 and stats.g2c["control"] >= 2, stats.summary()
    assert stats.c2g["ip"] == stats.c2g["lost"] >= 6, stats.summary()


# --- (e) the nft engine -------------------------------------------------------------------


def test_nft_engine_loss_and_dup(topology: Topology, wire: Wire) -> None:
    count = 2000
    results = {}
    for direction, imp in (("c2g", Impairment(loss=0.2)), ("g2c", Impairment(dup=0.2))):
        tx, rx, dst = udp_pair(topology, socket.AF_INET, direction)
        c2g, g2c = (imp, None) if direction == "c2g" else (None, imp)
        wire.start(c2g, g2c, engine="nft")
        try:
            box = Receiver(rx, quiet=0.8, limit=20.0)
            send_paced(tx, dst, count)
            box.join()
        finally:
            stats = wire.stop()
        results[direction] = (len(box.result), getattr(stats, direction))
    received, counters = results["c2g"]
    assert abs(received - 0.8 * count) < 5 * (count * 0.2 * 0.8) ** 0.5, received
    assert counters["lost"] == count - received, counters
    received, counters = results["g2c"]
    assert abs(received - 1.2 * count) < 5 * (count * 0.2 * 0.8) ** 0.5, received
    assert counters["duplicated"] == received - count, counters


# --- (f) tear-down -------------------------------------------------------------------


def test_teardown_removes_the_wire(netns_root: None) -> None:
    topo = Topology.build()
    try:
        wire = Wire.insert(topo)
        wire.start(Impairment(loss=0.1), Impairment(delay=0.01), seed=3)
        pid = wire.forwarder_pid()
        assert pid is not None
    finally:
        topo.close()
    assert not netns.exists(wire.ns)
    for name in (topo.cli, topo.gw, topo.srv):
        assert not netns.exists(name)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
