"""The receive side: acceptability, trimming, reassembly, ACK policy, the window.

RFC 9293 3.8.6 and 3.10.7.4, RFC 5681 4.2 (ACK generation).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from stack.config import TcpConfig
from stack.errors import LocalProtocolError
from stack.events import DataReceived, PeerFinished
from stack.tcp.connection import State
from stack.tcp.reassembly import RUN_OVERHEAD
from stack.tcp.segment import TcpSegment

from tcp_helpers import (
    ACK,
    FIN,
    FLOW,
    IRS,
    ISS,
    PSH,
    REPLY,
    TEMPLATE,
    WINDOW,
    deadline,
    drain,
    established,
    recv,
    recv_nothing,
    send,
)


def data(seq_off: int, payload: bytes, *, flags: int = ACK, ack: int = ISS + 1) -> TcpSegment:
    """The peer's segment ``seq_off`` bytes into its stream."""
    seq = (IRS + 1 + seq_off) & 0xFFFFFFFF
    return replace(TEMPLATE, seq=seq, payload=payload, flags=flags, ack=ack)


def ack_for(n: int, window: int | None = None) -> TcpSegment:
    """Our ACK after ``n`` payload bytes from the peer (none consumed)."""
    return replace(REPLY, ack=IRS + 1 + n, window=WINDOW - n if window is None else window)


# ------------------------------------------------------------ acceptability


def test_segment_beyond_window_gets_ack_and_changes_nothing() -> None:
    c = established(config=TcpConfig(rcv_buf=1000))
    send(c, data(1000, b"x" * 10), 0.1)  # starts at the right edge
    assert recv(c, 0.1) == [replace(REPLY, window=1000)]
    send(c, data(5000, b"y"), 0.2)
    assert recv(c, 0.2) == [replace(REPLY, window=1000)]
    assert c.rcv_nxt == IRS + 1
    assert c.state is State.ESTABLISHED
    assert drain(c) == []


def test_old_duplicate_gets_ack_and_is_dropped() -> None:
    c = established()
    send(c, data(0, b"abc"), 0.1)
    send(c, data(0, b"abc"), 0.2)  # a whole duplicate
    assert recv(c, 0.2) == [ack_for(3)]  # at once: RFC 9293 3.10.7.4, unacceptable
    assert drain(c) == [DataReceived(FLOW, b"abc")]
    send(c, replace(TEMPLATE, seq=IRS - 5000), 0.3)  # an old pure ACK
    assert recv(c, 0.3) == [ack_for(3)]
    assert drain(c) == []


def test_data_partly_before_rcv_nxt_is_trimmed() -> None:
    c = established()
    send(c, data(0, b"abcdef"), 0.1)
    assert drain(c) == [DataReceived(FLOW, b"abcdef")]
    send(c, data(3, b"defghi"), 0.2)  # three old bytes, three new
    assert drain(c) == [DataReceived(FLOW, b"ghi")]
    assert c.rcv_nxt == IRS + 10
    assert recv(c, 0.2) == [ack_for(9)]  # the second segment since our last ACK


def test_data_beyond_window_is_trimmed() -> None:
    c = established(config=TcpConfig(rcv_buf=100))
    send(c, data(0, bytes(range(150))), 0.1)
    assert drain(c) == [DataReceived(FLOW, bytes(range(100)))]
    assert c.get_timer() == pytest.approx(0.14)
    recv_nothing(c, 0.1)
    c.handle_timer(0.15)
    assert recv(c, 0.15) == [replace(REPLY, ack=IRS + 101, window=0)]


def test_ack_for_unsent_data_is_answered_and_segment_dropped() -> None:
    c = established()
    send(c, data(0, b"abc", ack=ISS + 50), 0.1)
    assert recv(c, 0.1) == [REPLY]  # RFC 9293 3.10.7.4: SEG.ACK > SND.NXT
    assert drain(c) == []
    assert c.rcv_nxt == IRS + 1


# -------------------------------------------------------------- wraparound


