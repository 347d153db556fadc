"""Timers and output of a TCP connection (RFC 9293 3.8, RFC 6298, RFC 5681, RFC 6675).

Theory of operation: input only sets flags and moves sequence variables;
``segments_to_send(now)`` turns that state into segments -- control segments
first, then retransmissions, then new data within the peer's window and the
congestion window, then a pure ACK if one is still owed. Timers arm
themselves here as segments leave.

What is retransmitted depends on the recovery in progress (``recovery.py``
decides which): with SACK, RFC 6675's NextSeg() rules under the ``pipe``
estimate (lost holes first, then new data, then other holes, then one rescue
segment); without, RFC 6582 NewReno resends the segment at ``snd_una`` and
sends new data within an inflated window; after an RTO, go-back-N from
``snd_una`` under a one-segment window, skipping what the peer SACKs anew.

Lingering flows: the keepalive (RFC 9293 3.8.4, RFC 1122 4.2.3.6) and the
idle timeout both count from the last segment received, which input records
with one store (each timer re-arms lazily when it finds the peer was heard
since). The deadlines themselves are ``timers.py``'s.
"""

from __future__ import annotations

from stack.compiled import mypyc_attr
from stack.events import CloseReason
from stack.seq import seq_add, seq_ge, seq_gt, seq_in, seq_lt, seq_sub
from stack.tcp.core import (
    EMPTY_MARKS,
    EMPTY_SEGMENTS,
    LINGERING,
    MAX_WINDOW,
    SYNCHRONIZED,
    ConnectionCore,
    State,
)
from stack.tcp.sack import DUP_THRESH
from stack.tcp.segment import TcpSegment
from stack.wire.tcp import ACK, FIN, NO_OPTIONS, PSH, SYN, TcpOptions


def _sack_len(opts: TcpOptions) -> int:
    """Bytes the SACK blocks take in ``encode_options`` (NOP,NOP,SACK + 8 per block)."""
    n = len(opts.sack_blocks)
    if not n:
        return 0
    return 4 + 8 * min(n, 3 if opts.timestamps is not None else 4)


TLP_MIN = 0.01  # RFC 8985 7.2 leaves a floor to implementations; Linux uses 10 ms


