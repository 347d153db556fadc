"""Congestion control for the server-to-client direction.

A small interface in the shape of aioquic's ``congestion/base.py``: the
connection reports ACKs and loss, and reads ``cwnd``. ``Reno`` follows
RFC 5681 (slow start, congestion avoidance, and the window reductions on
fast retransmit and on timeout).
"""

from __future__ import annotations


class CongestionControl:
    """Base class: an unlimited window (no congestion control)."""

    __slots__ = ("cwnd", "mss", "ssthresh")

    def __init__(self, mss: int) -> None:
        self.mss = mss
        self.cwnd = 1 << 30  # congestion window, bytes
        self.ssthresh = 1 << 30  # slow-start threshold, bytes

    def on_ack(self, acked: int, flight: int) -> None:
        """``acked`` new bytes were acknowledged with ``flight`` bytes outstanding before."""

    def on_fast_retransmit(self, flight: int) -> None:
        """Three duplicate ACKs signalled a loss."""

    def on_timeout(self, flight: int) -> None:
        """The retransmission timer expired."""


class Reno(CongestionControl):
    """RFC 5681 Reno."""

    __slots__ = ()

    def __init__(self, mss: int) -> None:
        super().__init__(mss)
        self.cwnd = 10 * mss  # RFC 6928 initial window

    def on_ack(self, acked: int, flight: int) -> None:
        if flight + self.mss < self.cwnd:
            return  # RFC 7661: do not grow a window the sender is not using
        if self.cwnd < self.ssthresh:
            self.cwnd += min(acked, self.mss)  # RFC 5681 3.1 (3.2) slow start
        else:
            self.cwnd += max(1, self.mss * self.mss // self.cwnd)  # (3.3)

    def on_fast_retransmit(self, flight: int) -> None:
        self.ssthresh = max(flight // 2, 2 * self.mss)  # RFC 5681 (4)
        self.cwnd = self.ssthresh

    def on_timeout(self, flight: int) -> None:
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.mss  # RFC 5681 3.1: loss window is one segment