def test_receive_across_sequence_wrap() -> None:
    irs = 0xFFFFFF00
    c = established(irs=irs)
    chunks = [bytes([i]) * 100 for i in range(5)]  # 500 bytes, crossing 0 at byte 255
    seq = irs + 1
    for i, chunk in enumerate(chunks):
        send(c, replace(TEMPLATE, seq=seq & 0xFFFFFFFF, payload=chunk), 0.1 * (i + 1))
        seq += len(chunk)
    assert drain(c) == [DataReceived(FLOW, b"".join(chunks))]
    assert c.rcv_nxt == (irs + 501) & 0xFFFFFFFF == 0xF5
    c.handle_timer(0.6)
    assert recv(c, 0.6) == [replace(REPLY, ack=0xF5, window=WINDOW - 500)]


def test_out_of_order_across_sequence_wrap() -> None:
    irs = 0xFFFFFFF0
    c = established(irs=irs)
    first, second = b"a" * 20, b"b" * 20  # the second starts after 0
    send(c, replace(TEMPLATE, seq=(irs + 21) & 0xFFFFFFFF, payload=second), 0.1)
    assert recv(c, 0.1) == [replace(REPLY, ack=irs + 1)]
    send(c, replace(TEMPLATE, seq=irs + 1, payload=first), 0.2)
    assert recv(c, 0.2) == [replace(REPLY, ack=(irs + 41) & 0xFFFFFFFF, window=WINDOW - 40)]
    assert drain(c) == [DataReceived(FLOW, first + second)]


def test_fin_across_sequence_wrap() -> None:
    irs = 0xFFFFFFFE  # the FIN sits at 0xFFFFFFFF + 3 = 2
    c = established(irs=irs)
    send(c, replace(TEMPLATE, seq=0xFFFFFFFF, payload=b"abc", flags=FIN | ACK), 0.1)
    assert c.state is State.CLOSE_WAIT
    recv_nothing(c, 0.1)  # a FIN that closes first waits for the delayed ACK
    c.handle_timer(deadline(c))
    assert recv(c, 0.2) == [replace(REPLY, ack=3, window=WINDOW - 4)]
    assert drain(c) == [DataReceived(FLOW, b"abc"), PeerFinished(FLOW)]


# ----------------------------------------------------------- in-order / OOO


def test_in_order_data_is_coalesced_into_one_event() -> None:
    c = established()
    send(c, data(0, b"abc"), 0.1)
    send(c, data(3, b"def"), 0.1)
    send(c, data(6, b"ghi", flags=PSH | ACK), 0.1)
    assert drain(c) == [DataReceived(FLOW, b"abcdefghi")]
    assert drain(c) == []


def test_out_of_order_held_until_the_hole_fills() -> None:
    c = established()
    send(c, data(3, b"def"), 0.1)
    assert recv(c, 0.1) == [REPLY]  # RFC 5681 4.2: an immediate duplicate ACK
    send(c, data(9, b"jkl"), 0.2)
    assert recv(c, 0.2) == [REPLY]
    assert drain(c) == []
    send(c, data(0, b"abc"), 0.3)  # fills the first hole
    assert recv(c, 0.3) == [ack_for(6)]  # at once
    assert drain(c) == [DataReceived(FLOW, b"abcdef")]
    send(c, data(6, b"ghi"), 0.4)  # fills the second
    assert recv(c, 0.4) == [ack_for(12)]
    assert drain(c) == [DataReceived(FLOW, b"ghijkl")]
    assert c.get_timer() is None


def test_out_of_order_overlaps_and_duplicates() -> None:
    c = established()
    send(c, data(4, b"efgh"), 0.1)
    send(c, data(4, b"efgh"), 0.1)  # duplicate held segment
    send(c, data(2, b"cdefghij"), 0.1)  # overlaps on both sides
    # RFC 5681 4.2: one immediate duplicate ACK per out-of-order segment.
    assert [s.ack for s in recv(c, 0.1)] == [IRS + 1] * 3
    send(c, data(0, b"abc"), 0.2)
    assert drain(c) == [DataReceived(FLOW, b"abcdefghij")]
    assert recv(c, 0.2) == [ack_for(10)]


def test_out_of_order_fin_waits_for_the_hole() -> None:
    c = established()
    send(c, data(3, b"def", flags=FIN | ACK), 0.1)
    assert recv(c, 0.1) == [REPLY]
    assert c.state is State.ESTABLISHED
    assert drain(c) == []
    send(c, data(0, b"abc"), 0.2)
    assert c.state is State.CLOSE_WAIT
    assert drain(c) == [DataReceived(FLOW, b"abcdef"), PeerFinished(FLOW)]
    assert recv(c, 0.2) == [replace(REPLY, ack=IRS + 8, window=WINDOW - 7)]


