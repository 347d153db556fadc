"""State shared by every part of a TCP connection: the variables, events, and helpers.

``TcpConnection`` is assembled from three layers so each stays readable:
``ConnectionCore`` (this module: the RFC 9293 variables, event emission,
window advertisement), ``TcpSender`` (``sender.py``: timers and everything
that produces segments) and ``TcpConnection`` (``connection.py``: opening,
the application calls, and segment processing).
"""

from __future__ import annotations

import enum
from collections import deque

from stack.config import TcpConfig
from stack.events import (
    Closed,
    CloseReason,
    DataReceived,
    Event,
    FlowId,
)
from stack.seq import seq_add, seq_le, seq_sub
from stack.tcp.congestion import CongestionControl, Reno
from stack.tcp.reassembly import Reassembly
from stack.tcp.rtt import RttEstimator
from stack.tcp.segment import TcpSegment
from stack.wire.tcp import ACK, NO_OPTIONS, RST, TcpOptions


class State(enum.Enum):
    CLOSED = "CLOSED"
    LISTEN = "LISTEN"  # a SYN arrived; the caller has not yet accepted or rejected it
    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSING = "CLOSING"
    TIME_WAIT = "TIME-WAIT"
    CLOSE_WAIT = "CLOSE-WAIT"
    LAST_ACK = "LAST-ACK"


SYNCHRONIZED = frozenset(
    {
        State.ESTABLISHED,
        State.FIN_WAIT_1,
        State.FIN_WAIT_2,
        State.CLOSE_WAIT,
        State.CLOSING,
        State.LAST_ACK,
        State.TIME_WAIT,
    }
)
RECEIVING = frozenset({State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2})
MAX_WINDOW = 0xFFFF  # no window scaling yet: RFC 7323 comes with the bad-paths work


