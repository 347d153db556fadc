"""Window scaling and timestamps (RFC 7323), buffer auto-tuning and the memory budget.

Packet level with a fake clock. The builders' peer offers ``ALL_OPTIONS``
(window scale 7, SACK-permitted, timestamps with TSval ``PEER_TS``); our
shift is 7 too, the smallest that covers the default 4 MiB receive-buffer cap.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from stack import Stack, StackConfig
from stack.config import TcpConfig
from stack.events import Closed, CloseReason, ConnectionReset, DataReceived
from stack.tcp.buffers import MemoryBudget, wscale_for
from stack.tcp.connection import State, TcpConnection
from stack.tcp.segment import TcpSegment
from stack.tcp.timestamps import PAWS_IDLE, offset_for
from stack.wire.tcp import SYN as SYN_FLAG
from stack.wire.tcp import TcpOptions, encode_options

from packets import CLIENT_ISN, SERVER_ISN, sent_tcp, stack_events, tcp_packet
from tcp_helpers import (
    ACK,
    ALL_OPTIONS,
    FLOW,
    IRS,
    ISS,
    LPORT,
    PEER_TS,
    REPLY,
    RPORT,
    RST,
    SYN,
    TEMPLATE,
    drain,
    established,
    listen,
    recv,
    recv_nothing,
    send,
)

M = 0xFFFFFFFF
OFF = offset_for(ISS)
CFG = TcpConfig(time_wait=2.0)


def tsval(now: float) -> int:
    """Our TSval at ``now``."""
    return (int(now * 1000) + OFF) & M


def data(off: int, payload: bytes, *, ts: int | None = None, ack: int = ISS + 1) -> TcpSegment:
    """The peer's data ``off`` bytes into its stream, with TSval ``ts``."""
    opts = TcpOptions() if ts is None else TcpOptions(timestamps=(ts, 0))
    return replace(TEMPLATE, seq=(IRS + 1 + off) & M, payload=payload, ack=ack, options=opts)


def edge(s: TcpSegment, shift: int = 7) -> int:
    """The right edge a segment of ours shows the peer: ACK + (window << shift)."""
    return (s.ack + (s.window << shift)) & M


# ------------------------------------------------------- negotiation


def test_syn_ack_answers_every_option_the_client_offered() -> None:
    c = listen(options=ALL_OPTIONS)
    c.accept(isn=ISS)
    (synack,) = recv(c, 0.0)
    assert synack.flags == SYN | ACK
    assert synack.window == 65535  # RFC 7323 2.2: never scaled in a SYN
    assert synack.options == TcpOptions(
        mss=1460, wscale=7, sack_permitted=True, timestamps=(OFF, PEER_TS)
    )
    assert (c.snd_wscale, c.rcv_wscale, c.sack_ok, c.ts is not None) == (7, 7, True, True)


def test_syn_ack_offers_nothing_the_client_did_not() -> None:
    c = listen()  # MSS only
    c.accept(isn=ISS)
    (synack,) = recv(c, 0.0)
    assert synack.options == TcpOptions(mss=1460)
    assert (c.snd_wscale, c.rcv_wscale, c.sack_ok, c.ts) == (0, 0, False, None)


@pytest.mark.parametrize(
    ("offer", "answer"),
    [
        (TcpOptions(wscale=3), TcpOptions(mss=1460, wscale=7)),
        (TcpOptions(sack_permitted=True), TcpOptions(mss=1460, sack_permitted=True)),
        (TcpOptions(timestamps=(9, 0)), TcpOptions(mss=1460, timestamps=(OFF, 9))),
    ],
)
def test_each_option_is_answered_alone(offer: TcpOptions, answer: TcpOptions) -> None:
    c = listen(options=offer)
    c.accept(isn=ISS)
    assert recv(c, 0.0)[0].options == answer


