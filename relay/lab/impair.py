"""Seeded, per-direction path impairment for the lab: loss, duplication, reordering, delay.

Theory of operation: `Wire.insert(topo)` cuts the client's link of a
`relay.lab.topology.Topology` and puts a fourth namespace, the *wire*, in the middle:

    cli ns                   wire ns (no addresses, IPv6 off)        gw ns
    cli-gw 198.18.1.2 ---- w-cli  ==[forwarder or nft]==  w-gw ---- gw-cli 198.18.1.1
           fd00:1::2                                                       fd00:1::1

The client and gateway keep their interface names, addresses and routes, so
everything that works on a plain lab (kernel forwarding, `tunrelay run`)
works on a wired one; every frame between them now crosses the wire. The wire
moves nothing until `Wire.start()` starts an engine, and `Wire.stop()` stops
it again (and returns its counters), so one lab can carry a kernel-forwarding
baseline and a relay run with the same impairment, one after the other.

Two engines:

``forwarder`` (the default; loss, dup, reorder, delay)
    `python -m relay.lab.impair forward ...` in the wire namespace: one AF_PACKET
    socket per veth, one thread, epoll; frames are read with `recv_into` in
    batches and written out of the other veth. Each direction has its own
    `Fates`, a `random.Random` seeded from (seed, direction), which draws
    exactly three numbers per IP frame (loss, dup, hold), so the fate of the
    n-th IP frame in a direction is a pure function of (seed, direction, n):
    repeatable. A held frame is sent right after the next `reorder_gap` frames
    of its direction have been sent, or after `reorder_timeout` if fewer come.
    Delay is constant per direction, so the delay queue is a FIFO of
    (release time, frame) (a heap would order it the same way); it is bounded
    by `max_queue` frames and a frame that finds it full is dropped and
    counted (``queue_drops``). epoll's timeout has millisecond resolution, so
    while a direction's delay is under `FINE_DELAY_BELOW` the loop waits for
    a release less than a millisecond away by polling without a timeout and
    sleeping at most `FINE_SLICE` (timer slack set to 1 us): a 100 us delay
    is then 100-150 us, not 1 ms.

``nft`` (loss and dup only; a kernel-speed fast path)
    A netdev table in the wire namespace: ingress on each veth, `numgen
    random mod 1000000 < N drop`, `numgen random ... dup to`, then `fwd to`
    the other veth. No userspace hop, so no capacity limit, but not
    repeatable: the kernel's numgen cannot be seeded. Delay and reordering
    raise ValueError.

Not impaired in either engine, and never delayed: non-IP frames (ARP), ICMPv6
neighbour discovery (types 133-137), and IPv6 packets with a hop-by-hop
header (MLD). So address resolution always works and the frame count the
fates are drawn for is only the traffic under test.

What is and is not repeatable: with the forwarder and one seed, the fate of
the n-th IP frame of a direction is always the same (`Fates` predicts it), and
a paced UDP test sees exactly the same losses, duplicates and order on every
run. A TCP transfer is not bit-for-bit repeatable even so: which frame is the
n-th depends on the endpoints' timing (ACK coalescing, retransmission
timers), and frames the kernel drops before the forwarder reads them (a full
socket buffer: ``kernel_drops``) are outside the harness's control; both
are reported in the counters. The nft engine repeats nothing.

Checksums and offloads: the veths leading into the wire (cli-gw, gw-cli) get
TX checksumming, TSO, GSO and GRO turned off, so every frame on the wire is a
complete, MTU-sized frame with a correct checksum: the forwarder's frames
reach the far side as fresh packets, and loss applies to wire packets, not to
64 KB super-segments.

Stopping: SIGTERM (`Wire.stop()`) ends the forwarder at once only while it
waits in epoll (or sleeps for a sub-millisecond release); anywhere else it
first finishes that pass of its loop, so its counters (``sent`` above all)
count every frame it sent, and a test may stop it as soon as the frames it
expects have arrived and then check that nothing more was sent.

Bounds: the forwarder exits by itself after ``max_seconds`` (default 1800);
the wire's namespace and processes are removed when the topology is closed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import math
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from relay.host import netns
from relay.lab.topology import add_address, stop_process, wait_link_local

__all__ = [
    "CLEAN",
    "DUP",
    "HELD",
    "LOST",
    "Fates",
    "Impairment",
    "Wire",
    "WireStats",
    "main",
]

WIRE_A = "w-cli"  # wire end facing the client
WIRE_B = "w-gw"  # wire end facing the gateway
DIRECTIONS = ("c2g", "g2c")  # c2g: read on WIRE_A, sent out of WIRE_B
READY = "ready"
NFT_TABLE = "tr_impair"

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_QDISC_BYPASS = 20
PACKET_IGNORE_OUTGOING = 23
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32
SOCKET_BUFFER = 8 << 20

# Fates (bit flags).
CLEAN, LOST, DUP, HELD = 0, 1, 2, 4

# ICMPv6 neighbour discovery: router/neighbour solicitation/advertisement, redirect.
_ND_TYPES = frozenset(range(133, 138))

# ethtool ioctls (linux/ethtool.h, linux/sockios.h).
SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM = 0x16, 0x17
ETHTOOL_GTSO, ETHTOOL_STSO = 0x1E, 0x1F
ETHTOOL_GGSO, ETHTOOL_SGSO = 0x23, 0x24
ETHTOOL_GGRO, ETHTOOL_SGRO = 0x2B, 0x2C


# --- what to do to a direction -----------------------------------------------------------


@dataclass(frozen=True)
class Impairment:
    """What happens to the IP frames of one direction.

    Args:
        loss: probability that a frame is dropped.
        dup: probability that a (not dropped) frame is sent twice.
        reorder: probability that a (not dropped) frame is held back ...
        reorder_gap: ... until this many later frames of its direction have gone out,
        reorder_timeout: ... or this many seconds have passed, whichever is first.
        delay: one-way delay, seconds (add it to both directions for an RTT).
    """

    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    reorder_gap: int = 3
    reorder_timeout: float = 0.01
    delay: float = 0.0

    def __post_init__(self) -> None:
        for name in ("loss", "dup", "reorder"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability, not {p!r}")
        if not 1 <= self.reorder_gap <= 1000:
            raise ValueError(f"reorder_gap must be 1..1000, not {self.reorder_gap!r}")
        if not 0.0 < self.reorder_timeout <= 10.0:
            raise ValueError(f"reorder_timeout must be in (0, 10] s, not {self.reorder_timeout!r}")
        if not 0.0 <= self.delay <= 5.0:
            raise ValueError(f"delay must be 0..5 s, not {self.delay!r}")

    @property
    def active(self) -> bool:
        """True if this changes anything."""
        return bool(self.loss or self.dup or self.reorder or self.delay)

    def with_delay(self, delay: float) -> Impairment:
        """The same with `delay` seconds of one-way delay."""
        return Impairment(**{**asdict(self), "delay": delay})

    def spec(self) -> str:
        """``loss=0.01,dup=0,...``: the form `parse` and the forwarder's CLI take."""
        return ",".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))

    @classmethod
    def parse(cls, spec: str) -> Impairment:
        """Parse ``key=value,...`` (keys are the field names; missing ones default)."""
        kwargs: dict[str, Any] = {}
        types = {f.name: f.type for f in fields(cls)}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in types:
                raise ValueError(f"bad impairment item {item!r} (keys: {', '.join(types)})")
            kwargs[key] = int(value) if types[key] in ("int", int) else float(value)
        return cls(**kwargs)

    def describe(self) -> str:
        """Short human form, e.g. ``1% loss, 5% held behind 3, 25 ms delay``."""
        parts = []
        if self.loss:
            parts.append(f"{_pct(self.loss)} loss")
        if self.dup:
            parts.append(f"{_pct(self.dup)} dup")
        if self.reorder:
            parts.append(f"{_pct(self.reorder)} held behind {self.reorder_gap}")
        if self.delay:
            parts.append(f"{self.delay * 1000:g} ms delay")
        return ", ".join(parts) or "none"