@mypyc_attr(allow_interpreted_subclasses=True)
class TcpSender(ConnectionCore):
    """The timer and output half of a connection."""

    __slots__ = ()

    def handle_timer(self, now: float) -> None:
        """Act on every deadline that has passed; a no-op when none has."""
        t = self.timers  # the same object throughout: _close clears it in place
        if t.ack is not None and now >= t.ack:
            t.clear_ack()
            self._ack_now = True
        if t.rto is not None and now >= t.rto:
            t.clear_tlp()  # the RTO acts instead
            self._on_retransmit_timeout(now)
        if t.tlp is not None and now >= t.tlp:
            t.clear_tlp()
            self._tlp_due = self.state in SYNCHRONIZED and self.snd_una != self.snd_max
        if t.persist is not None and now >= t.persist:
            self._on_persist_timeout(now)
        if t.time_wait is not None and now >= t.time_wait:
            t.clear_time_wait()
            if self.state is State.TIME_WAIT:
                self._close(CloseReason.FINISHED)
        if t.fin_wait_2 is not None and now >= t.fin_wait_2:
            t.clear_fin_wait_2()
            if self.state is State.FIN_WAIT_2:
                self._close(CloseReason.IDLE)
        if t.idle is not None and now >= t.idle:
            self._on_idle_timeout(now)
        if t.keepalive is not None and now >= t.keepalive:
            self._on_keepalive_timer(now)

    def _on_retransmit_timeout(self, now: float) -> None:
        self.timers.clear_rto()
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
        self.cc.on_timeout(flight, now)
        # RFC 6582 3.2 (4) / RFC 6675 5.1: recovery ends; none starts again until
        # everything sent so far is acknowledged. RFC 2018 8: the peer may have
        # reneged, so the SACK scoreboard is forgotten.
        self.in_recovery = False
        self._inflate = 0
        self.recover = self.snd_max
        self._sb.clear()
        self.high_rxt = self.snd_una
        self.rescue_rxt = None
        self._dupacks = 0
        self.snd_nxt = self.snd_una
        self._undo_cc = None  # no undo across a timeout
        self._rtx_marks = EMPTY_MARKS

    def _on_persist_timeout(self, now: float) -> None:
        self.timers.clear_persist()
        if self.state not in SYNCHRONIZED or self.timers.rto is not None:
            return
        usable = seq_sub(seq_add(self.snd_una, min(self.snd_wnd, self.cc.cwnd)), self.snd_nxt)
        if usable > 0:
            # RFC 9293 3.8.6.2.1 (d), the override timeout: sender SWS avoidance held
            # back a short segment with nothing in flight. Send what fits. (A timer
            # that ran only at a zero window would leave a connection stalled for
            # ever once a window update after a shrink below the SWS threshold was lost.)
            self._sws_override = True
            return
        self._probes += 1
        if self._probes > self.config.max_retries:
            self._reset(CloseReason.TIMED_OUT)
            return
        # A probe in the style of Linux's tcp_xmit_probe_skb: an old sequence
        # number makes the peer answer with an ACK carrying its current window
        # (RFC 9293 3.8.6.1 asks only that the window be probed).
        self._send_probe(now)
        # RFC 9293 3.8.6.1: probe intervals grow exponentially. The exponent is
        # its own count, not the unanswered-probe count: every answer resets that,
        # so while the peer kept answering the interval would never pass 2 RTOs.
        self._persist_backoff = min(self._persist_backoff + 1, 16)
        self.timers.set_persist(
            now + min(self._rtt.rto * (1 << self._persist_backoff), self.config.rto_max)
        )

    def _send_probe(self, now: float) -> None:
        seq = seq_add(self.snd_una, -1)
        opts = self._options(now)
        self._queue(self._segment(seq, self.rcv_nxt, ACK, self._advertise(), b"", opts))

    # ------------------------------------------------------- lingering flows

    def _arm_lingering(self) -> None:
        """Arm the idle timeout and the keepalive as configured (on ESTABLISHED)."""
        cfg = self.config
        if cfg.idle_timeout is not None:
            self.timers.set_idle(self._last_rcv + cfg.idle_timeout)
        else:
            self.timers.clear_idle()  # SYN-RECEIVED's bound, if it ran
        if cfg.keepalive:
            self.timers.set_keepalive(self._keepalive_due())

    def _keepalive_due(self) -> float:
        """When the next keepalive probe goes: an interval after the last probe
        while probes go unanswered, else the idle time after the last segment."""
        cfg = self.config
        if self._ka_probes:
            return self._ka_sent_at + cfg.keepalive_interval
        return self._last_rcv + cfg.keepalive_idle

    def _on_idle_timeout(self, now: float) -> None:
        timeout = self.config.idle_timeout
        self.timers.clear_idle()
        if self.state is State.SYN_RECEIVED:
            # TcpConfig.synrecv_timeout: the handshake never completed. Silently,
            # as Linux drops a request whose SYN-ACKs went unanswered: the client
            # (or whoever spoofed it) hears nothing more, and the caller's Closed
            # lets it drop what it holds for the flow (the relay: the upstream
            # connection, with an RST).
            self._close(CloseReason.TIMED_OUT)
            return
        if self.state not in LINGERING or timeout is None:
            return  # the other states have their own timers
        if now - self._last_rcv >= timeout:
            self._reset(CloseReason.IDLE)
            return
        self.timers.set_idle(self._last_rcv + timeout)  # heard since: count from then

    def _on_keepalive_timer(self, now: float) -> None:
        cfg = self.config
        timers = self.timers
        timers.clear_keepalive()
        if self.state not in LINGERING or not cfg.keepalive:
            return  # the other states have their own timers
        if self._ka_probes and self._last_rcv >= self._ka_sent_at:
            self._ka_probes = 0  # the peer answered
        due = self._keepalive_due()
        if now < due:
            timers.set_keepalive(due)  # heard since: count from then
            return
        if self.snd_una != self.snd_max or self._sndbuf or timers.persist is not None:
            # RFC 1122 4.2.3.6: keepalives only while no data is outstanding; the
            # retransmission and persist timers watch the peer meanwhile.
            self._ka_probes = 0
            timers.set_keepalive(now + cfg.keepalive_interval)
            return
        if self._ka_probes >= cfg.keepalive_probes:
            self._reset(CloseReason.TIMED_OUT)  # a dead peer: RST, as Linux does
            return
        # RFC 1122 4.2.3.6: SEG.SEQ = SND.NXT - 1, no data; any live peer ACKs it.
        self._send_probe(now)
        self._ka_probes += 1
        self._ka_sent_at = now
        timers.set_keepalive(self._keepalive_due())

    # ------------------------------------------------------------------ output

    def segments_to_send(self, now: float) -> list[TcpSegment]:
        """Everything due now: control segments, (re)transmissions, an owed ACK."""
        out = self._ctl
        if out:
            self._ctl = EMPTY_SEGMENTS
        else:
            out = []
        state = self.state
        if state is State.CLOSED or state is State.LISTEN:
            return out
        if self._syn_due:
            self._syn_due = False
            if state is State.SYN_RECEIVED and self.timers.idle is None:
                bound = self.config.synrecv_timeout
                if bound is not None:
                    self.timers.set_idle(now + bound)  # from the first SYN-ACK
            self._send_syn(out, now)
            return out
        if (state is State.ESTABLISHED or state is State.CLOSE_WAIT) and self._quiet(now):
            return out
        if self._dsack is not None and state is not State.SYN_RECEIVED:
            # RFC 2883 4: a duplicate is reported once. The segments built below
            # share one set of options (a TSO batch shares one header), so the
            # D-SACK goes first, on its own ACK: on every segment of a batch it
            # would be counted once per segment by a Linux sender (its undo, RACK's
            # reordering window).
            out.append(self._pure_ack(self._options(now)))  # _options takes _dsack
        opts = self._tx_opts = (
            NO_OPTIONS if self.ts is None and not self.sack_ok else (self._options(now))
        )
        # RFC 6691: options come out of the peer's MSS. snd_mss already pays for
        # TSopt; SACK blocks vary per batch (Linux's tcp_current_mss does the same).
        self._seg_mss = self.snd_mss - _sack_len(opts)
        if state is State.SYN_RECEIVED and self._ack_now:
            # RFC 5961 3.2 / RFC 9293 3.10.7.4: a challenge ACK or the ACK for an
            # unacceptable segment is owed in SYN-RECEIVED too.
            out.append(self._pure_ack(opts))
        if state is State.SYN_SENT or state is State.SYN_RECEIVED:
            return out
        if self._tlp_due:
            self._tlp_due = False
            self._send_tail_probe(out, now)
        if self.in_recovery and self.sack_ok:
            self._send_recovery(out, now)
        else:
            if self._rtx_due:
                self._rtx_due = False
                self._retransmit(out, self.snd_una, self.snd_max, now, restart=True)
            self._send_data(out, now, self._edge())
        self._after_output(now)
        if self._ack_now:
            out.append(self._pure_ack(opts))
        return out

    def _quiet(self, now: float) -> bool:
        """Whether nothing is owed and nothing waits to be sent (in ESTABLISHED or
        CLOSE-WAIT): the relay's pass after a request, before its response. Then
        this does what the full path of ``segments_to_send`` would still do -- its
        options would go unused, and with no SACK blocks the segment size is the
        whole MSS -- and the caller returns."""
        if (
            self._ack_now
            or self._tlp_due
            or self._rtx_due
            or self.in_recovery
            or self._fin_queued
            or self._dsack is not None
            or self.snd_nxt != seq_add(self._sb_seq, len(self._sndbuf))
            or self._ooo
        ):
            return False
        self._seg_mss = self.snd_mss
        self._sws_override = False
        self._after_output(now)
        return True

    def _after_output(self, now: float) -> None:
        """What every ``segments_to_send`` ends with: the most data in flight this
        window (RFC 7661), and the tail loss probe re-armed (RFC 8985 7.2)."""
        flight = seq_sub(self.snd_max, self.snd_una)
        if flight > self._flight_hw:
            self._flight_hw = flight
        self._arm_probe(flight, now)

    def _dup_thresh(self) -> int:
        """DupThresh in use: raised by observed reordering (recovery.py), but never
        past half the window, or a small window could not recover without an RTO."""
        return max(DUP_THRESH, min(self._dupthresh, self.cc.cwnd // (2 * self.snd_mss)))

    def _arm_probe(self, flight: int, now: float) -> None:
        """RFC 8985 7.2: with data in flight, probe after PTO = 2 SRTT without an ACK.

        Re-armed when this batch sent or was acknowledged; an RTO due first wins.
        """
        srtt = self._rtt.srtt
        timers = self.timers
        rto = timers.rto
        if flight <= 0 or not srtt or rto is None or not self.config.tail_loss_probe:
            if timers.tlp is not None:
                timers.clear_tlp()
            return
        if timers.tlp is not None and self._tlp_armed_at > self._last_progress:
            return  # armed after the last send or ACK: keep it
        pto = 2 * srtt
        if flight <= self._seg_mss:
            pto = max(pto, 1.5 * srtt + self.config.delayed_ack)  # RFC 8985 7.2: WCDelAckT
        pto = max(pto, TLP_MIN)
        at = now + pto
        if at < rto:
            timers.set_tlp(at)
        else:
            timers.clear_tlp()
        self._tlp_armed_at = now

    def _send_tail_probe(self, out: list[TcpSegment], now: float) -> None:
        """RFC 8985 7.3: one new segment if the peer's window allows, else the last one
        sent again, so that the peer's ACK (with SACK blocks) starts fast recovery
        instead of an RTO. In recovery (which RFC 8985 leaves to RACK's timer) the
        first hole goes again: its retransmission has gone unanswered for 2 SRTT."""
        una, high = self.snd_una, self.snd_max
        if self.in_recovery:
            self.high_rxt = una
            self._retransmit(out, una, high, now)
            return
        data_end = seq_add(self._sb_seq, len(self._sndbuf))
        if seq_lt(self.snd_nxt, data_end) and seq_lt(self.snd_nxt, seq_add(una, self.snd_wnd)):
            edge = seq_add(self.snd_nxt, self._seg_mss)
            self._sws_override = True
            if self._send_data(out, now, edge):
                return
        start = seq_add(high, -min(self._seg_mss, seq_sub(high, una)))
        self._retransmit(out, start, high, now)

    def _edge(self) -> int:
        """Right edge for new data: the peer's window and the congestion window."""
        return seq_add(self.snd_una, min(self.snd_wnd, self.cc.cwnd + self._inflate))

    def _send_syn(self, out: list[TcpSegment], now: float) -> None:
        ts = self.ts
        if self.state is State.SYN_SENT:
            flags, ack = SYN, 0
            stamp = None if ts is None else (ts.clock(now), 0)
        else:
            flags, ack = SYN | ACK, self.rcv_nxt
            stamp = None if ts is None else (ts.clock(now), ts.recent)
        # RFC 7323 2.2: the window in a SYN is never scaled.
        window = min(self.buf.rcv, MAX_WINDOW)
        self.rcv_adv = seq_add(self.rcv_nxt, window)
        options = TcpOptions(
            mss=self.rcv_mss,
            wscale=self.rcv_wscale if self._ws_ok else None,
            sack_permitted=self.sack_ok,
            timestamps=stamp,
        )
        out.append(
            TcpSegment(
                self.local_port, self.remote_port, self.iss, ack, flags, window, b"", options
            )
        )
        if self.snd_max == self.iss:
            self.snd_nxt = self.snd_max = seq_add(self.iss, 1)
            self._rtt_seq, self._rtt_start = self.iss, now
        self.timers.set_rto(now + self._rtt.rto)
        self._ack_sent()

    def _retransmit(
        self, out: list[TcpSegment], start: int, end: int, now: float, *, restart: bool = False
    ) -> int:
        """Resend one segment of sent sequence space from ``start``, not past ``end``.

        Returns:
            The sequence space it covers (0 when there was nothing to resend).
        """
        sb_seq = self._sb_seq
        off = seq_sub(start, sb_seq)
        if off < 0:
            return 0
        data_end = seq_add(sb_seq, len(self._sndbuf))
        fin_sent = self._fin_queued and seq_gt(self.snd_max, data_end)
        if seq_gt(end, self.snd_max):
            end = self.snd_max
        # Resend only bytes sent before (RFC 9293 3.8.1: a retransmission repeats
        # sent sequence space). A full MSS from the buffer could run past snd_max
        # and the peer's window; the peer would then acknowledge bytes never
        # counted as sent, and every later segment of its would be dropped.
        n = min(self._seg_mss, seq_sub(data_end if seq_lt(data_end, end) else end, start))
        data = self._sndbuf.view(off, n)
        flags = ACK
        if fin_sent and seq_add(start, len(data)) == data_end and seq_gt(end, data_end):
            flags |= FIN
        if not data and not flags & FIN:
            return 0
        out.append(
            self._segment(start, self.rcv_nxt, flags, self._advertise(), data, self._tx_opts)
        )
        self._ack_sent()
        length = len(data) + (1 if flags & FIN else 0)
        if self.in_recovery:
            # Kept for spotting a lost retransmission, and for D-SACK undo (recovery.py).
            mark = (start, seq_add(start, length), self.snd_max)
            if self._rtx_marks:
                self._rtx_marks.append(mark)
            else:
                self._rtx_marks = [mark]
        if self._rtt_seq is not None and seq_in(self._rtt_seq, start, seq_add(start, length)):
            self._rtt_seq = None  # Karn: a resent segment gives no RTT sample
        if restart or self.timers.rto is None:
            self.timers.set_rto(now + self._rtt.rto)
        return length

    def _send_recovery(self, out: list[TcpSegment], now: float) -> None:
        """RFC 6675 5 (C): send while cwnd - pipe >= SMSS, choosing by NextSeg()."""
        mss = self.snd_mss
        una = self.snd_una
        high = self.snd_max
        sb = self._sb
        if self._rtx_due:
            # RFC 6675 (4.3): the first segment presumed lost goes regardless of pipe.
            self._rtx_due = False
            hole = sb.next_hole(una, high)
            if hole is not None:
                n = self._retransmit(out, una, hole[1], now, restart=True)
                self.high_rxt = self.rescue_rxt = seq_add(una, n)
        hr = self.high_rxt if seq_gt(self.high_rxt, una) else una
        dupthresh = self._dup_thresh()
        pipe = sb.pipe(una, high, hr, mss, dupthresh)
        cwnd = self.cc.cwnd
        # NextSeg (1): holes IsLost() declares lost, above HighRxt.
        lost_edge = sb.lost_edge(una, mss, dupthresh)
        while cwnd - pipe >= mss and (hole := sb.next_hole(hr, lost_edge)) is not None:
            n = self._retransmit(out, hole[0], hole[1], now)
            if n == 0:
                break
            hr = self.high_rxt = seq_add(hole[0], n)
            pipe += n
        # (2): new data, within the peer's window.
        if cwnd - pipe >= mss:
            budget_edge = seq_add(self.snd_nxt, cwnd - pipe)
            win_edge = seq_add(una, self.snd_wnd)
            pipe += self._send_data(
                out, now, budget_edge if seq_lt(budget_edge, win_edge) else win_edge
            )
        # (3): other unSACKed data below the highest SACKed octet.
        top = sb.highest()
        while top is not None and cwnd - pipe >= mss and (hole := sb.next_hole(hr, top)):
            n = self._retransmit(out, hole[0], hole[1], now)
            if n == 0:
                break
            hr = self.high_rxt = seq_add(hole[0], n)
            pipe += n
        # (4): one rescue retransmission per recovery (HighRxt is not moved).
        rescue = self.rescue_rxt
        if cwnd - pipe >= mss and (rescue is None or seq_gt(una, rescue)):
            hole = sb.rescue_hole(una, high)
            if hole is not None:
                start = hole[0] if seq_sub(hole[1], hole[0]) <= mss else seq_add(hole[1], -mss)
                if self._retransmit(out, start, hole[1], now):
                    self.rescue_rxt = self.recover

    def _send_data(self, out: list[TcpSegment], now: float, edge: int) -> int:
        """Send from ``snd_nxt`` up to ``edge``; returns the sequence space sent."""
        sb_seq = self._sb_seq
        buf = self._sndbuf
        data_end = seq_add(sb_seq, len(buf))
        mss = self._seg_mss
        burst = mss * self.config.tso_segments  # new data: several segments at once
        opts = self._tx_opts
        snd_max = self.snd_max
        sacked = self._sb if seq_lt(self.snd_nxt, snd_max) and self._sb else None
        fin_pending = self._fin_queued and self.state is not State.SYN_RECEIVED
        total = 0
        while True:
            nxt = self.snd_nxt
            avail = seq_sub(data_end, nxt)
            if avail > 0:
                resend = seq_lt(nxt, snd_max)  # going back after an RTO
                n = min(avail, seq_sub(edge, nxt), mss if resend else burst)
                if resend and sacked is not None:
                    # Skip what the peer SACKed since the RTO; stop short of the next.
                    held = sacked.contains(nxt)
                    if held is not None:
                        self.snd_nxt = held[1]
                        continue
                    nxt_held = sacked.next_start(nxt)
                    if nxt_held is not None:
                        n = min(n, seq_sub(nxt_held, nxt))
                if n <= 0:
                    break
                # Sender SWS avoidance (RFC 9293 3.8.6.2.1): a short segment only
                # when it empties the buffer or the window is a large share of the max.
                # It concerns new data: resent holes may be short.
                if (
                    not resend
                    and n < mss
                    and n < avail
                    and n < self.max_snd_wnd // 2
                    and not self._sws_override
                ):
                    break
                if self.config.nagle and n < mss and seq_lt(self.snd_una, nxt) and not resend:
                    break
                off = seq_sub(nxt, sb_seq)
                flags = ACK
                if n == avail:
                    flags |= PSH
                    if fin_pending:
                        flags |= FIN
                # Not copied when it lies in one chunk of the buffer (sendbuf.py).
                payload = buf.view(off, n)
                # n > mss: several wire segments in one. The Stack cuts it to ``mss``
                # or hands it to the kernel as one GSO write (TcpConfig.tso_segments).
                gso = mss if n > mss else 0
                seg = self._segment(nxt, self.rcv_nxt, flags, self._advertise(), payload, opts, gso)
                length = n + (1 if flags & FIN else 0)
                self._sent(nxt, length, now)
                out.append(seg)
                total += length
            elif (
                fin_pending and nxt == data_end and (seq_lt(nxt, edge) or seq_lt(nxt, self.snd_max))
            ):
                # A FIN already sent once is retransmitted regardless of the window
                # (RFC 9293 3.8.6.1: retransmit even into a zero window); else a FIN
                # lost behind a zero window is never resent, with no timer armed.
                seg = self._segment(nxt, self.rcv_nxt, FIN | ACK, self._advertise(), b"", opts)
                self._sent(nxt, 1, now)
                out.append(seg)
                total += 1
            else:
                break
        self._sws_override = False
        # Something waits to be sent and nothing is being timed: run the persist
        # timer (RFC 9293 3.8.6.1 zero-window probe; 3.8.6.2.1 SWS override timeout).
        # Not only at snd_wnd == 0 with nothing in flight: that would leave no timer
        # at all for a small nonzero window held back by SWS avoidance, nor for a
        # window shrunk under data in flight once an RTO found nothing to send.
        timers = self.timers
        if (
            timers.rto is None
            and timers.persist is None
            and (seq_lt(self.snd_nxt, data_end) or (fin_pending and self.snd_nxt == data_end))
        ):
            timers.set_persist(now + self._rtt.rto)
        return total

    def _sent(self, seq: int, length: int, now: float) -> None:
        self._last_progress = now
        end = seq_add(seq, length)
        self.snd_nxt = end
        if seq_ge(seq, self.snd_max) and self._rtt_seq is None:
            self._rtt_seq, self._rtt_start = seq, now
        if seq_gt(end, self.snd_max):
            self.snd_max = end
        if self.timers.rto is None:
            self.timers.set_rto(now + self._rtt.rto)
        self._ack_sent()