def test_options_turned_off_in_the_config_are_not_answered() -> None:
    cfg = TcpConfig(window_scaling=False, sack=False, timestamps=False)
    c = listen(options=ALL_OPTIONS, config=cfg)
    c.accept(isn=ISS)
    assert recv(c, 0.0)[0].options == TcpOptions(mss=1460)
    assert c.snd_wscale == 0  # the peer's shift is not applied either


def test_our_shift_covers_the_receive_buffer_cap() -> None:
    assert [wscale_for(n) for n in (1000, 65535, 65536, 4 << 20, 1 << 30)] == [0, 0, 1, 7, 14]
    c = listen(options=ALL_OPTIONS, config=TcpConfig(rcv_buf=1 << 20))
    assert c.rcv_wscale == 5


def test_active_open_keeps_only_what_the_syn_ack_returns() -> None:
    c = TcpConnection(local_port=LPORT, remote_port=RPORT, config=CFG)
    c.connect(isn=ISS)
    (syn,) = recv(c, 0.0)
    assert syn.options == TcpOptions(mss=1460, wscale=7, sack_permitted=True, timestamps=(OFF, 0))
    # A SYN-ACK with timestamps only: no scaling either way, no SACK.
    synack = TcpSegment(RPORT, LPORT, IRS, ISS + 1, SYN | ACK, 5000, b"",
                        TcpOptions(mss=1460, timestamps=(77, OFF)))  # fmt: skip
    send(c, synack, 0.05)
    assert c.state is State.ESTABLISHED
    assert (c.snd_wscale, c.rcv_wscale, c.sack_ok) == (0, 0, False)
    assert c.ts is not None and c.ts.recent == 77
    assert c._rtt.srtt == pytest.approx(0.05, abs=0.0011)  # from the echoed TSval
    ack = recv(c, 0.05)[0]
    assert ack.options == TcpOptions(timestamps=(tsval(0.05), 77))
    assert ack.window == 65535  # not scaled: the SYN-ACK had no window-scale option


def test_active_open_with_a_scaling_peer() -> None:
    c = TcpConnection(local_port=LPORT, remote_port=RPORT, config=CFG)
    c.connect(isn=ISS)
    recv(c, 0.0)
    synack = TcpSegment(RPORT, LPORT, IRS, ISS + 1, SYN | ACK, 5000, b"",
                        TcpOptions(mss=1460, wscale=2, sack_permitted=True))  # fmt: skip
    send(c, synack, 0.05)
    assert (c.snd_wscale, c.rcv_wscale, c.sack_ok, c.ts) == (2, 7, True, None)
    assert c.snd_wnd == 5000  # the SYN-ACK's window is not scaled
    send(c, replace(TEMPLATE, window=5000), 0.1)
    assert c.snd_wnd == 20000


# ------------------------------------------------------- scaled windows


def test_peer_window_is_scaled_after_the_syn() -> None:
    c = established(options=ALL_OPTIONS._replace(wscale=2), window=1000, mss=1000)
    assert c.snd_wnd == 4000  # the handshake ACK's 1000 << 2
    c.send(bytes(10_000))
    # 988 = MSS 1000 - 12 bytes of TSopt; the 48 left in the window wait (SWS).
    assert [len(s.payload) for s in recv(c, 0.0)] == [988] * 4


def test_window_beyond_64k_both_ways() -> None:
    c = established(options=ALL_OPTIONS, window=4000)  # 4000 << 7 = 512000 bytes
    assert c.snd_wnd == 512_000
    c.send(bytes(200_000))
    sent = recv(c, 0.0)
    assert sum(len(s.payload) for s in sent) == 14_480  # the initial cwnd, not the window
    # Our window: 64 KiB in units of 128 bytes (the SYN-ACK's 65535 rounded up).
    assert sent[0].window == 512
    assert edge(sent[0]) == (IRS + 1 + 65536) & M


