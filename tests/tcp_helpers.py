"""Packet-level test helpers for ``stack.tcp.connection`` (smoltcp's scheme).

Builders put a ``TcpConnection`` in a known state by driving the real API (so
a builder can never produce a state the code cannot reach), drain whatever the
handshake produced, and hand the connection back quiet at ``now == 0.0``.

Two templates name the usual segments:

* ``TEMPLATE``: what the test (the peer) sends to the connection,
  ``seq=IRS+1, ack=ISS+1, ACK, window=PEER_WINDOW``;
* ``REPLY``: what the connection sends back,
  ``seq=ISS+1, ack=IRS+1, ACK, window=WINDOW``.

Builders take ``options=`` for the peer's SYN (``ALL_OPTIONS``: window scale,
SACK-permitted and timestamps, like Linux); without it the peer offers only
an MSS and nothing else is negotiated.

Tests ``replace(...)`` the fields that differ. ``send``/``recv``/``recv_nothing``
take explicit time. ``ConnectionPair`` joins two connections by a ``LossyLink``
driven by a seeded ``random.Random``.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from stack.config import TcpConfig
from stack.events import Event, FlowId
from stack.tcp.connection import State, TcpConnection
from stack.tcp.segment import TcpSegment
from stack.wire.tcp import ACK, FIN, NO_OPTIONS, PSH, RST, SYN, TcpOptions

__all__ = [
    "ACK",
    "ALL_OPTIONS",
    "FIN",
    "FLOW",
    "IRS",
    "ISS",
    "LPORT",
    "PEER_TS",
    "PEER_WINDOW",
    "PSH",
    "REPLY",
    "RPORT",
    "RST",
    "SYN",
    "TEMPLATE",
    "WINDOW",
    "ConnectionPair",
    "LossyLink",
    "close_wait",
    "closing",
    "deadline",
    "drain",
    "established",
    "fin_wait_1",
    "fin_wait_2",
    "last_ack",
    "listen",
    "recv",
    "recv_nothing",
    "send",
    "syn_received",
    "syn_sent",
    "time_wait",
]

LPORT = 80  # the connection's port (the original destination)
RPORT = 49152  # the peer's port
ISS = 10_000  # our initial send sequence number
IRS = 50_000  # the peer's initial sequence number
WINDOW = 65535  # what a fresh connection with the default TcpConfig advertises
PEER_WINDOW = 65535  # what the builders' peer advertises
FLOW = FlowId(0, "", RPORT, "", LPORT)  # the flow of a connection built without one

TEMPLATE = TcpSegment(
    src_port=RPORT, dst_port=LPORT, seq=IRS + 1, ack=ISS + 1, flags=ACK, window=PEER_WINDOW
)
REPLY = TcpSegment(
    src_port=LPORT, dst_port=RPORT, seq=ISS + 1, ack=IRS + 1, flags=ACK, window=WINDOW
)

M = 0xFFFFFFFF


def send(conn: TcpConnection, seg: TcpSegment, now: float) -> None:
    """Deliver ``seg`` from the peer at ``now``."""
    conn.receive_segment(seg, now)


def recv(conn: TcpConnection, now: float) -> list[TcpSegment]:
    """Everything the connection transmits at ``now`` (timers are not run)."""
    return conn.segments_to_send(now)


def recv_nothing(conn: TcpConnection, now: float) -> None:
    out = conn.segments_to_send(now)
    assert out == [], f"expected silence at {now}, got {out}"


def deadline(conn: TcpConnection) -> float:
    """``conn.get_timer()``, which must be set."""
    t = conn.get_timer()
    assert t is not None, "no timer is running"
    return t


def drain(conn: TcpConnection) -> list[Event]:
    """Pop every pending event."""
    events: list[Event] = []
    while (ev := conn.next_event()) is not None:
        events.append(ev)
    return events


# Builders default to a 2 s TIME-WAIT (the stack's default is Linux's 60 s) so
# timing assertions stay short and readable.
DEFAULT_CONFIG = TcpConfig(time_wait=2.0)


def _conn(config: TcpConfig | None, tlp: bool = False) -> TcpConnection:
    # Packet-level tests use a few-byte MSS to keep segment counts small, so the
    # builders lift the MSS floor (test_tcp_segment_size covers the floor). They
    # also leave out the tail loss probe unless asked (``tlp=True``), so that
    # timer tests see the RTO they are about.
    cfg = config or DEFAULT_CONFIG
    cfg = replace(cfg, min_snd_mss=1, tail_loss_probe=tlp and cfg.tail_loss_probe)
    return TcpConnection(local_port=LPORT, remote_port=RPORT, config=cfg)


def _syn(irs: int, window: int, mss: int | None, options: TcpOptions | None) -> TcpSegment:
    if options is None:
        opts = NO_OPTIONS if mss is None else TcpOptions(mss=mss)
    else:
        opts = options._replace(mss=mss)
    return TcpSegment(RPORT, LPORT, irs, 0, SYN, window, b"", opts)


PEER_TS = 5000  # the TSval the builders' peer puts in its SYN and handshake ACK
# What a peer like Linux offers: SACK, timestamps and a window-scale shift.
ALL_OPTIONS = TcpOptions(wscale=7, sack_permitted=True, timestamps=(PEER_TS, 0))


# --------------------------------------------------------------------- builders
#
# Every builder finishes at now == 0.0 and leaves nothing to send and no events.
# ``rtt=None`` (the default) completes the handshake through one SYN-ACK
# retransmission, so by Karn's rule there is no RTT sample and the RTO is
# ``config.rto_initial``; ``rtt=x`` gives exactly one sample of ``x`` seconds.


def listen(
    *,
    irs: int = IRS,
    window: int = PEER_WINDOW,
    mss: int | None = 1460,
    config: TcpConfig | None = None,
    options: TcpOptions | None = None,
    tlp: bool = False,
) -> TcpConnection:
    """A connection that has recorded the peer's SYN and awaits accept()/reject().

    ``options``: the SYN's options besides the MSS (e.g. ``ALL_OPTIONS``).
    """
    c = _conn(config, tlp)
    c.listen(_syn(irs, window, mss, options))
    assert c.state is State.LISTEN
    return c


def syn_received(
    *,
    iss: int = ISS,
    irs: int = IRS,
    window: int = PEER_WINDOW,
    mss: int | None = 1460,
    config: TcpConfig | None = None,
    now: float = 0.0,
    options: TcpOptions | None = None,
) -> TcpConnection:
    """Accepted at ``now``; the SYN-ACK has been sent (and taken)."""
    c = listen(irs=irs, window=window, mss=mss, config=config, options=options)
    c.accept(isn=iss)
    out = recv(c, now)
    assert [s.flags for s in out] == [SYN | ACK], out
    assert c.state is State.SYN_RECEIVED
    return c


def established(
    *,
    iss: int = ISS,
    irs: int = IRS,
    window: int = PEER_WINDOW,
    mss: int | None = 1460,
    config: TcpConfig | None = None,
    rtt: float | None = None,
    options: TcpOptions | None = None,
    tlp: bool = False,
) -> TcpConnection:
    """A passive-open connection in ESTABLISHED at now == 0.0 (see above for ``rtt``).

    With ``options`` carrying timestamps, the handshake ACK has TSval ``PEER_TS``
    and echoes the SYN-ACK's TSval (``rtt=x``) or 0, which gives no sample.
    """
    cfg = config or DEFAULT_CONFIG
    c = listen(irs=irs, window=window, mss=mss, config=cfg, options=options, tlp=tlp)
    c.accept(isn=iss)
    if rtt is None:
        t0 = -2 * cfg.rto_initial
        assert [s.flags for s in recv(c, t0)] == [SYN | ACK]
        deadline = c.get_timer()
        assert deadline is not None
        c.handle_timer(deadline)
        (synack,) = recv(c, deadline)
    else:
        (synack,) = recv(c, -rtt)
    assert synack.flags == SYN | ACK
    opts = NO_OPTIONS
    if c.ts is not None:
        assert synack.options.timestamps is not None
        echo = 0 if rtt is None else synack.options.timestamps[0]
        opts = TcpOptions(timestamps=(PEER_TS, echo))
    ack = TcpSegment(RPORT, LPORT, (irs + 1) & M, (iss + 1) & M, ACK, window, b"", opts)
    send(c, ack, 0.0)
    assert c.state is State.ESTABLISHED
    recv_nothing(c, 0.0)
    drain(c)
    return c


def syn_sent(*, iss: int = ISS, config: TcpConfig | None = None, now: float = 0.0) -> TcpConnection:
    """An active open whose SYN has been sent (and taken) at ``now``."""
    c = _conn(config)
    c.connect(isn=iss)
    out = recv(c, now)
    assert [s.flags for s in out] == [SYN], out
    assert c.state is State.SYN_SENT
    return c


def _fin_from_us(c: TcpConnection) -> TcpSegment:
    c.close()
    out = recv(c, 0.0)
    assert len(out) == 1 and out[0].flags & FIN, out
    return out[0]


def fin_wait_1(**kw: object) -> TcpConnection:
    """ESTABLISHED, then close(): our FIN (seq ISS+1) is sent and unacknowledged."""
    c = established(**kw)  # type: ignore[arg-type]
    _fin_from_us(c)
    assert c.state is State.FIN_WAIT_1
    return c


def fin_wait_2(**kw: object) -> TcpConnection:
    """Our FIN has been acknowledged (ack ISS+2); the peer has not finished."""
    c = fin_wait_1(**kw)
    send(c, replace(_peer(c), ack=(c.iss + 2) & M), 0.0)
    assert c.state is State.FIN_WAIT_2
    recv_nothing(c, 0.0)
    return c


def closing(**kw: object) -> TcpConnection:
    """Simultaneous close: our FIN is unacknowledged and the peer's FIN has arrived."""
    c = fin_wait_1(**kw)
    send(c, replace(_peer(c), flags=FIN | ACK), 0.0)
    assert c.state is State.CLOSING
    out = recv(c, 0.0)
    assert [s.flags for s in out] == [ACK], out
    drain(c)
    return c


