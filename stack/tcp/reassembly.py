"""Out-of-order segment queue for the receive side.

Theory of operation: segments that arrive beyond ``rcv_nxt`` are kept as
non-overlapping ``(offset, bytes)`` runs sorted by offset, where the offset is
the distance from the sequence number the queue was last aligned to. New data
that overlaps what is held is trimmed to the gaps (the first copy wins, as in
RFC 5722's spirit and Linux's), adjacent runs are coalesced, and the total is
bounded: a segment that would exceed the bound is dropped whole, which TCP
treats as loss and the sender repairs.
"""

from __future__ import annotations

from stack.seq import seq_sub


class Reassembly:
    """Holds out-of-order bytes keyed by sequence number."""

    __slots__ = ("_runs", "limit", "size")

    def __init__(self, limit: int) -> None:
        self._runs: list[tuple[int, bytes]] = []  # (seq, data), sorted, disjoint, non-adjacent
        self.limit = limit  # most bytes held
        self.size = 0  # bytes held now

    def __bool__(self) -> bool:
        return bool(self._runs)

    def blocks(self) -> list[tuple[int, int]]:
        """The held ranges as ``(start, end)`` sequence numbers (for SACK)."""
        return [(s, (s + len(d)) & 0xFFFFFFFF) for s, d in self._runs]

    def insert(self, rcv_nxt: int, seq: int, data: bytes) -> bool:
        """Hold ``data`` starting at ``seq`` (beyond ``rcv_nxt``).

        Returns:
            False when the bytes were dropped for lack of room.
        """
        start = seq_sub(seq, rcv_nxt)
        end = start + len(data)
        # Cut the new data into the pieces not already held.
        pieces: list[tuple[int, bytes]] = []
        cursor = start
        for rseq, rdata in self._runs:
            rs = seq_sub(rseq, rcv_nxt)
            re_ = rs + len(rdata)
            if re_ <= cursor:
                continue
            if rs >= end:
                break
            if rs > cursor:
                pieces.append((cursor, data[cursor - start : rs - start]))
            cursor = max(cursor, re_)
        if cursor < end:
            pieces.append((cursor, data[cursor - start :]))
        added = sum(len(p) for _, p in pieces)
        if added == 0:
            return True
        if self.size + added > self.limit:
            return False
        self.size += added
        merged = [(seq_sub(s, rcv_nxt), d) for s, d in self._runs]
        merged.extend(pieces)
        merged.sort(key=lambda r: r[0])
        runs: list[tuple[int, bytes]] = []
        for off, d in merged:
            if runs and runs[-1][0] + len(runs[-1][1]) == off:
                prev_off, prev = runs[-1]
                runs[-1] = (prev_off, prev + d)
            else:
                runs.append((off, d))
        self._runs = [((rcv_nxt + off) & 0xFFFFFFFF, d) for off, d in runs]
        return True

    def pop_ready(self, rcv_nxt: int) -> bytes | None:
        """Remove and return the bytes that now continue ``rcv_nxt``, if any.

        Runs wholly below ``rcv_nxt`` (already delivered through a retransmission)
        are discarded; a run straddling it is trimmed.
        """
        while self._runs:
            rseq, data = self._runs[0]
            off = seq_sub(rseq, rcv_nxt)
            if off > 0:
                return None
            del self._runs[0]
            self.size -= len(data)
            if off + len(data) > 0:
                return data[-off:] if off else data
        return None