def _pct(p: float) -> str:
    return f"{p * 100:g}%"


class Fates:
    """The decisions for one direction: a pure function of (seed, direction, frame number).

    Every call of `next()` draws exactly three numbers (loss, dup, hold), so the
    fate of the n-th frame does not depend on the fates before it.
    """

    def __init__(self, impairment: Impairment, seed: int, direction: str) -> None:
        self.impairment = impairment
        self._random = random.Random(f"tunrelay.impair/{seed}/{direction}").random

    def next(self) -> int:
        """The fate of the next frame: `CLEAN`, `LOST`, or `DUP` and/or `HELD`."""
        r = self._random
        u_loss, u_dup, u_hold = r(), r(), r()
        imp = self.impairment
        if u_loss < imp.loss:
            return LOST
        return (DUP if u_dup < imp.dup else 0) | (HELD if u_hold < imp.reorder else 0)

    def take(self, n: int) -> list[int]:
        """The next `n` fates."""
        return [self.next() for _ in range(n)]


# --- the forwarder (runs in the wire namespace) ---------------------------------------------


def is_control(frame: memoryview | bytes, n: int) -> bool:
    """True for frames that pass unimpaired: non-IP, ICMPv6 ND, IPv6 hop-by-hop (MLD)."""
    if n < 34:
        return True
    hi, lo = frame[12], frame[13]
    if hi == 0x08 and lo == 0x00:
        return False
    if hi == 0x86 and lo == 0xDD and n >= 54:
        nxt = frame[20]
        if nxt == 0:
            return True
        return nxt == 58 and n >= 55 and frame[54] in _ND_TYPES
    return True


