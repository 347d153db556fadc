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

from stack.compiled import mypyc_attr
from stack.events import Connected, SendSpace
from stack.seq import seq_add, seq_ge, seq_gt, seq_le, seq_lt, seq_sub
from stack.tcp.core import EMPTY_MARKS, Close, State
from stack.tcp.sack import DUP_THRESH, MAX_DUPTHRESH
from stack.tcp.sender import TcpSender
from stack.wire.tcp import RST, TcpOptions


@mypyc_attr(allow_interpreted_subclasses=True)
class TcpRecovery(TcpSender):
    """ACK processing and loss recovery."""

    __slots__ = ()

    def _on_established(self, now: float) -> None:
        self._emit(Connected(self._flow()))
        self._arm_lingering()
        self.buf.start_ticks(self.rcv_nxt, now, self._rtt.srtt or self.config.rto_initial)

    def merges_ack(self, seq: int, ack: int, options: TcpOptions) -> bool:
        """Whether a pure ACK (no data, SYN, FIN or RST) may be merged with the
        pure ACKs that follow it in the same input batch, only the last of the
        run being processed. Only a plain cumulative ACK may be: in sequence,
        advancing snd_una within what was sent, without SACK blocks, outside loss
        recovery and with no Eifel check pending (the first advancing ACK decides
        that), so nothing the skipped ACKs carry (dupacks, SACK, the first ACK
        after a retransmission) is lost. Linux leaves pure ACKs out of GRO for
        those reasons; here the run is merged only once it is known to be plain.
        """
        una = self.snd_una
        return (self.state is State.ESTABLISHED or self.state is State.CLOSE_WAIT) and (
            seq == self.rcv_nxt
            and not self.in_recovery
            and self._undo_tsval is None
            and not options.sack_blocks
            and seq_lt(una, ack)
            and seq_le(ack, self.snd_max)
        )

    def _on_ack(
        self,
        ack: int,
        seq: int,
        window: int,
        seg_len: int,
        options: TcpOptions,
        now: float,
        acks: int = 1,
    ) -> bool:
        """RFC 9293 3.10.7.4 fifth step. Returns False when the segment is to be dropped.

        ``acks``: how many ACKs this one stands for (a merged run, see ``merges_ack``).
        """
        if self.state is State.SYN_RECEIVED:
            if not (seq_lt(self.snd_una, ack) and seq_le(ack, self.snd_max)):
                self._queue(self._segment(ack, 0, RST, 0))
                return False
            self._set_state(State.ESTABLISHED)
            self.snd_wnd = window
            self.max_snd_wnd = max(self.max_snd_wnd, window)
            self.snd_wl1, self.snd_wl2 = seq, ack
            self._on_new_ack(ack, options, now)
            self._on_established(now)
            if self._fin_queued:
                self._close_side(Close.CALL, now)  # the close() made in SYN-RECEIVED
            return True

        if seq_gt(ack, self.snd_max):
            self._ack_now = True  # acknowledges something never sent
            return False
        una = self.snd_una
        advanced = seq_gt(ack, una)
        if advanced:
            self._on_new_ack(ack, options, now, acks)
        blocks = options.sack_blocks if self.sack_ok else ()
        if blocks:
            first = blocks[0]
            inside = len(blocks) > 1 and seq_le(blocks[1][0], first[0])
            if seq_le(first[1], ack) or (inside and seq_le(first[1], blocks[1][1])):
                self._on_dsack(first, now)  # RFC 2883 5: below the ACK, or inside the next
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
            # not the payload: a bare FIN is no duplicate) and the same window.
            # With SACK agreed, a duplicate without blocks (a peer or middlebox
            # that drops them) still counts, rather than leave recovery to the RTO.
            self._on_duplicate_ack(now)
        self._update_window(seq, ack, window)
        self._probes = 0
        return self.state is not State.CLOSED

    def _update_window(self, seq: int, ack: int, window: int) -> None:
        """The window update (RFC 9293 3.10.7.4, with SND.WL1/WL2 ordering)."""
        if seq_lt(self.snd_wl1, seq) or (self.snd_wl1 == seq and seq_le(self.snd_wl2, ack)):
            self.snd_wnd = window
            self.snd_wl1, self.snd_wl2 = seq, ack
            if window > self.max_snd_wnd:
                self.max_snd_wnd = window
            if window > 0:
                if self.timers.persist is not None:
                    self.timers.clear_persist()
                self._persist_backoff = 0

    def _on_new_ack(self, ack: int, options: TcpOptions, now: float, acks: int = 1) -> None:
        una = self.snd_una
        flight = seq_sub(self.snd_max, una)
        acked = seq_sub(ack, una)
        ts = self.ts
        stamp = options.timestamps
        if (
            self._undo_tsval is not None
            and stamp is not None
            and self._undo_cc is not None
            and seq_lt(stamp[1], self._undo_tsval)
        ):
            # RFC 3522 (Eifel detection): the first ACK for the retransmitted
            # segment echoes a TSval older than the retransmission: the original
            # arrived, so the retransmission was spurious (reordering, not loss).
            self._undo_reduction()
        self._undo_tsval = None  # only the first ACK that advances decides
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
        self._last_progress = now
        if seq_lt(self.snd_nxt, ack):
            self.snd_nxt = ack
        # Drop acknowledged bytes from the send buffer (the SYN and FIN hold no bytes).
        n = min(seq_sub(ack, self._sb_seq), len(self._sndbuf))
        if n > 0:
            self._sndbuf.drop(n)
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
                if not self._undone:
                    self.cc.on_recovery_end(seq_sub(self.snd_max, ack), now)
            elif not self.sack_ok:
                # RFC 6582 3.2 (5), a partial ACK: resend the next hole, deflate the
                # window by what was acknowledged, add back one SMSS if that was one.
                self._rtx_due = True
                self._inflate -= acked - (self.snd_mss if acked >= self.snd_mss else 0)
        else:
            used = max(flight, self._flight_hw, self._flight_hw_prev)
            self.cc.on_ack(acked, used, now, self._rtt.srtt or 0.0, acks)
        if seq_ge(ack, self._flight_hw_end):  # a window has gone by: start another
            self._flight_hw_prev = self._flight_hw
            self._flight_hw = seq_sub(self.snd_max, ack)
            self._flight_hw_end = self.snd_max
        # RFC 6298 5.2/5.3: stop the timer when all is acknowledged, else restart it.
        if self.snd_una == self.snd_max:
            self.timers.clear_rto()
        else:
            self.timers.set_rto(now + self._rtt.rto)
        if self._fin_queued and self.snd_una == seq_add(self._sb_seq, 1) and not self._sndbuf:
            self._close_side(Close.FIN_ACKED, now)

    def _on_sack(self, blocks: tuple[tuple[int, int], ...], now: float) -> None:
        """RFC 6675 5: update the scoreboard; count duplicates; maybe start recovery."""
        una = self.snd_una
        if not self._sb.update(blocks, una, self.snd_max):
            return
        if self.in_recovery:
            self._find_lost_retransmissions()
            return
        self._dupacks += 1
        # (1) DupThresh duplicates, or (2) IsLost(HighACK + 1); and never before
        # the recovery point of an RTO is passed (RFC 6675 5.1).
        dupthresh = self._dup_thresh()
        lost = seq_gt(self._sb.lost_edge(una, self.snd_mss, dupthresh), una)
        if (self._dupacks >= dupthresh or lost) and seq_ge(una, self.recover):
            # (4.1)-(4.3): RecoveryPoint = HighData; ssthresh and cwnd; resend the
            # first segment (segments_to_send) with HighRxt = RescueRxt = its end.
            self._enter_recovery(now)
            self.high_rxt = una
            self.rescue_rxt = None

    def _on_duplicate_ack(self, now: float) -> None:
        self._dupacks += 1
        if self.in_recovery:
            if not self.sack_ok:
                self._inflate += self.snd_mss  # RFC 6582 3.2 (4): one more has left
        elif self._dupacks == DUP_THRESH and seq_ge(self.snd_una, self.recover):
            # RFC 5681 3.2 fast retransmit; RFC 6582 3.2 (2) recovery point and the
            # window: ssthresh, inflated by the three segments that have left.
            self._enter_recovery(now)
            self._rtt_seq = None
            if self.sack_ok:  # RFC 6675 recovery, on an empty scoreboard
                self.high_rxt = self.snd_una
                self.rescue_rxt = None
            else:
                self._inflate = DUP_THRESH * self.snd_mss

    def _enter_recovery(self, now: float) -> None:
        una = self.snd_una
        self._undo_cc = self.cc.copy()  # the window before the reduction, for an undo
        self._undo_tsval = None if self.ts is None else self.ts.clock(now)
        self._undo_reorder = seq_sub(self._sb.highest() or una, una)
        self._undone = False
        self._rtx_marks = EMPTY_MARKS
        self.cc.on_loss(seq_sub(self.snd_max, una), now)
        self.in_recovery = True
        self.recover = self.snd_max
        self._rtx_due = True

    def _undo_reduction(self) -> None:
        """The last reduction answered reordering, not loss: take it back.

        RFC 4015 (Eifel response) / RFC 3708 5: restore cwnd and ssthresh, and
        raise DupThresh past the reordering seen, so that the same reordering
        does not start recovery again (RFC 4653's idea; Linux's tp->reordering).
        """
        prior = self._undo_cc
        if prior is None:
            return
        self._undo_cc = None
        self._undone = True
        if prior.cwnd > self.cc.cwnd:
            self.cc = prior
        mss = self.snd_mss
        seen = -(-self._undo_reorder // mss)  # the hole and the segments past it
        self._dupthresh = min(max(self._dupthresh, seen), MAX_DUPTHRESH)

    def _on_dsack(self, block: tuple[int, int], now: float) -> None:
        """RFC 2883: the peer got ``block`` twice. RFC 3708 5: once every
        retransmission of the episode is reported so, none was needed."""
        if self._undo_cc is None:
            return
        marks = self._rtx_marks
        for i, (s, e, _) in enumerate(marks):
            if seq_le(block[0], s) and seq_le(e, block[1]):
                del marks[i]
                break
        else:
            return  # a duplicate the network made, not one of our retransmissions
        if not marks:
            self._undo_reduction()

    def _find_lost_retransmissions(self) -> None:
        """A retransmission is lost when what was sent after it arrives (RFC 8985's
        idea, by sequence rather than time): SACKed data more than DupThresh - 1
        segments beyond the snd_max of its sending, or DupThresh later
        retransmissions delivered. NextSeg() then resends it (high_rxt goes back);
        RFC 6675 alone resends a hole once per recovery, leaving a lost
        retransmission to the RTO."""
        marks = self._rtx_marks
        if not marks:
            return
        sb = self._sb
        una = self.snd_una
        highest = sb.highest()
        if highest is None:
            return
        dupthresh = self._dup_thresh()
        reach = (dupthresh - 1) * self.snd_mss
        later_delivered = 0
        lost_from: int | None = None
        keep: list[tuple[int, int, int]] = []
        for s, e, sent_max in reversed(marks):
            if seq_le(e, una) or sb.covers(s, e):
                later_delivered += 1
                continue  # delivered: its mark has served
            if later_delivered >= dupthresh or seq_gt(highest, seq_add(sent_max, reach)):
                lost_from = s if lost_from is None or seq_lt(s, lost_from) else lost_from
                continue  # resent below; a fresh mark follows
            keep.append((s, e, sent_max))
        if lost_from is None:
            return
        keep.reverse()
        self._rtx_marks = keep
        if seq_lt(lost_from, self.high_rxt):
            self.high_rxt = lost_from if seq_gt(lost_from, una) else una
