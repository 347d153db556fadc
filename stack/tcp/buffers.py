"""Per-connection buffer sizes, their auto-tuning, and the Stack-wide memory budget.

Theory of operation: a connection's receive and send buffers start small
(``TcpConfig.rcv_buf_initial``/``snd_buf_initial``) and grow with demand up to
their caps (``rcv_buf``/``snd_buf``), as Linux's receive-buffer auto-tuning
(dynamic right sizing) and send-buffer expansion do:

* receive: once per RTT the connection reports how far the application's
  read point (``rcv_nxt`` minus what it holds unconsumed; Linux's
  ``copied_seq`` in ``tcp_rcv_space_adjust``) moved. If the application
  disposed of at least half the buffer within that RTT, the peer filled it and
  the application kept up: the window, not the path or the application, is
  the bottleneck, and the buffer doubles (or grows to twice what was
  consumed), like slow start does for cwnd. An application that lags moves
  its read point slowly and gets no growth.
* send: when the application offers more than fits and the buffer is smaller
  than twice what the network could carry per RTT (min(cwnd, peer window)),
  the buffer grows to that.

Every byte of buffer size is reserved from a ``MemoryBudget`` that the Stack
shares among all its connections. Growth takes only what the budget has left;
a new connection's initial buffers shrink to what is left (never below a few
segments, so that nothing fails: the budget may be over-committed by those
floors); and while the budget is over-committed, a receive buffer gives back
half its size at each of its RTT ticks. Shrinking a buffer only lowers the
windows advertised from then on: the right edge already advertised is never
moved left (RFC 7323 2.4, RFC 9293 3.8.6.2.2), see ``ConnectionCore._advertise``.

A Stack may also bound the receive buffers alone (``TcpConfig.rcv_window_budget``,
a second ``MemoryBudget``): the windows a connection advertises never exceed its
receive buffer, so the windows of all connections together stay within that
bound (beyond the floors), and so do the bytes clients may have in flight
toward the Stack. A relay behind a TUN device sizes it to the device's queue:
when its reader falls behind many clients at once, the clients' windows fill
before the queue does, and they wait instead of losing packets at its tail
(Linux's receivers clamp their windows under ``tcp_memory_pressure`` alike).
Growth takes from both budgets; over either, a receive buffer shrinks.

Out-of-order data lives inside the receive buffer too: ``Reassembly`` charges
each run its payload plus ``RUN_OVERHEAD`` for its objects, within the room
the unconsumed bytes leave, so the reservation covers what it really costs.
"""

from __future__ import annotations

from typing import Protocol

from stack.config import TcpConfig
from stack.seq import seq_add, seq_sub

MAX_WINDOW = 0xFFFF  # the 16-bit window field
MAX_WSCALE = 14  # RFC 7323 2.3
MIN_TICK = 0.001  # seconds: the receive-tuning period when the RTT measures ~0 (1 ms clocks)


def wscale_for(cap: int) -> int:
    """The smallest window-scale shift whose largest window covers ``cap`` bytes."""
    shift = 0
    while shift < MAX_WSCALE and MAX_WINDOW << shift < cap:
        shift += 1
    return shift


class BudgetCounts(Protocol):
    """Where a budget counts the reservations its limit cut short (``StackStats``)."""

    memory_budget_reached: int


class MemoryBudget:
    """Buffer bytes all connections of one Stack may reserve together.

    ``counts``, when given, counts each reservation the limit cut short: a new
    connection's initial buffers shrunk, or a buffer's growth refused or cut.
    """

    __slots__ = ("counts", "limit", "used")

    def __init__(self, limit: int, counts: BudgetCounts | None = None) -> None:
        self.limit = limit  # bytes
        self.used = 0  # bytes reserved now (may exceed limit by the per-connection floors)
        self.counts = counts

    def reserve(self, want: int) -> int:
        """Reserve up to ``want`` bytes; returns how many were granted (maybe 0)."""
        grant = min(want, self.limit - self.used)
        if grant < want and want > 0 and self.counts is not None:
            self.counts.memory_budget_reached += 1
        if grant <= 0:
            return 0
        self.used += grant
        return grant

    def force(self, n: int) -> None:
        """Reserve ``n`` bytes even beyond the limit (a connection's floor)."""
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n

    @property
    def over(self) -> bool:
        """Whether more is reserved than the limit allows."""
        return self.used > self.limit