@dataclass
class _Held:
    frame: bytes
    copies: int
    remaining: int  # frames still to go out before this one
    deadline: float


class _Direction:
    """One direction of the forwarder: read from `rx`, impair, write to `tx`."""

    def __init__(
        self,
        name: str,
        rx: socket.socket,
        tx: socket.socket,
        impairment: Impairment,
        seed: int,
        max_queue: int,
    ) -> None:
        self.name = name
        self.rx, self.tx = rx, tx
        self.imp = impairment
        self.fates = Fates(impairment, seed, name)
        self.max_queue = max_queue
        self.queue: deque[tuple[float, bytes]] = deque()
        self.held: list[_Held] = []
        self.c: dict[str, int] = dict.fromkeys(
            (
                "frames", "bytes", "control", "ip", "lost", "duplicated", "held",
                "held_timeouts", "queue_drops", "max_queue", "sent", "send_errors",
            ),
            0,
        )  # fmt: skip
        self.passthrough = not impairment.active

    # input

    def drain(self, buf: bytearray, view: memoryview, budget: int, now: float) -> int:
        """Read and handle up to `budget` frames; how many were read."""
        recv_into = self.rx.recv_into
        c = self.c
        for i in range(budget):
            try:
                n = recv_into(buf)
            except BlockingIOError:
                return i
            c["frames"] += 1
            c["bytes"] += n
            if self.passthrough:
                self._send(view[:n])
            elif is_control(view, n):
                c["control"] += 1
                self._send(view[:n])
            else:
                c["ip"] += 1
                self._impair(view, n, now)
        return budget

    def _impair(self, view: memoryview, n: int, now: float) -> None:
        fate = self.fates.next()
        c = self.c
        if fate & LOST:
            c["lost"] += 1
            return
        copies = 1
        if fate & DUP:
            c["duplicated"] += 1
            copies = 2
        if fate & HELD:
            c["held"] += 1
            self.held.append(
                _Held(bytes(view[:n]), copies, self.imp.reorder_gap, now + self.imp.reorder_timeout)
            )
            return
        self._emit(view[:n], copies, now)
        self._count_down(now)

    def _count_down(self, now: float) -> None:
        """One frame went out: release the held frames it was the last one owed to."""
        if not self.held:
            return
        keep: list[_Held] = []
        release: list[_Held] = []
        for h in self.held:
            h.remaining -= 1
            (release if h.remaining <= 0 else keep).append(h)
        self.held = keep
        for h in release:
            self._emit(h.frame, h.copies, now)

    def _emit(self, frame: memoryview | bytes, copies: int, now: float) -> None:
        if not self.imp.delay and not self.queue:
            for _ in range(copies):
                self._send(frame)
            return
        due = now + self.imp.delay
        if self.queue and self.queue[-1][0] > due:
            due = self.queue[-1][0]  # never overtake (a held frame leaves after its releaser)
        data = frame if isinstance(frame, bytes) else bytes(frame)
        for _ in range(copies):
            if len(self.queue) >= self.max_queue:
                self.c["queue_drops"] += 1
                continue
            self.queue.append((due, data))
        if len(self.queue) > self.c["max_queue"]:
            self.c["max_queue"] = len(self.queue)

    def _send(self, frame: memoryview | bytes) -> None:
        try:
            self.tx.send(frame)
            self.c["sent"] += 1
        except OSError:  # ENOBUFS, EAGAIN, EMSGSIZE: the frame is lost, and counted
            self.c["send_errors"] += 1

    # time

    def flush(self, now: float) -> None:
        """Release held frames whose time is up and send queued frames that are due."""
        if self.held:
            late = [h for h in self.held if h.deadline <= now]
            if late:
                self.held = [h for h in self.held if h.deadline > now]
                for h in late:
                    self.c["held_timeouts"] += 1
                    self._emit(h.frame, h.copies, now)
        q = self.queue
        while q and q[0][0] <= now:
            self._send(q.popleft()[1])

    def next_deadline(self) -> float:
        t = math.inf
        if self.queue:
            t = self.queue[0][0]
        for h in self.held:
            t = min(t, h.deadline)
        return t

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.c)
        out["queued_at_exit"] = len(self.queue)
        out["held_at_exit"] = len(self.held)
        out["kernel_drops"] = _packet_drops(self.rx)
        out["impairment"] = asdict(self.imp)
        return out