def time_wait(**kw: object) -> TcpConnection:
    """FIN-WAIT-2, then the peer's FIN: TIME-WAIT until config.time_wait."""
    c = fin_wait_2(**kw)
    send(c, replace(_peer(c), ack=(c.iss + 2) & M, flags=FIN | ACK), 0.0)
    assert c.state is State.TIME_WAIT
    out = recv(c, 0.0)
    assert [s.flags for s in out] == [ACK], out
    drain(c)
    return c


def close_wait(**kw: object) -> TcpConnection:
    """The peer's FIN (seq IRS+1) has arrived at 0.0 and been acknowledged by the
    delayed ACK (a FIN that closes first waits for it: our FIN could carry it)."""
    c = established(**kw)  # type: ignore[arg-type]
    send(c, replace(_peer(c), flags=FIN | ACK), 0.0)
    assert c.state is State.CLOSE_WAIT
    recv_nothing(c, 0.0)
    at = c.config.delayed_ack
    assert deadline(c) == at
    c.handle_timer(at)
    out = recv(c, at)
    assert [s.flags for s in out] == [ACK], out
    drain(c)
    return c


def last_ack(**kw: object) -> TcpConnection:
    """CLOSE-WAIT, then close(): our FIN (seq ISS+1) is sent."""
    c = close_wait(**kw)
    _fin_from_us(c)
    assert c.state is State.LAST_ACK
    return c


