"""The ACK field of incoming segments: RTT samples, the SACK scoreboard, loss recovery.

Theory of operation (RFC 9293 3.10.7.4, fifth step): an ACK that moves
``snd_una`` frees send-buffer space, feeds the RTT estimator -- from the
echoed timestamp on every such ACK when timestamps are on (RFC 7323 4, with
Appendix G's weights), else from the one segment being timed (Karn) -- and,
outside loss recovery, the congestion controller.

Loss recovery starts from the ACK stream and ends when a cumulative ACK
covers the recovery point (``recover``, snd_max when it started). Two kinds:

* SACK (RFC 6675), when both SYNs allowed it: an ACK is a duplicate when its
  SACK blocks cover octets not covered before; recovery starts at the third,
  or as soon as IsLost(snd_una) holds. Which segments go is the sender's
  NextSeg() loop (``sender.py``), under ``cwnd - pipe``.
* NewReno (RFC 6582) for peers without SACK: the third RFC 5681 duplicate
  ACK resends the segment at ``snd_una`` and inflates the window by 3 SMSS,
  each further one by 1 SMSS; a partial ACK resends the next hole and
  deflates by what it acknowledged; the full ACK ends recovery.

After an RTO no recovery starts until ``snd_una`` reaches the snd_max of the
timeout (RFC 6582 3.2 (2) "careful" variant; RFC 6675 5.1).
"""

from __future__ import annotations

from stack.events import CloseReason, Connected, SendSpace
from stack.seq import seq_add, seq_ge, seq_gt, seq_le, seq_lt, seq_sub
from stack.tcp.core import State
from stack.tcp.sack import DUP_THRESH
from stack.tcp.sender import TcpSender
from stack.wire.tcp import RST, TcpOptions


