"""Retransmission (RFC 6298), Karn's rule, give-up, and the timer API.

``get_timer()`` is the earliest deadline; ``handle_timer()`` acts on what is
due and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from stack.config import TcpConfig
from stack.events import Closed, CloseReason
from stack.tcp.connection import State, TcpConnection
from stack.tcp.rtt import RttEstimator
from stack.tcp.segment import TcpSegment

from tcp_helpers import (
    ACK,
    FIN,
    FLOW,
    IRS,
    ISS,
    PSH,
    REPLY,
    RST,
    TEMPLATE,
    WINDOW,
    close_wait,
    closing,
    deadline,
    drain,
    established,
    fin_wait_1,
    fin_wait_2,
    last_ack,
    listen,
    recv,
    recv_nothing,
    send,
    syn_received,
    syn_sent,
    time_wait,
)


def seg(off: int, payload: bytes, flags: int = PSH | ACK) -> TcpSegment:
    return replace(REPLY, seq=ISS + 1 + off, flags=flags, payload=payload)


def ack(n: int) -> TcpSegment:
    return replace(TEMPLATE, ack=ISS + 1 + n)


# --------------------------------------------------------------- RFC 6298


def test_first_rto_is_rto_initial_before_any_sample() -> None:
    c = established(config=TcpConfig(rto_initial=1.5))
    c.send(b"abc")
    assert recv(c, 0.0) == [seg(0, b"abc")]
    assert c.get_timer() == pytest.approx(1.5)
    c.handle_timer(1.49)
    recv_nothing(c, 1.49)
    c.handle_timer(1.5)
    assert recv(c, 1.5) == [seg(0, b"abc")]


def test_rtt_samples_shape_srtt_and_rto() -> None:
    c = established()
    c.send(b"a")
    recv(c, 0.0)
    send(c, ack(1), 0.1)  # first sample: SRTT 0.1, RTTVAR 0.05, RTO 0.1 + 4 * 0.05
    c.send(b"b")
    recv(c, 1.0)
    assert c.get_timer() == pytest.approx(1.3)
    send(c, ack(2), 1.2)  # RTTVAR 3/4 * 0.05 + 1/4 * 0.1, SRTT 7/8 * 0.1 + 1/8 * 0.2
    c.send(b"c")
    recv(c, 2.0)
    assert c.get_timer() == pytest.approx(2.0 + 0.1125 + 4 * 0.0625)


def test_rto_restarts_on_each_new_ack_and_stops_when_all_is_acked() -> None:
    c = established(mss=10)
    c.send(bytes(30))
    assert len(recv(c, 0.0)) == 3
    assert c.get_timer() == pytest.approx(1.0)
    send(c, ack(10), 0.5)  # RFC 6298 (5.3): restart; sample 0.5 -> RTO 1.5
    assert c.get_timer() == pytest.approx(2.0)
    send(c, ack(30), 0.6)  # (5.2): all acknowledged, stop
    assert c.get_timer() is None


def test_rto_doubles_on_each_timeout() -> None:
    c = established()
    c.send(b"abc")
    recv(c, 0.0)
    t = 0.0
    for gap in (1.0, 2.0, 4.0, 8.0, 16.0):
        assert c.get_timer() == pytest.approx(t + gap)
        t += gap
        c.handle_timer(t)
        assert recv(c, t) == [seg(0, b"abc")]


def test_rto_max_clamps_the_backoff() -> None:
    c = established(config=TcpConfig(rto_max=5.0))
    c.send(b"abc")
    recv(c, 0.0)
    t = 0.0
    for gap in (1.0, 2.0, 4.0, 5.0, 5.0, 5.0):
        assert c.get_timer() == pytest.approx(t + gap)
        t += gap
        c.handle_timer(t)
        assert recv(c, t) == [seg(0, b"abc")]


def test_rto_min_clamps_a_small_rtt() -> None:
    c = established(config=TcpConfig(rto_min=0.25))
    c.send(b"a")
    recv(c, 0.0)
    send(c, ack(1), 0.01)  # RTT 10 ms: 0.01 + 4 * 0.005 = 0.03 s, below rto_min
    c.send(b"b")
    recv(c, 1.0)
    assert c.get_timer() == pytest.approx(1.25)


def test_karn_no_sample_from_a_retransmitted_segment() -> None:
    c = established()
    c.send(b"abc")
    recv(c, 0.0)
    c.handle_timer(1.0)
    assert recv(c, 1.0) == [seg(0, b"abc")]
    send(c, ack(3), 1.1)  # ambiguous: 1.1 s or 0.1 s? Neither is taken.
    c.send(b"d")
    assert recv(c, 2.0) == [seg(3, b"d")]
    assert c.get_timer() == pytest.approx(3.0)  # back to rto_initial, no sample
    send(c, ack(4), 2.5)  # a clean sample: SRTT 0.5, RTO 0.5 + 4 * 0.25
    c.send(b"e")
    recv(c, 3.0)
    assert c.get_timer() == pytest.approx(4.5)


def test_karn_with_a_sample_in_hand_keeps_it() -> None:
    c = established(rtt=0.1)  # RTO 0.3
    c.send(b"abc")
    recv(c, 0.0)
    t = deadline(c)
    assert t == pytest.approx(0.3)
    c.handle_timer(t)
    assert recv(c, t) == [seg(0, b"abc")]
    assert c.get_timer() == pytest.approx(0.9)  # 0.3 + 2 * 0.3
    send(c, ack(3), 0.35)  # would be a 0.05 s or 0.35 s sample: ignored
    c.send(b"d")
    recv(c, 1.0)
    assert c.get_timer() == pytest.approx(1.3)


def test_gives_up_after_max_retries_with_rst() -> None:
    c = established(config=TcpConfig(max_retries=3))
    c.send(b"abc")
    recv(c, 0.0)
    for t in (1.0, 3.0, 7.0):
        c.handle_timer(t)
        assert recv(c, t) == [seg(0, b"abc")]
    assert c.get_timer() == pytest.approx(15.0)
    c.handle_timer(15.0)
    assert c.state is State.CLOSED
    assert recv(c, 15.0) == [replace(REPLY, seq=ISS + 4, flags=RST | ACK, window=0)]
    assert drain(c) == [Closed(FLOW, CloseReason.TIMED_OUT)]
    assert c.get_timer() is None


def test_timeout_goes_back_to_one_segment_then_slow_starts() -> None:
    # RFC 5681 3.1: after an RTO the congestion window is one segment.
    c = established(mss=10)
    c.send(bytes(range(40)))
    assert len(recv(c, 0.0)) == 4
    c.handle_timer(1.0)
    assert recv(c, 1.0) == [seg(0, bytes(range(10)), ACK)]
    send(c, ack(10), 1.1)
    assert recv(c, 1.1) == [seg(10, bytes(range(10, 20)), ACK), seg(20, bytes(range(20, 30)), ACK)]
    send(c, ack(40), 1.2)  # the peer had the last segment already
    recv_nothing(c, 1.2)
    assert c.get_timer() is None


def test_acks_during_go_back_carry_snd_max() -> None:
    # After an RTO snd_nxt goes back to snd_una, but the peer may have every
    # byte up to snd_max: an ACK stamped with the rolled-back snd_nxt is "old"
    # to the peer, which answers it with an ACK; two ends going back at once
    # then exchanged ACKs forever. The ACK carries RFC 9293's SND.NXT (snd_max).
    c = established(mss=10)
    c.send(bytes(30))
    assert len(recv(c, 0.0)) == 3
    c.handle_timer(1.0)
    assert recv(c, 1.0) == [seg(0, bytes(10), ACK)]
    assert c.snd_nxt == ISS + 11
    send(c, replace(TEMPLATE, payload=b"xy"), 1.01)  # peer data, acknowledging nothing
    send(c, replace(TEMPLATE, seq=IRS + 3, payload=b"z"), 1.01)
    assert recv(c, 1.01) == [replace(REPLY, seq=ISS + 31, ack=IRS + 4, window=WINDOW - 3)]
    # The peer, holding all 30 bytes, finds that ACK acceptable and stays quiet;
    # its own ACK (seq at our rcv_nxt) is acceptable to us: no exchange follows.
    send(c, replace(TEMPLATE, seq=IRS + 4, ack=ISS + 31), 1.02)
    recv_nothing(c, 1.02)
    assert c.get_timer() is None


def test_rst_on_abort_during_go_back_carries_snd_max() -> None:
    c = established(mss=10)
    c.send(bytes(30))
    recv(c, 0.0)
    c.handle_timer(1.0)
    recv(c, 1.0)
    c.abort()
    assert recv(c, 1.1) == [replace(REPLY, seq=ISS + 31, flags=RST | ACK, window=0)]


def test_rtt_estimator_directly() -> None:
    r = RttEstimator(1.0, 0.2, 60.0)
    assert r.rto == 1.0 and r.srtt is None
    r.sample(0.5)
    assert (r.srtt, r.rttvar, r.rto) == pytest.approx((0.5, 0.25, 1.5))
    r.sample(1.0)
    assert r.rttvar == pytest.approx(0.75 * 0.25 + 0.25 * 0.5)
    assert r.srtt == pytest.approx(0.875 * 0.5 + 0.125 * 1.0)
    r.backoff = 3
    assert r.rto == pytest.approx(8 * (0.5625 + 4 * 0.3125))
    r.backoff = 20
    assert r.rto == 60.0
    r.backoff = 0
    r.sample(0.0)
    r.sample(0.0)
    assert r.rto >= 0.2


# ------------------------------------------------------------- the timer API


def test_get_timer_is_the_earliest_deadline() -> None:
    c = established()
    c.send(b"out")
    recv(c, 0.0)  # retransmission deadline 1.0
    send(c, replace(TEMPLATE, payload=b"in"), 0.5)  # delayed-ACK deadline 0.54
    assert c.get_timer() == pytest.approx(0.54)
    c.handle_timer(0.54)
    assert recv(c, 0.54) == [replace(REPLY, seq=ISS + 4, ack=IRS + 3, window=WINDOW - 2)]
    assert c.get_timer() == pytest.approx(1.0)
    c.close()  # FIN-WAIT-1: the FIN goes out, timer unchanged
    assert recv(c, 0.6) == [
        replace(REPLY, seq=ISS + 4, ack=IRS + 3, flags=FIN | ACK, window=WINDOW - 2)
    ]
    assert c.get_timer() == pytest.approx(1.0)
    send(c, replace(TEMPLATE, seq=IRS + 3, ack=ISS + 5), 0.6)  # FIN-WAIT-2
    assert c.get_timer() == pytest.approx(60.6)  # only the FIN-WAIT-2 deadline
    # Within rto_min of the last data (after a longer silence it is ACKed at once):
    send(c, replace(TEMPLATE, seq=IRS + 3, ack=ISS + 5, payload=b"x"), 0.65)
    assert c.get_timer() == pytest.approx(0.69)  # the delayed ACK comes first again


# (builder, its earliest deadline at now == 0)
BUILDERS: list[tuple[Callable[[], TcpConnection], float | None]] = [
    (listen, None),
    (syn_sent, 1.0),
    (syn_received, 1.0),
    (established, None),
    (fin_wait_1, 1.0),
    (fin_wait_2, 60.0),
    (closing, 1.0),
    (time_wait, 2.0),
    (close_wait, None),
    (last_ack, 1.0),
]


@pytest.mark.parametrize(("build", "deadline"), BUILDERS, ids=[b.__name__ for b, _ in BUILDERS])
def test_handle_timer_is_a_no_op_when_nothing_is_due(
    build: Callable[[], TcpConnection], deadline: float | None
) -> None:
    c = build()
    assert c.get_timer() == deadline
    before = (c.state, c.snd_nxt, c.snd_una, c.rcv_nxt, c.get_timer())
    for t in (0.0, 0.5, 0.99 if deadline is None else deadline - 0.01):
        c.handle_timer(t)
        recv_nothing(c, t)
        assert (c.state, c.snd_nxt, c.snd_una, c.rcv_nxt, c.get_timer()) == before
        assert drain(c) == []


@pytest.mark.parametrize(("build", "deadline"), BUILDERS, ids=[b.__name__ for b, _ in BUILDERS])
def test_something_happens_at_the_deadline(
    build: Callable[[], TcpConnection], deadline: float | None
) -> None:
    c = build()
    if deadline is None:
        c.handle_timer(1000.0)
        recv_nothing(c, 1000.0)
        assert c.get_timer() is None
        return
    c.handle_timer(deadline)
    acted = recv(c, deadline) != [] or drain(c) != []
    assert acted
    assert c.get_timer() != deadline


def test_handle_timer_after_close_does_nothing() -> None:
    c = established()
    c.send(b"x")
    recv(c, 0.0)
    c.abort()
    recv(c, 0.0)
    drain(c)
    c.handle_timer(100.0)
    recv_nothing(c, 100.0)
    assert drain(c) == []
