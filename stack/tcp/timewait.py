"""TIME-WAIT kept compactly, outside the connection table (RFC 9293 3.6.1).

Theory of operation: when a connection reaches TIME-WAIT its application is
done with it, so the Stack reports ``Closed`` at once and keeps only what
TIME-WAIT needs -- the 4-tuple (the table key), the sequence numbers for
re-acknowledging a repeated FIN, and a deadline -- like Linux's
``tcp_timewait_sock``. The duration is constant, so an ``OrderedDict`` in
deadline order is the whole index: a new entry goes to the end, a restarted
one moves there (one entry per 4-tuple, however many FINs repeat), and expiry
pops from the front. The table is bounded and, when full, the oldest entry
goes first (Linux's ``tcp_max_tw_buckets`` does the same).

What a segment for a TIME-WAIT 4-tuple gets (RFC 9293 3.10.7.4, TIME-WAIT):

* a SYN with a sequence number beyond the old ``rcv_nxt``: the entry is
  dropped and the SYN opens a new connection (RFC 6191 spirit);
* a FIN (the peer did not get our last ACK): the ACK again, and the timer
  restarts;
* an RST: ignored (RFC 1337, TIME-WAIT assassination);
* anything else: dropped.
"""

from __future__ import annotations

from collections import OrderedDict

from stack.seq import seq_gt


class TimeWaitTable:
    """4-tuple key -> (snd_nxt, rcv_nxt, window, deadline), oldest deadline first."""

    __slots__ = ("_entries", "duration", "limit")

    def __init__(self, duration: float, limit: int) -> None:
        self.duration = duration  # seconds an entry lives (2 MSL in RFC 9293)
        self.limit = limit  # entries at most
        self._entries: OrderedDict[bytes, tuple[int, int, int, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def add(self, key: bytes, snd_nxt: int, rcv_nxt: int, window: int, now: float) -> None:
        """Remember a connection that entered TIME-WAIT at ``now``."""
        if self.limit <= 0:
            return
        entries = self._entries
        entries.pop(key, None)
        while len(entries) >= self.limit:
            entries.popitem(last=False)
        entries[key] = (snd_nxt, rcv_nxt, window, now + self.duration)

    def get(self, key: bytes) -> tuple[int, int, int] | None:
        """``(snd_nxt, rcv_nxt, window)`` of a live entry, or None."""
        entry = self._entries.get(key)
        return None if entry is None else entry[:3]

    def reopens(self, key: bytes, syn_seq: int) -> bool:
        """Whether a SYN may reuse the 4-tuple; if so the entry is dropped."""
        entry = self._entries.get(key)
        if entry is None or not seq_gt(syn_seq, entry[1]):
            return False
        del self._entries[key]
        return True

    def restart(self, key: bytes, now: float) -> None:
        """A repeated FIN restarts the 2 MSL wait (RFC 9293 3.10.7.4): the entry
        gets the new deadline and moves to the end; nothing is added."""
        entries = self._entries
        entry = entries.get(key)
        if entry is not None:
            entries[key] = (*entry[:3], now + self.duration)
            entries.move_to_end(key)

    def expire(self, now: float) -> int:
        """Drop entries whose time is up; returns how many went."""
        entries = self._entries
        gone = 0
        while entries:
            key = next(iter(entries))
            if entries[key][3] > now:
                break
            del entries[key]
            gone += 1
        return gone
