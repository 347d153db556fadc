"""TIME-WAIT kept compactly, outside the connection table (RFC 9293 3.6.1).

Theory of operation: when a connection reaches TIME-WAIT its application is
done with it, so the Stack reports ``Closed`` at once and keeps only what
TIME-WAIT needs -- the 4-tuple (the table key), the sequence numbers for
re-acknowledging a repeated FIN, and a deadline -- like Linux's
``tcp_timewait_sock``. Entries expire in the order they were added (the
duration is constant), so a deque gives the expiry order; the table is
bounded and, when full, the oldest entry goes first (Linux's
``tcp_max_tw_buckets`` does the same).

What a segment for a TIME-WAIT 4-tuple gets (RFC 9293 3.10.7.4, TIME-WAIT):

* a SYN with a sequence number beyond the old ``rcv_nxt``: the entry is
  dropped and the SYN opens a new connection (RFC 6191 spirit);
* a FIN (the peer did not get our last ACK): the ACK again, and the timer
  restarts;
* an RST: ignored (RFC 1337, TIME-WAIT assassination);
* anything else: dropped.
"""

from __future__ import annotations

from collections import deque

from stack.seq import seq_gt


class TimeWaitTable:
    """4-tuple key -> (snd_nxt, rcv_nxt, window, deadline)."""

    __slots__ = ("_entries", "_order", "duration", "limit")

    def __init__(self, duration: float, limit: int) -> None:
        self.duration = duration  # seconds an entry lives (2 MSL in RFC 9293)
        self.limit = limit  # entries at most
        self._entries: dict[bytes, tuple[int, int, int, float]] = {}
        self._order: deque[tuple[float, bytes]] = deque()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def add(self, key: bytes, snd_nxt: int, rcv_nxt: int, window: int, now: float) -> None:
        """Remember a connection that entered TIME-WAIT at ``now``."""
        if self.limit <= 0:
            return
        while len(self._entries) >= self.limit and self._order:
            _, old = self._order.popleft()
            self._entries.pop(old, None)
        deadline = now + self.duration
        self._entries[key] = (snd_nxt, rcv_nxt, window, deadline)
        self._order.append((deadline, key))

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
        """A repeated FIN restarts the 2 MSL wait (RFC 9293 3.10.7.4)."""
        entry = self._entries.get(key)
        if entry is not None:
            deadline = now + self.duration
            self._entries[key] = (*entry[:3], deadline)
            self._order.append((deadline, key))

    def expire(self, now: float) -> int:
        """Drop entries whose time is up; returns how many went."""
        order = self._order
        entries = self._entries
        gone = 0
        while order and order[0][0] <= now:
            deadline, key = order.popleft()
            entry = entries.get(key)
            if entry is not None and entry[3] == deadline:
                del entries[key]
                gone += 1
        return gone
