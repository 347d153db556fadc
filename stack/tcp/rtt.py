"""Retransmission timeout estimation (RFC 6298)."""

from __future__ import annotations


class RttEstimator:
    """SRTT/RTTVAR smoothing and the RTO with exponential backoff.

    Samples come only from segments that were not retransmitted (Karn's rule);
    the caller enforces that by timing one segment at a time.
    """

    __slots__ = ("_base", "backoff", "rto_max", "rto_min", "rttvar", "srtt")

    def __init__(self, initial: float, rto_min: float, rto_max: float) -> None:
        self.srtt: float | None = None  # smoothed round-trip time, seconds
        self.rttvar = initial / 2  # round-trip time variation, seconds
        self.rto_min = rto_min
        self.rto_max = rto_max
        self.backoff = 0  # doublings since the last new ACK (RFC 6298 5.5)
        self._base = initial

    def sample(self, rtt: float, expected: int = 1) -> None:
        """Feed one RTT measurement (RFC 6298 2.2 and 2.3).

        Args:
            rtt: the measurement, seconds.
            expected: with timestamps, the samples expected per RTT,
                ceil(FlightSize / (2 * SMSS)); RFC 7323 Appendix G divides alpha and
                beta by it so that SRTT and RTTVAR keep the history RFC 6298 meant
                for one sample per RTT.
        """
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            # alpha = 1/8, beta = 1/4 (RFC 6298 2.3), each / ExpectedSamples.
            alpha = 0.125 / expected
            beta = 0.25 / expected
            self.rttvar = (1 - beta) * self.rttvar + beta * abs(self.srtt - rtt)
            self.srtt = (1 - alpha) * self.srtt + alpha * rtt
        # G (clock granularity) is taken as 1 ms.
        self._base = self.srtt + max(0.001, 4 * self.rttvar)

    @property
    def rto(self) -> float:
        """The current timeout, clamped (RFC 6298 2.4, 2.5) and backed off (5.5)."""
        base = min(max(self._base, self.rto_min), self.rto_max)
        return min(base * (1 << self.backoff), self.rto_max)