def test_window_field_rounds_up_without_retracting_the_edge() -> None:
    # Nothing is consumed: the window closes as data arrives. 65536 - 1000 is no
    # whole number of 128-byte units; rounding the field down would show the peer
    # an edge left of the one it has. It is rounded up: the edge stays, or moves
    # right by less than a unit (over-committing the buffer by as much).
    c = established(options=ALL_OPTIONS)
    right = (IRS + 1 + 65536) & M
    t = 0.0
    for n in (1000, 1460, 100, 1460, 1460, 7):
        t += 0.1
        send(c, data(c.rcv_nxt - IRS - 1, bytes(n), ts=PEER_TS), t)
        c.handle_timer(t + 0.04)  # the delayed ACK
        (ack,) = recv(c, t + 0.04)
        assert 0 <= (edge(ack) - right) & M < 128
        right = edge(ack)
        assert right == c.rcv_adv  # what the peer sees is what we accept
    assert c._unconsumed + ((right - c.rcv_nxt) & M) < 65536 + 6 * 128


def test_right_edge_never_moves_left_while_the_application_consumes() -> None:
    c = established(options=ALL_OPTIONS, rtt=0.05)
    last = (IRS + 1 + 65536) & M
    t = 0.0
    for i in range(300):
        t += 0.01
        n = (i * 397) % 1460 + 1  # odd sizes, never whole units
        send(c, data(c.rcv_nxt - IRS - 1, bytes(n), ts=PEER_TS + i), t)
        if i % 3 == 0:
            for ev in drain(c):
                if isinstance(ev, DataReceived):
                    c.consumed(len(ev.data))
        for s in recv(c, t):
            assert ((edge(s) - last) & M) < 1 << 31, f"edge moved left at {i}"
            last = edge(s)


def test_retraction_only_by_rounding_for_tiny_segments_nobody_reads() -> None:
    # RFC 7323 Appendix F: segments smaller than a unit into a buffer nobody
    # reads. Rounding up every time would keep the window open for ever. Once the
    # roundings pass the slack (an eighth of the buffer) the edge the peer sees
    # retracts by less than one unit, and the window does close.
    c = established(options=ALL_OPTIONS)
    best = c.rcv_adv
    retracted = False
    t = 0.0
    while True:
        t += 0.001
        send(c, data(c.rcv_nxt - IRS - 1, bytes(100), ts=PEER_TS), t)
        acks = recv(c, t)
        if not acks:
            c.handle_timer(t + 0.04)
            acks = recv(c, t + 0.04)
        (ack,) = acks
        back = (best - edge(ack)) & M
        assert back < 128 or back > 1 << 31
        retracted = retracted or 0 < back < 128
        if back > 1 << 31:
            best = edge(ack)
        if ack.window == 0:
            break
    assert retracted
    assert c._unconsumed <= 65536 + 65536 // 8
    send(c, data(c.rcv_nxt - IRS - 1, b"x", ts=PEER_TS), t + 1)
    assert c._unconsumed <= 65536 + 65536 // 8  # closed: nothing more is taken


def test_a_buffer_shrunk_by_pressure_still_honours_its_edge() -> None:
    c = established(options=ALL_OPTIONS)
    old = c.rcv_adv  # the SYN-ACK's window: + 65535
    c.buf.rcv = 10_000  # (white-box) as a tick under memory pressure would
    send(c, data(0, bytes(1000), ts=PEER_TS), 0.1)
    c.handle_timer(0.14)
    (ack,) = recv(c, 0.14)
    assert 0 <= (edge(ack) - old) & M < 128  # not left of it: rounded up
    # A segment that reaches the old edge is taken whole.
    send(c, data(65535 - 1460, bytes(1460), ts=PEER_TS), 0.2)
    assert c._ooo.size == 1460


# --------------------------------------------------- buffers grow with demand


