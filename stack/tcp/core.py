"""State shared by every part of a TCP connection: the variables, events, and helpers.

``TcpConnection`` is assembled from four layers so each stays readable:
``ConnectionCore`` (this module: the RFC 9293 variables, state changes --
by the tables of ``transitions.py`` -- event emission, window advertisement
and the options on outgoing segments), ``TcpSender``
(``sender.py``: timers and everything that produces segments),
``TcpRecovery`` (``recovery.py``: the ACK field -- RTT samples, the SACK
scoreboard, loss recovery) and ``TcpConnection`` (``connection.py``: opening,
the application calls, and the rest of segment processing).

The receive window (RFC 7323 2.4): ``rcv_adv`` is the right edge we have
advertised, and it never moves left. A window opens -- by at least the
receiver-SWS threshold, RFC 9293 3.8.6.2.2 -- to the free buffer space,
rounded down to the scale unit (2**shift bytes). The 16-bit field is the
distance to ``rcv_adv`` shifted right and rounded up, so the peer sees
``rcv_adv`` or a little beyond it (which then becomes ``rcv_adv``). Each
rounding promises the peer up to a unit more than the buffer had free when
the window last opened; while the application does not read, these add up,
by less than a unit per ACK. Once they would pass ``slack`` (an eighth of the
buffer, at least one unit minus one byte), the field is rounded down
instead: the edge the peer sees retracts by less than one unit -- the
retraction by rounding of RFC 7323 Appendix F -- and segments up to
``rcv_adv`` are still accepted. With full-sized segments and the default
cap (a 128-byte unit) a whole window closes before that point; it takes
segments smaller than a unit, and always rounding up would let such a peer
keep the window open for ever and grow the buffer without bound (the
problem Linux made optional in 2023, ``tcp_shrink_window``). So a
connection holds at most ``rcv_buf + slack`` bytes, and a buffer shrunk by
memory pressure still honours the edge it advertised before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import cast

from stack.compiled import COMPILED, mypyc_attr
from stack.config import TcpConfig
from stack.events import (
    Closed,
    CloseReason,
    DataReceived,
    Event,
    FlowId,
)
from stack.seq import seq_add, seq_le, seq_sub
from stack.tcp.buffers import MAX_WINDOW, Buffers, MemoryBudget
from stack.tcp.congestion import CongestionControl
from stack.tcp.cubic import make
from stack.tcp.reassembly import Reassembly
from stack.tcp.rtt import RttEstimator
from stack.tcp.sack import DUP_THRESH, Scoreboard, choose_blocks
from stack.tcp.segment import Payload, TcpSegment
from stack.tcp.sendbuf import SendBuffer
from stack.tcp.timers import Timers
from stack.tcp.timestamps import Timestamps
from stack.tcp.transitions import (
    CLOSE_SIDE,
    LINGERING,
    RECEIVING,
    SYNCHRONIZED,
    Close,
    State,
)
from stack.wire.positional import positional
from stack.wire.tcp import ACK, NO_OPTIONS, RST, TcpOptions

_tcp_options = positional(
    TcpOptions, "mss", "wscale", "sack_permitted", "timestamps", "sack_blocks"
)

# What a connection's usually empty lists hold when empty: one shared empty tuple
# each, not a 56-byte list per connection (memory per idle connection). Only the
# code below writes to them, and it replaces an empty one rather than append to
# it (a write that missed this raises: a tuple has no append). Compiled with mypyc
# (scripts/build-compiled), which checks a list-typed value at run time, they are
# shared empty lists instead: the pure-Python build is the one that catches that write.
EMPTY_SEGMENTS: list[TcpSegment] = [] if COMPILED else cast("list[TcpSegment]", ())
EMPTY_CHUNKS: list[Payload] = [] if COMPILED else cast("list[Payload]", ())
EMPTY_MARKS: list[tuple[int, int, int]] = [] if COMPILED else cast("list[tuple[int, int, int]]", ())
EMPTY_SEQS: list[int] = [] if COMPILED else cast("list[int]", ())


__all__ = [
    "EMPTY_CHUNKS",
    "EMPTY_MARKS",
    "EMPTY_SEGMENTS",
    "EMPTY_SEQS",
    "LINGERING",
    "MAX_WINDOW",
    "RECEIVING",
    "SYNCHRONIZED",
    "Close",
    "ConnectionCore",
    "State",
]


@mypyc_attr(allow_interpreted_subclasses=True)  # the fast-path twin test's subclasses
class ConnectionCore:
    """The variables of one connection and the helpers every layer uses."""

    # Slots: a connection has more attributes than CPython 3.11 shares keys for
    # (30), so each instance carried its own ~3 KiB dict; 10,000 idle flows.
    __slots__ = (
        "_ack_now",
        "_challenge_count",
        "_challenge_second",
        "_ctl",
        "_dsack",
        "_dupacks",
        "_dupthresh",
        "_events",
        "_fin_queued",
        "_flight_hw",
        "_flight_hw_end",
        "_flight_hw_prev",
        "_inflate",
        "_ka_probes",
        "_ka_sent_at",
        "_last_data",
        "_last_progress",
        "_last_rcv",
        "_max_wnd",
        "_ooo",
        "_ooo_fin",
        "_persist_backoff",
        "_probes",
        "_quickacks",
        "_readable",
        "_retries",
        "_rounded",
        "_rtt",
        "_rtt_seq",
        "_rtt_start",
        "_rtx_due",
        "_rtx_marks",
        "_rx_pending",
        "_sack_recent",
        "_sb",
        "_sb_seq",
        "_seg_mss",
        "_sndbuf",
        "_sws_override",
        "_syn_due",
        "_tlp_armed_at",
        "_tlp_due",
        "_tx_opts",
        "_unacked_segments",
        "_unconsumed",
        "_undo_cc",
        "_undo_reorder",
        "_undo_tsval",
        "_undone",
        "_want_send_space",
        "_ws_ok",
        "buf",
        "cc",
        "close_reason",
        "config",
        "flow",
        "high_rxt",
        "in_recovery",
        "irs",
        "iss",
        "last_ack_sent",
        "local_port",
        "max_snd_wnd",
        "rcv_adv",
        "rcv_mss",
        "rcv_nxt",
        "rcv_wscale",
        "recover",
        "remote_port",
        "rescue_rxt",
        "sack_ok",
        "snd_max",
        "snd_mss",
        "snd_nxt",
        "snd_una",
        "snd_wl1",
        "snd_wl2",
        "snd_wnd",
        "snd_wscale",
        "state",
        "timers",
        "ts",
    )

    def __init__(
        self,
        *,
        local_port: int,
        remote_port: int,
        config: TcpConfig | None = None,
        flow: FlowId | None = None,
        mss: int | None = None,
        events: deque[Event] | None = None,
        readable: list[ConnectionCore] | None = None,
        budget: MemoryBudget | None = None,
        rcv_budget: MemoryBudget | None = None,
    ) -> None:
        cfg = config or TcpConfig()
        self.config = cfg
        self.local_port = local_port
        self.remote_port = remote_port
        self.flow = flow
        self.state = State.CLOSED  # _set_state makes every later change
        self.close_reason: CloseReason | None = None
        self._events: deque[Event] = deque() if events is None else events
        self._readable: list[ConnectionCore] = [] if readable is None else readable

        # Send sequence space (RFC 9293 3.3.1).
        self.iss = 0  # initial send sequence number, from the caller
        self.snd_una = 0  # oldest unacknowledged sequence number
        self.snd_nxt = 0  # next sequence number to send
        self.snd_max = 0  # highest sequence number sent + 1 (snd_nxt < snd_max while going back)
        self.snd_wnd = 0  # peer's receive window
        self.snd_wl1 = 0  # segment sequence number used for the last window update
        self.snd_wl2 = 0  # segment acknowledgment number used for the last window update
        self.max_snd_wnd = 0  # largest window the peer has offered (sender SWS avoidance)
        self.snd_wscale = 0  # RFC 7323 Snd.Wind.Shift: the peer's window field is << this
        self.snd_mss = cfg.default_peer_mss  # largest payload we send per segment
        self._sndbuf = SendBuffer()  # unacknowledged and unsent bytes from the application
        self._sb_seq = 0  # sequence number of _sndbuf[0]
        self._fin_queued = False  # close() was called: FIN follows the data
        self._want_send_space = False  # a send() came up short: emit SendSpace when room frees

        # Receive sequence space.
        self.irs = 0  # initial receive sequence number
        self.rcv_nxt = 0  # next sequence number expected
        self.rcv_adv = 0  # right edge of the window advertised (never moves left)
        self.rcv_wscale = 0  # RFC 7323 Rcv.Wind.Shift: our window field is >> this
        self._max_wnd = MAX_WINDOW  # the largest window the field can express
        self._rounded = 0  # bytes promised by rounding up since the window last opened
        self.rcv_mss = mss or cfg.mss  # MSS we advertise
        self.last_ack_sent = 0  # RFC 7323 Last.ACK.sent: the ACK field we last sent
        self.buf = Buffers(cfg, budget or MemoryBudget(cfg.memory_budget), self.rcv_mss, rcv_budget)
        self._unconsumed = 0  # bytes delivered to the application and not yet consumed
        self._ooo = Reassembly(min(cfg.ooo_limit, self.buf.rcv), cfg.ooo_max_runs)
        self._ooo_fin: int | None = None  # sequence number of a FIN that arrived beyond a hole
        self._rx_pending = EMPTY_CHUNKS  # in-order bytes not yet surfaced as an event

        # Negotiated options (RFC 7323, RFC 2018): set by the SYN exchange.
        self._ws_ok = False  # window scaling offered (active open) or agreed
        self.ts: Timestamps | None = None  # timestamps: our clock, TS.Recent
        self.sack_ok = False  # SACK-permitted both ways
        # Seqs of recent out-of-order arrivals (RFC 2018 4); a list of its own once
        # there is one (memory per connection).
        self._sack_recent = EMPTY_SEQS
        self._tx_opts: TcpOptions = NO_OPTIONS  # options for the segments being built now
        self._seg_mss = self.snd_mss  # payload per segment once those options are paid for
        self._dsack: tuple[int, int] | None = None  # RFC 2883 block for the next ACK
        # Reordering and spurious retransmissions (recovery.py): the DupThresh in
        # use, the controller as it was before the last reduction (to undo it),
        # and the retransmissions of that episode as (start, end, snd_max then).
        self._dupthresh = DUP_THRESH
        self._undo_cc: CongestionControl | None = None
        self._undo_tsval: int | None = None
        self._undo_reorder = 0  # bytes SACKed above snd_una when the episode began
        self._undone = False
        self._rtx_marks = EMPTY_MARKS
        # RFC 7661 (and Linux's is_cwnd_limited): the most data in flight after any
        # transmission during the current window, so that ACKs processed as one
        # batch, each lowering the flight before the next send, still count as
        # cwnd-limited; judged by the flight of the moment, only the first ACK of
        # a batch would grow cwnd.
        self._flight_hw = 0
        self._flight_hw_prev = 0  # the same for the window before
        self._flight_hw_end = 0  # the window ends when snd_una reaches this

        # Output flags and timers.
        self.timers = Timers()  # every deadline (timers.py)
        self._ctl = EMPTY_SEGMENTS  # RSTs and other one-off segments to send first (_queue)
        self._syn_due = False  # (re)send our SYN or SYN-ACK
        self._ack_now = False  # an ACK is owed immediately
        self._unacked_segments = 0  # in-order segments received since our last ACK
        self._quickacks = 0  # in-order segments still to ACK at once (after a loss sign)
        self._rtx_due = False  # fast retransmit: resend the segment at snd_una
        self._tlp_due = False  # the probe goes with the next segments_to_send
        self._tlp_armed_at = -1.0  # when the probe timer was last armed
        self._last_progress = 0.0  # when data last went out or was acknowledged
        self._last_rcv = 0.0  # when the peer last sent anything (keepalive, idle timeout)
        # When in-order data last arrived (the quick-ACK after a gap); none yet: +inf.
        self._last_data = float("inf")
        self._ka_probes = 0  # keepalive probes sent since the peer was last heard
        self._ka_sent_at = 0.0  # when the last keepalive probe went

        # Loss recovery (RFC 6582 NewReno, RFC 6675 with SACK).
        self.in_recovery = False  # between a loss detected by ACKs and the recovery point
        self.recover = 0  # RFC 6582 "recover" / RFC 6675 RecoveryPoint (snd_max then)
        self._dupacks = 0  # RFC 5681 / RFC 6675 DupAcks
        self._inflate = 0  # RFC 6582 fast-recovery window inflation (peers without SACK)
        self._sb = Scoreboard()  # the peer's SACKed ranges (RFC 6675)
        self.high_rxt = 0  # RFC 6675 HighRxt (exclusive): end of what was resent
        self.rescue_rxt: int | None = None  # RFC 6675 RescueRxt
        self._retries = 0  # consecutive timeouts without progress
        self._probes = 0  # unanswered zero-window probes
        self._persist_backoff = 0  # probe-interval doublings since the window closed
        self._sws_override = False  # the persist timer fired on a short usable window
        self._rtt = RttEstimator(cfg.rto_initial, cfg.rto_min, cfg.rto_max)
        self._rtt_seq: int | None = None  # sequence number being timed (Karn: never a resend)
        self._rtt_start = 0.0
        self._challenge_second = -1.0
        self._challenge_count = 0
        self.cc: CongestionControl = make(cfg.congestion, self.snd_mss)

    def _reset(self, reason: CloseReason) -> None:
        if self.state is State.CLOSED:
            return
        if self.state in SYNCHRONIZED or self.state is State.SYN_RECEIVED:
            self._queue(self._segment(self._ack_seq(), self.rcv_nxt, RST | ACK, 0))
        self._close(reason)

    # --------------------------------------------------------------------- events

    def next_event(self) -> Event | None:
        """Pop the next event for this connection's queue, or None."""
        self.flush_data()
        return self._events.popleft() if self._events else None

    def _queue(self, segment: TcpSegment) -> None:
        """A control segment (RST, a pure ACK, a probe) goes out first, next time."""
        if self._ctl:
            self._ctl.append(segment)
        else:
            self._ctl = [segment]

    def flush_data(self) -> None:
        """Turn gathered in-order bytes into one ``DataReceived`` event."""
        if self._rx_pending:
            chunks = self._rx_pending
            # One copy at most: a super-segment's payload is a view of its packet
            # (Stack.receive), joined here with the rest of the pass into bytes.
            first = chunks[0]
            data = first if len(chunks) == 1 and type(first) is bytes else b"".join(chunks)
            self._rx_pending = EMPTY_CHUNKS
            self._events.append(DataReceived(self._flow(), data))

    def _emit(self, event: Event) -> None:
        self.flush_data()
        self._events.append(event)

    def _flow(self) -> FlowId:
        return self.flow or FlowId(0, "", self.remote_port, "", self.local_port)

    @property
    def buffered(self) -> int:
        """Bytes this connection holds now: its send buffer (unacknowledged and
        unsent), the receive buffer's delivered but not yet consumed bytes, and
        the out-of-order bytes waiting in reassembly."""
        return len(self._sndbuf) + self._unconsumed + self._ooo.size

    @staticmethod
    def buffered_total(conns: Iterable[ConnectionCore]) -> int:
        """``buffered`` summed over ``conns``, inlined: 3x faster than the property
        (under 0.1 µs a connection: about 1 ms for 10,000)."""
        total = 0
        for c in conns:
            total += len(c._sndbuf) + c._unconsumed + c._ooo.size
        return total

    def retire(self) -> None:
        """Close a connection in TIME-WAIT now, with reason FINISHED.

        For a caller that keeps the 4-tuple in TIME-WAIT itself (the Stack's
        compact ``TimeWaitTable``); a no-op in any other state.
        """
        if self.state is State.TIME_WAIT:
            self._close(CloseReason.FINISHED)

    def arm_send_space(self) -> None:
        """Ask for a ``SendSpace`` event once the full send buffer frees room."""
        if not self._fin_queued and self.state is not State.CLOSED:
            self._want_send_space = True

    # ------------------------------------------------------------------ state

    def _set_state(self, state: State) -> None:
        """Every change of ``state`` after ``__init__`` is made here (transitions.py)."""
        self.state = state

    def _close_side(self, event: Close, now: float) -> bool:
        """Take the transition ``CLOSE_SIDE`` gives for ``event`` in this state, with
        the timers the new state runs. Returns False when the table has none (a
        repeated event, or one that means nothing here): nothing changed."""
        nxt = CLOSE_SIDE.get((self.state, event))
        if nxt is None:
            return False
        if nxt is State.CLOSED:
            # LAST-ACK, FIN acknowledged; or close() before the handshake completed.
            self._close(CloseReason.FINISHED if event is Close.FIN_ACKED else CloseReason.ABORTED)
            return True
        self._set_state(nxt)
        timers = self.timers
        if nxt is State.TIME_WAIT:
            # RFC 9293 3.10.7.4: only the 2 MSL timer runs (and an owed ACK): the
            # FIN exchange is over, and keepalive and idle timeout watch live flows.
            timers.clear_rto()
            timers.clear_tlp()
            timers.clear_persist()
            timers.clear_keepalive()
            timers.clear_idle()
            timers.clear_fin_wait_2()
            timers.set_time_wait(now + self.config.time_wait)
        elif nxt is State.FIN_WAIT_2:
            # The FIN-WAIT-2 timeout (RFC 9293 3.10.7.4 leaves it to the
            # implementation, Linux's tcp_fin_timeout) replaces the keepalive.
            timers.set_fin_wait_2(now + self.config.fin_wait_2_timeout)
            timers.clear_keepalive()
            timers.clear_idle()
        return True

    def _close(self, reason: CloseReason) -> None:
        self._set_state(State.CLOSED)
        self.close_reason = reason
        self.timers.clear_all()
        self._ack_now = self._syn_due = self._rtx_due = False
        self._sndbuf.clear()
        self._ooo = Reassembly(0)
        self._sb.clear()
        self.buf.close()
        self._emit(Closed(self._flow(), reason))

    # ----------------------------------------------------------------- timers

    def get_timer(self) -> float | None:
        """The earliest deadline, or None when no timer runs."""
        return self.timers.earliest()

    # ----------------------------------------------------------------- output

    def _segment(
        self,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        payload: Payload = b"",
        options: TcpOptions = NO_OPTIONS,
        gso: int = 0,
    ) -> TcpSegment:
        return TcpSegment(
            self.local_port, self.remote_port, seq, ack, flags, window, payload, options, gso
        )

    def _options(self, now: float) -> TcpOptions:
        """Options for a non-SYN, non-RST segment sent at ``now``.

        RFC 7323 3.2: once negotiated, TSopt goes on every non-RST segment (RSTs go
        without: they are accepted regardless of timestamps, 5.3 R1). RFC 2018 4:
        SACK blocks on every ACK while out-of-order data is held -- at most 3 next
        to timestamps, else 4 (RFC 2018 3, the 40-byte option space).
        """
        ts = self.ts
        blocks: tuple[tuple[int, int], ...] = ()
        limit = 4 if ts is None else 3
        if self.sack_ok and self._ooo:
            blocks = choose_blocks(self._ooo, self._sack_recent, limit)
        if self._dsack is not None:
            # RFC 2883 4: a D-SACK block goes first, once; the sender uses it to
            # undo a reduction after a spurious retransmission and to learn
            # about reordering (Linux's tcp_check_dsack).
            blocks = ((self._dsack, *blocks))[:limit]
            self._dsack = None
        if ts is None:
            if not blocks:
                return NO_OPTIONS
            return _tcp_options((None, None, False, None, blocks))
        stamp = (ts.clock(now), ts.recent)
        return _tcp_options((None, None, False, stamp, blocks))

    def _ack_seq(self) -> int:
        """The sequence number for a segment without data: RFC 9293's SND.NXT.

        Our snd_nxt goes back to snd_una after an RTO (go-back-N), but the peer
        may hold everything up to snd_max. A pure ACK carrying snd_nxt looks old
        to the peer, which answers it with an ACK; with both ends going back at
        once the two would exchange ACKs without end. BSD's tcp_output uses
        snd_max here; like Linux's tcp_acceptable_seq() we stay within the peer's
        window.
        """
        edge = seq_add(self.snd_una, self.snd_wnd)
        return self.snd_max if seq_le(self.snd_max, edge) else edge

    def _free(self) -> int:
        """Buffer room for a window, in bytes: at most what the field can express."""
        free = self.buf.rcv - self._unconsumed
        return 0 if free <= 0 else min(free, self._max_wnd)

    def _window_increase(self) -> int:
        free = self._free()
        shift = self.rcv_wscale
        if shift:
            free = free >> shift << shift  # a new edge is a whole number of units
        return seq_sub(seq_add(self.rcv_nxt, free), self.rcv_adv)

    def _advertise(self) -> int:
        """The window field for an outgoing segment (RFC 9293 3.8.6.2.2, RFC 7323 2.4).

        Receiver SWS avoidance: the edge moves right only by min(buffer / 2, MSS) or
        more. See the module docstring for the scaled case.
        """
        increase = self._window_increase()
        if increase >= min(self.buf.rcv // 2, self.rcv_mss):
            self.rcv_adv = seq_add(self.rcv_adv, increase)
            self._rounded = 0
        wnd = seq_sub(self.rcv_adv, self.rcv_nxt)
        if wnd <= 0:
            return 0
        shift = self.rcv_wscale
        if not shift:
            return wnd
        field = wnd >> shift
        if field << shift != wnd:
            up = ((field + 1) << shift) - wnd
            rcv = self.buf.rcv
            if self._rounded + up <= max(rcv >> 3, (1 << shift) - 1):
                self._rounded += up  # round up, within the slack (module docstring)
                field += 1
                self.rcv_adv = seq_add(self.rcv_nxt, field << shift)
        return field

    def _pure_ack(self, opts: TcpOptions) -> TcpSegment:
        """An ACK without data, counted as the ACK owed (``_ack_sent``)."""
        seg = self._segment(self._ack_seq(), self.rcv_nxt, ACK, self._advertise(), b"", opts)
        self._ack_sent()
        return seg

    def _ack_sent(self) -> None:
        self._ack_now = False
        timers = self.timers
        if timers.ack is not None:
            timers.clear_ack()
        self._unacked_segments = 0
        self.last_ack_sent = self.rcv_nxt