def _packet_drops(sock: socket.socket) -> int:
    """Frames the kernel dropped because the AF_PACKET socket's buffer was full."""
    with contextlib.suppress(OSError):
        _packets, drops = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        return int(drops)
    return -1


def _packet_socket(ifname: str) -> socket.socket:
    # Protocol 0 until bound: an unbound ETH_P_ALL socket would see every interface.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        for opt in (SO_RCVBUFFORCE, SO_SNDBUFFORCE):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        sock.bind((ifname, ETH_P_ALL))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _Stop(Exception):
    pass


# Sub-millisecond delays (see the module docstring): below this one-way delay the
# loop waits for a release less than a millisecond away in slices of FINE_SLICE.
FINE_DELAY_BELOW = 0.002
FINE_SLICE = 50e-6
_EPOLL_RESOLUTION = 0.001
_PR_SET_TIMERSLACK = 29


def _fine_timer_slack() -> None:
    """Let sleeps of tens of microseconds end on time (the default slack is 50 us)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)  # nanoseconds


def forward(
    a_if: str,
    b_if: str,
    c2g: Impairment,
    g2c: Impairment,
    *,
    seed: int,
    stats_path: Path | None,
    max_seconds: float,
    max_queue: int = 10_000,
    budget: int = 256,
) -> dict[str, Any]:
    """Forward frames between `a_if` and `b_if` until SIGTERM/SIGINT or `max_seconds`.

    Prints ``ready`` on stdout once both sockets are bound; returns (and writes
    to `stats_path`, as JSON) the counters.
    """
    a, b = _packet_socket(a_if), _packet_socket(b_if)
    dirs = {
        a.fileno(): _Direction("c2g", a, b, c2g, seed, max_queue),
        b.fileno(): _Direction("g2c", b, a, g2c, seed, max_queue),
    }
    ep = select.epoll()
    for fd in dirs:
        ep.register(fd, select.EPOLLIN)
    buf = bytearray(65536)
    view = memoryview(buf)
    started = time.monotonic()
    end = started + max_seconds
    reason = "max_seconds"

    # A signal ends the loop at once only while it waits in poll; elsewhere it is kept
    # for the top of the loop, so a frame that was sent is always counted as sent.
    polling = [False]
    stop: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop.append(signal.Signals(signum).name)
        if polling[0]:
            raise _Stop(stop[0])

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    print(READY, flush=True)
    try:
        monotonic = time.monotonic
        both = list(dirs.values())
        fine = any(0.0 < d.imp.delay < FINE_DELAY_BELOW for d in both)
        if fine:
            _fine_timer_slack()
        while True:
            now = monotonic()
            if now >= end:
                break
            wake = min(min(d.next_deadline() for d in both), end)
            timeout = max(0.0, wake - now) if wake < math.inf else 1.0
            polling[0] = True
            if stop:
                raise _Stop(stop[0])
            if fine and 0.0 < timeout < _EPOLL_RESOLUTION:
                events = ep.poll(0, 8)
                if not events:
                    time.sleep(min(timeout, FINE_SLICE))  # a signal may end it, as a poll
                    polling[0] = False
                    continue
            else:
                events = ep.poll(min(timeout, 1.0), 8)
            polling[0] = False
            for fd, _ev in events:
                dirs[fd].drain(buf, view, budget, monotonic())
            now = monotonic()
            for d in both:
                if d.queue or d.held:
                    d.flush(now)
    except _Stop as exc:
        reason = str(exc)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    stats = {
        "engine": "forwarder",
        "seed": seed,
        "seconds": time.monotonic() - started,
        "exit": reason,
        **{d.name: d.stats() for d in dirs.values()},
    }
    ep.close()
    a.close()
    b.close()
    if stats_path is not None:
        tmp = stats_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats))
        tmp.replace(stats_path)
    return stats


# --- ethtool ---------------------------------------------------------------------------


def _ethtool(sock: socket.socket, ifname: str, cmd: int, data: int = 0) -> int:
    value = ctypes.create_string_buffer(struct.pack("II", cmd, data), 8)
    ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(value)).ljust(40, b"\0")
    fcntl.ioctl(sock.fileno(), SIOCETHTOOL, ifreq)
    return int(struct.unpack("II", value.raw)[1])


def disable_offloads(ifname: str) -> dict[str, int]:
    """Turn off TX checksumming, TSO, GSO and GRO on `ifname` (current thread's namespace).

    Returns what each reads back as (all 0 when it worked).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for set_cmd in (ETHTOOL_SGRO, ETHTOOL_SGSO, ETHTOOL_STSO, ETHTOOL_STXCSUM):
            _ethtool(sock, ifname, set_cmd, 0)
        return {
            name: _ethtool(sock, ifname, get_cmd)
            for name, get_cmd in (
                ("tx-checksumming", ETHTOOL_GTXCSUM),
                ("tso", ETHTOOL_GTSO),
                ("gso", ETHTOOL_GGSO),
                ("gro", ETHTOOL_GGRO),
            )
        }


# --- nft engine -------------------------------------------------------------------------


def nft_ruleset(c2g: Impairment, g2c: Impairment, table: str = NFT_TABLE) -> str:
    """The netdev table for the nft engine (loss and dup only)."""
    for imp in (c2g, g2c):
        if imp.reorder or imp.delay:
            raise ValueError("the nft engine does loss and dup only; use the forwarder")
    lines = [f"table netdev {table} {{"]
    for name, rx, tx, imp in (("c2g", WIRE_A, WIRE_B, c2g), ("g2c", WIRE_B, WIRE_A, g2c)):
        lines += [
            f"  chain {name} {{",
            f'    type filter hook ingress device "{rx}" priority 0; policy accept;',
            f'    meta protocol != {{ ip, ip6 }} counter fwd to "{tx}"',
            f'    meta protocol ip6 ip6 nexthdr 0 counter fwd to "{tx}"',
            "    meta protocol ip6 ip6 nexthdr ipv6-icmp icmpv6 type { nd-router-solicit,"
            " nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect }"
            f' counter fwd to "{tx}"',
        ]
        if imp.loss:
            lines.append(f"    numgen random mod 1000000 < {round(imp.loss * 1e6)} counter drop")
        if imp.dup:
            lines.append(
                f'    numgen random mod 1000000 < {round(imp.dup * 1e6)} counter dup to "{tx}"'
            )
        lines += [f'    counter fwd to "{tx}"', "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _nft_stats(listing: dict[str, Any]) -> dict[str, Any]:
    """Per-direction counters from ``nft -j list table``: control, lost, duplicated, sent."""
    out: dict[str, dict[str, int]] = {d: {} for d in DIRECTIONS}
    for item in listing.get("nftables", []):
        rule = item.get("rule")
        if not rule or rule.get("chain") not in out:
            continue
        expr = rule.get("expr", [])
        packets = next((e["counter"]["packets"] for e in expr if "counter" in e), 0)
        text = json.dumps(expr)
        if '"drop"' in text:
            key = "lost"
        elif '"dup"' in text:
            key = "duplicated"
        elif '"numgen"' not in text and ('"meta"' in text or '"payload"' in text):
            key = "control"
        else:
            key = "forwarded_ip"
        d = out[rule["chain"]]
        d[key] = d.get(key, 0) + int(packets)
    return {"engine": "nft", **out}


# --- the wire -------------------------------------------------------------------------------


@dataclass
class WireStats:
    """What one `Wire.start()` .. `stop()` did (`raw` holds every counter)."""

    engine: str
    seed: int | None
    c2g: dict[str, Any]
    g2c: dict[str, Any]
    cpu_seconds: float | None = None
    seconds: float = 0.0
    raw: dict[str, Any] = field(default_factory=dict)

    def uncontrolled_drops(self) -> int:
        """Frames lost outside the impairment model (full buffers, full queue, send errors)."""
        total = 0
        for d in (self.c2g, self.g2c):
            total += max(0, d.get("kernel_drops", 0)) + d.get("queue_drops", 0)
            total += d.get("send_errors", 0)
        return total

    def summary(self) -> str:
        parts = []
        for name in DIRECTIONS:
            d = getattr(self, name)
            keys = ("ip", "lost", "duplicated", "held", "held_timeouts", "control")
            items = [f"{k} {d[k]}" for k in keys if d.get(k)]
            extra = [
                f"{k} {d[k]}"
                for k in ("kernel_drops", "queue_drops", "send_errors", "max_queue")
                if d.get(k, 0) > 0
            ]
            parts.append(f"{name}: " + ", ".join(items + extra))
        cpu = f", forwarder CPU {self.cpu_seconds:.1f} s" if self.cpu_seconds is not None else ""
        return f"[wire {self.engine} seed={self.seed}] " + "; ".join(parts) + cpu


class Wire:
    """A wire namespace between a topology's client and gateway. Use `Wire.insert`."""

    def __init__(self, topo: Any) -> None:
        self.topo = topo
        self.ns = f"{topo.base}-wire"
        self._proc: subprocess.Popen[bytes] | None = None
        self._engine: str | None = None
        self._seed: int | None = None
        self._started = 0.0
        self._runs = 0
        self._tmp = Path(tempfile.mkdtemp(prefix="tr-wire-"))
        self._stats_path: Path | None = None
        self._closed = False
        self.offloads: dict[str, dict[str, int]] = {}

    # --- set-up ---

    @classmethod
    def insert(cls, topo: Any) -> Wire:
        """Put a wire namespace on the client's link of `topo` (a `relay.lab.topology.Topology`).

        Call it before starting anything in the lab (the relay, servers): the
        client's link is replaced, so a relay started earlier would see its
        gateway's links change under it. The wire is torn down with the
        topology (or by `close()`).
        """
        wire = cls(topo)
        topo.defer(wire.close)
        wire._build()
        return wire

    def _build(self) -> None:
        topo = self.topo
        netns.create(self.ns)
        with netns.entered(self.ns):
            for conf in ("all", "default"):
                with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
                    f.write("1")
        gw = netns.ipr(topo.gw)
        try:
            for index in gw.link_lookup(ifname=topo.gw_cli_if):
                gw.link("del", index=index)  # and its peer, the client's cli-gw
        finally:
            gw.close()
        wire = netns.ipr(self.ns)
        try:
            for local, peer, peer_ns in (
                (WIRE_A, topo.cli_if, topo.cli),
                (WIRE_B, topo.gw_cli_if, topo.gw),
            ):
                fd = netns.open_fd(peer_ns)
                try:
                    wire.link(
                        "add", ifname=local, kind="veth", peer={"ifname": peer, "net_ns_fd": fd}
                    )
                finally:
                    os.close(fd)
            for ifname in (WIRE_A, WIRE_B):
                with netns.entered(self.ns):
                    self.offloads[ifname] = disable_offloads(ifname)
                wire.link("set", index=wire.link_lookup(ifname=ifname)[0], state="up")
        finally:
            wire.close()
        plan = {
            topo.cli: (topo.cli_if, [f"{topo.cli_v4}/24", f"{topo.cli_v6}/64"]),
            topo.gw: (topo.gw_cli_if, [f"{topo.gw_cli_v4}/24", f"{topo.gw_cli_v6}/64"]),
        }
        for name, (ifname, cidrs) in plan.items():
            with netns.entered(name):
                self.offloads[ifname] = disable_offloads(ifname)
            ipr = netns.ipr(name)
            try:
                index = ipr.link_lookup(ifname=ifname)[0]
                for cidr in cidrs:
                    add_address(ipr, index, cidr)
                ipr.link("set", index=index, state="up")
                wait_link_local(ipr, index)
                if name == topo.cli:
                    ipr.route("add", dst="0.0.0.0", dst_len=0, gateway=topo.gw_cli_v4)
                    ipr.route(
                        "add", dst="::", dst_len=0, gateway=topo.gw_cli_v6, family=socket.AF_INET6
                    )
            finally:
                ipr.close()
        bad = {i: o for i, o in self.offloads.items() if any(o.values())}
        if bad:
            raise RuntimeError(f"could not turn offloads off: {bad}")

    # --- engines ---

    @property
    def running(self) -> str | None:
        """The engine now running, or None."""
        return self._engine

    def start(
        self,
        c2g: Impairment | None = None,
        g2c: Impairment | None = None,
        *,
        seed: int = 0,
        engine: str = "forwarder",
        max_seconds: float = 1800.0,
        max_queue: int = 10_000,
    ) -> None:
        """Start moving frames, impaired as given (None: unimpaired).

        Raises:
            ValueError: the nft engine was asked for delay or reordering.
            RuntimeError: an engine is already running, or the forwarder did not start.
        """
        if self._engine is not None:
            raise RuntimeError(f"the {self._engine} engine is already running")
        c2g, g2c = c2g or Impairment(), g2c or Impairment()
        self._runs += 1
        self._seed = seed if engine == "forwarder" else None
        if engine == "forwarder":
            self._stats_path = self._tmp / f"stats{self._runs}.json"
            argv = [
                sys.executable, "-m", "relay.lab.impair", "forward",
                "--a", WIRE_A, "--b", WIRE_B, "--c2g", c2g.spec(), "--g2c", g2c.spec(),
                "--seed", str(seed), "--stats", str(self._stats_path),
                "--max-seconds", f"{max_seconds:g}", "--max-queue", str(max_queue),
            ]  # fmt: skip
            err = open(self._tmp / f"forwarder{self._runs}.err", "wb")  # noqa: SIM115
            try:
                proc = self.topo.spawn(self.ns, argv, stdout=subprocess.PIPE, stderr=err)
            finally:
                err.close()
            self._proc = proc
            self._engine = engine
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 20.0)
            line = proc.stdout.readline().decode(errors="replace").strip() if ready else ""
            if line != READY:
                self.stop()
                raise RuntimeError(
                    f"the forwarder did not start (said {line!r}): {self.forwarder_stderr()}"
                )
        elif engine == "nft":
            self._nft(["-f", "-"], nft_ruleset(c2g, g2c))
            self._engine = engine
        else:
            raise ValueError(f"unknown engine {engine!r}: forwarder or nft")
        self._started = time.monotonic()

    def stop(self) -> WireStats:
        """Stop the engine (the wire then moves nothing); its counters."""
        engine, self._engine = self._engine, None
        seconds = time.monotonic() - self._started
        if engine == "nft":
            listing = json.loads(self._nft(["-j", "list", "table", "netdev", NFT_TABLE]))
            self._nft(["delete", "table", "netdev", NFT_TABLE])
            raw = _nft_stats(listing)
            return WireStats("nft", None, raw["c2g"], raw["g2c"], None, seconds, raw)
        proc, self._proc = self._proc, None
        if engine is None or proc is None:
            raise RuntimeError("no engine is running")
        cpu = _cpu_seconds(proc.pid)
        stop_process(proc)
        if proc.stdout is not None:
            proc.stdout.close()
        path = self._stats_path
        if path is None or not path.exists():
            raise RuntimeError(
                f"the forwarder (exit {proc.returncode}) left no counters: "
                f"{self.forwarder_stderr()}"
            )
        raw = json.loads(path.read_text())
        return WireStats("forwarder", raw["seed"], raw["c2g"], raw["g2c"], cpu, seconds, raw)

    @contextlib.contextmanager
    def impaired(
        self, c2g: Impairment | None = None, g2c: Impairment | None = None, **kw: Any
    ) -> Iterator[list[WireStats]]:
        """``with wire.impaired(c2g, g2c, seed=1) as out:`` ... then ``out[0]`` is the stats."""
        out: list[WireStats] = []
        self.start(c2g, g2c, **kw)
        try:
            yield out
        finally:
            out.append(self.stop())

    def forwarder_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def forwarder_stderr(self) -> str:
        path = self._tmp / f"forwarder{self._runs}.err"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def link_stats(self) -> dict[str, dict[str, int]]:
        """rx/tx packets and drops of the wire's two veths (kernel counters)."""
        ipr = netns.ipr(self.ns)
        try:
            out = {}
            for ifname in (WIRE_A, WIRE_B):
                (link,) = ipr.link("get", ifname=ifname)
                s = link.get_attr("IFLA_STATS64")
                out[ifname] = {
                    k: int(s[k]) for k in ("rx_packets", "tx_packets", "rx_dropped", "tx_dropped")
                }
            return out
        finally:
            ipr.close()

    def _nft(self, args: Sequence[str], stdin: str | None = None) -> str:
        cmd = [sys.executable, "-m", "relay.lab.nsexec", self.ns, "--", "nft", *args]
        done = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, timeout=20, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"nft {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    # --- tear-down ---

    def close(self) -> None:
        """Stop the engine and remove the wire namespace; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._engine is not None:
            with contextlib.suppress(Exception):
                self.stop()
        netns.remove(self.ns, missing_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    fields_ = data[data.rindex(")") + 2 :].split()
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


# --- CLI --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m relay.lab.impair forward ...`` (run it inside the wire namespace)."""
    parser = argparse.ArgumentParser(prog="python -m relay.lab.impair")
    sub = parser.add_subparsers(dest="command", required=True)
    fw = sub.add_parser("forward", help="the userspace forwarder between two interfaces")
    fw.add_argument("--a", default=WIRE_A, help="the client-side interface")
    fw.add_argument("--b", default=WIRE_B, help="the gateway-side interface")
    fw.add_argument("--c2g", default="", help="impairment a->b, e.g. loss=0.01,delay=0.025")
    fw.add_argument("--g2c", default="", help="impairment b->a")
    fw.add_argument("--seed", type=int, default=0)
    fw.add_argument("--stats", type=Path, help="write the counters here (JSON) at exit")
    fw.add_argument("--max-seconds", type=float, default=1800.0)
    fw.add_argument("--max-queue", type=int, default=10_000, help="delay queue bound, frames")
    args = parser.parse_args(argv)
    stats = forward(
        args.a,
        args.b,
        Impairment.parse(args.c2g),
        Impairment.parse(args.g2c),
        seed=args.seed,
        stats_path=args.stats,
        max_seconds=args.max_seconds,
        max_queue=args.max_queue,
    )
    if args.stats is None:
        print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