def _fill_rounds(c: TcpConnection, rounds: int, rtt: float) -> list[int]:
    """The peer fills the advertised window once per RTT; the application keeps up."""
    windows = []
    t = 0.0
    right = c.rcv_adv
    for r in range(rounds):
        t += rtt
        while ((right - c.rcv_nxt) & M) >= 1460 and ((right - c.rcv_nxt) & M) < 1 << 31:
            send(c, data(c.rcv_nxt - IRS - 1, bytes(1460), ts=PEER_TS + r), t)
        for ev in drain(c):
            if isinstance(ev, DataReceived):
                c.consumed(len(ev.data))
        acks = recv(c, t)
        right = edge(acks[-1], c.rcv_wscale)
        windows.append((right - c.rcv_nxt) & M)
    return windows


def test_receive_buffer_grows_when_the_window_is_filled_each_rtt() -> None:
    c = established(options=ALL_OPTIONS, rtt=0.1)
    windows = _fill_rounds(c, 8, 0.1)
    assert windows[0] == 65536
    assert windows[-1] >= 1 << 20  # doubled every other RTT (the measurement lags one)
    assert windows == sorted(windows)


def test_receive_buffer_grows_when_one_super_segment_fills_the_window() -> None:
    # With TUN offloads a GRO super-segment can fill the whole 64 KiB window, and
    # the auto-tuning check runs as it arrives, before the relay consumes it.
    # Judged by what the application held at that moment (all of the buffer), it
    # would keep the window at 64 KiB for good: one super-segment per round trip,
    # ~1 Gbit/s uploads. The application's progress per RTT is what counts.
    c = established(options=ALL_OPTIONS, rtt=0.001)
    windows = []
    t = 0.0
    for r in range(12):
        t += 0.0006
        room = (c.rcv_adv - c.rcv_nxt) & M
        send(c, data(c.rcv_nxt - IRS - 1, bytes(room), ts=PEER_TS + r), t)
        for ev in drain(c):
            if isinstance(ev, DataReceived):
                c.consumed(len(ev.data))
        acks = recv(c, t)
        windows.append((edge(acks[-1], c.rcv_wscale) - c.rcv_nxt) & M)
    assert windows[0] == 65536
    assert windows[-1] >= 1 << 20, windows


def test_receive_buffer_growth_stops_at_the_cap() -> None:
    c = established(options=ALL_OPTIONS, rtt=0.1, config=TcpConfig(rcv_buf=200_000))
    windows = _fill_rounds(c, 10, 0.1)
    assert max(windows) <= 200_000
    assert c.buf.rcv == 200_000


def test_no_growth_without_scaling() -> None:
    c = established(rtt=0.1)  # the peer offered no window scaling
    for r in range(6):
        for _ in range(44):
            send(c, data(c.rcv_nxt - IRS - 1, bytes(1460)), 0.1 * (r + 1))
        for ev in drain(c):
            if isinstance(ev, DataReceived):
                c.consumed(len(ev.data))
        recv(c, 0.1 * (r + 1))
    assert c.buf.rcv == 65535  # the most a 16-bit window can use


def test_no_growth_when_the_application_lags() -> None:
    c = established(options=ALL_OPTIONS, rtt=0.1)
    for r in range(6):
        send(c, data(c.rcv_nxt - IRS - 1, bytes(40_000), ts=PEER_TS), 0.1 * (r + 1))
        recv(c, 0.1 * (r + 1))  # nothing consumed: the application is the bottleneck
        if c._unconsumed > 60_000:
            break
    assert c.buf.rcv == 65536


def test_send_buffer_grows_when_the_application_offers_more() -> None:
    cfg = TcpConfig(snd_buf_initial=20_000, snd_buf=100_000, time_wait=2.0)
    c = established(options=ALL_OPTIONS, window=4000, config=cfg)
    # Grown from 20000 to 2 * min(cwnd 10 * 1448, peer window 512000).
    assert c.send(bytes(30_000)) == 28_960
    assert c.buf.snd == 28_960
    assert c.send(b"more") == 0  # full, and cwnd has not grown
    assert sum(len(s.payload) for s in recv(c, 0.0)) == 14_480
    send(c, replace(TEMPLATE, ack=ISS + 1 + 14_480, window=4000), 0.1)
    assert c.cc.cwnd == 17_376  # slow start: a stretch ACK counts 2 SMSS (RFC 3465)
    assert c.send(bytes(100_000)) == 34_752 - 14_480
    assert c.buf.snd == 34_752


