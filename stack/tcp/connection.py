"""One TCP connection, sans-IO (RFC 9293).

Theory of operation: three kinds of input change the state -- segments from
the peer (``receive_segment``), calls from the application (``send``,
``consumed``, ``close``, ``abort``) and time (``handle_timer``). None of them
transmits anything directly; they set flags (an ACK is due, a retransmission
is due) and move sequence variables. ``segments_to_send(now)`` then turns the
state into segments: control segments first, then data within the peer's
window and the congestion window, then a pure ACK if one is still owed.
Events go to a deque the caller drains; in-order payload is gathered per
connection and surfaces as one ``DataReceived`` per drain, so a batch of
packets for one flow costs one event.

The receive window is derived, never stored: buffer capacity minus the bytes
the application has not yet confirmed consumed. The send buffer holds bytes
from the oldest unacknowledged one onward, so retransmission reads it directly.
"""

from __future__ import annotations

from stack.errors import LocalProtocolError
from stack.events import (
    CloseReason,
    Connected,
    ConnectionReset,
    PeerFinished,
    SendSpace,
)
from stack.seq import seq_add, seq_gt, seq_le, seq_lt, seq_sub
from stack.tcp.congestion import Reno
from stack.tcp.core import MAX_WINDOW, RECEIVING, SYNCHRONIZED, State
from stack.tcp.segment import TcpSegment
from stack.tcp.sender import TcpSender
from stack.wire.tcp import ACK, FIN, RST, SYN, TcpOptions

__all__ = ["State", "TcpConnection"]


