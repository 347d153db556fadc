"""Tail loss probe (RFC 8985 7) and the DupThresh cap, packet level with a fake clock.

Builders leave the probe out unless asked (``tlp=True``); see tcp_helpers.
"""

from __future__ import annotations

from dataclasses import replace

from stack.config import TcpConfig
from stack.tcp.segment import TcpSegment
from stack.wire.tcp import TcpOptions

from tcp_helpers import ISS, TEMPLATE, established, recv, send

SACK_ONLY = TcpOptions(sack_permitted=True)


def ack(n: int) -> TcpSegment:
    return replace(TEMPLATE, ack=ISS + 1 + n)


def offsets(segs: list[TcpSegment]) -> list[int]:
    return [s.seq - ISS - 1 for s in segs if s.payload]


def test_probe_resends_the_last_segment_after_two_srtt() -> None:
    c = established(mss=10, options=SACK_ONLY, rtt=0.1, tlp=True)
    c.send(bytes(30))
    assert offsets(recv(c, 1.0)) == [0, 10, 20]
    assert c.timers.rto is not None and c.timers.tlp == 1.0 + 0.2  # PTO = 2 SRTT
    assert c.get_timer() == c.timers.tlp < c.timers.rto
    c.handle_timer(1.2)
    assert offsets(recv(c, 1.2)) == [20]  # the tail goes again; the RTO is still armed
    assert c.timers.rto is not None
    send(c, ack(30), 1.3)  # it repaired the loss
    assert c.timers.tlp is None and c.timers.rto is None


def test_probe_sends_new_data_when_the_window_allows() -> None:
    # cwnd-limited with more queued: the probe is the next new segment.
    c = established(mss=10, options=SACK_ONLY, rtt=0.1, tlp=True)
    c.send(bytes(200))
    assert offsets(recv(c, 1.0)) == list(range(0, 100, 10))  # the initial window
    c.handle_timer(c.timers.tlp or 0.0)
    assert offsets(recv(c, 1.2)) == [100]


def test_one_segment_in_flight_waits_for_a_delayed_ack_too() -> None:
    c = established(mss=10, options=SACK_ONLY, rtt=0.05, tlp=True)
    c.send(bytes(5))
    recv(c, 1.0)
    # RFC 8985 7.2: PTO = max(2 SRTT, 1.5 SRTT + WCDelAckT) for a single segment.
    assert c.timers.tlp is not None
    assert abs(c.timers.tlp - (1.0 + 0.075 + c.config.delayed_ack)) < 1e-9


def test_no_probe_when_disabled() -> None:
    cfg = TcpConfig(tail_loss_probe=False, time_wait=2.0)
    c = established(mss=10, options=SACK_ONLY, rtt=0.1, tlp=True, config=cfg)
    c.send(bytes(30))
    recv(c, 1.0)
    assert c.timers.tlp is None and c.get_timer() == c.timers.rto


def test_raised_dupthresh_is_capped_by_half_the_window() -> None:
    c = established(mss=10, options=SACK_ONLY)
    c._dupthresh = 20  # after much reordering
    assert c.cc.cwnd == 100
    assert c._dup_thresh() == 5  # ten segments of window: at most five
    c._dupthresh = 4
    assert c._dup_thresh() == 4