def _peer(c: TcpConnection) -> TcpSegment:
    """TEMPLATE adjusted to a builder's iss/irs."""
    return replace(TEMPLATE, seq=(c.irs + 1) & M, ack=(c.iss + 1) & M)


# ----------------------------------------------------------------- lossy link


@dataclass(order=True)
class _InFlight:
    at: float
    n: int
    seg: TcpSegment = field(compare=False)
    to_b: bool = field(compare=False)


@dataclass
class LossyLink:
    """Carries segments both ways with a delay, dropping, duplicating and reordering.

    Every segment takes ``delay`` seconds; with probability ``reorder`` it takes
    up to ``3 * delay`` more, so later segments overtake it. ``loss`` drops it
    and ``dup`` delivers a second copy (each copy delayed independently).
    """

    rng: random.Random
    delay: float = 0.01
    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    _queue: list[_InFlight] = field(default_factory=list)
    _n: int = 0
    sent: int = 0  # segments offered to the link
    dropped: int = 0

    def put(self, seg: TcpSegment, to_b: bool, now: float) -> None:
        self.sent += 1
        if self.rng.random() < self.loss:
            self.dropped += 1
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            delay = self.delay
            if self.rng.random() < self.reorder:
                delay += self.rng.uniform(0.0, 3 * self.delay)
            self._n += 1
            heapq.heappush(self._queue, _InFlight(now + delay, self._n, seg, to_b))

    def next_delivery(self) -> float | None:
        return self._queue[0].at if self._queue else None

    def due(self, now: float) -> list[_InFlight]:
        out = []
        while self._queue and self._queue[0].at <= now:
            out.append(heapq.heappop(self._queue))
        return out


