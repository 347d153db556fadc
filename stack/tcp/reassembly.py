"""Out-of-order segment queue for the receive side (RFC 9293 3.10.7.4).

Theory of operation: segments that arrive beyond ``rcv_nxt`` are kept as
non-overlapping, non-adjacent runs sorted by sequence number. New data that
overlaps what is held is trimmed to the gaps (the first copy wins, as in RFC
5722's spirit and Linux's), and the runs it touches are coalesced into one.

Bounded work per segment: runs are keyed by their offset from ``_base``, a
sequence number at or below ``rcv_nxt`` (all held data lies within the
receive window, so the offsets do not wrap; ``_base`` moves up to ``rcv_nxt``
when the queue empties or falls a GiB behind). A parallel sorted list of run
starts is searched with ``bisect``, so an insert touches only the runs the
segment overlaps or abuts -- and those it merges away -- and the common cases
(the next segment after the top run, or a new run above it) touch none.
``block_at`` and ``top_blocks`` give the SACK code the same bounded access.

Bounded memory, as Linux's ``truesize``: every run is charged its payload
plus ``RUN_OVERHEAD`` (its Python objects) against ``limit`` and against
the receive buffer's room (the connection's buffer is what the Stack's
``MemoryBudget`` reserved, so the budget covers the objects), and at most
``max_runs`` runs are held. A segment that would exceed any of these is dropped
whole and counted in ``dropped``, which TCP treats as loss and the sender
repairs; the in-order segment that fills the hole never comes through here,
so the connection always progresses.

A run keeps its bytes as a list of the segments' payloads and joins them once,
when the run is delivered: a run kept as one ``bytes`` object, concatenated on
every arrival, would make a hole with N segments held behind it cost O(N^2)
copying -- about 1 ms per segment with 4 MiB held. Neighbouring chunks that
are both under ``SMALL_CHUNK`` bytes are joined (a copy of at most 1 KiB),
so one-byte segments cannot make a run's chunk list cost ~40 bytes of objects
per byte held.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import cast

from stack.compiled import COMPILED
from stack.seq import seq_add, seq_sub

# Bytes charged per run on top of its payload: the _Run object (56), its chunk
# list (64 with one slot), one chunk's bytes header (33), two ints (2 x 28) and
# the slots in _runs and _starts (16), rounded up (sys.getsizeof on CPython 3.11;
# see test_reassembly.test_run_overhead_covers_the_objects).
RUN_OVERHEAD = 256
SMALL_CHUNK = 512  # chunks shorter than this are joined with a short neighbour
_REBASE = 1 << 30  # move _base up once rcv_nxt is this far beyond it


class _Run:
    __slots__ = ("chunks", "end", "start")

    def __init__(self, start: int, end: int, chunks: list[bytes]) -> None:
        self.start = start  # offset of the first byte from Reassembly._base
        self.end = end  # offset just past the last byte
        self.chunks = chunks  # the payload, in order

    def data(self) -> bytes:
        if len(self.chunks) > 1:
            self.chunks = [b"".join(self.chunks)]
        return self.chunks[0]


def _append(chunks: list[bytes], piece: bytes) -> None:
    if chunks and len(piece) < SMALL_CHUNK and len(chunks[-1]) < SMALL_CHUNK:
        chunks[-1] += piece
    else:
        chunks.append(piece)


def _extend(chunks: list[bytes], more: list[bytes]) -> None:
    if chunks and more and len(more[0]) < SMALL_CHUNK and len(chunks[-1]) < SMALL_CHUNK:
        chunks[-1] += more[0]
        chunks.extend(more[1:])
    else:
        chunks.extend(more)


# The empty run lists every Reassembly holding nothing shares (typed as the lists
# they stand for: only _new_run writes to an empty one, and it replaces them).
# Compiled with mypyc, which checks list-typed values at run time: empty lists.
_NO_RUNS: list[_Run] = [] if COMPILED else cast("list[_Run]", ())
_NO_STARTS: list[int] = [] if COMPILED else cast("list[int]", ())


class Reassembly:
    """Holds out-of-order bytes keyed by sequence number."""

    __slots__ = ("_base", "_runs", "_starts", "charged", "dropped", "limit", "max_runs", "size")

    def __init__(self, limit: int, max_runs: int = 1024) -> None:
        # Sorted, disjoint, non-adjacent. Holding nothing, every connection shares
        # one empty tuple for each (memory per connection: an empty list is 56
        # bytes); _new_run makes them lists, pop_ready gives them back when empty.
        # (A tuple: a write that missed this would raise, not share bytes.)
        self._runs: list[_Run] = _NO_RUNS
        self._starts: list[int] = _NO_STARTS  # _runs[i].start, for bisect
        self._base = 0  # sequence number the offsets count from (<= rcv_nxt)
        self.limit = limit  # most bytes charged (payload + RUN_OVERHEAD per run)
        self.max_runs = max_runs  # most runs held
        self.size = 0  # payload bytes held now
        self.charged = 0  # size + RUN_OVERHEAD * runs
        self.dropped = 0  # segments dropped for lack of room or runs

    def __bool__(self) -> bool:
        return bool(self._runs)

    def __len__(self) -> int:
        return len(self._runs)

    def _offset(self, rcv_nxt: int) -> int:
        """``rcv_nxt`` as an offset from ``_base``, rebasing when it is far."""
        d = seq_sub(rcv_nxt, self._base)
        if not self._runs:
            self._base = rcv_nxt
            return 0
        if d >= _REBASE:  # at most once per GiB received: O(runs)
            for r in self._runs:
                r.start -= d
                r.end -= d
            self._starts = [r.start for r in self._runs]
            self._base = rcv_nxt
            return 0
        return d

    def _block(self, r: _Run) -> tuple[int, int]:
        return seq_add(self._base, r.start), seq_add(self._base, r.end)

    def blocks(self) -> list[tuple[int, int]]:
        """Every held range as ``(start, end)`` sequence numbers, in order."""
        return [self._block(r) for r in self._runs]

    def block_at(self, seq: int) -> tuple[int, int] | None:
        """The held range containing ``seq``, if any (a bisect)."""
        off = seq_sub(seq, self._base)
        i = bisect_right(self._starts, off) - 1
        if i < 0 or off >= self._runs[i].end:
            return None
        return self._block(self._runs[i])

    def top_blocks(self, n: int) -> list[tuple[int, int]]:
        """The ``n`` highest held ranges, highest first."""
        return [self._block(r) for r in reversed(self._runs[-n:])] if n > 0 else []

    def insert(self, rcv_nxt: int, seq: int, data: bytes, room: int | None = None) -> bool:
        """Hold ``data`` starting at ``seq`` (beyond ``rcv_nxt``, within the window).

        Args:
            room: what the receive buffer has left beside the bytes delivered
                and not consumed; the charge stays within it too, so the
                buffer reserved from the memory budget covers the objects.

        Returns:
            False when the bytes were dropped for lack of room or of runs.
        """
        limit = self.limit if room is None or room > self.limit else room
        runs = self._runs
        starts = self._starts
        n = len(data)
        d = self._offset(rcv_nxt)
        start = d + seq_sub(seq, rcv_nxt)
        end = start + n
        if runs:
            last = runs[-1]
            if start == last.end:  # the common case: the next segment after the top run
                if self.charged + n > limit:
                    self.dropped += 1
                    return False
                _append(last.chunks, data)
                last.end = end
                self.size += n
                self.charged += n
                return True
            if start > last.end:  # a new run above everything held
                return self._new_run(len(runs), start, data, limit)
        # The runs the segment overlaps or abuts: lo .. hi-1.
        lo = bisect_left(starts, start)
        if lo > 0 and runs[lo - 1].end >= start:
            lo -= 1
        hi = bisect_right(starts, end, lo)
        if lo == hi:
            return self._new_run(lo, start, data, limit)
        # Cut the new data into the pieces not already held, in order, and
        # gather the merged run's chunks from them and the runs between.
        added = 0
        cursor = start
        pieces: list[tuple[int, bytes]] = []  # (index of the run it precedes, piece)
        for k in range(lo, hi):
            r = runs[k]
            if r.start > cursor:
                pieces.append((k, data[cursor - start : r.start - start]))
                added += r.start - cursor
            if r.end > cursor:
                cursor = r.end
        if cursor < end:
            pieces.append((hi, data[cursor - start :]))
            added += end - cursor
        if added == 0:
            return True  # all held already (a duplicate)
        merged = hi - lo - 1  # runs that disappear into one
        if self.charged + added - merged * RUN_OVERHEAD > limit:
            self.dropped += 1
            return False
        first = runs[lo]
        if pieces[0][0] == lo:  # the segment begins below the first run
            chunks = [pieces[0][1]]
            _extend(chunks, first.chunks)
            p = 1
        else:
            chunks = first.chunks
            p = 0
        for k in range(lo + 1, hi):
            if p < len(pieces) and pieces[p][0] == k:
                _append(chunks, pieces[p][1])
                p += 1
            _extend(chunks, runs[k].chunks)
        if p < len(pieces):
            _append(chunks, pieces[p][1])
        run = _Run(min(start, first.start), max(end, runs[hi - 1].end), chunks)
        runs[lo:hi] = [run]
        starts[lo:hi] = [run.start]
        self.size += added
        self.charged += added - merged * RUN_OVERHEAD
        return True

    def _new_run(self, i: int, start: int, data: bytes, limit: int) -> bool:
        """A run of its own at index ``i``: it overlaps and abuts nothing held."""
        cost = len(data) + RUN_OVERHEAD
        if len(self._runs) >= self.max_runs or self.charged + cost > limit:
            self.dropped += 1
            return False
        if self._runs is _NO_RUNS:
            self._runs, self._starts = [], []
        self._runs.insert(i, _Run(start, start + len(data), [data]))
        self._starts.insert(i, start)
        self.size += len(data)
        self.charged += cost
        return True

    def pop_ready(self, rcv_nxt: int) -> bytes | None:
        """Remove and return the bytes that now continue ``rcv_nxt``, if any.

        Runs wholly below ``rcv_nxt`` (already delivered through a retransmission)
        are discarded; a run straddling it is trimmed.
        """
        runs = self._runs
        if not runs:
            return None
        d = self._offset(rcv_nxt)
        while runs:
            run = runs[0]
            if run.start > d:
                return None
            del runs[0]
            del self._starts[0]
            if not runs:
                self._runs, self._starts = _NO_RUNS, _NO_STARTS
            length = run.end - run.start
            self.size -= length
            self.charged -= length + RUN_OVERHEAD
            if run.end > d:
                data = run.data()
                return data[d - run.start :] if d > run.start else data
        return None