def test_send_buffer_grows_for_a_caller_that_offers_only_the_free_space() -> None:
    # The relay reads upstream no more than send_space() bytes, so send() never
    # finds the buffer overfull; a full buffer seen through Stack.send_space grows it.
    stack = Stack(StackConfig(tcp=TcpConfig(snd_buf_initial=20_000, snd_buf=100_000)))
    syn = encode_options(mss=1460, sack_permitted=True, timestamps=(7, 0), wscale=7)
    stack.receive(tcp_packet(CLIENT_ISN, 0, SYN_FLAG, options=syn), 0.0)
    (req,) = stack_events(stack)
    flow = req.flow  # type: ignore[attr-defined]
    stack.accept(flow, isn=SERVER_ISN)
    (synack,) = sent_tcp(stack)
    assert synack.tcp.options.timestamps is not None
    ts = encode_options(timestamps=(8, synack.tcp.options.timestamps[0]))
    stack.receive(tcp_packet(CLIENT_ISN + 1, SERVER_ISN + 1, options=ts, window=4000), 0.0)
    stack_events(stack)
    assert stack.send_space(flow) == 20_000
    assert stack.send(flow, bytes(20_000)) == 20_000
    assert stack.send_space(flow) == 28_960 - 20_000  # 2 * min(cwnd, peer window)


# --------------------------------------------------------------- the budget


def _conn(
    budget: MemoryBudget, cfg: TcpConfig = CFG, rcv_budget: MemoryBudget | None = None
) -> tuple[TcpConnection, TcpSegment]:
    c = TcpConnection(
        local_port=LPORT, remote_port=RPORT, config=cfg, budget=budget, rcv_budget=rcv_budget
    )
    c.listen(TcpSegment(RPORT, LPORT, IRS, 0, SYN, 65535, b"", ALL_OPTIONS._replace(mss=1460)))
    c.accept(isn=ISS)
    (synack,) = recv(c, 0.0)
    return c, synack


def test_new_windows_shrink_when_the_budget_is_tight() -> None:
    cfg = TcpConfig(snd_buf_initial=65536, time_wait=2.0)
    budget = MemoryBudget(200_000)
    a, syn_a = _conn(budget, cfg)
    b, syn_b = _conn(budget, cfg)
    c, syn_c = _conn(budget, cfg)
    assert (a.buf.rcv, a.buf.snd, syn_a.window) == (65536, 65536, 65535)
    # b gets what is left, split between its buffers above the floors (4 MSS each).
    assert (b.buf.rcv, b.buf.snd) == (34_464, 34_464)
    assert syn_b.window == 34_464
    # c still opens, with the floors: the budget is over-committed, nothing fails.
    assert (c.buf.rcv, c.buf.snd) == (5840, 5840)
    assert syn_c.window == 5840
    assert budget.used == 200_000 + 2 * 5840 and budget.over
    for conn in (a, b, c):
        conn.abort()
    assert budget.used == 0  # closing gives everything back


def _tick_rounds(c: TcpConnection, rounds: int, right: int) -> None:
    """One segment a second for `rounds` s (> one RTT: every round is a buffer tick),
    each consumed at once; the advertised right edge never moves left of `right`."""
    t = 0.0
    for r in range(rounds):
        t += 1.0
        send(c, data(c.rcv_nxt - IRS - 1, bytes(1460), ts=PEER_TS + r), t)
        for ev in drain(c):
            if isinstance(ev, DataReceived):
                c.consumed(len(ev.data))
        for s in recv(c, t):
            assert ((edge(s) - right) & M) < 1 << 31  # never left of the old edge
            right = edge(s)


