"""Congestion control: NewReno (RFC 5681, RFC 6582) and CUBIC (RFC 9438).

The algorithms are tested through their small interface with explicit times
(the CUBIC curve against RFC 9438's formulas), and NewReno's fast recovery
packet by packet on a connection whose peer has no SACK.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from stack.config import TcpConfig
from stack.tcp.congestion import CongestionControl, NewReno
from stack.tcp.connection import TcpConnection
from stack.tcp.cubic import ALPHA, BETA, C, Cubic, cbrt
from stack.tcp.segment import TcpSegment

from tcp_helpers import ISS, TEMPLATE, established, recv, send

MSS = 1000


# ------------------------------------------------------------------ NewReno


def test_newreno_slow_start_adds_at_most_two_mss_per_ack() -> None:
    cc = NewReno(MSS)
    assert cc.cwnd == 10 * MSS  # RFC 6928
    cc.on_ack(MSS, cc.cwnd, 0.0, 0.1)
    assert cc.cwnd == 11 * MSS
    cc.on_ack(2 * MSS, cc.cwnd, 0.0, 0.1)  # a delayed ACK: both segments count
    assert cc.cwnd == 13 * MSS
    cc.on_ack(5 * MSS, cc.cwnd, 0.0, 0.1)  # a stretch ACK: capped at L = 2 SMSS (RFC 3465)
    assert cc.cwnd == 15 * MSS
    cc.on_ack(MSS, 5 * MSS, 0.0, 0.1)  # application-limited (RFC 7661): no growth
    assert cc.cwnd == 15 * MSS


def test_acks_processed_as_one_batch_all_grow_the_window() -> None:
    # A drained batch of ACKs is processed before anything is sent: each ACK
    # sees less in flight than the one before. The window was in use, so each
    # still counts (RFC 7661); judged by the flight of its moment, only the first
    # ACK of a batch would grow cwnd.
    c = established(mss=10, window=60_000)
    c.send(bytes(5000))
    assert len(recv(c, 0.1)) == 10  # the initial window: 100 bytes
    for k in range(1, 6):
        send(c, ack(20 * k), 0.2)  # five delayed ACKs, two segments each
    assert c.cc.cwnd == 100 + 5 * 20  # slow start: doubled in one round trip
    assert len(recv(c, 0.2)) == 20


def test_newreno_congestion_avoidance_one_mss_per_window() -> None:
    cc = NewReno(MSS)
    cc.ssthresh = cc.cwnd = 10 * MSS
    for _ in range(9):
        cc.on_ack(MSS, cc.cwnd, 0.0, 0.1)
    assert cc.cwnd == 10 * MSS
    cc.on_ack(MSS, cc.cwnd, 0.0, 0.1)  # a whole window acknowledged (RFC 5681 3.1)
    assert cc.cwnd == 11 * MSS


def test_newreno_reductions() -> None:
    cc = NewReno(MSS)
    cc.on_loss(20 * MSS, 0.0)  # RFC 5681 (4): half the flight
    assert (cc.ssthresh, cc.cwnd) == (10 * MSS, 10 * MSS)
    cc.on_recovery_end(3 * MSS, 0.0)  # RFC 6582 (3) option 1: min(ssthresh, flight + SMSS)
    assert cc.cwnd == 4 * MSS
    cc.on_loss(MSS, 0.0)
    assert cc.ssthresh == 2 * MSS  # never below two segments
    cc.on_timeout(30 * MSS, 0.0)
    assert (cc.ssthresh, cc.cwnd) == (15 * MSS, MSS)  # RFC 5681 3.1: one segment


def _newreno() -> TcpConnection:
    c = established(mss=10, config=TcpConfig(congestion="newreno", time_wait=2.0))
    assert isinstance(c.cc, NewReno)
    return c


def ack(n: int) -> TcpSegment:
    return replace(TEMPLATE, ack=ISS + 1 + n)


def sent(c: TcpConnection, now: float) -> list[int]:
    return [s.seq - ISS - 1 for s in recv(c, now)]


def test_newreno_fast_recovery_with_partial_acks() -> None:
    # RFC 6582 3.2, peer without SACK; segments at 10 and 40 lost.
    c = _newreno()
    c.send(bytes(200))
    assert sent(c, 0.0) == list(range(0, 100, 10))
    send(c, ack(10), 0.1)
    assert sent(c, 0.1) == [100, 110]  # slow start: cwnd 110
    for t in (0.11, 0.12):
        send(c, ack(10), t)
        assert sent(c, t) == []
    send(c, ack(10), 0.13)
    # (2): ssthresh = flight / 2; the lost segment goes; cwnd = ssthresh + 3 SMSS.
    assert sent(c, 0.13) == [10]
    assert c.recover == ISS + 1 + 120
    assert (c.cc.ssthresh, c.cc.cwnd + c._inflate) == (55, 85)
    # (4): each further duplicate inflates by one SMSS; new data once it fits.
    for i, t in enumerate((0.14, 0.15, 0.16)):
        send(c, ack(10), t)
        assert sent(c, t) == []
        assert c.cc.cwnd + c._inflate == 95 + 10 * i
    send(c, ack(10), 0.17)
    assert sent(c, 0.17) == [120]  # 55 + 70 = 125 >= flight 110 + 10
    # (5) partial ACK: the next hole goes at once; deflate by the 30 acknowledged,
    # add one SMSS back: 125 - 30 + 10 = 105, room for one more new segment.
    send(c, ack(40), 0.2)
    assert sent(c, 0.2) == [40, 130]
    assert c.cc.cwnd + c._inflate == 105 and c.in_recovery
    # (3) the full ACK: cwnd = min(ssthresh, flight + SMSS) = min(55, 20 + 10).
    send(c, ack(120), 0.3)
    assert not c.in_recovery
    assert (c.cc.cwnd, c._inflate) == (30, 0)
    assert sent(c, 0.3) == [140]


def test_newreno_no_fast_retransmit_for_data_sent_before_a_timeout() -> None:
    # RFC 6582 3.2 (2), the careful variant: after an RTO, duplicate ACKs below
    # its recovery point are the echo of go-back-N, not a new loss.
    c = _newreno()
    c.send(bytes(50))
    recv(c, 0.0)
    c.handle_timer(1.0)
    assert sent(c, 1.0) == [0]
    for t in (1.1, 1.11, 1.12, 1.13):
        send(c, ack(0), t)
    assert not c.in_recovery and sent(c, 1.13) == []


# -------------------------------------------------------------------- CUBIC


def _after_loss(w_max: int, mss: int = MSS) -> Cubic:
    """A CUBIC controller just after a loss at ``w_max`` segments, epoch started at 0."""
    cc = Cubic(mss)
    cc.cwnd = w_max * mss
    cc.on_loss(cc.cwnd, 0.0)
    cc.on_ack(1, cc.cwnd, 0.0, 0.1)  # the first ACK in congestion avoidance: t_epoch = 0
    return cc


def test_cubic_reduces_by_beta() -> None:
    cc = Cubic(MSS)
    cc.cwnd = 100 * MSS
    cc.on_loss(cc.cwnd, 0.0)
    assert BETA == 0.7
    assert cc.cwnd == cc.ssthresh == 70 * MSS  # RFC 9438 4.6
    assert cc.w_max == 100


def test_cubic_growth_follows_the_rfc_9438_curve() -> None:
    # W_max 1000 segments, cwnd_epoch 700: K = cbrt((1000 - 700) / 0.4).
    cc = _after_loss(1000)
    k = cbrt(300 / C)
    assert cc.k == pytest.approx(k) and k == pytest.approx(9.0856, abs=1e-4)
    rtt = 0.1

    def w_cubic(t: float) -> float:
        return C * (t - k) ** 3 + 1000  # RFC 9438 eq. 1

    for t in (1.0, 4.0, 9.0, 12.0, 15.0):
        before = cc.cwnd / MSS
        cc.on_ack(cc.cwnd, cc.cwnd, t, rtt)  # a whole window acknowledged at t
        # RFC 9438 4.4/4.5: toward W_cubic(t + RTT), clamped to [cwnd, 1.5 cwnd].
        target = min(max(w_cubic(t + rtt), before), 1.5 * before)
        assert cc.cwnd / MSS == pytest.approx(target, abs=0.001), t
    # Concave below W_max, flat around K, convex beyond.
    assert cc.w_cubic(k) == pytest.approx(1000)
    assert cc.w_cubic(1.1) == pytest.approx(796.3, abs=0.1)
    assert cc.w_cubic(15.1) == pytest.approx(1087.0, abs=0.1)


def test_cubic_growth_clamped_to_one_and_a_half_cwnd() -> None:
    cc = _after_loss(1000)
    cc.on_ack(cc.cwnd, cc.cwnd, 30.0, 0.1)  # W_cubic(30.1) is far above 1.5 * 700
    assert cc.cwnd == 1050 * MSS


def test_cubic_fast_convergence_lowers_w_max() -> None:
    cc = Cubic(MSS)
    cc.cwnd = 100 * MSS
    cc.on_loss(cc.cwnd, 0.0)
    assert cc.w_max == 100
    cc.cwnd = 80 * MSS  # the next loss comes before the window got back to W_max
    cc.on_loss(cc.cwnd, 1.0)
    assert cc.w_max == pytest.approx(80 * (1 + BETA) / 2)  # RFC 9438 4.7: 68
    assert cc.cwnd == 56 * MSS
    slow = Cubic(MSS, fast_convergence=False)
    slow.cwnd = 100 * MSS
    slow.on_loss(slow.cwnd, 0.0)
    slow.cwnd = 80 * MSS
    slow.on_loss(slow.cwnd, 1.0)
    assert slow.w_max == 80


def test_cubic_reno_friendly_region() -> None:
    # A small window (W_max 20, after the loss 14): near the start of the stage
    # W_cubic(t) is barely above 14 while Reno's estimate grows by alpha a window.
    cc = _after_loss(20)
    assert pytest.approx(3 * 0.3 / 1.7) == ALPHA
    est = cc.w_est
    for i in range(1, 6):
        t = i * 0.01
        cc.on_ack(cc.cwnd, cc.cwnd, t, 0.01)
        est += ALPHA  # RFC 9438 4.3: alpha * segments_acked / cwnd, one window acked
        assert cc.w_cubic(t) < cc.w_est == pytest.approx(est)
        assert cc.cwnd == int(est * MSS)  # cwnd = W_est
    # Once W_est reaches the window before the loss (cwnd_prior, 20), alpha is 1.
    cc.w_est = 20.0
    cc.on_ack(cc.cwnd, cc.cwnd, 0.06, 0.01)
    assert cc.w_est == pytest.approx(21.0, abs=0.05)


def test_cubic_timeout_then_a_stage_with_k_zero() -> None:
    cc = Cubic(MSS)
    cc.cwnd = 100 * MSS
    cc.on_timeout(cc.cwnd, 0.0)
    assert (cc.cwnd, cc.ssthresh) == (MSS, 70 * MSS)  # RFC 9438 4.8
    while cc.cwnd < cc.ssthresh:  # slow start back up
        cc.on_ack(MSS, cc.cwnd, 1.0, 0.1)
    cc.on_ack(MSS, cc.cwnd, 2.0, 0.1)  # the first ACK of the stage
    assert cc.k == 0.0 and cc.w_max == pytest.approx(70)
    cc.on_ack(cc.cwnd, cc.cwnd, 4.0, 0.1)  # convex from the start: W_cubic(2.1) = 73.7
    assert cc.cwnd / MSS == pytest.approx(C * 2.1**3 + 70, abs=0.01)


def test_cubic_slow_start_and_application_limit() -> None:
    cc = Cubic(MSS)
    cc.on_ack(MSS, cc.cwnd, 0.0, 0.1)
    assert cc.cwnd == 11 * MSS
    cc.on_ack(MSS, 2 * MSS, 0.0, 0.1)  # far from using the window
    assert cc.cwnd == 11 * MSS


def test_the_algorithm_is_chosen_by_config() -> None:
    assert isinstance(established().cc, Cubic)  # the default
    assert isinstance(established(config=TcpConfig(congestion="newreno")).cc, NewReno)
    with pytest.raises(ValueError, match="congestion"):
        TcpConfig(congestion="vegas")  # type: ignore[arg-type]


def test_cubic_on_a_connection_recovers_like_newreno_without_sack() -> None:
    c = established(mss=10)
    c.send(bytes(50))
    recv(c, 0.0)
    for t in (0.1, 0.11, 0.12):
        send(c, replace(TEMPLATE, ack=ISS + 1), t)
    assert [s.seq for s in recv(c, 0.12)] == [ISS + 1]
    assert c.cc.cwnd == 70  # 0.7 * the initial 100


@pytest.mark.parametrize("cls", [CongestionControl, NewReno, Cubic])
def test_copy_takes_every_field(cls: type[CongestionControl]) -> None:
    # Loss recovery's undo restores a copy: one that missed a field would restore
    # a mix of the old and the new window (a field added but not copied fails here).
    cc = cls(MSS)
    names: set[str] = set()
    for klass in cls.__mro__:  # __slots__ in Python; compiled with mypyc, __mypyc_attrs__
        names.update(klass.__dict__.get("__slots__", klass.__dict__.get("__mypyc_attrs__", ())))
    names.discard("__dict__")
    for i, name in enumerate(sorted(names)):
        value = getattr(cc, name)
        if isinstance(value, bool):
            setattr(cc, name, not value)
        elif isinstance(value, int):
            setattr(cc, name, 1000 + i)
        else:  # a float, or the None of a time not yet set
            setattr(cc, name, 1000.5 + i)
    clone = cc.copy()
    assert type(clone) is cls
    assert {n: getattr(clone, n) for n in names} == {n: getattr(cc, n) for n in names}
