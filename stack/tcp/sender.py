"""Timers and output of a TCP connection (RFC 9293 3.8, RFC 6298, RFC 5681).

Theory of operation: input only sets flags and moves sequence variables;
``segments_to_send(now)`` turns that state into segments -- control segments
first, then a due retransmission, then new data within the peer's window and
the congestion window, then a pure ACK if one is still owed. Timers arm
themselves here as segments leave.
"""

from __future__ import annotations

from stack.events import (
    CloseReason,
)
from stack.seq import seq_add, seq_ge, seq_gt, seq_lt, seq_sub
from stack.tcp.core import MAX_WINDOW, SYNCHRONIZED, ConnectionCore, State
from stack.tcp.segment import TcpSegment
from stack.wire.tcp import ACK, FIN, PSH, SYN, TcpOptions


class TcpSender(ConnectionCore):
    """The timer and output half of a connection."""

    def handle_timer(self, now: float) -> None:
        """Act on every deadline that has passed; a no-op when none has."""
        if self.ack_deadline is not None and now >= self.ack_deadline:
            self.ack_deadline = None
            self._ack_now = True
        if self.rto_deadline is not None and now >= self.rto_deadline:
            self._on_retransmit_timeout(now)
        if self.persist_deadline is not None and now >= self.persist_deadline:
            self._on_persist_timeout(now)
        if self.linger_deadline is not None and now >= self.linger_deadline:
            self.linger_deadline = None
            if self.state is State.TIME_WAIT:
                self._close(CloseReason.FINISHED)
            elif self.state is State.FIN_WAIT_2:
                self._close(CloseReason.IDLE)

    def _on_retransmit_timeout(self, now: float) -> None:
        self.rto_deadline = None
        if self.state in (State.SYN_RECEIVED, State.SYN_SENT):
            self._retries += 1
            if self._retries > self.config.syn_retries:
                self._close(CloseReason.TIMED_OUT)
                return
            self._rtt.backoff += 1
            self._rtt_seq = None
            self._syn_due = True
            return
        flight = seq_sub(self.snd_max, self.snd_una)
        if flight <= 0:
            return
        self._retries += 1
        if self._retries > self.config.max_retries:
            self._reset(CloseReason.TIMED_OUT)
            return
        # RFC 6298 5.5-5.7: back off, retransmit from snd_una (go-back-N under a
        # one-segment congestion window), and do not time retransmissions (Karn).
        self._rtt.backoff += 1
        self._rtt_seq = None
        self.cc.on_timeout(flight)
        self._recover = None
        self._dupacks = 0
        self.snd_nxt = self.snd_una

    def _on_persist_timeout(self, now: float) -> None:
        self.persist_deadline = None
        if self.state not in SYNCHRONIZED or self.rto_deadline is not None:
            return
        usable = seq_sub(seq_add(self.snd_una, min(self.snd_wnd, self.cc.cwnd)), self.snd_nxt)
        if usable > 0:
            # RFC 9293 3.8.6.2.1 (d), the override timeout: sender SWS avoidance held
            # back a short segment with nothing in flight. Send what fits. (Fixed:
            # the timer used to run only at a zero window, so a lost window update
            # after a shrink below the SWS threshold stalled the connection forever.)
            self._sws_override = True
            return
        self._probes += 1
        if self._probes > self.config.max_retries:
            self._reset(CloseReason.TIMED_OUT)
            return
        # A probe in the style of Linux's tcp_xmit_probe_skb: an old sequence
        # number makes the peer answer with an ACK carrying its current window
        # (RFC 9293 3.8.6.1 asks only that the window be probed).
        self._ctl.append(
            self._segment(seq_add(self.snd_una, -1), self.rcv_nxt, ACK, self._advertise())
        )
        # RFC 9293 3.8.6.1: probe intervals grow exponentially. Fixed: the exponent
        # was the unanswered-probe count, which every answer resets, so while the
        # peer kept answering the interval never grew past 2 RTOs.
        self._persist_backoff = min(self._persist_backoff + 1, 16)
        self.persist_deadline = now + min(
            self._rtt.rto * (1 << self._persist_backoff), self.config.rto_max
        )

    def segments_to_send(self, now: float) -> list[TcpSegment]:
        """Everything due now: control segments, (re)transmissions, an owed ACK."""
        out = self._ctl
        self._ctl = []
        state = self.state
        if state is State.CLOSED or state is State.LISTEN:
            return out
        if self._syn_due:
            self._syn_due = False
            self._send_syn(out, now)
            return out
        if state is State.SYN_RECEIVED and self._ack_now:
            # RFC 5961 3.2 / RFC 9293 3.10.7.4: a challenge ACK or the ACK for an
            # unacceptable segment is owed in SYN-RECEIVED too (it used to be dropped).
            out.append(self._segment(self._ack_seq(), self.rcv_nxt, ACK, self._advertise()))
            self._ack_sent()
        if state is State.SYN_SENT or state is State.SYN_RECEIVED:
            return out
        if self._rtx_due:
            self._rtx_due = False
            self._retransmit_one(out, now)
        self._send_data(out, now)
        if self._ack_now:
            out.append(self._segment(self._ack_seq(), self.rcv_nxt, ACK, self._advertise()))
            self._ack_sent()
        return out

    def _send_syn(self, out: list[TcpSegment], now: float) -> None:
        if self.state is State.SYN_SENT:
            flags, ack = SYN, 0
        else:
            flags, ack = SYN | ACK, self.rcv_nxt
        window = min(self.config.rcv_buf, MAX_WINDOW)
        self.rcv_adv = seq_add(self.rcv_nxt, window)
        seg = TcpSegment(
            self.local_port,
            self.remote_port,
            self.iss,
            ack,
            flags,
            window,
            b"",
            TcpOptions(mss=self.rcv_mss),
        )
        out.append(seg)
        if self.snd_max == self.iss:
            self.snd_nxt = self.snd_max = seq_add(self.iss, 1)
            self._rtt_seq, self._rtt_start = self.iss, now
        self.rto_deadline = now + self._rtt.rto
        self._ack_sent()

    def _retransmit_one(self, out: list[TcpSegment], now: float) -> None:
        start = self.snd_una
        off = seq_sub(start, self._sb_seq)
        data_end = seq_add(self._sb_seq, len(self._sndbuf))
        fin_sent = self._fin_queued and seq_gt(self.snd_max, data_end)
        # Resend only bytes sent before (RFC 9293 3.8.1: a retransmission repeats
        # sent sequence space). Fixed: a full MSS was taken from the buffer, which
        # could run past snd_max and the peer's window; the peer then acknowledged
        # bytes we had never counted as sent, and we dropped all its later segments.
        sent = seq_sub(self.snd_max, start) - (1 if fin_sent else 0)
        n = min(self.snd_mss, sent)
        data = bytes(self._sndbuf[off : off + n]) if off >= 0 and n > 0 else b""
        flags = ACK
        if fin_sent and off + len(data) >= len(self._sndbuf):
            flags |= FIN
        if not data and not flags & FIN:
            return
        out.append(self._segment(start, self.rcv_nxt, flags, self._advertise(), data))
        self._ack_sent()
        self.rto_deadline = now + self._rtt.rto

    def _send_data(self, out: list[TcpSegment], now: float) -> None:
        sb_seq = self._sb_seq
        buf = self._sndbuf
        data_end = seq_add(sb_seq, len(buf))
        mss = self.snd_mss
        edge = seq_add(self.snd_una, min(self.snd_wnd, self.cc.cwnd))
        fin_pending = self._fin_queued and self.state is not State.SYN_RECEIVED
        while True:
            nxt = self.snd_nxt
            avail = seq_sub(data_end, nxt)
            if avail > 0:
                n = min(avail, seq_sub(edge, nxt), mss)
                if n <= 0:
                    break
                # Sender SWS avoidance (RFC 9293 3.8.6.2.1): a short segment only
                # when it empties the buffer or the window is a large share of the max.
                if n < mss and n < avail and n < self.max_snd_wnd // 2 and not self._sws_override:
                    break
                if self.config.nagle and n < mss and seq_lt(self.snd_una, nxt):
                    break
                off = seq_sub(nxt, sb_seq)
                flags = ACK
                if n == avail:
                    flags |= PSH
                    if fin_pending:
                        flags |= FIN
                payload = bytes(buf[off : off + n])
                seg = self._segment(nxt, self.rcv_nxt, flags, self._advertise(), payload)
                self._sent(seg, nxt, n + (1 if flags & FIN else 0), now)
                out.append(seg)
            elif (
                fin_pending and nxt == data_end and (seq_lt(nxt, edge) or seq_lt(nxt, self.snd_max))
            ):
                # A FIN already sent once is retransmitted regardless of the window
                # (RFC 9293 3.8.6.1: retransmit even into a zero window). Fixed: a lost
                # FIN behind a zero window was never resent and no timer stayed armed.
                seg = self._segment(nxt, self.rcv_nxt, FIN | ACK, self._advertise())
                self._sent(seg, nxt, 1, now)
                out.append(seg)
            else:
                break
        self._sws_override = False
        # Something waits to be sent and nothing is being timed: run the persist
        # timer (RFC 9293 3.8.6.1 zero-window probe; 3.8.6.2.1 SWS override timeout).
        # Fixed: this used to require snd_wnd == 0 and nothing in flight, which left
        # no timer at all for a small nonzero window held back by SWS avoidance, and
        # for a window shrunk under data in flight once an RTO found nothing to send.
        if (
            self.rto_deadline is None
            and self.persist_deadline is None
            and (seq_lt(self.snd_nxt, data_end) or (fin_pending and self.snd_nxt == data_end))
        ):
            self.persist_deadline = now + self._rtt.rto

    def _sent(self, seg: TcpSegment, seq: int, length: int, now: float) -> None:
        end = seq_add(seq, length)
        self.snd_nxt = end
        if seq_ge(seq, self.snd_max) and self._rtt_seq is None:
            self._rtt_seq, self._rtt_start = seq, now
        if seq_gt(end, self.snd_max):
            self.snd_max = end
        if self.rto_deadline is None:
            self.rto_deadline = now + self._rtt.rto
        self._ack_sent()