class ConnectionPair:
    """Two connections joined by a ``LossyLink``: ``a`` opens actively, ``b`` passively.

    ``step()`` advances simulated time to the earliest of the next delivery, either
    connection's timer and ``wake`` (an application deadline), then delivers,
    runs timers and moves every segment either side wants to send onto the link.
    Events go to ``on_event(side, event)``.
    """

    def __init__(
        self,
        link: LossyLink,
        config_a: TcpConfig,
        config_b: TcpConfig,
        *,
        isn_a: int,
        isn_b: int,
        on_event: Callable[[str, Event], None] | None = None,
        factory: Callable[..., TcpConnection] = TcpConnection,
    ) -> None:
        self.link = link
        self.a = factory(local_port=RPORT, remote_port=LPORT, config=config_a)
        self.b = factory(local_port=LPORT, remote_port=RPORT, config=config_b)
        self._isn_b = isn_b
        self.on_event = on_event
        self.now = 0.0
        self.steps = 0
        self.a.connect(isn=isn_a)
        self.flush()

    def deliver(self, seg: TcpSegment, to_b: bool) -> None:
        if not to_b:
            self.a.receive_segment(seg, self.now)
            return
        b = self.b
        if b.state is State.CLOSED and b.close_reason is None and seg.flags & SYN:
            # The passive side: record the SYN and accept it at once.
            b.listen(seg)
            b.accept(isn=self._isn_b)
        else:
            b.receive_segment(seg, self.now)

    def flush(self) -> None:
        """Move output onto the link and events to ``on_event``."""
        for name, conn, to_b in (("a", self.a, True), ("b", self.b, False)):
            for seg in conn.segments_to_send(self.now):
                self.link.put(seg, to_b, self.now)
            while (ev := conn.next_event()) is not None:
                if self.on_event is not None:
                    self.on_event(name, ev)

    def next_time(self, wake: float | None = None) -> float | None:
        times = [self.link.next_delivery(), self.a.get_timer(), self.b.get_timer(), wake]
        pending = [t for t in times if t is not None]
        return min(pending) if pending else None

    def step(self, wake: float | None = None) -> bool:
        """Advance to the next thing that happens; False when nothing ever will."""
        t = self.next_time(wake)
        if t is None:
            return False
        self.steps += 1
        self.now = max(self.now, t)
        for item in self.link.due(self.now):
            self.deliver(item.seg, item.to_b)
        self.a.handle_timer(self.now)
        self.b.handle_timer(self.now)
        self.flush()
        return True
