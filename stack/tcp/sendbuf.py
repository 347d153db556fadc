"""The send buffer: the application's bytes from the oldest unacknowledged one on.

Theory of operation: the bytes are kept as the chunks ``send`` was given (bytes
are immutable, so keeping the caller's object is no copy), in order, each with
its absolute end position; ``drop`` (an ACK) forgets whole chunks from the
front and moves the start within the first; ``view`` returns a segment's bytes
without copying them when they lie in one chunk (a memoryview of it; a short
one as a bytes slice), and joins the pieces when they span chunks.

A bytearray did the same with two copies of every byte (``+=`` in, a slice
out) and, used as a queue, a third: bytes deleted from its front leave an
offset, and growing it then reallocates and copies everything it holds. With a
relay's 256 KiB reads and 1-2 MiB in flight that was 50-90 us per read against
7 us for one copy of it.

Small writes are merged into the last chunk while it is small (``MERGE_MAX``),
so a buffer of many tiny sends holds few objects; a merge copies at most
``MERGE_MAX`` bytes. A view keeps its chunk alive, never the buffer: no view is
held by the buffer, and its chunks are never changed in place.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import cast

from stack.compiled import COMPILED
from stack.tcp.segment import VIEW_MIN, Payload

__all__ = ["MERGE_MAX", "VIEW_MIN", "SendBuffer"]

# A chunk shorter than this takes the next small write into itself (one copy of it).
MERGE_MAX = 4096

# The shared empty lists of an empty buffer (as stack.tcp.core's EMPTY_*: replaced,
# never appended to; tuples in the pure-Python build, so a missed write raises).
_NO_CHUNKS: list[bytes] = [] if COMPILED else cast("list[bytes]", ())
_NO_ENDS: list[int] = [] if COMPILED else cast("list[int]", ())


class SendBuffer:
    """Bytes queued for sending, from the oldest unacknowledged one (offset 0)."""

    __slots__ = ("_chunks", "_end", "_ends", "_start")

    def __init__(self) -> None:
        self._chunks = _NO_CHUNKS  # the bytes, in order; the first may be partly dropped
        self._ends = _NO_ENDS  # absolute end position of each chunk
        self._start = 0  # absolute position of offset 0 (bytes dropped so far)
        self._end = 0  # absolute position after the last byte (bytes appended so far)

    def __len__(self) -> int:
        return self._end - self._start

    def __bool__(self) -> bool:
        return self._end != self._start

    def append(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` after what is held (bytes are kept, anything else copied)."""
        n = len(data)
        if not n:
            return
        end = self._end + n
        self._end = end
        chunks = self._chunks
        if n < MERGE_MAX and chunks and len(chunks[-1]) < MERGE_MAX:
            chunks[-1] = chunks[-1] + data  # a new object: a view of the old one stays valid
            self._ends[-1] = end
            return
        chunk = data if type(data) is bytes else bytes(data)
        if chunks:
            chunks.append(chunk)
            self._ends.append(end)
        else:
            self._chunks = [chunk]
            self._ends = [end]

    def drop(self, n: int) -> None:
        """Forget the first ``n`` bytes (acknowledged); at most what is held."""
        start = self._start + min(n, self._end - self._start)
        self._start = start
        ends = self._ends
        if not ends or ends[0] > start:
            return
        if start == self._end:
            self._chunks, self._ends = _NO_CHUNKS, _NO_ENDS
            return
        k = bisect_right(ends, start)  # chunks that end at or before the new start
        del self._chunks[:k]
        del ends[:k]

    def view(self, offset: int, n: int) -> Payload:
        """``n`` bytes from ``offset`` (0 <= offset, offset + n <= len): not copied
        when they lie in one chunk and ``n >= VIEW_MIN``."""
        if n <= 0:
            return b""
        pos = self._start + offset
        ends = self._ends
        i = bisect_right(ends, pos)
        chunk = self._chunks[i]
        lo = pos - (ends[i] - len(chunk))
        hi = lo + n
        if hi <= len(chunk):
            if lo == 0 and hi == len(chunk):
                return chunk
            return memoryview(chunk)[lo:hi] if n >= VIEW_MIN else chunk[lo:hi]
        parts: list[Payload] = [memoryview(chunk)[lo:]]
        left = n - (len(chunk) - lo)
        while left > 0:
            i += 1
            chunk = self._chunks[i]
            if len(chunk) <= left:
                parts.append(chunk)
                left -= len(chunk)
            else:
                parts.append(memoryview(chunk)[:left])
                left = 0
        return b"".join(parts)

    def clear(self) -> None:
        self._chunks, self._ends = _NO_CHUNKS, _NO_ENDS
        self._start = self._end
