"""Congestion control for the server-to-client direction.

A small interface in the shape of aioquic's ``congestion/base.py``: the
connection reports what happened -- new data acknowledged outside loss
recovery, a loss found by duplicate ACKs or SACK (once per recovery episode),
the end of that recovery, a retransmission timeout -- and reads ``cwnd`` and
``ssthresh``. Loss *recovery* (which segments to resend, RFC 6675 pipe,
RFC 6582 window inflation) belongs to the connection; these classes only size
the window. Every call gets ``now`` so that time-based algorithms (CUBIC,
``stack.tcp.cubic``) need nothing else.

``NewReno`` is RFC 5681 with the RFC 6582 exit rule; ``stack.tcp.cubic.make``
picks an algorithm by ``TcpConfig.congestion``.
"""

from __future__ import annotations


class CongestionControl:
    """Base class: an unlimited window (no congestion control)."""

    __slots__ = ("cwnd", "mss", "ssthresh")

    def __init__(self, mss: int) -> None:
        self.mss = mss  # sender MSS (SMSS), bytes
        self.cwnd = 1 << 30  # congestion window, bytes
        self.ssthresh = 1 << 30  # slow-start threshold, bytes

    def copy(self) -> CongestionControl:
        """Every field copied (loss recovery's undo). Not ``copy.copy``: compiled with
        mypyc (scripts/build-compiled), a class's ``__new__`` runs its ``__init__``,
        which the copy protocol calls without arguments."""
        clone = CongestionControl(self.mss)
        clone.cwnd, clone.ssthresh = self.cwnd, self.ssthresh
        return clone

    def on_ack(self, acked: int, flight: int, now: float, srtt: float, acks: int = 1) -> None:
        """``acked`` new bytes were acknowledged outside loss recovery.

        Args:
            acked: bytes newly acknowledged.
            flight: the most bytes outstanding after any send in the current
                window (at least those outstanding before this ACK): whether the
                sender is using its window (RFC 7661).
            now: the current time.
            srtt: the smoothed RTT (0.0 before any sample).
            acks: how many ACKs brought them (the Stack merges a run of pure
                ACKs from one input batch); slow start's per-ACK limit scales.
        """

    def on_loss(self, flight: int, now: float) -> None:
        """Duplicate ACKs or SACK found a loss: loss recovery begins (once per episode)."""

    def on_recovery_end(self, flight: int, now: float) -> None:
        """A cumulative ACK covered the recovery point.

        RFC 6582 3.2 (3), option (1): cwnd = min(ssthresh, max(FlightSize, SMSS) + SMSS),
        so the data released at the end of recovery does not go out as one burst.
        """
        self.cwnd = min(self.ssthresh, max(flight, self.mss) + self.mss)

    def on_timeout(self, flight: int, now: float) -> None:
        """The retransmission timer expired."""


class NewReno(CongestionControl):
    """RFC 5681 slow start and congestion avoidance; RFC 6582 reductions."""

    __slots__ = ("_acked",)

    def __init__(self, mss: int) -> None:
        super().__init__(mss)
        self.cwnd = 10 * mss  # RFC 6928 initial window
        self._acked = 0  # bytes acknowledged toward the next congestion-avoidance step

    def copy(self) -> NewReno:
        clone = NewReno(self.mss)
        clone.cwnd, clone.ssthresh, clone._acked = self.cwnd, self.ssthresh, self._acked
        return clone

    def on_ack(self, acked: int, flight: int, now: float, srtt: float, acks: int = 1) -> None:
        if self.cwnd < self.ssthresh:
            if 2 * flight <= self.cwnd:
                return  # RFC 7661: not using half the window (Linux's slow-start test)
            self.cwnd += min(acked, 2 * self.mss * acks)  # RFC 5681 3.1 (2), RFC 3465 L=2*SMSS
            return
        if flight + self.mss < self.cwnd:
            return  # RFC 7661: do not grow a window the sender is not using
        # RFC 5681 3.1, congestion avoidance with byte counting (the RECOMMENDED
        # way): one SMSS per cwnd of acknowledged bytes.
        self._acked += acked
        if self._acked >= self.cwnd:
            self._acked -= self.cwnd
            self.cwnd += self.mss

    def on_loss(self, flight: int, now: float) -> None:
        # RFC 5681 (4) and RFC 6582 3.2 (2). The connection adds the 3 * SMSS
        # inflation of fast recovery itself (only peers without SACK need it).
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.ssthresh
        self._acked = 0

    def on_timeout(self, flight: int, now: float) -> None:
        self.ssthresh = max(flight // 2, 2 * self.mss)
        self.cwnd = self.mss  # RFC 5681 3.1: the loss window is one segment
        self._acked = 0


Reno = NewReno  # the name the connection used before RFC 6582 recovery