def test_growth_stops_and_buffers_shrink_under_pressure_without_retracting() -> None:
    budget = MemoryBudget(150_000)
    c, _ = _conn(budget)  # rcv 65536, snd what is left (84464)
    send(c, replace(TEMPLATE, options=TcpOptions(timestamps=(PEER_TS, 0))), 0.0)
    assert c.state is State.ESTABLISHED
    assert budget.used == 150_000
    right = c.rcv_adv
    # Another flow takes the rest, and more (its floors).
    _conn(budget)
    assert budget.over
    _tick_rounds(c, 6, right)
    # Halved at the first tick, which ended the over-commitment; no more since.
    assert c.buf.rcv == 32_768 and not budget.over


def test_stack_connections_share_one_budget() -> None:
    stack = Stack(StackConfig(tcp=TcpConfig(memory_budget=100_000)))
    windows = []
    for port in (40000, 40001):
        stack.receive(tcp_packet(CLIENT_ISN, 0, SYN_FLAG, sport=port,
                          options=encode_options(mss=1460, wscale=7)), 0.0)  # fmt: skip
        (req,) = stack_events(stack)
        stack.accept(req.flow, isn=SERVER_ISN)  # type: ignore[attr-defined]
        (p,) = sent_tcp(stack)
        windows.append(p.tcp.window)
    # 100000 bytes for 64 KiB + 256 KiB wanted: the first flow's buffers get the
    # floors (4 MSS each) plus half the rest each; the second gets just the floors.
    assert windows == [5840 + (100_000 - 2 * 5840) // 2, 5840]


# ------------------------------------------------- the receive-window budget


def _open_flows(stack: Stack, ports: range) -> list[int]:
    """Open one connection per client port; the windows of their SYN-ACKs."""
    windows = []
    for port in ports:
        stack.receive(tcp_packet(CLIENT_ISN, 0, SYN_FLAG, sport=port,
                          options=encode_options(mss=1460, wscale=7)), 0.0)  # fmt: skip
        (req,) = stack_events(stack)
        stack.accept(req.flow, isn=SERVER_ISN)  # type: ignore[attr-defined]
        (p,) = sent_tcp(stack)
        windows.append(p.tcp.window)
    return windows


def test_windows_of_many_flows_add_up_to_the_window_budget_not_more() -> None:
    # 200 clients uploading at once toward a reader that falls behind: what they
    # may have in flight is the sum of the windows, and a queue in front of the
    # reader (a TUN device's) that is smaller loses packets at its tail. With the
    # budget, the sum stays within it (a new flow gets what is left, or its floor).
    budget = 3_000_000
    stack = Stack(StackConfig(tcp=TcpConfig(rcv_window_budget=budget)))
    windows = _open_flows(stack, range(40000, 40200))
    floor = 4 * 1460
    assert windows[:45] == [65535] * 45  # 45 * 65536 fit
    assert windows[45] == budget - 45 * 65536
    assert windows[46:] == [floor] * 154
    assert sum(windows) <= budget + 154 * floor
    # Without one, the windows add up to 200 full initial windows (13 MB).
    assert _open_flows(Stack(StackConfig()), range(40000, 40200)) == [65535] * 200


def test_receive_buffer_grows_only_within_the_window_budget() -> None:
    windows = MemoryBudget(200_000)
    c, _ = _conn(MemoryBudget(1 << 30), rcv_budget=windows)
    send(c, replace(TEMPLATE, options=TcpOptions(timestamps=(PEER_TS, 0))), 0.0)
    grown = _fill_rounds(c, 8, 1.0)
    assert grown[0] == 65536 and grown[-1] == 200_000 - 200_000 % 128, grown
    assert c.buf.rcv == windows.used == 200_000
    # The same connection without the window budget grows past it.
    free, _ = _conn(MemoryBudget(1 << 30))
    send(free, replace(TEMPLATE, options=TcpOptions(timestamps=(PEER_TS, 0))), 0.0)
    assert _fill_rounds(free, 8, 1.0)[-1] >= 1 << 20
    c.abort()
    assert windows.used == 0  # closing gives the window budget back


def test_receive_buffers_shrink_while_the_window_budget_is_over_committed() -> None:
    windows = MemoryBudget(100_000)
    c, _ = _conn(MemoryBudget(1 << 30), rcv_budget=windows)  # 65536 of it
    send(c, replace(TEMPLATE, options=TcpOptions(timestamps=(PEER_TS, 0))), 0.0)
    right = c.rcv_adv
    d, syn_d = _conn(MemoryBudget(1 << 30), rcv_budget=windows)  # the rest: 34464
    e, syn_e = _conn(MemoryBudget(1 << 30), rcv_budget=windows)  # its floor, forced
    assert (syn_d.window, syn_e.window) == (34_464, 5840)
    assert windows.over
    _tick_rounds(c, 4, right)
    assert c.buf.rcv == 32_768 and not windows.over  # halved once, then within it
    for conn in (c, d, e):
        conn.abort()
    assert windows.used == 0


def test_window_budget_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="rcv_window_budget"):
        TcpConfig(rcv_window_budget=-1)


