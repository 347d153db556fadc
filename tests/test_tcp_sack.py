"""Selective acknowledgments: the blocks we send (RFC 2018) and recovery with the
peer's (RFC 6675 scoreboard, IsLost, NextSeg, pipe, rescue retransmission).

Connection tests negotiate SACK without timestamps so segments compare
exactly; the peer's MSS is 10, so every segment is 10 bytes.
"""

from __future__ import annotations

from dataclasses import replace

from stack import Stack
from stack.events import DataReceived
from stack.tcp.connection import TcpConnection
from stack.tcp.core import EMPTY_SEQS
from stack.tcp.reassembly import Reassembly
from stack.tcp.sack import Scoreboard, choose_blocks
from stack.tcp.segment import TcpSegment
from stack.wire.tcp import ACK, SYN, TcpOptions, encode_options

from packets import CLIENT_ISN, SERVER_ISN, sent_tcp, stack_events, tcp_packet
from tcp_helpers import (
    ALL_OPTIONS,
    FLOW,
    IRS,
    ISS,
    PEER_TS,
    REPLY,
    TEMPLATE,
    drain,
    established,
    recv,
    send,
)

SACK_ONLY = TcpOptions(sack_permitted=True)


def peer_data(off: int, n: int, *, ts: bool = False) -> TcpSegment:
    opts = TcpOptions(timestamps=(PEER_TS, 0)) if ts else TcpOptions()
    return replace(TEMPLATE, seq=IRS + 1 + off, payload=bytes(n), options=opts)