def test_bare_out_of_order_fin_is_acked_at_once() -> None:
    c = established()
    send(c, replace(TEMPLATE, seq=IRS + 4, flags=FIN | ACK), 0.1)
    assert recv(c, 0.1) == [REPLY]  # a duplicate ACK, as for out-of-order data
    send(c, data(0, b"abc"), 0.2)
    assert c.state is State.CLOSE_WAIT
    assert recv(c, 0.2) == [replace(REPLY, ack=IRS + 5, window=WINDOW - 4)]
    assert drain(c) == [DataReceived(FLOW, b"abc"), PeerFinished(FLOW)]


def test_out_of_order_queue_is_bounded() -> None:
    # Each run is charged its bytes and RUN_OVERHEAD: room for 8 bytes in two runs.
    c = established(config=TcpConfig(ooo_limit=8 + 2 * RUN_OVERHEAD))
    send(c, data(10, b"01234"), 0.1)  # held: 5 of 8, one run
    send(c, data(30, b"abcde"), 0.1)  # a second run: 10 bytes, dropped whole
    send(c, data(15, b"567"), 0.1)  # held: 8 of 8, still one run
    assert [s.ack for s in recv(c, 0.1)] == [IRS + 1] * 3  # a duplicate ACK each
    send(c, data(0, b"ABCDEFGHIJ"), 0.2)
    assert drain(c) == [DataReceived(FLOW, b"ABCDEFGHIJ01234567")]
    assert recv(c, 0.2) == [ack_for(18)]  # not 25: the dropped segment must come again
    send(c, data(18, b"xxabcde"), 0.3)
    assert drain(c) == [DataReceived(FLOW, b"xxabcde")]


# ----------------------------------------------------------------- ACK policy


def test_delayed_ack_for_one_segment() -> None:
    c = established(config=TcpConfig(delayed_ack=0.04))
    send(c, data(0, b"abc"), 1.0)
    recv_nothing(c, 1.0)
    assert c.get_timer() == pytest.approx(1.04)
    c.handle_timer(1.03)
    recv_nothing(c, 1.03)
    c.handle_timer(1.04)
    assert recv(c, 1.04) == [ack_for(3)]
    assert c.get_timer() is None


def test_two_full_segments_are_acked_at_once() -> None:
    c = established()
    full = 1460  # the MSS we advertised
    send(c, data(0, b"a" * full), 1.0)
    recv_nothing(c, 1.0)
    send(c, data(full, b"b" * full), 1.01)
    assert recv(c, 1.01) == [ack_for(2 * full)]
    assert c.get_timer() is None


def test_delayed_ack_rides_on_data() -> None:
    c = established()
    send(c, data(0, b"ping"), 1.0)
    c.send(b"pong")
    assert recv(c, 1.0) == [replace(ack_for(4), flags=PSH | ACK, payload=b"pong")]
    assert c.get_timer() == pytest.approx(2.0)  # only the retransmission timer


# ------------------------------------------------------------------- window


def test_window_closes_without_consumed_and_reopens_with_it() -> None:
    c = established(config=TcpConfig(rcv_buf=100))
    send(c, data(0, b"a" * 60), 0.1)
    t = deadline(c)
    assert t == pytest.approx(0.14)
    c.handle_timer(t)
    assert recv(c, t) == [replace(REPLY, ack=IRS + 61, window=40)]
    send(c, data(60, b"b" * 40), 0.2)
    t = deadline(c)
    assert t == pytest.approx(0.24)
    c.handle_timer(t)
    assert recv(c, t) == [replace(REPLY, ack=IRS + 101, window=0)]
    # Zero window: more data is not accepted, only acknowledged.
    send(c, data(100, b"c" * 10), 0.3)
    assert recv(c, 0.3) == [replace(REPLY, ack=IRS + 101, window=0)]
    assert drain(c) == [DataReceived(FLOW, b"a" * 60 + b"b" * 40)]
    c.consumed(100)
    assert recv(c, 0.4) == [replace(REPLY, ack=IRS + 101, window=100)]  # the window update
    send(c, data(100, b"c" * 10), 0.5)
    assert drain(c) == [DataReceived(FLOW, b"c" * 10)]