# ------------------------------------------------------------- timestamps


def test_timestamps_are_echoed_on_every_segment() -> None:
    c = established(options=ALL_OPTIONS)
    send(c, data(0, b"abc", ts=PEER_TS + 10), 0.1)
    c.send(b"xyz")
    (s,) = recv(c, 0.12)
    assert s.payload == b"xyz"
    assert s.options == TcpOptions(timestamps=(tsval(0.12), PEER_TS + 10))


def test_rtt_sample_from_every_ack_that_advances() -> None:
    c = established(options=ALL_OPTIONS, rtt=0.1)
    assert c._rtt.srtt == pytest.approx(0.1)
    c.send(bytes(3 * 1448))
    assert len(recv(c, 1.0)) == 3
    stamp = TcpOptions(timestamps=(PEER_TS, tsval(1.0)))
    send(c, replace(TEMPLATE, ack=ISS + 1 + 1448, options=stamp), 1.3)
    # RFC 7323 Appendix G: 4344 bytes in flight, 2 expected samples: alpha 1/16.
    srtt = 0.1 * 15 / 16 + 0.3 / 16
    assert c._rtt.srtt == pytest.approx(srtt)
    send(c, replace(TEMPLATE, ack=ISS + 1 + 1448, options=stamp), 1.32)  # a duplicate
    assert c._rtt.srtt == pytest.approx(srtt)  # does not advance: no sample
    send(c, replace(TEMPLATE, ack=ISS + 1 + 3 * 1448, options=stamp), 1.35)
    assert c._rtt.srtt == pytest.approx(srtt * 7 / 8 + 0.35 / 8)


def test_rtt_sample_from_a_retransmission() -> None:
    # With timestamps the echo says which transmission is acknowledged, so
    # Karn's rule is not needed (RFC 7323 4.1).
    c = established(options=ALL_OPTIONS, rtt=0.1)
    c.send(b"abc")
    recv(c, 0.0)
    t = c.get_timer()
    assert t is not None
    c.handle_timer(t)
    (rtx,) = recv(c, t)
    assert rtx.options.timestamps == (tsval(t), PEER_TS)
    send(c, replace(TEMPLATE, ack=ISS + 4, options=TcpOptions(timestamps=(PEER_TS, tsval(t)))),
         t + 0.2)  # fmt: skip
    assert c._rtt.srtt == pytest.approx(0.1 * 7 / 8 + 0.2 / 8)


