"""The send side: segmentation, windows, send buffer, Nagle, FIN placement,
fast retransmit / NewReno, zero-window probing and sequence wraparound.

RFC 9293 3.7, 3.8.6; RFC 5681 3.2; RFC 6582 3.2.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from stack.config import TcpConfig
from stack.errors import LocalProtocolError
from stack.events import Closed, CloseReason, SendSpace
from stack.tcp.connection import State, TcpConnection
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
    deadline,
    drain,
    established,
    recv,
    recv_nothing,
    send,
)


def seg(off: int, payload: bytes, flags: int = ACK) -> TcpSegment:
    """Our data segment starting ``off`` bytes into the stream."""
    return replace(REPLY, seq=ISS + 1 + off, flags=flags, payload=payload)


def ack(n: int, window: int = 65535) -> TcpSegment:
    """The peer acknowledging ``n`` of our bytes."""
    return replace(TEMPLATE, ack=ISS + 1 + n, window=window)


# ------------------------------------------------------------- segmentation


def test_segments_to_the_peers_mss() -> None:
    c = established(mss=10)
    assert c.send(b"abcdefghijklmnopqrstuvwxy") == 25
    assert recv(c, 0.0) == [
        seg(0, b"abcdefghij"),
        seg(10, b"klmnopqrst"),
        seg(20, b"uvwxy", PSH | ACK),
    ]
    recv_nothing(c, 0.0)


def test_default_mss_is_536_without_the_option() -> None:
    c = established(mss=None)
    c.send(bytes(1000))
    assert recv(c, 0.0) == [seg(0, bytes(536)), seg(536, bytes(464), PSH | ACK)]


def test_sends_within_the_peers_window() -> None:
    c = established(mss=10, window=20)
    c.send(bytes(range(50)))
    assert recv(c, 0.0) == [seg(0, bytes(range(10))), seg(10, bytes(range(10, 20)))]
    recv_nothing(c, 0.1)
    send(c, ack(10, window=20), 0.2)  # the right edge moves by 10
    assert recv(c, 0.2) == [seg(20, bytes(range(20, 30)))]
    send(c, ack(30, window=20), 0.3)
    assert recv(c, 0.3) == [seg(30, bytes(range(30, 40))), seg(40, bytes(range(40, 50)), PSH | ACK)]


def test_sender_sws_avoidance_holds_a_small_segment() -> None:
    # RFC 9293 3.8.6.2.1: 5 usable bytes are neither an MSS, nor all that is
    # queued, nor half the largest window the peer has offered (20).
    c = established(mss=10, window=20)
    c.send(bytes(40))
    assert len(recv(c, 0.0)) == 2
    send(c, ack(15, window=10), 0.1)  # usable: 15 + 10 - 20 = 5
    recv_nothing(c, 0.1)
    send(c, ack(20, window=20), 0.2)  # usable: 20 + 20 - 20 = 20
    assert recv(c, 0.2) == [seg(20, bytes(10)), seg(30, bytes(10), PSH | ACK)]


def test_send_buffer_limit_and_send_space() -> None:
    c = established(mss=10, config=TcpConfig(snd_buf=20))
    assert c.send(bytes(15)) == 15
    assert c.send(b"x" * 10) == 5  # only 5 bytes of room
    assert c.send_space == 0
    assert c.send(b"y") == 0
    assert recv(c, 0.0) == [seg(0, bytes(10)), seg(10, bytes(5) + b"xxxxx", PSH | ACK)]
    assert drain(c) == []
    send(c, ack(4), 0.1)
    assert drain(c) == [SendSpace(FLOW)]
    assert c.send_space == 4
    send(c, ack(8), 0.2)
    assert drain(c) == []  # once per short send()
    assert c.send(b"z" * 8) == 8


def test_fin_follows_the_drained_buffer() -> None:
    c = established(mss=10, window=10)
    c.send(bytes(25))
    c.close()
    assert c.state is State.FIN_WAIT_1
    assert recv(c, 0.0) == [seg(0, bytes(10))]
    send(c, ack(10, window=10), 0.1)
    assert recv(c, 0.1) == [seg(10, bytes(10))]
    send(c, ack(20, window=10), 0.2)
    assert recv(c, 0.2) == [seg(20, bytes(5), FIN | PSH | ACK)]
    send(c, ack(26, window=10), 0.3)
    assert c.state is State.FIN_WAIT_2


def test_bare_fin_when_the_buffer_is_already_empty() -> None:
    c = established()
    c.send(b"abc")
    assert recv(c, 0.0) == [seg(0, b"abc", PSH | ACK)]
    c.close()
    assert recv(c, 0.1) == [seg(3, b"", FIN | ACK)]


def test_send_before_handshake_completes_goes_out_after() -> None:
    from tcp_helpers import syn_received

    c = syn_received(mss=10)
    assert c.send(b"early") == 5
    recv_nothing(c, 0.05)
    send(c, TEMPLATE, 0.1)
    assert recv(c, 0.1) == [seg(0, b"early", PSH | ACK)]


def test_send_rejected_when_closed() -> None:
    c = established()
    c.abort()
    with pytest.raises(LocalProtocolError):
        c.send(b"x")
    assert c.send_space == 0


# ------------------------------------------------------------------- Nagle


def test_no_nagle_by_default() -> None:
    c = established()
    c.send(b"a")
    assert recv(c, 0.0) == [seg(0, b"a", PSH | ACK)]
    c.send(b"b")  # "a" is still unacknowledged
    assert recv(c, 0.01) == [seg(1, b"b", PSH | ACK)]


def test_nagle_holds_small_writes_while_data_is_in_flight() -> None:
    c = established(mss=10, config=TcpConfig(nagle=True))
    c.send(b"a")
    assert recv(c, 0.0) == [seg(0, b"a", PSH | ACK)]  # nothing in flight: goes
    c.send(b"b")
    recv_nothing(c, 0.01)
    c.send(b"c")
    recv_nothing(c, 0.02)
    send(c, ack(1), 0.1)
    assert recv(c, 0.1) == [seg(1, b"bc", PSH | ACK)]
    c.send(bytes(12))  # a full segment is never held
    assert recv(c, 0.11) == [seg(3, bytes(10))]


# ------------------------------------------------- fast retransmit, NewReno


def _five_segments() -> tuple[TcpConnection, bytes]:
    c = established(mss=10)
    payload = bytes(range(50))
    c.send(payload)
    out = recv(c, 0.0)
    assert [s.seq for s in out] == [ISS + 1 + 10 * i for i in range(5)]
    return c, payload


def test_fast_retransmit_after_exactly_three_duplicate_acks() -> None:
    c, payload = _five_segments()
    send(c, ack(10), 0.1)  # the segment at 10 was lost
    recv_nothing(c, 0.1)
    send(c, ack(10), 0.11)
    send(c, ack(10), 0.12)
    recv_nothing(c, 0.12)  # two are not enough
    send(c, ack(10), 0.13)
    assert recv(c, 0.13) == [seg(10, payload[10:20])]
    send(c, ack(10), 0.14)  # a fourth: no second retransmission
    recv_nothing(c, 0.14)


def test_duplicate_ack_must_not_carry_a_window_change_data_or_fin() -> None:
    # RFC 5681 2: a duplicate ACK carries no data, has SYN and FIN off and
    # leaves the advertised window unchanged.
    c, _ = _five_segments()
    send(c, ack(10), 0.1)
    send(c, ack(10), 0.11)
    send(c, ack(10), 0.12)  # two duplicates
    send(c, ack(10, window=65000), 0.13)  # a window update
    send(c, replace(ack(10, window=65000), payload=b"x"), 0.14)  # data
    send(c, replace(ack(10, window=65000), seq=IRS + 2, flags=FIN | ACK), 0.15)  # a FIN
    recv_nothing(c, 0.15)  # the FIN's ACK waits (delayed): the next segment carries it
    send(c, replace(ack(10, window=65000), seq=IRS + 3), 0.16)  # the third real duplicate
    assert recv(c, 0.16) == [replace(seg(10, bytes(range(10, 20))), ack=IRS + 3, window=65533)]


def test_fast_retransmit_resends_only_what_was_sent() -> None:
    # The peer's window (10) is smaller than its MSS (20): the segment in flight
    # is 10 bytes. Its fast retransmission must not grow to an MSS of bytes never
    # sent (beyond snd_max and the window): the peer would acknowledge them and
    # every later segment would then "acknowledge something not yet sent".
    c = established(mss=20, window=10)
    c.send(bytes(range(30)))
    assert recv(c, 0.0) == [seg(0, bytes(range(10)))]
    for t in (0.1, 0.11, 0.12):
        send(c, ack(0, window=10), t)
    assert recv(c, 0.12) == [seg(0, bytes(range(10)))]
    assert c.snd_max == ISS + 11


def test_newreno_partial_ack_retransmits_the_next_hole() -> None:
    c, payload = _five_segments()  # segments at 10 and 30 were lost
    for t in (0.1, 0.11, 0.12, 0.13):
        send(c, ack(10), t)
    assert recv(c, 0.13) == [seg(10, payload[10:20])]
    send(c, ack(30), 0.2)  # partial: below the recovery point (50)
    assert recv(c, 0.2) == [seg(30, payload[30:40])]
    send(c, ack(50), 0.3)  # full: recovery ends
    recv_nothing(c, 0.3)
    assert c.get_timer() is None


# --------------------------------------------------------------- zero window


def test_zero_window_probe_backoff_and_reopen() -> None:
    c = established(mss=10, window=10)
    c.send(bytes(range(30)))
    assert recv(c, 0.0) == [seg(0, bytes(range(10)))]
    send(c, ack(10, window=0), 0.25)  # an RTT sample of 0.25 s: RTO 0.75 s
    recv_nothing(c, 0.25)
    probe = replace(REPLY, seq=ISS + 10)  # seq = snd_una - 1, no payload
    # RFC 9293 3.8.6.1: the first probe after one RTO, then exponentially
    # further apart (up to rto_max), and on and on while the peer answers.
    t = 0.25
    for gap in (0.75, 1.5, 3.0, 6.0, 12.0, 24.0, 48.0, 60.0, 60.0, 60.0, 60.0):
        assert c.get_timer() == pytest.approx(t + gap)
        t += gap
        c.handle_timer(t - 0.01)
        recv_nothing(c, t - 0.01)
        c.handle_timer(t)
        assert recv(c, t) == [probe]
        send(c, ack(10, window=0), t + 0.05)  # the peer answers: still closed
        recv_nothing(c, t + 0.05)
    assert c.state is State.ESTABLISHED  # 11 answered probes > max_retries (8)
    send(c, ack(10, window=20), t + 1)  # the window opens
    assert recv(c, t + 1) == [
        seg(10, bytes(range(10, 20))),
        seg(20, bytes(range(20, 30)), PSH | ACK),
    ]
    assert c.get_timer() == pytest.approx(t + 1.75)  # the retransmission timer, not a probe


def test_unanswered_zero_window_probes_give_up() -> None:
    c = established(mss=10, window=10, config=TcpConfig(max_retries=2))
    c.send(bytes(20))
    recv(c, 0.0)
    send(c, ack(10, window=0), 0.25)  # RTO 0.75 s
    recv_nothing(c, 0.25)
    for t in (1.0, 2.5):  # max_retries probes...
        assert c.get_timer() == pytest.approx(t)
        c.handle_timer(t)
        assert recv(c, t) == [replace(REPLY, seq=ISS + 10)]
    assert c.get_timer() == pytest.approx(5.5)
    c.handle_timer(5.5)  # ...and the next expiry gives up
    assert c.state is State.CLOSED
    assert recv(c, 5.5) == [replace(REPLY, seq=ISS + 11, flags=RST | ACK, window=0)]
    assert drain(c) == [Closed(FLOW, CloseReason.TIMED_OUT)]


def test_lost_window_update_at_zero_window_is_recovered_by_the_probe() -> None:
    c = established(mss=10, window=10)
    c.send(bytes(10) + b"z" * 10)
    recv(c, 0.0)
    send(c, ack(10, window=0), 0.25)
    recv_nothing(c, 0.25)
    # (the peer's window update is lost)
    c.handle_timer(1.0)
    assert recv(c, 1.0) == [replace(REPLY, seq=ISS + 10)]
    send(c, ack(10, window=10), 1.05)  # its answer carries the open window
    assert recv(c, 1.05) == [seg(10, b"z" * 10, PSH | ACK)]


def test_small_window_with_nothing_in_flight_still_has_a_timer() -> None:
    # The peer's window shrinks below the sender-SWS threshold and the update
    # that would reopen it is lost: without a timer this would stall forever.
    c = established(mss=10, window=40)
    c.send(bytes(range(60)))
    assert len(recv(c, 0.0)) == 4
    send(c, ack(40, window=5), 0.25)  # usable 5: held back by SWS avoidance
    recv_nothing(c, 0.25)
    t = deadline(c)
    assert t == pytest.approx(1.0)
    c.handle_timer(t)
    # RFC 9293 3.8.6.2.1 (d): on the override timeout, send what fits.
    assert recv(c, t) == [seg(40, bytes(range(40, 45)))]
    send(c, ack(45, window=40), t + 0.1)
    assert recv(c, t + 0.1) == [
        seg(45, bytes(range(45, 55))),
        seg(55, bytes(range(55, 60)), PSH | ACK),
    ]


def test_fin_is_retransmitted_into_a_zero_window() -> None:
    c = established(mss=10, window=10)
    c.send(bytes(10))
    c.close()
    assert recv(c, 0.0) == [seg(0, bytes(10), FIN | PSH | ACK)]
    send(c, ack(10, window=0), 0.25)  # the data is taken, the FIN is not
    recv_nothing(c, 0.25)
    assert c.get_timer() == pytest.approx(1.0)
    c.handle_timer(1.0)
    assert recv(c, 1.0) == [seg(10, b"", FIN | ACK)]
    assert c.get_timer() == pytest.approx(2.5)
    c.handle_timer(2.5)
    assert recv(c, 2.5) == [seg(10, b"", FIN | ACK)]
    send(c, ack(11, window=0), 2.6)
    assert c.state is State.FIN_WAIT_2


def test_shrunken_window_under_data_in_flight_is_probed() -> None:
    # RFC 9293 3.8.6.2.2 (receivers should not shrink, senders must cope):
    # after an RTO the data no longer fits; the sender probes rather than stalls.
    c = established(mss=10, window=30)
    c.send(bytes(30))
    assert len(recv(c, 0.0)) == 3
    send(c, ack(0, window=0), 0.1)  # the peer took back its whole window
    c.handle_timer(1.0)
    recv_nothing(c, 1.0)  # go-back-N finds no room to resend anything
    t = deadline(c)
    assert t == pytest.approx(3.0)  # the persist timer, at the backed-off RTO
    c.handle_timer(t)
    assert recv(c, t) == [replace(REPLY, seq=ISS)]  # a probe: snd_una - 1
    send(c, ack(30, window=30), t + 0.1)
    assert c.snd_una == ISS + 31
    assert c.get_timer() is None


# -------------------------------------------------------------- wraparound


def test_send_across_sequence_wrap() -> None:
    iss = 0xFFFFFFF0
    c = established(iss=iss, mss=10)
    c.send(bytes(range(40)))
    out = recv(c, 0.0)
    assert [(s.seq, s.payload) for s in out] == [
        (0xFFFFFFF1, bytes(range(10))),
        (0xFFFFFFFB, bytes(range(10, 20))),
        (0x00000005, bytes(range(20, 30))),
        (0x0000000F, bytes(range(30, 40))),
    ]
    send(c, replace(TEMPLATE, ack=0x0F), 0.1)  # acknowledges across 0
    assert c.snd_una == 0x0F
    assert c.unsent == 10
    c.handle_timer(1.1)  # the last segment is retransmitted
    assert recv(c, 1.1) == [replace(REPLY, seq=0x0F, payload=bytes(range(30, 40)), flags=PSH | ACK)]
    c.close()
    send(c, replace(TEMPLATE, ack=0x19), 1.2)
    assert recv(c, 1.2) == [replace(REPLY, seq=0x19, flags=FIN | ACK)]
    send(c, replace(TEMPLATE, ack=0x1A), 1.3)
    assert c.state is State.FIN_WAIT_2


def test_fast_retransmit_across_sequence_wrap() -> None:
    iss = 0xFFFFFFEC  # the second segment straddles 0
    c = established(iss=iss, mss=10)
    c.send(bytes(range(50)))
    recv(c, 0.0)
    for t in (0.1, 0.11, 0.12, 0.13):
        send(c, replace(TEMPLATE, ack=iss + 11), t)
    assert recv(c, 0.13) == [replace(REPLY, seq=iss + 11, payload=bytes(range(10, 20)))]
    send(c, replace(TEMPLATE, ack=(iss + 51) & 0xFFFFFFFF), 0.2)
    assert c.snd_una == 0x1F
    assert c.get_timer() is None