def test_receiver_sws_avoidance() -> None:
    # RFC 9293 3.8.6.2.2: the window opens only by min(rcv_buf / 2, MSS) or more.
    c = established(config=TcpConfig(rcv_buf=100))
    send(c, data(0, b"a" * 100), 0.1)
    c.handle_timer(0.2)
    assert recv(c, 0.2) == [replace(REPLY, ack=IRS + 101, window=0)]
    c.consumed(10)
    recv_nothing(c, 0.2)  # no update for 10 bytes
    send(c, data(99, b"a"), 0.3)  # a zero-window probe: the answer still says 0
    assert recv(c, 0.3) == [replace(REPLY, ack=IRS + 101, window=0)]
    c.consumed(39)
    recv_nothing(c, 0.4)  # 49 < 50
    c.consumed(1)
    assert recv(c, 0.5) == [replace(REPLY, ack=IRS + 101, window=50)]
    # The window is already half open: no update of its own, the next ACK carries it.
    c.consumed(50)
    recv_nothing(c, 0.6)
    send(c, data(101, b"b"), 0.7)  # out of order: answered at once
    assert recv(c, 0.7) == [replace(REPLY, ack=IRS + 101, window=100)]


def test_window_edge_never_moves_left() -> None:
    c = established(config=TcpConfig(rcv_buf=100))
    edges = []
    for i in range(10):
        send(c, data(10 * i, b"z" * 10), float(i))
        c.handle_timer(i + 0.5)
        for seg in recv(c, i + 0.5):
            edges.append(seg.ack + seg.window)
        if i % 3 == 0:
            c.consumed(10)
    assert edges
    assert edges == sorted(edges)


def test_zero_window_still_takes_acks() -> None:
    c = established(config=TcpConfig(rcv_buf=100))
    c.send(b"out")
    assert recv(c, 0.0) == [replace(REPLY, flags=PSH | ACK, payload=b"out", window=100)]
    send(c, data(0, b"a" * 100), 0.1)
    c.handle_timer(0.2)
    assert recv(c, 0.2) == [replace(REPLY, seq=ISS + 4, ack=IRS + 101, window=0)]
    # Data at rcv_nxt in a zero window, acknowledging our bytes.
    send(c, data(100, b"more", ack=ISS + 4), 0.2)
    assert c.snd_una == ISS + 4
    assert c.get_timer() is None  # nothing left to retransmit
    assert recv(c, 0.2) == [replace(REPLY, seq=ISS + 4, ack=IRS + 101, window=0)]


def test_consumed_rejects_more_than_delivered() -> None:
    c = established()
    send(c, data(0, b"abc"), 0.1)
    with pytest.raises(LocalProtocolError):
        c.consumed(4)
    c.consumed(3)


def test_data_after_peer_fin_is_ignored() -> None:
    c = established()
    send(c, data(0, b"", flags=FIN | ACK), 0.1)
    drain(c)
    recv(c, 0.1)
    send(c, data(1, b"late"), 0.2)  # beyond the FIN: cannot be real
    assert drain(c) == []
    assert c.rcv_nxt == IRS + 2


def test_data_after_a_silence_longer_than_rto_min_is_acked_at_once() -> None:
    # Linux's tcp_event_data_recv ("too long gap"): a sender that timed out sends one
    # segment (RFC 5681 3.1); a delayed ACK would hold it 40 ms on every timeout.
    c = established()
    send(c, replace(TEMPLATE, flags=ACK | PSH, payload=b"a"), 0.0)
    t = deadline(c)
    c.handle_timer(t)
    assert recv(c, t)[0].ack == IRS + 2
    send(c, replace(TEMPLATE, seq=IRS + 2, flags=ACK | PSH, payload=b"b"), 0.1)
    recv_nothing(c, 0.1)  # within rto_min of the last data: the usual delayed ACK
    t = deadline(c)
    assert t == pytest.approx(0.1 + c.config.delayed_ack)
    c.handle_timer(t)
    assert recv(c, t)[0].ack == IRS + 3
    later = 0.1 + c.config.rto_min + 0.01
    send(c, replace(TEMPLATE, seq=IRS + 3, flags=ACK | PSH, payload=b"c"), later)
    (ack,) = recv(c, later)  # at once
    assert ack.ack == IRS + 4