class Buffers:
    """The current receive and send buffer sizes of one connection."""

    __slots__ = (
        "_budget",
        "_mark_seq",
        "_mark_time",
        "_rcv_budget",
        "_rcv_held",
        "_reserved",
        "_snd_floor",
        "rcv",
        "rcv_cap",
        "rcv_floor",
        "snd",
        "snd_cap",
        "tick_at",
    )

    def __init__(
        self, cfg: TcpConfig, budget: MemoryBudget, mss: int, rcv_budget: MemoryBudget | None = None
    ) -> None:
        self._budget = budget
        self._rcv_budget = rcv_budget  # the Stack's receive-window budget, if bounded
        self._rcv_held = 0  # bytes of it this connection holds: rcv, once open
        self.rcv_cap = cfg.rcv_buf  # the configured cap (lowered to the window limit later)
        self.snd_cap = cfg.snd_buf
        self.rcv = min(cfg.rcv_buf_initial, cfg.rcv_buf)  # receive buffer size, bytes
        self.snd = min(cfg.snd_buf_initial, cfg.snd_buf)  # send buffer size, bytes
        self.rcv_floor = min(self.rcv, 4 * mss)  # never shrunk below (SWS needs room)
        self._snd_floor = min(self.snd, 4 * mss)
        self._reserved = 0  # bytes of the budget this connection holds
        self.tick_at = float("inf")  # next receive auto-tuning check (once per RTT)
        self._mark_seq = 0  # the application's read point at the last check
        self._mark_time = 0.0  # and when it was

    def open(self, max_window: int) -> None:
        """Reserve the initial sizes; under budget pressure they shrink to what is left."""
        self.rcv_cap = min(self.rcv_cap, max_window)
        self.rcv = min(self.rcv, self.rcv_cap)
        self.rcv_floor = min(self.rcv_floor, self.rcv)
        want = self.rcv + self.snd
        got = self._budget.reserve(want)
        if got < want:
            # Shrink what will be advertised rather than fail: the floors are
            # granted even beyond the limit.
            spare = max(got - self.rcv_floor - self._snd_floor, 0)
            extra = min(self.rcv - self.rcv_floor, spare // 2)
            self.rcv = self.rcv_floor + extra
            self.snd = self._snd_floor + min(self.snd - self._snd_floor, spare - extra)
            need = self.rcv + self.snd
            if need > got:
                self._budget.force(need - got)
            else:
                self._budget.release(got - need)
            got = need
        self._reserved = got
        windows = self._rcv_budget
        if windows is not None:
            # The receive buffer shrinks to what the window budget has left, never
            # below its floor (forced beyond the limit, as above).
            held = windows.reserve(self.rcv)
            if held < self.rcv_floor:
                windows.force(self.rcv_floor - held)
                held = self.rcv_floor
            self._rcv_held = held
            if held < self.rcv:
                self._budget.release(self.rcv - held)
                self._reserved -= self.rcv - held
                self.rcv = held

    def limit_window(self, max_window: int) -> None:
        """The window cannot exceed ``max_window`` (no scaling agreed): cap the buffer."""
        self.rcv_cap = min(self.rcv_cap, max_window)
        if self.rcv > self.rcv_cap:
            self._resize_rcv(self.rcv_cap)
        self.rcv_floor = min(self.rcv_floor, self.rcv)

    def start_ticks(self, rcv_nxt: int, now: float, rtt: float) -> None:
        """Begin measuring: the first check is one RTT after ``now`` (see rcv_tick)."""
        self._mark_seq, self._mark_time = rcv_nxt, now
        self.tick_at = now + max(rtt, MIN_TICK)

    def rcv_tick(self, rcv_nxt: int, unconsumed: int, now: float, rtt: float) -> bool:
        """Once per RTT: grow (or, over budget, shrink) the receive buffer.

        Returns:
            True when the size changed.
        """
        rtt = max(rtt, MIN_TICK)
        self.tick_at = now + rtt
        read_point = seq_add(rcv_nxt, -unconsumed)
        consumed = seq_sub(read_point, self._mark_seq)
        fresh = now - self._mark_time <= 2 * rtt  # else the flow idled: not one RTT's worth
        self._mark_seq, self._mark_time = read_point, now
        rcv = self.rcv
        windows = self._rcv_budget
        if self._budget.over or (windows is not None and windows.over):
            new = max(self.rcv_floor, rcv // 2)
            if new < rcv:
                self._resize_rcv(new)
                return True
            return False
        if not fresh or rcv >= self.rcv_cap or 2 * consumed < rcv:
            return False
        want = min(self.rcv_cap, max(2 * rcv, 2 * consumed)) - rcv
        grant = self._budget.reserve(want)
        if windows is not None and grant > 0:
            granted = windows.reserve(grant)
            self._budget.release(grant - granted)
            grant = granted
            self._rcv_held += grant
        if grant <= 0:
            return False
        self._reserved += grant
        self.rcv = rcv + grant
        return True

    def _resize_rcv(self, new: int) -> None:
        self._budget.release(self.rcv - new)
        self._reserved -= self.rcv - new
        if self._rcv_budget is not None:
            given = min(self._rcv_held, self.rcv - new)
            self._rcv_budget.release(given)
            self._rcv_held -= given
        self.rcv = new

    def want_snd(self, target: int) -> bool:
        """The application is blocked on a full send buffer: grow toward ``target``.

        Returns:
            True when the buffer grew.
        """
        target = min(target, self.snd_cap)
        if target <= self.snd:
            return False
        grant = self._budget.reserve(target - self.snd)
        if grant <= 0:
            return False
        self._reserved += grant
        self.snd += grant
        return True

    def close(self) -> None:
        """Give every reserved byte back to the budget."""
        self._budget.release(self._reserved)
        self._reserved = 0
        if self._rcv_budget is not None:
            self._rcv_budget.release(self._rcv_held)
            self._rcv_held = 0
        self.tick_at = float("inf")