class TcpConnection(TcpSender):
    """A TCP endpoint for one 4-tuple. See the module docstring."""

    # ------------------------------------------------------------------ opening

    def listen(self, syn: TcpSegment) -> None:
        """Record a client's SYN; the caller decides later with ``accept`` or ``reject``."""
        self.state = State.LISTEN
        self.irs = syn.seq
        self.rcv_nxt = seq_add(syn.seq, 1)
        self.peer_options = syn.options
        self._take_syn_options(syn)
        self.snd_wnd = syn.window  # RFC 7323 2.2: the window in a SYN is never scaled
        self.max_snd_wnd = syn.window

    def accept(self, isn: int) -> None:
        """Answer the recorded SYN with a SYN-ACK (passive open)."""
        if self.state is not State.LISTEN:
            raise LocalProtocolError(f"accept() in state {self.state.value}")
        self._init_send(isn)
        self.state = State.SYN_RECEIVED
        self._syn_due = True

    def connect(self, isn: int) -> None:
        """Active open: send a SYN."""
        if self.state is not State.CLOSED or self.close_reason is not None:
            raise LocalProtocolError(f"connect() in state {self.state.value}")
        self._init_send(isn)
        self.state = State.SYN_SENT
        self._syn_due = True

    def reject(self, *, rst: bool) -> None:
        """Refuse the recorded SYN, with an RST (RFC 9293 3.10.7.1) or silently."""
        if self.state is not State.LISTEN:
            raise LocalProtocolError(f"reject() in state {self.state.value}")
        if rst:
            self._ctl.append(self._segment(0, self.rcv_nxt, RST | ACK, 0))
        self._close(CloseReason.REJECTED)

    def _init_send(self, isn: int) -> None:
        self.iss = isn
        self.snd_una = self.snd_nxt = self.snd_max = isn
        self._sb_seq = seq_add(isn, 1)

    def _take_syn_options(self, seg: TcpSegment) -> None:
        if seg.options.mss:
            self.snd_mss = seg.options.mss
        self.cc = Reno(self.snd_mss)

    # ----------------------------------------------------------- application side

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Queue bytes for the peer.

        Returns:
            How many bytes were accepted; fewer than offered when the send buffer
            is full, and then a ``SendSpace`` event follows once room frees.

        Raises:
            LocalProtocolError: after ``close()`` or once the connection is closed.
        """
        if self._fin_queued or self.state in (State.CLOSED, State.LISTEN):
            raise LocalProtocolError(f"send() in state {self.state.value}")
        room = self.config.snd_buf - len(self._sndbuf)
        n = min(room, len(data))
        if n < len(data):
            self._want_send_space = True
        if n > 0:
            self._sndbuf += data[:n]
        return n

    @property
    def send_space(self) -> int:
        """Free bytes in the send buffer (0 once closed for sending)."""
        if self._fin_queued or self.state in (State.CLOSED, State.LISTEN):
            return 0
        return self.config.snd_buf - len(self._sndbuf)

    @property
    def unsent(self) -> int:
        """Bytes in the send buffer, acknowledged or not."""
        return len(self._sndbuf)

    def consumed(self, n: int) -> None:
        """The application has disposed of ``n`` delivered bytes: reopen the window."""
        if n < 0 or n > self._unconsumed:
            raise LocalProtocolError(f"consumed({n}) with {self._unconsumed} bytes outstanding")
        before = seq_sub(self.rcv_adv, self.rcv_nxt)
        self._unconsumed -= n
        # Send a window update now only when the window had become small and
        # the increase passes receiver SWS avoidance (RFC 9293 3.8.6.2.2).
        if (
            self.state in RECEIVING
            and before < self.config.rcv_buf // 2
            and self._window_increase() >= min(self.config.rcv_buf // 2, self.rcv_mss)
        ):
            self._ack_now = True

    def close(self) -> None:
        """Half-close: send FIN once the queued data is sent (RFC 9293 3.10.4)."""
        if self._fin_queued:
            return
        if self.state in (State.LISTEN, State.SYN_SENT):
            self._close(CloseReason.ABORTED)
            return
        if self.state not in (State.SYN_RECEIVED, State.ESTABLISHED, State.CLOSE_WAIT):
            return
        self._fin_queued = True
        if self.state is State.ESTABLISHED:
            self.state = State.FIN_WAIT_1
        elif self.state is State.CLOSE_WAIT:
            self.state = State.LAST_ACK
        # In SYN-RECEIVED the FIN waits for the handshake (see _on_ack).

    def abort(self) -> None:
        """Reset the connection (RFC 9293 3.10.5) and close it."""
        self._reset(CloseReason.ABORTED)

    # ------------------------------------------------------------ segment input

    def receive_segment(self, seg: TcpSegment, now: float) -> None:
        """Process one segment from the peer (never raises for bad input)."""
        self.on_segment(seg.seq, seg.ack, seg.flags, seg.window, seg.payload, seg.options, now)

    def on_segment(
        self,
        seq: int,
        ack: int,
        flags: int,
        window: int,
        payload: bytes,
        options: TcpOptions,
        now: float,
    ) -> None:
        """``receive_segment`` with the fields passed separately (the Stack's fast path)."""
        state = self.state
        if state is State.CLOSED:
            return
        if state is State.LISTEN:
            # Retransmitted SYNs while the caller decides are absorbed; an RST
            # means the client gave up.
            if flags & RST and (seq == self.irs or seq == self.rcv_nxt):
                self._close(CloseReason.RESET)
            return
        if state is State.SYN_SENT:
            self._on_segment_syn_sent(seq, ack, flags, window, options, now)
            return

        # RFC 9293 3.10.7.4, first: is the segment acceptable?
        seg_len = len(payload) + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        rcv_wnd = seq_sub(self.rcv_adv, self.rcv_nxt)
        if not self._acceptable(seq, seg_len, rcv_wnd):
            if flags & RST:
                return
            if state is State.SYN_RECEIVED and flags & SYN and seq == self.irs:
                self._syn_due = True  # our SYN-ACK was lost: the client repeats its SYN
                return
            self._ack_now = True  # RFC 9293: send an ACK, drop the segment
            if state is State.TIME_WAIT and flags & FIN:
                # RFC 9293 3.10.7.4 TIME-WAIT: a retransmitted FIN (it lies before
                # rcv_nxt, so it fails the test above) restarts the 2 MSL timeout.
                self.linger_deadline = now + self.config.time_wait
            if flags & ACK and rcv_wnd == 0 and seq == self.rcv_nxt:
                self._on_ack(ack, seq, window, 0, now)  # zero window: still take ACKs
            return

        # Second: RST (RFC 5961 3.2).
        if flags & RST:
            if seq == self.rcv_nxt:
                if state in SYNCHRONIZED:
                    self._emit(ConnectionReset(self._flow()))
                self._close(CloseReason.RESET)
            else:
                self._challenge_ack(now)
            return
        # Fourth: SYN in a synchronized state (RFC 5961 4.2).
        if flags & SYN:
            self._challenge_ack(now)
            return
        # Fifth: the ACK field.
        if not flags & ACK:
            return
        # seg_len, not len(payload): RFC 5681 2 (duplicate ACK) requires SYN and FIN
        # off as well as no data; a bare FIN used to count as a duplicate.
        if not self._on_ack(ack, seq, window, seg_len, now):
            return
        # Sixth and seventh: the text and the FIN.
        if payload and self.state in RECEIVING:
            if self.state is State.FIN_WAIT_2:
                # close() is a half-close: the peer may go on sending. The FIN-WAIT-2
                # timeout (RFC 9293 3.10.7.4 leaves it to the implementation) counts
                # idle time, not time since our FIN, or a long upload would be cut.
                self.linger_deadline = now + self.config.fin_wait_2_timeout
            self._on_data(seq, payload, now)
        if flags & FIN:
            self._on_fin(seq_add(seq, len(payload)), now)
        # RFC 9293 3.10.7.4 (TIME-WAIT): only a retransmitted FIN is answered. Fixed:
        # an ACK for every acceptable ACK made two TIME-WAIT ends (simultaneous
        # close) ping-pong ACKs until the timer ran out.

    def _acceptable(self, seq: int, seg_len: int, rcv_wnd: int) -> bool:
        # RFC 9293 3.10.7.4, the four cases of the acceptability test.
        rcv_nxt = self.rcv_nxt
        if seg_len == 0:
            if rcv_wnd == 0:
                return seq == rcv_nxt
            return seq_le(rcv_nxt, seq) and seq_lt(seq, seq_add(rcv_nxt, rcv_wnd))
        if rcv_wnd == 0:
            return False
        end = seq_add(seq, seg_len - 1)
        edge = seq_add(rcv_nxt, rcv_wnd)
        return (seq_le(rcv_nxt, seq) and seq_lt(seq, edge)) or (
            seq_le(rcv_nxt, end) and seq_lt(end, edge)
        )

    def _challenge_ack(self, now: float) -> None:
        # RFC 5961 5: rate-limited challenge ACKs.
        second = float(int(now))
        if second != self._challenge_second:
            self._challenge_second = second
            self._challenge_count = 0
        if self._challenge_count < self.config.challenge_ack_limit:
            self._challenge_count += 1
            self._ack_now = True

    def _on_segment_syn_sent(
        self, seq: int, ack: int, flags: int, window: int, options: TcpOptions, now: float
    ) -> None:
        # RFC 9293 3.10.7.3.
        if flags & ACK and not (seq_lt(self.iss, ack) and seq_le(ack, self.snd_max)):
            if not flags & RST:
                self._ctl.append(self._segment(ack, 0, RST, 0))
            return
        if flags & RST:
            if flags & ACK:
                self._emit(ConnectionReset(self._flow()))
                self._close(CloseReason.RESET)
            return
        if not flags & SYN:
            return
        self.irs = seq
        self.rcv_nxt = seq_add(seq, 1)
        self.rcv_adv = seq_add(self.rcv_nxt, min(self.config.rcv_buf, MAX_WINDOW))
        self.peer_options = options
        if options.mss:
            self.snd_mss = options.mss
            self.cc = Reno(self.snd_mss)
        self.snd_wnd = self.max_snd_wnd = window
        self.snd_wl1, self.snd_wl2 = seq, ack
        self._ack_now = True
        if flags & ACK:
            self._on_new_ack(ack, now)
            self.state = State.ESTABLISHED
            self._emit(Connected(self._flow()))
        else:
            self.state = State.SYN_RECEIVED  # simultaneous open
            self._syn_due = True

    def _on_ack(self, ack: int, seq: int, window: int, payload_len: int, now: float) -> bool:
        """RFC 9293 3.10.7.4 fifth step. Returns False when the segment is to be dropped."""
        if self.state is State.SYN_RECEIVED:
            if not (seq_lt(self.snd_una, ack) and seq_le(ack, self.snd_max)):
                self._ctl.append(self._segment(ack, 0, RST, 0))
                return False
            self.state = State.ESTABLISHED
            self.snd_wnd = window
            self.max_snd_wnd = max(self.max_snd_wnd, window)
            self.snd_wl1, self.snd_wl2 = seq, ack
            self._on_new_ack(ack, now)
            self._emit(Connected(self._flow()))
            if self._fin_queued:
                self.state = State.FIN_WAIT_1
            return True

        if seq_gt(ack, self.snd_max):
            self._ack_now = True  # acknowledges something never sent
            return False
        if seq_gt(ack, self.snd_una):
            self._on_new_ack(ack, now)
        elif (
            ack == self.snd_una
            and payload_len == 0
            and window == self.snd_wnd
            and self.snd_max != self.snd_una
        ):
            self._on_duplicate_ack()
        # Window update (RFC 9293 3.10.7.4, with SND.WL1/WL2 ordering).
        if seq_lt(self.snd_wl1, seq) or (self.snd_wl1 == seq and seq_le(self.snd_wl2, ack)):
            self.snd_wnd = window
            self.snd_wl1, self.snd_wl2 = seq, ack
            if window > self.max_snd_wnd:
                self.max_snd_wnd = window
            if window > 0:
                self.persist_deadline = None
                self._persist_backoff = 0
        self._probes = 0
        return self.state is not State.CLOSED

    def _on_new_ack(self, ack: int, now: float) -> None:
        flight = seq_sub(self.snd_max, self.snd_una)
        acked = seq_sub(ack, self.snd_una)
        if self._rtt_seq is not None and seq_gt(ack, self._rtt_seq):
            self._rtt.sample(now - self._rtt_start)
            self._rtt_seq = None
        self.snd_una = ack
        if seq_lt(self.snd_nxt, ack):
            self.snd_nxt = ack
        # Drop acknowledged bytes from the send buffer (the SYN and FIN hold no bytes).
        n = min(seq_sub(ack, self._sb_seq), len(self._sndbuf))
        if n > 0:
            del self._sndbuf[:n]
            self._sb_seq = seq_add(self._sb_seq, n)
            if self._want_send_space and not self._fin_queued:
                self._want_send_space = False
                self._emit(SendSpace(self._flow()))
        self._retries = 0
        self._rtt.backoff = 0
        self._dupacks = 0
        if self._recover is not None:
            if seq_lt(ack, self._recover):
                self._rtx_due = True  # RFC 6582 3.2 (5): a partial ACK, the next hole
            else:
                self._recover = None
        else:
            self.cc.on_ack(acked, flight)
        # RFC 6298 5.2/5.3: stop the timer when all is acknowledged, else restart it.
        self.rto_deadline = None if self.snd_una == self.snd_max else now + self._rtt.rto
        if self._fin_queued and self.snd_una == seq_add(self._sb_seq, 1) and not self._sndbuf:
            self._on_fin_acked(now)

    def _on_duplicate_ack(self) -> None:
        self._dupacks += 1
        if self._dupacks == 3 and self._recover is None:
            # RFC 5681 3.2 fast retransmit; RFC 6582 recovery point.
            self.cc.on_fast_retransmit(seq_sub(self.snd_max, self.snd_una))
            self._recover = self.snd_max
            self._rtx_due = True
            self._rtt_seq = None

    def _on_fin_acked(self, now: float) -> None:
        if self.state is State.FIN_WAIT_1:
            self.state = State.FIN_WAIT_2
            self.linger_deadline = now + self.config.fin_wait_2_timeout
        elif self.state is State.CLOSING:
            self._enter_time_wait(now)
        elif self.state is State.LAST_ACK:
            self._close(CloseReason.FINISHED)

    def _enter_time_wait(self, now: float) -> None:
        self.state = State.TIME_WAIT
        self.rto_deadline = self.persist_deadline = None
        self.linger_deadline = now + self.config.time_wait

    def _on_data(self, seq: int, payload: bytes, now: float) -> None:
        # Trim to the window: the part before rcv_nxt is a duplicate and the part
        # beyond the advertised edge is not ours to keep (RFC 9293 3.10.7.4).
        rcv_nxt = self.rcv_nxt
        front = seq_sub(rcv_nxt, seq)
        if front > 0:
            payload = payload[front:]
            seq = rcv_nxt
        room = seq_sub(self.rcv_adv, seq)
        if len(payload) > room:
            payload = payload[: max(room, 0)]
        if not payload:
            self._ack_now = True
            return
        if seq != rcv_nxt:
            self._ooo.insert(rcv_nxt, seq, payload)
            self._ack_now = True  # RFC 5681 4.2: an immediate duplicate ACK
            return
        filled_hole = bool(self._ooo)
        self._deliver(payload)
        if filled_hole:
            while (more := self._ooo.pop_ready(self.rcv_nxt)) is not None:
                self._deliver(more)
            self._ack_now = True  # RFC 5681 4.2: ACK at once when a hole fills
        if self._ooo_fin is not None and self._ooo_fin == self.rcv_nxt:
            self._on_fin(self._ooo_fin, now)
        self._unacked_segments += 1
        if self._unacked_segments >= 2:
            self._ack_now = True  # RFC 9293 3.8.6.3 / RFC 5681 4.2: every second segment
        elif self.ack_deadline is None:
            self.ack_deadline = now + self.config.delayed_ack

    def _deliver(self, data: bytes) -> None:
        self.rcv_nxt = seq_add(self.rcv_nxt, len(data))
        self._unconsumed += len(data)
        if not self._rx_pending:
            self._readable.append(self)
        self._rx_pending.append(data)

    def _on_fin(self, fin_seq: int, now: float) -> None:
        if fin_seq != self.rcv_nxt:
            if self.state in RECEIVING and seq_gt(fin_seq, self.rcv_nxt):
                self._ooo_fin = fin_seq  # wait for the hole before it to fill
                # RFC 5681 4.2: an out-of-order segment is acknowledged at once (the
                # duplicate ACK); a bare FIN beyond a hole used to get no ACK at all.
                self._ack_now = True
            else:
                self._ack_now = True  # a repeated FIN
                if self.state is State.TIME_WAIT:
                    self.linger_deadline = now + self.config.time_wait
            return
        self._ooo_fin = None
        self.rcv_nxt = seq_add(self.rcv_nxt, 1)
        self._ack_now = True
        state = self.state
        if state is State.ESTABLISHED:
            self.state = State.CLOSE_WAIT
        elif state is State.FIN_WAIT_1:
            # Our FIN is not yet acknowledged (else we would be in FIN-WAIT-2).
            self.state = State.CLOSING
        elif state is State.FIN_WAIT_2:
            self._enter_time_wait(now)
        else:
            return
        self._emit(PeerFinished(self._flow()))
