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

Options (RFC 7323, RFC 2018) are negotiated in the SYN exchange: a passive
open answers window scaling, timestamps and SACK-permitted only when the
client's SYN carried them; an active open offers all three (as configured)
and keeps those the SYN-ACK returns. With timestamps, PAWS (RFC 7323 5.3)
drops a segment older than TS.Recent before the acceptability test.
"""

from __future__ import annotations

from stack.compiled import mypyc_attr
from stack.errors import LocalProtocolError
from stack.events import (
    CloseReason,
    ConnectionReset,
    PeerFinished,
)
from stack.seq import seq_add, seq_gt, seq_le, seq_lt, seq_sub
from stack.tcp.buffers import MAX_WSCALE, wscale_for
from stack.tcp.core import EMPTY_SEQS, MAX_WINDOW, RECEIVING, SYNCHRONIZED, State
from stack.tcp.cubic import make
from stack.tcp.recovery import TcpRecovery
from stack.tcp.sack import MAX_RECENT
from stack.tcp.segment import Payload, TcpSegment
from stack.tcp.timestamps import TS_OPTION_LEN, Timestamps, offset_for
from stack.tcp.transitions import CLOSE_SIDE, Close
from stack.wire.tcp import ACK, FIN, NO_OPTIONS, PSH, RST, SYN, TcpOptions

__all__ = ["State", "TcpConnection"]


QUICKACKS = 16  # segments ACKed at once after a sign of loss (Linux's TCP_MAX_QUICKACKS)


@mypyc_attr(allow_interpreted_subclasses=True)
class TcpConnection(TcpRecovery):
    """A TCP endpoint for one 4-tuple. See the module docstring."""

    __slots__ = ()

    # ------------------------------------------------------------------ opening

    def listen(self, syn: TcpSegment) -> None:
        """Record a client's SYN; the caller decides later with ``accept`` or ``reject``."""
        self._set_state(State.LISTEN)
        self.irs = syn.seq
        self.rcv_nxt = seq_add(syn.seq, 1)
        self.snd_wnd = syn.window  # RFC 7323 2.2: the window in a SYN is never scaled
        self.max_snd_wnd = syn.window
        # Answer only what the client offered (RFC 7323 1.3 and 3.2, RFC 2018 2).
        cfg = self.config
        opts = syn.options
        if cfg.window_scaling and opts.wscale is not None:
            self._use_wscale(opts.wscale)
        self.sack_ok = cfg.sack and opts.sack_permitted
        if cfg.timestamps and opts.timestamps is not None:
            self.ts = Timestamps(opts.timestamps[0])
        self._set_snd_mss(opts.mss)

    def accept(self, isn: int) -> None:
        """Answer the recorded SYN with a SYN-ACK (passive open)."""
        if self.state is not State.LISTEN:
            raise LocalProtocolError(f"accept() in state {self.state.value}")
        self._init_send(isn)
        self._set_state(State.SYN_RECEIVED)
        self._syn_due = True

    def connect(self, isn: int) -> None:
        """Active open: send a SYN offering the configured options."""
        if self.state is not State.CLOSED or self.close_reason is not None:
            raise LocalProtocolError(f"connect() in state {self.state.value}")
        cfg = self.config
        if cfg.window_scaling:
            self._use_wscale(0)  # the peer's shift comes with its SYN-ACK
        self.sack_ok = cfg.sack
        if cfg.timestamps:
            self.ts = Timestamps()
        self._init_send(isn)
        self._set_state(State.SYN_SENT)
        self._syn_due = True

    def reject(self, *, rst: bool) -> None:
        """Refuse the recorded SYN, with an RST (RFC 9293 3.10.7.1) or silently."""
        if self.state is not State.LISTEN:
            raise LocalProtocolError(f"reject() in state {self.state.value}")
        if rst:
            self._queue(self._segment(0, self.rcv_nxt, RST | ACK, 0))
        self._close(CloseReason.REJECTED)

    def _init_send(self, isn: int) -> None:
        self.iss = isn
        self.snd_una = self.snd_nxt = self.snd_max = isn
        self._sb_seq = seq_add(isn, 1)
        self._flight_hw_end = isn
        self.recover = self.high_rxt = isn  # RFC 6582 3.2: recover starts at the ISN
        if self.ts is not None:
            self.ts.offset = offset_for(isn)
        self.buf.open(self._max_wnd)
        self._ooo.limit = min(self.config.ooo_limit, self.buf.rcv)

    def _use_wscale(self, peer_shift: int) -> None:
        self._ws_ok = True
        self.snd_wscale = min(peer_shift, MAX_WSCALE)  # RFC 7323 2.3
        self.rcv_wscale = wscale_for(self.config.rcv_buf)
        self._max_wnd = MAX_WINDOW << self.rcv_wscale

    def _set_snd_mss(self, peer_mss: int | None) -> None:
        """Full-segment payload from the peer's MSS option, once options are settled.

        RFC 6691: the MSS counts payload after bare 20-byte IP and TCP headers, so
        the 12 bytes of TSopt on every segment come out of it (Linux's mss_cache
        does the same); otherwise a full segment with timestamps is 12 bytes over
        the path MTU and never arrives.
        """
        # Linux's tcp_min_snd_mss floor: a tiny MSS would cost a segment per few bytes.
        cfg = self.config
        mss = max(peer_mss or cfg.default_peer_mss, cfg.min_snd_mss)
        if self.ts is not None:
            mss = max(mss - TS_OPTION_LEN, 1)
        self.snd_mss = self._seg_mss = mss
        self.cc = make(cfg.congestion, mss)

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
        room = self.buf.snd - len(self._sndbuf)
        if room < len(data) and self.buf.want_snd(2 * min(self.cc.cwnd, self.max_snd_wnd)):
            room = self.buf.snd - len(self._sndbuf)  # grown with demand (buffers.py)
        n = min(room, len(data))
        if n < len(data):
            self._want_send_space = True
        if n > 0:
            self._sndbuf.append(data if n == len(data) else data[:n])
        return n

    @property
    def send_space(self) -> int:
        """Free bytes in the send buffer (0 once closed for sending)."""
        if self._fin_queued or self.state in (State.CLOSED, State.LISTEN):
            return 0
        return self.buf.snd - len(self._sndbuf)

    @property
    def send_burst(self) -> int:
        """New data the sender takes per segment it builds (``TcpConfig.tso_segments``
        full segments): a write of a multiple of it leaves no short segment behind."""
        return self.snd_mss * self.config.tso_segments

    def grow_send_buffer(self) -> int:
        """The caller found the send buffer full: grow it with demand, as ``send`` does.

        A caller that offers only ``send_space`` bytes never overfills the buffer,
        so this is where auto-tuning happens for it (buffers.py). Without it, a
        relay that reads at most ``send_space`` bytes upstream keeps the buffer at
        its initial size, which caps a flow at 256 KiB per RTT.

        Returns:
            The send space afterwards.
        """
        if self.send_space == 0:
            self.buf.want_snd(2 * min(self.cc.cwnd, self.max_snd_wnd))
        return self.send_space

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
            and before < self.buf.rcv // 2
            and self._window_increase() >= min(self.buf.rcv // 2, self.rcv_mss)
        ):
            self._ack_now = True

    def close(self) -> None:
        """Half-close: send FIN once the queued data is sent (RFC 9293 3.10.4)."""
        if self._fin_queued:
            return
        nxt = CLOSE_SIDE.get((self.state, Close.CALL))
        if nxt is None:
            return  # closing already, or closed
        if nxt is State.CLOSED:
            self._close(CloseReason.ABORTED)  # before the handshake: nothing to finish
            return
        self._fin_queued = True
        self._set_state(nxt)  # SYN-RECEIVED stays: the FIN waits for the handshake (_on_ack)

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
        payload: Payload,
        options: TcpOptions,
        now: float,
        acks: int = 1,
    ) -> None:
        """``receive_segment`` with the fields passed separately (the Stack's fast path).

        ``acks`` > 1: this pure ACK ends a merged run of that many (``merges_ack``).
        """
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
        if (
            (state is State.ESTABLISHED or state is State.CLOSE_WAIT)
            and seq == self.rcv_nxt
            and flags & ~PSH == ACK
            and self._predicted(seq, ack, window, payload, options, now, acks)
        ):
            return
        self._last_rcv = now  # the peer is alive (keepalive, idle timeout)
        if self.snd_wscale and not flags & SYN:
            window <<= self.snd_wscale  # RFC 7323 2.3: SND.WND = SEG.WND << Snd.Wind.Shift
        ts = self.ts
        stamp = None if ts is None else options.timestamps
        # RFC 7323 5.3 R1 (PAWS): an older TSval than TS.Recent is a duplicate from
        # an earlier incarnation of the sequence space: ACK it and drop it. RSTs are
        # exempt. (A segment without TSopt is processed, as Linux and FreeBSD do;
        # RFC 7323 3.2 says SHOULD drop, MUST NOT abort.)
        if (
            stamp is not None
            and ts is not None
            and seq_lt(stamp[0], ts.recent)
            and not flags & RST
            and ts.paws_rejects(stamp[0], now)
        ):
            # A late original behind its retransmission has an older TSval, so PAWS
            # drops it; it is still a duplicate the sender should hear of (Linux's
            # tcp_send_dupack): the D-SACK is how the sender learns a retransmission
            # was spurious and undoes its reduction (RFC 2883 4.1, RFC 3708).
            self._ack_duplicate(now, seq, len(payload))
            return

        # RFC 9293 3.10.7.4, first: is the segment acceptable?
        seg_len = len(payload) + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        rcv_wnd = seq_sub(self.rcv_adv, self.rcv_nxt)
        if not self._acceptable(seq, seg_len, rcv_wnd, flags & RST):
            if flags & RST:
                return
            if state is State.SYN_RECEIVED and flags & SYN and seq == self.irs:
                self._syn_due = True  # our SYN-ACK was lost: the client repeats its SYN
                return
            self._ack_duplicate(now, seq, len(payload))  # RFC 9293: ACK, drop the segment
            if state is State.TIME_WAIT and flags & FIN:
                # RFC 9293 3.10.7.4 TIME-WAIT: a retransmitted FIN (it lies before
                # rcv_nxt, so it fails the test above) restarts the 2 MSL timeout.
                self.timers.set_time_wait(now + self.config.time_wait)
            if flags & ACK and rcv_wnd == 0 and seq == self.rcv_nxt:
                self._on_ack(ack, seq, window, 0, options, now)  # zero window: take ACKs
            return
        if stamp is not None and ts is not None and stamp[0] != ts.recent:
            ts.update(stamp[0], seq, self.last_ack_sent, now)  # RFC 7323 5.3 R3, 4.3

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
        # off as well as no data, so a bare FIN is not a duplicate.
        if not self._on_ack(ack, seq, window, seg_len, options, now, acks):
            return
        # Sixth and seventh: the text and the FIN.
        if payload and self.state in RECEIVING:
            if self.state is State.FIN_WAIT_2:
                # close() is a half-close: the peer may go on sending. The FIN-WAIT-2
                # timeout (RFC 9293 3.10.7.4 leaves it to the implementation) counts
                # idle time, not time since our FIN, or a long upload would be cut.
                self.timers.set_fin_wait_2(now + self.config.fin_wait_2_timeout)
            self._on_data(seq, payload, now)
        if flags & FIN:
            self._on_fin(seq_add(seq, len(payload)), now)
        # RFC 9293 3.10.7.4 (TIME-WAIT): only a retransmitted FIN is answered. An
        # ACK for every acceptable ACK would make two TIME-WAIT ends (simultaneous
        # close) ping-pong ACKs until the timer ran out.

    def _predicted(
        self,
        seq: int,
        ack: int,
        window: int,
        payload: Payload,
        options: TcpOptions,
        now: float,
        acks: int,
    ) -> bool:
        """Header prediction (Jacobson's, as in BSD's tcp_input and Linux's
        tcp_rcv_established): the common segment -- the next one expected, ACK
        with or without PSH, no SACK blocks, a TSval not older than TS.Recent, and
        either a new ACK alone (ESTABLISHED or CLOSE-WAIT) or data in ESTABLISHED
        that fits the window with no hole to fill and a current ACK -- takes the
        steps the full path would take for it and skips the tests whose outcome
        is known. The caller checked the state (one of the two), the sequence
        number and the flags.

        Returns:
            False, having changed nothing, when the segment needs the full path.
        """
        ts = self.ts
        stamp = options.timestamps
        if (ts is not None and (stamp is None or seq_lt(stamp[0], ts.recent))) or (
            options.sack_blocks
        ):
            return False  # PAWS may apply, or the SACK scoreboard has work
        una = self.snd_una
        if payload:
            # Acceptable and untrimmed (RFC 9293 3.10.7.4): it starts at rcv_nxt and
            # ends within the window; an ACK below snd_una is left to the full path.
            if (
                self.state is not State.ESTABLISHED  # CLOSE-WAIT: data after the FIN
                or len(payload) > seq_sub(self.rcv_adv, seq)
                or self._ooo_fin is not None
                or self._ooo
                or seq_lt(ack, una)
            ):
                return False
        elif not seq_gt(ack, una):
            return False  # a pure ACK that is no news may be a duplicate (RFC 5681 2)
        if seq_gt(ack, self.snd_max):
            return False
        self._last_rcv = now
        if self.snd_wscale:
            window <<= self.snd_wscale  # RFC 7323 2.3
        if ts is not None and stamp is not None and stamp[0] != ts.recent:
            ts.update(stamp[0], seq, self.last_ack_sent, now)  # RFC 7323 5.3 R3, 4.3
        if ack != una:
            self._on_new_ack(ack, options, now, acks)
        self._update_window(seq, ack, window)
        self._probes = 0
        if payload:
            self._deliver(payload)
            self._delivered(now)
        return True

    def _acceptable(self, seq: int, seg_len: int, rcv_wnd: int, rst: int) -> bool:
        # RFC 9293 3.10.7.4, the four cases of the acceptability test.
        rcv_nxt = self.rcv_nxt
        if seg_len == 0:
            # Inclusive right edge for non-RST segments, as Linux's tcp_sequence()
            # and BSD: a peer that filled our window exactly sends its pure ACKs
            # with SEQ == RCV.NXT + RCV.WND; RFC 9293's strict "<" drops them and
            # ignores their ACK field, which stalled flows whose first segment in
            # the window was lost. An RST at the edge stays outside (RFC 5961 3.2).
            edge = seq_add(rcv_nxt, rcv_wnd)
            if not rst and seq == edge:
                return True
            if rcv_wnd == 0:
                return seq == rcv_nxt
            return seq_le(rcv_nxt, seq) and seq_lt(seq, edge)
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
                self._queue(self._segment(ack, 0, RST, 0))
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
        self.rcv_adv = seq_add(self.rcv_nxt, min(self.buf.rcv, MAX_WINDOW))
        self._negotiated(options, now)
        self._set_snd_mss(options.mss)
        self.snd_wnd = self.max_snd_wnd = window  # RFC 7323 2.2: never scaled in a SYN
        self.snd_wl1, self.snd_wl2 = seq, ack
        self._last_rcv = now
        self._ack_now = True
        if flags & ACK:
            self._on_new_ack(ack, options, now)
            self._set_state(State.ESTABLISHED)
            self._on_established(now)
        else:
            self._set_state(State.SYN_RECEIVED)  # simultaneous open
            self._syn_due = True

    def _negotiated(self, options: TcpOptions, now: float) -> None:
        """Keep what both our SYN and the peer's offered (RFC 7323 1.3, 3.2; RFC 2018 2)."""
        if self._ws_ok and options.wscale is not None:
            self.snd_wscale = min(options.wscale, MAX_WSCALE)  # RFC 7323 2.3
        elif self._ws_ok:
            self._ws_ok = False
            self.rcv_wscale = 0
            self._max_wnd = MAX_WINDOW
            self.buf.limit_window(MAX_WINDOW)
            self._ooo.limit = min(self.config.ooo_limit, self.buf.rcv)
        self.sack_ok = self.sack_ok and options.sack_permitted
        ts = self.ts
        if ts is not None:
            if options.timestamps is None:
                self.ts = None
            else:
                ts.recent, ts.recent_at = options.timestamps[0], now

    def _on_data(self, seq: int, payload: Payload, now: float) -> None:
        # Trim to the window: the part before rcv_nxt is a duplicate and the part
        # beyond the advertised edge is not ours to keep (RFC 9293 3.10.7.4).
        rcv_nxt = self.rcv_nxt
        arrived, arrived_len = seq, len(payload)
        front = seq_sub(rcv_nxt, seq)
        if front > 0:
            payload = payload[front:]
            seq = rcv_nxt
        room = seq_sub(self.rcv_adv, seq)
        if len(payload) > room:
            payload = payload[: max(room, 0)]
        if not payload or seq != rcv_nxt:
            self._ack_duplicate(now, arrived, arrived_len)
            if not payload:
                return
        if seq != rcv_nxt:
            held = self._ooo.size
            room = self.buf.rcv - self._unconsumed
            # Held bytes are copied out of the packet (a view would keep all of it).
            held_bytes = payload if type(payload) is bytes else bytes(payload)
            if self._ooo.insert(rcv_nxt, seq, held_bytes, room) and self.sack_ok:
                if self._ooo.size == held:
                    self._dsack = (seq, seq_add(seq, len(payload)))  # RFC 2883 4.1.2
                recent = self._sack_recent  # RFC 2018 4: its block goes first
                if recent is EMPTY_SEQS:
                    self._sack_recent = recent = []
                recent.insert(0, seq)
                del recent[MAX_RECENT:]
            return
        if front > 0 and self.sack_ok:
            self._ack_duplicate(now, arrived, arrived_len)  # partly old (RFC 2883 4.1.3)
        filled_hole = bool(self._ooo)
        self._deliver(payload)
        if filled_hole:
            while (more := self._ooo.pop_ready(self.rcv_nxt)) is not None:
                self._deliver(more)
            self._ack_now = True  # RFC 5681 4.2: ACK at once when a hole fills
            self._quickacks = QUICKACKS
        if self._ooo_fin is not None and self._ooo_fin == self.rcv_nxt:
            self._on_fin(self._ooo_fin, now)
        self._delivered(now)

    def _delivered(self, now: float) -> None:
        """In-order bytes were delivered: receive-buffer tuning and the ACK policy."""
        if now >= self.buf.tick_at and self.buf.rcv_tick(
            self.rcv_nxt, self._unconsumed, now, self._rtt.srtt or self.config.rto_initial
        ):
            self._ooo.limit = min(self.config.ooo_limit, self.buf.rcv)  # auto-tuned
        self._unacked_segments += 1
        if now - self._last_data > self.config.rto_min:
            # Data after a silence longer than any RTO (Linux's tcp_event_data_recv,
            # "too long gap"): the sender has most likely just timed out and sends
            # with a window of one segment (RFC 5681 3.1); a delayed ACK would hold
            # it 40 ms per timeout, then again for each segment of its slow start.
            self._quickacks = QUICKACKS
        self._last_data = now
        if self._quickacks:
            # Quick-ACK mode (Linux's tcp_enter_quickack_mode): after an out-of-order
            # segment, a duplicate or a filled hole, the sender is recovering with a
            # small window; a delayed ACK for the one segment it got through would
            # leave it waiting for its loss probe (with 5% loss and a flow the other
            # way, a client's TLPs and RTOs ran at several times Linux's without it).
            self._quickacks -= 1
            self._ack_now = True
        elif self._unacked_segments >= 2:
            self._ack_now = True  # RFC 9293 3.8.6.3 / RFC 5681 4.2: every second segment
        elif self.timers.ack is None:
            self.timers.set_ack(now + self.config.delayed_ack)

    def _ack_duplicate(self, now: float, seq: int, length: int) -> None:
        """Owe an immediate ACK for an out-of-order or (partly) duplicate segment.

        RFC 5681 4.2: one duplicate ACK per such segment. An ACK still owed for an
        earlier segment of this batch goes first, with the SACK blocks of that
        moment: one ACK for a drained batch of N segments behind a hole would show
        the sender too few duplicates to start fast retransmit. With SACK, the
        bytes below rcv_nxt go in a D-SACK block (RFC 2883 4.1.1, 4.1.3).
        """
        if self._ack_now:
            self._send_ack_now(now)
        self._ack_now = True
        self._quickacks = QUICKACKS
        if length and self.sack_ok and seq_lt(seq, self.rcv_nxt):
            end = seq_add(seq, length)
            self._dsack = (seq, end if seq_le(end, self.rcv_nxt) else self.rcv_nxt)

    def _send_ack_now(self, now: float) -> None:
        opts = NO_OPTIONS if self.ts is None and not self.sack_ok else self._options(now)
        self._queue(self._pure_ack(opts))

    def _deliver(self, data: Payload) -> None:
        self.rcv_nxt = seq_add(self.rcv_nxt, len(data))
        self._unconsumed += len(data)
        if self._rx_pending:
            self._rx_pending.append(data)
        else:
            self._readable.append(self)
            self._rx_pending = [data]

    def _on_fin(self, fin_seq: int, now: float) -> None:
        if fin_seq != self.rcv_nxt:
            if self.state in RECEIVING and seq_gt(fin_seq, self.rcv_nxt):
                self._ooo_fin = fin_seq  # wait for the hole before it to fill
                # RFC 5681 4.2: an out-of-order segment is acknowledged at once (the
                # duplicate ACK), a bare FIN beyond a hole included.
                self._ack_now = True
            else:
                self._ack_now = True  # a repeated FIN
                if self.state is State.TIME_WAIT:
                    self.timers.set_time_wait(now + self.config.time_wait)
            return
        held = self._ooo_fin is not None  # it came before a hole that has now filled
        self._ooo_fin = None
        self.rcv_nxt = seq_add(self.rcv_nxt, 1)
        if seq_lt(self.rcv_adv, self.rcv_nxt):
            # A FIN right after data that filled the window lies one past its right
            # edge (accepted, as Linux and BSD do). The edge never moves left, so it
            # moves up to RCV.NXT: a zero window, where a negative one would fail
            # every later segment in the acceptability test (RFC 9293 3.10.7.4).
            self.rcv_adv = self.rcv_nxt
        if self.state is State.ESTABLISHED and not (held or self._quickacks):
            # The client closes first. Its FIN waits for the delayed-ACK time
            # (RFC 9293 3.8.6.3), as Linux's does (tcp_fin enters pingpong mode): the
            # relay's FIN follows the server's within a round trip and carries the
            # ACK, one segment less per connection. (After a hole, RFC 5681 4.2: at
            # once.)
            if self.timers.ack is None:
                self.timers.set_ack(now + self.config.delayed_ack)
        else:
            self._ack_now = True
        if self._close_side(Close.FIN, now):
            self._emit(PeerFinished(self._flow()))