class TcpRecovery(TcpSender):
    """ACK processing and loss recovery."""

    def _on_established(self, now: float) -> None:
        self._emit(Connected(self._flow()))
        self._arm_idle(now)
        self.buf.start_ticks(self.rcv_nxt, now, self._rtt.srtt or self.config.rto_initial)

    def _on_ack(
        self, ack: int, seq: int, window: int, seg_len: int, options: TcpOptions, now: float
    ) -> bool:
        """RFC 9293 3.10.7.4 fifth step. Returns False when the segment is to be dropped."""
        if self.state is State.SYN_RECEIVED:
            if not (seq_lt(self.snd_una, ack) and seq_le(ack, self.snd_max)):
                self._ctl.append(self._segment(ack, 0, RST, 0))
                return False
            self.state = State.ESTABLISHED
            self.snd_wnd = window
            self.max_snd_wnd = max(self.max_snd_wnd, window)
            self.snd_wl1, self.snd_wl2 = seq, ack
            self._on_new_ack(ack, options, now)
            self._on_established(now)
            if self._fin_queued:
                self.state = State.FIN_WAIT_1
            return True

        if seq_gt(ack, self.snd_max):
            self._ack_now = True  # acknowledges something never sent
            return False
        una = self.snd_una
        advanced = seq_gt(ack, una)
        if advanced:
            self._on_new_ack(ack, options, now)
        blocks = options.sack_blocks if self.sack_ok else ()
        if blocks:
            if self.snd_una != self.snd_max:
                self._on_sack(blocks, now)
        elif (
            not advanced
            and ack == una
            and seg_len == 0
            and window == self.snd_wnd
            and self.snd_max != una
        ):
            # RFC 5681 2: a duplicate ACK carries no data, no SYN or FIN (seg_len,
            # not the payload: a bare FIN used to count) and the same window.
            # With SACK agreed, a duplicate without blocks (a peer or middlebox
            # that drops them) still counts, rather than leave recovery to the RTO.
            self._on_duplicate_ack(now)
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

    def _on_new_ack(self, ack: int, options: TcpOptions, now: float) -> None:
        una = self.snd_una
        flight = seq_sub(self.snd_max, una)
        acked = seq_sub(ack, una)
        ts = self.ts
        stamp = options.timestamps
        if ts is not None and stamp is not None:
            # RFC 7323 4.1 (RTTM): every ACK that advances snd_una is a sample,
            # retransmission or not; Appendix G weights it by the samples per RTT.
            rtt = ts.rtt(stamp[1], now)
            if rtt is not None:
                expected = -(-flight // (2 * self.snd_mss)) or 1
                self._rtt.sample(rtt, expected)
            self._rtt_seq = None
        elif self._rtt_seq is not None and seq_gt(ack, self._rtt_seq):
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
        if self._sb:
            self._sb.advance(ack)
        self._retries = 0
        self._rtt.backoff = 0
        self._dupacks = 0  # RFC 6675 5: a cumulative ACK resets DupAcks
        if self.in_recovery:
            if seq_ge(ack, self.recover):
                # RFC 6582 3.2 (3) / RFC 6675 5 (A): the full ACK ends recovery.
                self.in_recovery = False
                self._inflate = 0
                self.cc.on_recovery_end(seq_sub(self.snd_max, ack), now)
            elif not self.sack_ok:
                # RFC 6582 3.2 (5), a partial ACK: resend the next hole, deflate the
                # window by what was acknowledged, add back one SMSS if that was one.
                self._rtx_due = True
                self._inflate -= acked - (self.snd_mss if acked >= self.snd_mss else 0)
        else:
            self.cc.on_ack(acked, flight, now, self._rtt.srtt or 0.0)
        # RFC 6298 5.2/5.3: stop the timer when all is acknowledged, else restart it.
        self.rto_deadline = None if self.snd_una == self.snd_max else now + self._rtt.rto
        if self._fin_queued and self.snd_una == seq_add(self._sb_seq, 1) and not self._sndbuf:
            self._on_fin_acked(now)

    def _on_sack(self, blocks: tuple[tuple[int, int], ...], now: float) -> None:
        """RFC 6675 5: update the scoreboard; count duplicates; maybe start recovery."""
        una = self.snd_una
        if not self._sb.update(blocks, una, self.snd_max) or self.in_recovery:
            return
        self._dupacks += 1
        # (1) DupThresh duplicates, or (2) IsLost(HighACK + 1); and never before
        # the recovery point of an RTO is passed (RFC 6675 5.1).
        lost = seq_gt(self._sb.lost_edge(una, self.snd_mss), una)
        if (self._dupacks >= DUP_THRESH or lost) and seq_ge(una, self.recover):
            # (4.1)-(4.3): RecoveryPoint = HighData; ssthresh and cwnd; resend the
            # first segment (segments_to_send) with HighRxt = RescueRxt = its end.
            self.in_recovery = True
            self.recover = self.snd_max
            self.cc.on_loss(seq_sub(self.snd_max, una), now)
            self.high_rxt = una
            self.rescue_rxt = None
            self._rtx_due = True

    def _on_duplicate_ack(self, now: float) -> None:
        self._dupacks += 1
        if self.in_recovery:
            if not self.sack_ok:
                self._inflate += self.snd_mss  # RFC 6582 3.2 (4): one more has left
        elif self._dupacks == DUP_THRESH and seq_ge(self.snd_una, self.recover):
            # RFC 5681 3.2 fast retransmit; RFC 6582 3.2 (2) recovery point and the
            # window: ssthresh, inflated by the three segments that have left.
            self.cc.on_loss(seq_sub(self.snd_max, self.snd_una), now)
            self.in_recovery = True
            self.recover = self.snd_max
            self._rtx_due = True
            self._rtt_seq = None
            if self.sack_ok:  # RFC 6675 recovery, on an empty scoreboard
                self.high_rxt = self.snd_una
                self.rescue_rxt = None
            else:
                self._inflate = DUP_THRESH * self.snd_mss

    def _on_fin_acked(self, now: float) -> None:
        if self.state is State.FIN_WAIT_1:
            self.state = State.FIN_WAIT_2
            self.linger_deadline = now + self.config.fin_wait_2_timeout
            self.idle_deadline = None
        elif self.state is State.CLOSING:
            self._enter_time_wait(now)
        elif self.state is State.LAST_ACK:
            self._close(CloseReason.FINISHED)

    def _enter_time_wait(self, now: float) -> None:
        self.state = State.TIME_WAIT
        self.rto_deadline = self.persist_deadline = self.idle_deadline = None
        self.linger_deadline = now + self.config.time_wait