def blocks(*spans: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """SACK blocks of the peer's stream, as offsets from its first byte."""
    return tuple((IRS + 1 + a, IRS + 1 + b) for a, b in spans)


def blocks2(*spans: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """SACK blocks of our stream, as offsets from our first byte."""
    return tuple((ISS + 1 + a, ISS + 1 + b) for a, b in spans)


def ack(n: int, *spans: tuple[int, int]) -> TcpSegment:
    """The peer acknowledging ``n`` of our bytes and SACKing ``spans`` of them."""
    sacks = tuple((ISS + 1 + a, ISS + 1 + b) for a, b in spans)
    return replace(TEMPLATE, ack=ISS + 1 + n, options=TcpOptions(sack_blocks=sacks))


def sent(c: TcpConnection, now: float) -> list[int]:
    """Offsets of the (10-byte) segments the connection sends at ``now``."""
    out = recv(c, now)
    assert all(len(s.payload) == 10 for s in out), out
    return [s.seq - ISS - 1 for s in out]


# -------------------------------------------------------- SACK generation


def test_blocks_most_recent_first_three_next_to_timestamps() -> None:
    c = established(options=ALL_OPTIONS)
    expect: list[tuple[int, int]] = []
    for i, off in enumerate((100, 200, 300, 400)):
        send(c, peer_data(off, 10, ts=True), 0.1 + i / 100)
        (dup,) = recv(c, 0.1 + i / 100)  # RFC 5681 4.2: an immediate duplicate ACK
        assert dup.ack == IRS + 1
        expect.insert(0, (off, off + 10))
        assert dup.options.sack_blocks == blocks(*expect[:3])  # RFC 2018 3: 3 with TSopt
    # Adjacent to the oldest block: the merged block goes first (RFC 2018 4).
    send(c, peer_data(110, 10, ts=True), 0.2)
    (dup,) = recv(c, 0.2)
    assert dup.options.sack_blocks == blocks((100, 120), (400, 410), (300, 310))
    # The hole before 100 fills: what remains is reported, most recent first.
    send(c, peer_data(0, 100, ts=True), 0.3)
    (ack_,) = recv(c, 0.3)
    assert ack_.ack == IRS + 121
    assert ack_.options.sack_blocks == blocks((400, 410), (300, 310), (200, 210))
    assert drain(c) == [DataReceived(FLOW, bytes(120))]


def test_one_duplicate_ack_per_segment_within_one_batch() -> None:
    # A drained TUN batch delivers several segments before output is taken.
    # RFC 5681 4.2: each out-of-order segment still gets its own duplicate
    # ACK, each with the SACK blocks of its moment, so the sender counts them.
    c = established(options=SACK_ONLY)
    for off in (100, 200, 300):
        send(c, peer_data(off, 10), 0.1)
    dups = recv(c, 0.1)
    assert [d.ack for d in dups] == [IRS + 1] * 3
    assert [d.options.sack_blocks for d in dups] == [
        blocks((100, 110)),
        blocks((200, 210), (100, 110)),
        blocks((300, 310), (200, 210), (100, 110)),
    ]
    send(c, peer_data(300, 10), 0.2)  # a duplicate of held data, then more
    send(c, peer_data(400, 10), 0.2)
    assert len(recv(c, 0.2)) == 2


def test_quick_acks_after_a_hole_then_delayed_acks_again() -> None:
    # Linux's quick-ACK mode: after a sign of loss every in-order segment is ACKed
    # at once (16 of them), so a sender with a small window is not left waiting
    # for its loss probe; then one ACK per two segments, or the delayed-ACK timer.
    c = established(options=SACK_ONLY)
    send(c, peer_data(10, 10), 0.1)  # out of order: a hole at 0
    recv(c, 0.1)
    send(c, peer_data(0, 10), 0.2)  # fills it
    assert len(recv(c, 0.2)) == 1
    for k in range(15):  # one segment at a time, each ACKed at once (16 with the fill)
        send(c, peer_data(20 + 10 * k, 10), 0.3 + k / 100)
        (a,) = recv(c, 0.3 + k / 100)
        assert a.ack == IRS + 1 + 30 + 10 * k
    send(c, peer_data(170, 10), 0.5)  # the next: delayed again
    assert recv(c, 0.5) == []
    assert c.timers.ack == 0.5 + c.config.delayed_ack


def test_blocks_four_without_timestamps() -> None:
    c = established(options=SACK_ONLY)
    for i, off in enumerate((100, 200, 300, 400, 500)):
        send(c, peer_data(off, 10), 0.1 + i / 100)
        (dup,) = recv(c, 0.1 + i / 100)
    assert dup.options == TcpOptions(
        sack_blocks=blocks((500, 510), (400, 410), (300, 310), (200, 210))
    )


def test_a_duplicate_of_held_data_is_reported_first() -> None:
    c = established(options=SACK_ONLY)
    for i, off in enumerate((100, 200, 300)):
        send(c, peer_data(off, 10), 0.1 + i / 100)
        recv(c, 0.1 + i / 100)
    send(c, peer_data(100, 10), 0.2)  # a retransmission of what we hold
    (dup,) = recv(c, 0.2)
    # RFC 2883 4.1.2: the D-SACK block, then the block holding it, then the rest.
    assert dup.options.sack_blocks == blocks((100, 110), (100, 110), (300, 310), (200, 210))
    send(c, peer_data(400, 10), 0.3)  # the D-SACK block is reported once
    (nxt,) = recv(c, 0.3)
    assert nxt.options.sack_blocks == blocks((400, 410), (100, 110), (300, 310), (200, 210))


def test_a_d_sack_goes_on_one_segment_when_data_follows() -> None:
    # Our data goes out in batches that share one header (TSO); a D-SACK in it
    # would reach the peer once per wire segment (RFC 2883 4: once).
    c = established(options=SACK_ONLY)
    send(c, peer_data(0, 10), 0.1)
    send(c, peer_data(10, 10), 0.1)
    recv(c, 0.1)
    c.send(bytes(50))  # five segments of ours are due, in one batch
    send(c, peer_data(0, 10), 0.2)  # a duplicate of the peer's
    segs = recv(c, 0.2)
    with_dsack = [s for s in segs if s.options.sack_blocks == blocks((0, 10))]
    assert len(with_dsack) == 1 and not with_dsack[0].payload
    data = [s for s in segs if s.payload]
    assert sum(len(s.payload) for s in data) == 50
    assert all(s.options.sack_blocks == () for s in data)


def test_d_sack_for_a_segment_below_the_cumulative_ack() -> None:
    c = established(options=SACK_ONLY)
    send(c, peer_data(0, 10), 0.1)
    send(c, peer_data(10, 10), 0.1)
    recv(c, 0.1)
    send(c, peer_data(0, 10), 0.2)  # the whole segment again (RFC 2883 4.1.1)
    (dup,) = recv(c, 0.2)
    assert dup.ack == IRS + 21 and dup.options.sack_blocks == blocks((0, 10))
    send(c, peer_data(15, 10), 0.3)  # half old, half new (RFC 2883 4.1.3)
    (ack_,) = recv(c, 0.3)
    assert ack_.ack == IRS + 26 and ack_.options.sack_blocks == blocks((15, 20))
    send(c, peer_data(0, 10), 0.4)  # without SACK agreed there is no D-SACK
    c2 = established()
    send(c2, peer_data(0, 10), 0.1)
    recv(c2, 0.1)
    send(c2, peer_data(0, 10), 0.2)
    assert recv(c2, 0.2)[0].options.sack_blocks == ()


def test_no_blocks_without_sack_permitted() -> None:
    c = established()
    send(c, peer_data(100, 10), 0.1)
    assert recv(c, 0.1) == [replace(REPLY, window=65535)]


def test_blocks_choice_directly() -> None:
    held = Reassembly(1 << 20)
    for start in (10, 30, 50):
        held.insert(0, start, bytes(10))
    recent = [55, 12, 99, 15]  # 99 is no longer held; 15 repeats the block of 12
    assert choose_blocks(held, recent, 4) == ((50, 60), (10, 20), (30, 40))
    assert recent == [55, 12]
    assert choose_blocks(held, [], 2) == ((50, 60), (30, 40))
    # A connection that has had no out-of-order arrival yet shares an empty tuple.
    assert choose_blocks(held, EMPTY_SEQS, 2) == ((50, 60), (30, 40))


def test_stack_encodes_sack_blocks_and_timestamps_in_one_option_block() -> None:
    stack = Stack()
    syn_opts = encode_options(mss=1460, sack_permitted=True, timestamps=(7, 0), wscale=7)
    stack.receive(tcp_packet(CLIENT_ISN, 0, SYN, options=syn_opts), 0.0)
    (req,) = stack_events(stack)
    stack.accept(req.flow, isn=SERVER_ISN)  # type: ignore[attr-defined]
    (synack,) = sent_tcp(stack)
    assert synack.tcp.options.sack_permitted and synack.tcp.options.wscale == 7
    assert synack.tcp.options.timestamps is not None
    ts = encode_options(timestamps=(8, synack.tcp.options.timestamps[0]))
    stack.receive(tcp_packet(CLIENT_ISN + 1, SERVER_ISN + 1, options=ts), 0.01)
    stack_events(stack)
    for i, off in enumerate((1000, 2000, 3000, 4000)):
        stack.receive(tcp_packet(CLIENT_ISN + 1 + off, SERVER_ISN + 1, ACK, b"x" * 100, options=ts),
                      0.02 + i / 100)  # fmt: skip
    dups = sent_tcp(stack, 0.06)
    assert len(dups) == 4  # one duplicate ACK each (RFC 5681 4.2); the last has all
    opts = dups[-1].tcp.options
    assert opts.timestamps is not None and opts.timestamps[1] == 8  # echoes the client
    base = CLIENT_ISN + 1
    assert opts.sack_blocks == tuple((base + o, base + o + 100) for o in (4000, 3000, 2000))


# ------------------------------------------------------------ scoreboard


def test_scoreboard_merges_and_ignores_what_it_must() -> None:
    sb = Scoreboard()
    assert sb.update(((120, 130), (140, 150)), 100, 200)
    assert sb.ranges() == [(120, 130), (140, 150)] and sb.sacked == 20
    assert not sb.update(((120, 130),), 100, 200)  # nothing new
    assert sb.update(((125, 145),), 100, 200)  # bridges the two
    assert sb.ranges() == [(120, 150)] and sb.sacked == 30
    assert not sb.update(((90, 100), (150, 260)), 100, 200)  # D-SACK, beyond snd_max
    assert not sb.update(((160, 160), (170, 165)), 100, 200)  # empty, inverted
    sb.advance(130)
    assert sb.ranges() == [(130, 150)] and sb.sacked == 20
    sb.advance(155)
    assert not sb and sb.sacked == 0


def test_scoreboard_across_sequence_wrap() -> None:
    sb = Scoreboard()
    una = 0xFFFFFFF0
    assert sb.update(((0xFFFFFFFA, 5), (10, 20)), una, 30)
    assert sb.ranges() == [(0xFFFFFFFA, 5), (10, 20)]
    assert sb.next_hole(una, 30) == (una, 0xFFFFFFFA)
    assert sb.next_hole(0xFFFFFFFA, 30) == (5, 10)


def test_is_lost_by_bytes_or_by_three_ranges() -> None:
    # RFC 6675 IsLost(): more than 2 * SMSS bytes, or 3 discontiguous ranges, above.
    sb = Scoreboard()
    sb.update(((110, 130),), 100, 200)
    assert sb.lost_edge(100, 10) == 100  # 20 bytes: not more than 2 SMSS
    sb.update(((130, 131),), 100, 200)
    assert sb.lost_edge(100, 10) == 110  # 21 bytes above 100..110: lost
    sb = Scoreboard()
    sb.update(((110, 111), (120, 121), (130, 131)), 100, 200)
    assert sb.lost_edge(100, 10) == 110  # three ranges above 100..110
    assert sb.lost_edge(100, 1) == 110


def test_pipe_counts_unsacked_not_lost_plus_retransmitted() -> None:
    # una 100, high 200; SACKed 120-140 and 150-160; SMSS 10: IsLost below 120.
    sb = Scoreboard()
    sb.update(((120, 140), (150, 160)), 100, 200)
    assert sb.lost_edge(100, 10) == 120
    # Unsacked 70; lost 20 (100-120); nothing resent: 50.
    assert sb.pipe(100, 200, 100, 10) == 50
    # 100-110 resent: it is in flight again.
    assert sb.pipe(100, 200, 110, 10) == 60
    # Resent up to 145 (the SACKed part does not count): 20 + 0 + 5 more.
    assert sb.pipe(100, 200, 145, 10) == 75


def test_next_hole_and_rescue() -> None:
    sb = Scoreboard()
    sb.update(((120, 140), (150, 160)), 100, 200)
    assert sb.next_hole(100, 200) == (100, 120)
    assert sb.next_hole(125, 200) == (140, 150)
    assert sb.next_hole(140, 150) == (140, 150)
    assert sb.next_hole(150, 160) is None
    assert sb.rescue_hole(100, 200) == (160, 200)  # the unSACKed tail
    assert sb.rescue_hole(100, 160) == (140, 150)  # the hole below the top range


# ------------------------------------------------------ RFC 6675 recovery


def _ten_segments(**kw: object) -> TcpConnection:
    c = established(mss=10, options=SACK_ONLY, **kw)  # type: ignore[arg-type]
    c.send(bytes(150))
    assert sent(c, 0.0) == list(range(0, 100, 10))  # the initial window: 10 segments
    send(c, ack(10), 0.1)  # slow start: cwnd 110
    assert sent(c, 0.1) == [100, 110]
    return c


def test_sack_recovery_resends_the_holes_first() -> None:
    # Lost: the segments at 10 and 40.
    c = _ten_segments()
    send(c, ack(10, (20, 30)), 0.11)
    send(c, ack(10, (20, 40)), 0.12)
    assert sent(c, 0.12) == []
    assert not c.in_recovery
    send(c, ack(10, (50, 60), (20, 40)), 0.13)  # the third duplicate
    assert c.in_recovery and c.recover == ISS + 1 + 120
    assert c.cc.cwnd == 77  # CUBIC: 0.7 * 110
    # (4.3): the first hole goes; pipe (80: 60 not lost, 10 lost, 10 resent) >= cwnd.
    assert sent(c, 0.13) == [10]
    send(c, ack(10, (50, 70), (20, 40)), 0.14)
    assert sent(c, 0.14) == []  # pipe 70: cwnd 77 leaves no room for a segment
    # 40-50 now has more than 2 SMSS SACKed above it: lost. It goes before new data.
    send(c, ack(10, (50, 80), (20, 40)), 0.15)
    assert sent(c, 0.15) == [40, 120]
    send(c, ack(10, (50, 90), (20, 40)), 0.16)
    assert sent(c, 0.16) == [130]  # each SACKed segment lets one more go
    send(c, ack(40, (50, 100)), 0.2)  # the resent 10 arrived: partial ACK
    # New data, then NextSeg() rule (4): HighACK passed RescueRxt, so the segment
    # with the highest unSACKed octet goes once more (a rescue, once per recovery).
    assert sent(c, 0.2) == [140, 130]
    send(c, ack(40, (50, 110)), 0.21)
    assert sent(c, 0.21) == []  # no lost hole, no new data, the rescue is spent
    send(c, ack(120), 0.3)  # covers the recovery point
    assert not c.in_recovery
    assert c.cc.cwnd == min(77, 30 + 10)  # RFC 6582 (3) option 1: flight 30 + SMSS
    assert c.get_timer() is not None


def test_is_lost_starts_recovery_before_three_duplicates() -> None:
    c = established(mss=10, options=SACK_ONLY)
    c.send(bytes(100))
    sent(c, 0.0)
    # One ACK SACKs three segments above the first: IsLost(HighACK + 1) (RFC 6675 5 (2)).
    send(c, ack(0, (10, 40)), 0.1)
    assert c.in_recovery
    assert sent(c, 0.1) == [0]


def test_rescue_retransmission_of_a_lost_tail() -> None:
    # Lost: the first and the last segment. Nothing is SACKed above the last, so
    # only NextSeg() rule (4) resends it, once the resent first one is ACKed.
    c = established(mss=10, options=SACK_ONLY)
    c.send(bytes(50))
    assert sent(c, 0.0) == [0, 10, 20, 30, 40]
    send(c, ack(0, (10, 20)), 0.1)
    send(c, ack(0, (10, 30)), 0.11)
    assert sent(c, 0.11) == []
    send(c, ack(0, (10, 40)), 0.12)
    assert sent(c, 0.12) == [0]
    send(c, ack(40), 0.2)  # partial: below the recovery point 50
    assert sent(c, 0.2) == [40]  # the rescue
    send(c, ack(40), 0.21)
    assert sent(c, 0.21) == []  # once per recovery
    send(c, ack(50), 0.3)
    assert not c.in_recovery and c.get_timer() is None


def test_timeout_forgets_the_scoreboard_and_go_back_skips_what_is_sacked_anew() -> None:
    c = established(mss=10, options=SACK_ONLY)
    c.send(bytes(50))
    sent(c, 0.0)
    send(c, ack(0, (20, 30)), 0.1)
    assert c._sb
    c.handle_timer(1.0)  # RFC 2018 8 / RFC 6675 5.1
    assert not c._sb and not c.in_recovery
    assert sent(c, 1.0) == [0]  # go-back-N from snd_una, one segment
    send(c, ack(10), 1.1)  # cwnd 20
    assert sent(c, 1.1) == [10, 20]
    send(c, ack(20, (30, 50)), 1.2)  # the peer had 30-50 all along
    assert sent(c, 1.2) == []  # 30-50 is SACKed: not resent
    assert c.snd_nxt == ISS + 1 + 50
    send(c, ack(50), 1.3)
    assert c.get_timer() is None


def test_no_recovery_before_the_timeout_recovery_point_is_passed() -> None:
    # RFC 6675 5.1: after an RTO, duplicates for data sent before it start nothing.
    c = established(mss=10, options=SACK_ONLY)
    c.send(bytes(50))
    sent(c, 0.0)
    c.handle_timer(1.0)
    sent(c, 1.0)
    for i, top in enumerate((20, 30, 40)):
        send(c, ack(0, (10, top)), 1.1 + i / 100)
    assert not c.in_recovery


def test_recovery_ignores_sack_blocks_when_sack_was_not_negotiated() -> None:
    c = established(mss=10)
    c.send(bytes(50))
    sent(c, 0.0)
    for t in (0.1, 0.11):
        send(c, ack(0, (10, 50)), t)  # two RFC 5681 duplicates; the blocks are ignored
    assert not c.in_recovery and not c._sb
    send(c, ack(0, (10, 50)), 0.12)
    assert c.in_recovery and sent(c, 0.12) == [0]  # NewReno's third duplicate


def test_duplicates_without_blocks_still_count_when_sack_was_agreed() -> None:
    # A peer (or a middlebox) that drops the blocks: three plain duplicates start
    # RFC 6675 recovery on an empty scoreboard rather than wait for the RTO.
    c = established(mss=10, options=SACK_ONLY)
    c.send(bytes(50))
    sent(c, 0.0)
    for t in (0.1, 0.11):
        send(c, ack(0), t)
    assert not c.in_recovery
    send(c, ack(0), 0.12)
    assert c.in_recovery and sent(c, 0.12) == [0]
    assert c._inflate == 0  # no RFC 6582 inflation: pipe does the accounting


# ------------------------------------- reordering: undo, DupThresh, lost retransmissions


def _reordered_recovery() -> TcpConnection:
    """Recovery started by reordering: 10 SACKed after 20-50 arrived first."""
    c = established(mss=10, options=SACK_ONLY)
    c.send(bytes(200))
    assert sent(c, 0.0) == list(range(0, 100, 10))
    send(c, ack(10, (20, 50)), 0.1)  # 10-20 held behind the next three
    assert c.in_recovery and c.cc.cwnd == 77  # 0.7 * 110
    assert sent(c, 0.1) == [10, 100]  # the hole, then new data (pipe 70)
    return c


def test_d_sack_of_every_retransmission_undoes_the_reduction() -> None:
    # RFC 3708 5: the peer reports the retransmitted 10-20 as a duplicate.
    c = _reordered_recovery()
    send(c, ack(50, (10, 20)), 0.11)  # the original arrived; then the D-SACK
    assert c.cc.cwnd == 110  # the window before the spurious reduction
    assert c._dupthresh == 4  # three segments of reordering: DupThresh past them
    # The same reordering again starts no recovery.
    send(c, ack(100), 0.2)
    assert not c.in_recovery
    c.send(bytes(200))
    out = sent(c, 0.2)
    first = out[0]
    send(c, ack(first + 10, (first + 20, first + 50)), 0.3)
    assert not c.in_recovery


def test_a_network_duplicate_is_no_reason_to_undo() -> None:
    c = _reordered_recovery()
    send(c, ack(50, (60, 70)), 0.11)  # a D-SACK for data never retransmitted: 60-70 ...
    # ... is not below the ACK, so not a D-SACK at all; and one that is:
    send(c, ack(50, (40, 50)), 0.12)
    assert c.cc.cwnd == 77 and c._dupthresh == 3


def test_eifel_timestamps_undo_a_spurious_fast_retransmit() -> None:
    # RFC 3522: the ACK for the hole echoes the original's TSval, older than the
    # retransmission's, so the original arrived and nothing was lost.
    c = established(mss=22, options=ALL_OPTIONS._replace(wscale=None))  # 10 + TSopt
    c.send(bytes(200))
    first = recv(c, 0.0)
    assert first[0].options.timestamps is not None
    original_tsval = first[1].options.timestamps[0]  # the segment at 10 (0.0 s)
    sacks = TcpOptions(timestamps=(PEER_TS, original_tsval), sack_blocks=blocks2((20, 50)))
    send(c, replace(TEMPLATE, ack=ISS + 1 + 10, options=sacks), 0.1)
    assert c.in_recovery and c.cc.cwnd == 77
    recv(c, 0.1)  # the retransmission of 10-20, TSval of 0.1 s
    echo = TcpOptions(timestamps=(PEER_TS + 1, original_tsval))
    send(c, replace(TEMPLATE, ack=ISS + 1 + 50, options=echo), 0.11)
    assert c.cc.cwnd == 110 and c._dupthresh == 4


def test_a_lost_retransmission_is_resent_without_waiting_for_the_rto() -> None:
    c = established(mss=10, options=SACK_ONLY, window=60_000)
    c.send(bytes(400))
    assert sent(c, 0.0) == list(range(0, 100, 10))
    send(c, ack(0, (10, 40)), 0.1)  # 0-10 lost
    assert sent(c, 0.1) == [0]  # the retransmission ...
    # ... is lost too. New data sent after it arrives, three segments' worth.
    for k in range(4, 10):
        send(c, ack(0, (10, 10 * k + 10)), 0.1 + k / 100)
        sent(c, 0.1 + k / 100)
    send(c, ack(0, (10, 130)), 0.2)
    assert 0 in sent(c, 0.2)  # resent once more, long before the RTO (1 s)


def test_an_empty_scoreboard_holds_no_list_of_its_own() -> None:
    a, b = Scoreboard(), Scoreboard()
    assert a._ranges is b._ranges  # shared (memory per idle connection)
    assert a.update(((1100, 1200),), 1000, 2000)
    assert a.ranges() == [(1100, 1200)] and not b
    a.clear()
    assert not a and a._ranges is b._ranges and a.sacked == 0