def test_paws_drops_an_old_timestamp_with_an_ack() -> None:
    c = established(options=ALL_OPTIONS)
    send(c, data(0, b"new", ts=PEER_TS + 5), 0.1)
    assert c.ts is not None and c.ts.recent == PEER_TS + 5
    drain(c)
    recv(c, 0.1)
    send(c, data(3, b"old", ts=PEER_TS + 4), 0.2)  # in window, but an older TSval
    assert recv(c, 0.2) == [
        replace(REPLY, ack=IRS + 4, window=512,
                options=TcpOptions(timestamps=(tsval(0.2), PEER_TS + 5)))
    ]  # fmt: skip
    assert c.rcv_nxt == IRS + 4
    assert drain(c) == []


def test_paws_does_not_apply_to_rst() -> None:
    c = established(options=ALL_OPTIONS)
    rst = replace(TEMPLATE, flags=RST, options=TcpOptions(timestamps=(PEER_TS - 100, 0)))
    send(c, rst, 0.1)
    assert c.state is State.CLOSED
    assert drain(c) == [ConnectionReset(FLOW), Closed(FLOW, CloseReason.RESET)]


def test_paws_compares_modulo_2_32_and_expires_after_24_days() -> None:
    c = established(options=ALL_OPTIONS._replace(timestamps=(M - 10, 0)))
    assert c.ts is not None
    c.ts.recent = M - 10
    send(c, data(0, b"a", ts=5), 0.1)  # 5 is newer than 2**32 - 10
    assert c.rcv_nxt == IRS + 2 and c.ts.recent == 5
    c.handle_timer(0.14)
    recv(c, 0.14)  # the delayed ACK
    send(c, data(1, b"b", ts=M - 20), 0.2)  # older: dropped
    assert c.rcv_nxt == IRS + 2
    recv(c, 0.2)
    # RFC 7323 5.5: after 24 days of silence TS.Recent is no longer valid.
    later = 0.1 + PAWS_IDLE + 1
    send(c, data(1, b"b", ts=M - 20), later)
    assert c.rcv_nxt == IRS + 3 and c.ts.recent == M - 20


def test_segment_without_timestamps_is_processed() -> None:
    c = established(options=ALL_OPTIONS)
    send(c, data(0, b"plain"), 0.1)  # no TSopt: accepted (Linux, FreeBSD)
    assert drain(c) == [DataReceived(FLOW, b"plain")]
    assert c.ts is not None and c.ts.recent == PEER_TS


def test_ts_recent_comes_from_the_segment_a_delayed_ack_acknowledges() -> None:
    # RFC 7323 4.3: TS.Recent is updated only by a segment at or before the last
    # ACK sent, so a delayed ACK echoes the earliest unacknowledged segment.
    c = established(options=ALL_OPTIONS)
    send(c, data(0, b"a", ts=PEER_TS + 1), 0.1)
    send(c, data(1, b"b", ts=PEER_TS + 2), 0.11)  # beyond Last.ACK.sent: no update
    assert c.ts is not None and c.ts.recent == PEER_TS + 1
    (ack,) = recv(c, 0.11)
    assert ack.options.timestamps == (tsval(0.11), PEER_TS + 1)
    send(c, data(2, b"c", ts=PEER_TS + 3), 0.2)  # at Last.ACK.sent now
    assert c.ts.recent == PEER_TS + 3


def test_out_of_order_segment_does_not_update_ts_recent() -> None:
    c = established(options=ALL_OPTIONS)
    send(c, data(100, b"later", ts=PEER_TS + 9), 0.1)
    assert c.ts is not None and c.ts.recent == PEER_TS
    (ack,) = recv(c, 0.1)
    assert ack.options.timestamps == (tsval(0.1), PEER_TS)
    assert ack.options.sack_blocks == ((IRS + 101, IRS + 106),)


def test_rst_carries_no_timestamps() -> None:
    c = established(options=ALL_OPTIONS)
    c.abort()
    (rst,) = recv(c, 0.1)
    assert rst.flags == RST | ACK and rst.options == TcpOptions()
    recv_nothing(c, 0.2)