class ConnectionCore:
    """The variables of one connection and the helpers every layer uses."""

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
    ) -> None:
        cfg = config or TcpConfig()
        self.config = cfg
        self.local_port = local_port
        self.remote_port = remote_port
        self.flow = flow
        self.state = State.CLOSED
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
        self.snd_mss = cfg.default_peer_mss  # largest payload we send per segment
        self._sndbuf = bytearray()  # unacknowledged and unsent bytes from the application
        self._sb_seq = 0  # sequence number of _sndbuf[0]
        self._fin_queued = False  # close() was called: FIN follows the data
        self._want_send_space = False  # a send() came up short: emit SendSpace when room frees

        # Receive sequence space.
        self.irs = 0  # initial receive sequence number
        self.rcv_nxt = 0  # next sequence number expected
        self.rcv_adv = 0  # right edge of the window last advertised
        self.rcv_mss = mss or cfg.mss  # MSS we advertise
        self._unconsumed = 0  # bytes delivered to the application and not yet consumed
        self._ooo = Reassembly(min(cfg.ooo_limit, cfg.rcv_buf))
        self._ooo_fin: int | None = None  # sequence number of a FIN that arrived beyond a hole
        self._rx_pending: list[bytes] = []  # in-order bytes not yet surfaced as an event
        self.peer_options: TcpOptions = NO_OPTIONS  # options from the peer's SYN

        # Output flags and timers (absolute deadlines, seconds).
        self._ctl: list[TcpSegment] = []  # RSTs and other one-off segments to send first
        self._syn_due = False  # (re)send our SYN or SYN-ACK
        self._ack_now = False  # an ACK is owed immediately
        self._unacked_segments = 0  # in-order segments received since our last ACK
        self._rtx_due = False  # fast retransmit: resend the segment at snd_una
        self._recover: int | None = None  # RFC 6582 recovery point while in fast recovery
        self._dupacks = 0
        self.ack_deadline: float | None = None  # delayed ACK
        self.rto_deadline: float | None = None  # retransmission
        self.persist_deadline: float | None = None  # zero-window probe
        self.linger_deadline: float | None = None  # TIME-WAIT or FIN-WAIT-2 expiry
        self._retries = 0  # consecutive timeouts without progress
        self._probes = 0  # unanswered zero-window probes
        self._persist_backoff = 0  # probe-interval doublings since the window closed
        self._sws_override = False  # the persist timer fired on a short usable window
        self._rtt = RttEstimator(cfg.rto_initial, cfg.rto_min, cfg.rto_max)
        self._rtt_seq: int | None = None  # sequence number being timed (Karn: never a resend)
        self._rtt_start = 0.0
        self._challenge_second = -1.0
        self._challenge_count = 0
        self.cc: CongestionControl = Reno(self.snd_mss)

    def _reset(self, reason: CloseReason) -> None:
        if self.state is State.CLOSED:
            return
        if self.state in SYNCHRONIZED or self.state is State.SYN_RECEIVED:
            self._ctl.append(self._segment(self._ack_seq(), self.rcv_nxt, RST | ACK, 0))
        self._close(reason)

    # --------------------------------------------------------------------- events

    def next_event(self) -> Event | None:
        """Pop the next event for this connection's queue, or None."""
        self.flush_data()
        return self._events.popleft() if self._events else None

    def flush_data(self) -> None:
        """Turn gathered in-order bytes into one ``DataReceived`` event."""
        if self._rx_pending:
            chunks = self._rx_pending
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._rx_pending = []
            self._events.append(DataReceived(self._flow(), data))

    def _emit(self, event: Event) -> None:
        self.flush_data()
        self._events.append(event)

    def _flow(self) -> FlowId:
        return self.flow or FlowId(0, "", self.remote_port, "", self.local_port)

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

    def _close(self, reason: CloseReason) -> None:
        self.state = State.CLOSED
        self.close_reason = reason
        self.ack_deadline = self.rto_deadline = self.persist_deadline = None
        self.linger_deadline = None
        self._ack_now = self._syn_due = self._rtx_due = False
        self._sndbuf = bytearray()
        self._ooo = Reassembly(0)
        self._emit(Closed(self._flow(), reason))

    # ----------------------------------------------------------------- timers

    def get_timer(self) -> float | None:
        """The earliest deadline, or None when no timer runs."""
        best: float | None = None
        deadlines = (self.ack_deadline, self.rto_deadline, self.persist_deadline)
        for d in (*deadlines, self.linger_deadline):
            if d is not None and (best is None or d < best):
                best = d
        return best

    # ----------------------------------------------------------------- output

    def _segment(
        self, seq: int, ack: int, flags: int, window: int, payload: bytes = b""
    ) -> TcpSegment:
        return TcpSegment(self.local_port, self.remote_port, seq, ack, flags, window, payload)

    def _ack_seq(self) -> int:
        """The sequence number for a segment without data: RFC 9293's SND.NXT.

        Our snd_nxt goes back to snd_una after an RTO (go-back-N), but the peer
        may hold everything up to snd_max. Fixed: pure ACKs carried snd_nxt, which
        the peer found old and answered with an ACK; with both ends going back
        at once the two exchanged ACKs without end. BSD's tcp_output uses snd_max
        here; like Linux's tcp_acceptable_seq() we stay within the peer's window.
        """
        edge = seq_add(self.snd_una, self.snd_wnd)
        return self.snd_max if seq_le(self.snd_max, edge) else edge

    def _window_increase(self) -> int:
        free = self.config.rcv_buf - self._unconsumed
        right = seq_add(self.rcv_nxt, min(max(free, 0), MAX_WINDOW))
        return seq_sub(right, self.rcv_adv)

    def _advertise(self) -> int:
        """The window for an outgoing segment, with receiver SWS avoidance (RFC 9293 3.8.6.2.2)."""
        increase = self._window_increase()
        if increase >= min(self.config.rcv_buf // 2, self.rcv_mss):
            self.rcv_adv = seq_add(self.rcv_adv, increase)
        return max(0, seq_sub(self.rcv_adv, self.rcv_nxt))

    def _ack_sent(self) -> None:
        self._ack_now = False
        self.ack_deadline = None
        self._unacked_segments = 0
