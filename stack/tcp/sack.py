"""Selective acknowledgments: the blocks we send (RFC 2018) and the sender's
scoreboard for the peer's (RFC 6675).

Theory of operation, receive side: the out-of-order queue (``Reassembly``)
knows which ranges we hold; ``choose_blocks`` orders them for the SACK option
as RFC 2018 4 asks -- the block holding the most recently received segment
first, then the blocks reported most recently -- using a short list of the
sequence numbers of recent out-of-order arrivals, most recent first
(``MAX_RECENT``), each looked up by bisection, and then the highest runs.
A duplicate ACK goes out per out-of-order segment, so this work is bounded
by the block count, never by the number of runs held.

Send side: ``Scoreboard`` keeps the ranges of our sequence space the peer has
SACKed above ``snd_una`` as sorted, disjoint ``(start, end)`` pairs. RFC 6675's
IsLost(seq) -- more than (DupThresh - 1) * SMSS bytes or DupThresh
discontiguous ranges SACKed above seq -- holds for every unSACKed octet below
one boundary, so ``lost_edge`` computes that boundary once and ``pipe`` and
``next_hole`` work hole by hole, not octet by octet. Ranges are few (each ACK
carries at most 4 blocks and they merge); a hostile peer's flood of tiny
blocks is capped at ``MAX_RANGES``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stack.seq import seq_add, seq_gt, seq_in, seq_le, seq_lt, seq_sub

if TYPE_CHECKING:
    from collections.abc import Sequence

    from stack.tcp.reassembly import Reassembly

DUP_THRESH = 3  # RFC 6675 / RFC 5681: duplicate ACKs that signal a loss
MAX_DUPTHRESH = 32  # the most reordering tolerated, in segments (Linux allows 300)
MAX_RANGES = 64  # SACKed ranges remembered; beyond that the highest are dropped
MAX_RECENT = 8  # recent out-of-order arrivals remembered for block ordering


def choose_blocks(held: Reassembly, recent: list[int], limit: int) -> tuple[tuple[int, int], ...]:
    """The SACK blocks for an outgoing segment, most recent first (RFC 2018 4).

    Bounded work whatever is held: a bisect per recent arrival, then the few
    highest runs (a hostile peer can make many runs; a duplicate ACK is sent
    for each of its segments).

    Args:
        held: the out-of-order queue.
        recent: sequence numbers of recent out-of-order segments, most recent
            first; pruned in place of those no longer held or already covered.
        limit: the most blocks that fit (4, or 3 alongside timestamps: RFC 2018 3).
    """
    out: list[tuple[int, int]] = []
    keep: list[int] = []
    for s in recent:
        block = held.block_at(s)
        if block is not None and block not in out:
            out.append(block)
            keep.append(s)
    if recent:  # (an empty one may be the connection's shared empty tuple)
        recent[:] = keep[:MAX_RECENT]
    if len(out) < limit:
        # RFC 2018 4: the remaining slots repeat older blocks; with no memory of
        # which were reported, the highest go (of the top ``limit`` runs at most
        # len(out) are already in, so these are enough).
        out.extend(b for b in held.top_blocks(limit) if b not in out)
    return tuple(out[:limit])


class Scoreboard:
    """The peer's SACKed ranges above snd_una (RFC 6675 2, "scoreboard")."""

    __slots__ = ("_ranges", "sacked")

    def __init__(self) -> None:
        # Sorted, disjoint, non-adjacent; never changed in place, always replaced,
        # so a connection with nothing SACKed shares one empty tuple (memory per
        # idle connection: an empty list is 56 bytes).
        self._ranges: Sequence[tuple[int, int]] = ()
        self.sacked = 0  # bytes SACKed in total

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def ranges(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    def clear(self) -> None:
        """Forget everything (RFC 2018 8 / RFC 6675 5.1: after an RTO the peer may renege)."""
        self._ranges = ()
        self.sacked = 0

    def update(self, blocks: tuple[tuple[int, int], ...], una: int, high: int) -> bool:
        """Merge a segment's SACK blocks (RFC 6675 "Update ()").

        Blocks outside ``(una, high]`` are ignored: D-SACK reports (RFC 2883) lie
        below ``una``, and a block beyond ``high`` SACKs what was never sent.

        Returns:
            True when the blocks SACKed octets not SACKed before (what makes the
            ACK a duplicate ACK in RFC 6675's sense).
        """
        spans = [(seq_sub(s, una), seq_sub(e, una)) for s, e in self._ranges]
        added = False
        for left, right in blocks:
            if not (seq_lt(left, right) and seq_gt(right, una) and seq_le(right, high)):
                continue
            spans.append((max(seq_sub(left, una), 0), seq_sub(right, una)))
            added = True
        if not added:
            return False
        spans.sort()
        merged: list[list[int]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                if e > merged[-1][1]:
                    merged[-1][1] = e
            else:
                merged.append([s, e])
        del merged[MAX_RANGES:]
        total = sum(e - s for s, e in merged)
        self._ranges = [(seq_add(una, s), seq_add(una, e)) for s, e in merged]
        grew = total > self.sacked
        self.sacked = total
        return grew

    def advance(self, una: int) -> None:
        """The cumulative ACK moved to ``una``: drop what it covers."""
        ranges = self._ranges
        if not ranges or seq_lt(una, ranges[0][0]):
            return
        kept: list[tuple[int, int]] = []
        total = 0
        for s, e in ranges:
            if seq_le(e, una):
                continue
            if seq_lt(s, una):
                s = una
            kept.append((s, e))
            total += seq_sub(e, s)
        self._ranges = kept
        self.sacked = total

    def highest(self) -> int | None:
        """The end of the highest SACKed range (RFC 6675 NextSeg (1.b))."""
        return self._ranges[-1][1] if self._ranges else None

    def contains(self, seq: int) -> tuple[int, int] | None:
        """The SACKed range holding ``seq``, if any."""
        for s, e in self._ranges:
            if seq_in(seq, s, e):
                return s, e
        return None

    def next_start(self, seq: int) -> int | None:
        """The start of the first SACKed range beyond ``seq``."""
        for s, _ in self._ranges:
            if seq_gt(s, seq):
                return s
        return None

    def lost_edge(self, una: int, mss: int, dupthresh: int = DUP_THRESH) -> int:
        """Every unSACKed octet below the result is lost by RFC 6675 IsLost()."""
        ranges = self._ranges
        total = 0
        for i in range(len(ranges) - 1, -1, -1):
            s, e = ranges[i]
            total += seq_sub(e, s)
            if total > (dupthresh - 1) * mss or len(ranges) - i >= dupthresh:
                return s
        return una

    def covers(self, start: int, end: int) -> bool:
        """Whether ``[start, end)`` lies inside one SACKed range."""
        for s, e in self._ranges:
            if seq_le(s, start) and seq_le(end, e):
                return True
            if seq_gt(s, start):
                return False
        return False

    def _sacked_below(self, una: int, x: int) -> int:
        n = 0
        for s, e in self._ranges:
            if seq_le(x, s):
                break
            n += seq_sub(e if seq_lt(e, x) else x, s)
        return n

    def pipe(
        self, una: int, high: int, high_rxt: int, mss: int, dupthresh: int = DUP_THRESH
    ) -> int:
        """RFC 6675 SetPipe(): octets presumed in the network.

        Each unSACKed octet below ``high`` counts once if not lost and once more
        if retransmitted (below ``high_rxt``, the end of what was resent).
        """
        unsacked = seq_sub(high, una) - self.sacked
        edge = self.lost_edge(una, mss, dupthresh)
        lost = seq_sub(edge, una) - self._sacked_below(una, edge)
        rxt = 0
        if seq_gt(high_rxt, una):
            rxt = seq_sub(high_rxt, una) - self._sacked_below(una, high_rxt)
        return unsacked - lost + rxt

    def next_hole(self, start: int, limit: int) -> tuple[int, int] | None:
        """The first unSACKed range at or after ``start`` and below ``limit``."""
        for s, e in self._ranges:
            if seq_lt(start, s):
                end = s if seq_lt(s, limit) else limit
                return (start, end) if seq_lt(start, end) else None
            if seq_lt(start, e):
                start = e
        return (start, limit) if seq_lt(start, limit) else None

    def rescue_hole(self, una: int, high: int) -> tuple[int, int] | None:
        """The unSACKed range holding the highest unSACKed octet below ``high``."""
        ranges = self._ranges
        if not ranges or seq_lt(ranges[-1][1], high):
            start = ranges[-1][1] if ranges else una
            return (start, high) if seq_lt(start, high) else None
        end = ranges[-1][0]
        start = ranges[-2][1] if len(ranges) > 1 else una
        return (start, end) if seq_lt(start, end) else None
