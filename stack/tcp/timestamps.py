"""TCP timestamps (RFC 7323 3-5): the TSval clock, TS.Recent and PAWS, RTT samples.

Theory of operation: our TSval is the caller's ``now`` in milliseconds plus a
per-connection offset (RFC 7323 5.4 and 7.1 ask for one, so that TSvals do
not reveal a host clock); the offset is derived from the ISN, which the caller
chose at random, so nothing here needs a random source. The peer echoes a
TSval back in TSecr; ``now`` minus that is an RTT sample on every ACK that
acknowledges new data (RTTM, RFC 7323 4), retransmission or not.

TS.Recent is the TSval we echo. It follows RFC 7323 4.3: it is updated from a
segment whose TSval is not older than TS.Recent and whose sequence number is
not beyond the last ACK we sent (so it is the in-sequence segment that a
delayed ACK acknowledges, not a later out-of-order one). PAWS (RFC 7323 5.3
R1) rejects a non-RST segment whose TSval is older than TS.Recent; once the
connection has been idle for 24 days TS.Recent is no longer valid (5.5).
All comparisons are modulo 2**32 (RFC 7323 5.2).
"""

from __future__ import annotations

from stack.seq import HALF, MASK, seq_ge, seq_le, seq_lt

TS_OPTION_LEN = 12  # NOP, NOP, kind 8, length 10 (RFC 7323 Appendix A layout)
TS_HZ = 1000  # RFC 7323 5.4: a clock between 1 ms and 1 s per tick
PAWS_IDLE = 24 * 24 * 3600.0  # RFC 7323 5.5: TS.Recent expires after 24 days idle


def offset_for(isn: int) -> int:
    """The TSval offset for a connection whose ISN is ``isn`` (a fixed bijection)."""
    return (isn * 0x9E3779B1) & MASK


class Timestamps:
    """Negotiated timestamp state of one connection."""

    __slots__ = ("_last_now", "_last_val", "offset", "recent", "recent_at")

    def __init__(self, recent: int = 0, recent_at: float | None = None, offset: int = 0) -> None:
        self.offset = offset  # added to now in milliseconds (``offset_for(iss)``)
        self.recent = recent  # TS.Recent: the TSval we echo in TSecr
        self.recent_at = recent_at  # when TS.Recent was set (RFC 7323 5.5); None: unknown
        self._last_now = -1.0
        self._last_val = 0

    def clock(self, now: float) -> int:
        """Our TSval at ``now``."""
        if now != self._last_now:
            self._last_now = now
            self._last_val = (int(now * TS_HZ) + self.offset) & MASK
        return self._last_val

    def paws_rejects(self, tsval: int, now: float) -> bool:
        """RFC 7323 5.3 R1: an older TSval than TS.Recent (while TS.Recent is valid)."""
        if not seq_lt(tsval, self.recent):
            return False
        return self.recent_at is None or now - self.recent_at <= PAWS_IDLE

    def update(self, tsval: int, seq: int, last_ack_sent: int, now: float) -> None:
        """RFC 7323 4.3 (1) / 5.3 R3: record TS.Recent from an acceptable segment."""
        if seq_le(seq, last_ack_sent) and (
            seq_ge(tsval, self.recent)
            or (self.recent_at is not None and now - self.recent_at > PAWS_IDLE)  # 5.5
        ):
            self.recent = tsval
            self.recent_at = now

    def rtt(self, tsecr: int, now: float) -> float | None:
        """The RTT sample a TSecr gives at ``now`` (RFC 7323 4.1), or None if nonsense."""
        ticks = (self.clock(now) - tsecr) & MASK
        if ticks >= HALF or tsecr == 0:
            return None  # from the future, or 0 (as Linux: a peer that echoes nothing)
        return ticks / TS_HZ
