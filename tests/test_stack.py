"""Packet-level tests of the Stack: raw IP packets in, packets and events out."""

from __future__ import annotations

import ipaddress

import pytest

from stack import (
    ClientQuotas,
    Closed,
    CloseReason,
    Connected,
    ConnectionRequest,
    DataReceived,
    FlowId,
    PeerFinished,
    Reject,
    Stack,
    StackConfig,
    State,
    TcpConfig,
    Unreachable,
)
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, encode_options

from packets import (
    C4,
    C6,
    CLIENT_ISN,
    CPORT,
    S4,
    S6,
    SERVER_ISN,
    SPORT,
    open_tcp_flow,
    parse_icmp_packet,
    request_tcp_flow,
    sent_tcp,
    stack_events,
    tcp_packet,
)


@pytest.mark.parametrize(("src", "dst", "version"), [(C4, S4, 4), (C6, S6, 6)])
def test_syn_to_any_address_is_a_connection_request(src: bytes, dst: bytes, version: int) -> None:
    stack = Stack()
    opts = encode_options(mss=1400, sack_permitted=True)
    stack.receive(tcp_packet(CLIENT_ISN, 0, SYN, src=src, dst=dst, options=opts), 0.0)
    (ev,) = stack_events(stack)
    assert isinstance(ev, ConnectionRequest)
    assert ev.flow == FlowId(
        version,
        str(ipaddress.ip_address(src)),
        CPORT,
        str(ipaddress.ip_address(dst)),
        SPORT,
    )
    assert ev.options.mss == 1400
    assert ev.options.sack_permitted
    assert sent_tcp(stack) == []  # nothing until the caller decides


def test_syn_retransmitted_while_undecided_is_absorbed() -> None:
    stack = Stack()
    flow = request_tcp_flow(stack)
    stack.receive(tcp_packet(CLIENT_ISN, 0, SYN, options=encode_options(mss=1460)), 1.0)
    assert stack_events(stack) == []
    assert sent_tcp(stack, 1.0) == []
    assert stack.state_of(flow) is State.LISTEN


@pytest.mark.parametrize(("src", "dst", "mss"), [(C4, S4, 1460), (C6, S6, 1440)])
def test_accept_sends_syn_ack_from_the_original_destination(
    src: bytes, dst: bytes, mss: int
) -> None:
    stack = Stack()
    flow = request_tcp_flow(stack, src=src, dst=dst)
    stack.accept(flow, isn=SERVER_ISN)
    (p,) = sent_tcp(stack)
    assert (p.src, p.dst) == (dst, src)
    assert (p.tcp.src_port, p.tcp.dst_port) == (SPORT, CPORT)
    assert (p.tcp.seq, p.tcp.ack, p.tcp.flags) == (SERVER_ISN, CLIENT_ISN + 1, SYN | ACK)
    assert p.tcp.options.mss == mss
    stack.receive(tcp_packet(CLIENT_ISN + 1, SERVER_ISN + 1, src=src, dst=dst), 0.01)
    assert stack_events(stack) == [Connected(flow)]
    assert stack.state_of(flow) is State.ESTABLISHED


def test_syn_ack_is_retransmitted_on_timeout() -> None:
    stack = Stack()
    flow = request_tcp_flow(stack)
    stack.accept(flow, isn=SERVER_ISN)
    assert len(sent_tcp(stack)) == 1
    assert stack.get_timer() == pytest.approx(1.0)  # RFC 6298 2.1 initial RTO
    stack.handle_timer(0.5)
    assert sent_tcp(stack, 0.5) == []
    stack.handle_timer(1.0)
    (p,) = sent_tcp(stack, 1.0)
    assert p.tcp.flags == SYN | ACK and p.tcp.seq == SERVER_ISN
    assert stack.get_timer() == pytest.approx(3.0)  # backed off to 2 s


def test_reject_with_rst() -> None:
    stack = Stack()
    flow = request_tcp_flow(stack)
    stack.reject(flow, Reject.RST)
    (p,) = sent_tcp(stack)
    assert (p.tcp.seq, p.tcp.ack, p.tcp.flags) == (0, CLIENT_ISN + 1, RST | ACK)
    assert stack_events(stack) == [Closed(flow, CloseReason.REJECTED)]
    assert len(stack) == 0


@pytest.mark.parametrize(
    ("src", "dst", "why", "icmp_type", "code"),
    [
        (C4, S4, Unreachable.HOST, 3, 1),
        (C4, S4, Unreachable.NET, 3, 0),
        (C4, S4, Unreachable.ADMIN, 3, 13),
        (C6, S6, Unreachable.HOST, 1, 3),
        (C6, S6, Unreachable.NET, 1, 0),
        (C6, S6, Unreachable.PORT, 1, 4),
    ],
)
def test_reject_with_icmp_unreachable(
    src: bytes, dst: bytes, why: Unreachable, icmp_type: int, code: int
) -> None:
    stack = Stack()
    flow = request_tcp_flow(stack, src=src, dst=dst)
    stack.reject(flow, Reject.ICMP, unreachable=why)
    (packet,) = stack.packets_to_send(0.0)
    ip, icmp = parse_icmp_packet(packet)
    assert (ip.src, ip.dst) == (dst, src)
    assert (icmp.type, icmp.code) == (icmp_type, code)
    # The quote is the client's SYN: its addresses and then its ports.
    quoted = packet[ip.offset + 8 : ip.end]
    hlen = 20 if len(src) == 4 else 40
    assert quoted[0] >> 4 == (4 if len(src) == 4 else 6)
    assert src in quoted[:hlen] and dst in quoted[:hlen]
    assert quoted[hlen : hlen + 4] == CPORT.to_bytes(2, "big") + SPORT.to_bytes(2, "big")
    assert stack_events(stack) == [Closed(flow, CloseReason.REJECTED)]


def test_reject_silently_sends_nothing() -> None:
    stack = Stack()
    flow = request_tcp_flow(stack)
    stack.reject(flow, Reject.SILENT)
    assert stack.packets_to_send(0.0) == []
    assert stack_events(stack) == [Closed(flow, CloseReason.REJECTED)]


def test_segment_for_no_connection_is_answered_with_rst() -> None:
    stack = Stack()
    stack.receive(tcp_packet(7, 1234, ACK, b"data"), 0.0)
    (p,) = sent_tcp(stack)
    assert (p.tcp.seq, p.tcp.flags) == (1234, RST)  # RFC 9293 3.10.7.1, ACK set
    stack.receive(tcp_packet(7, 0, FIN), 0.0)
    (p,) = sent_tcp(stack)
    assert (p.tcp.seq, p.tcp.ack, p.tcp.flags) == (0, 8, RST | ACK)  # no ACK: ack = seq + len
    stack.receive(tcp_packet(7, 0, RST), 0.0)
    assert sent_tcp(stack) == []  # never answer an RST
    assert stack.stats.rst_sent == 2
    assert stack_events(stack) == []


def test_data_both_ways_and_orderly_close() -> None:
    stack = Stack()
    flow = open_tcp_flow(stack)
    stack.receive(tcp_packet(CLIENT_ISN + 1, SERVER_ISN + 1, ACK | PSH, b"hello"), 0.1)
    assert stack_events(stack) == [DataReceived(flow, b"hello")]
    stack.consumed(flow, 5)
    assert stack.send(flow, b"world") == 5
    (p,) = sent_tcp(stack, 0.1)
    assert (p.tcp.seq, p.tcp.ack, p.payload) == (SERVER_ISN + 1, CLIENT_ISN + 6, b"world")
    stack.receive(tcp_packet(CLIENT_ISN + 6, SERVER_ISN + 6, ACK | FIN), 0.2)
    assert stack_events(stack) == [PeerFinished(flow)]
    assert sent_tcp(stack, 0.2) == []  # its ACK waits: our FIN carries it
    stack.close(flow)
    (p,) = sent_tcp(stack, 0.2)
    assert p.tcp.flags & FIN and p.tcp.seq == SERVER_ISN + 6 and p.tcp.ack == CLIENT_ISN + 7
    stack.receive(tcp_packet(CLIENT_ISN + 7, SERVER_ISN + 7, ACK), 0.3)
    assert stack_events(stack) == [Closed(flow, CloseReason.FINISHED)]
    assert len(stack) == 0
    assert stack.get_timer() is None


def test_the_fin_of_a_client_that_closes_first_is_acked_by_the_stacks_timer() -> None:
    # Its ACK waits for the delayed-ACK time (our FIN usually carries it); when the
    # relay does not close, the Stack's timer heap must still send it then.
    stack = Stack()
    flow = open_tcp_flow(stack)
    stack.receive(tcp_packet(CLIENT_ISN + 1, SERVER_ISN + 1, ACK | FIN), 0.2)
    assert stack_events(stack) == [PeerFinished(flow)]
    assert sent_tcp(stack, 0.2) == []
    deadline = stack.get_timer()
    assert deadline is not None and deadline <= 0.2 + TcpConfig().delayed_ack
    stack.handle_timer(deadline)
    (p,) = sent_tcp(stack, deadline)
    assert p.tcp.flags == ACK and p.tcp.ack == CLIENT_ISN + 2


def test_packet_counts_follow_the_connection_and_outlive_it() -> None:
    stack = Stack()
    flow = request_tcp_flow(stack)
    stack.receive(tcp_packet(CLIENT_ISN, 0, SYN, options=encode_options(mss=1460)), 0.0)
    counts = stack.packet_counts(flow)
    assert counts is not None
    assert (counts.received, counts.sent) == (2, 0)  # the SYN and its retransmission
    stack.accept(flow, isn=SERVER_ISN)
    assert len(sent_tcp(stack)) == 1 and (counts.received, counts.sent) == (2, 1)
    stack.receive(tcp_packet(CLIENT_ISN + 1, SERVER_ISN + 1, ACK), 0.0)
    stack.receive(tcp_packet(CLIENT_ISN + 1, SERVER_ISN + 1, ACK | PSH, b"hello"), 0.1)
    stack_events(stack)
    stack.consumed(flow, 5)
    stack.send(flow, b"world")
    stack.close(flow)
    assert len(sent_tcp(stack, 0.1)) == 1  # data and FIN in one segment
    stack.receive(tcp_packet(CLIENT_ISN + 6, SERVER_ISN + 7, ACK | FIN), 0.2)
    sent_tcp(stack, 0.2)  # the last ACK, from TIME-WAIT
    assert stack.packet_counts(flow) is None  # gone...
    assert (counts.received, counts.sent) == (5, 3)  # ...with its final counts


def test_packet_counts_of_a_refused_connection() -> None:
    stack = Stack()
    flow = request_tcp_flow(stack)
    counts = stack.packet_counts(flow)
    stack.reject(flow, Reject.RST)
    assert len(sent_tcp(stack)) == 1
    assert counts is not None and (counts.received, counts.sent) == (1, 1)


def test_abort_sends_rst_and_forgets_the_flow() -> None:
    stack = Stack()
    flow = open_tcp_flow(stack)
    stack.abort(flow)
    (p,) = sent_tcp(stack)
    assert p.tcp.flags == RST | ACK and p.tcp.seq == SERVER_ISN + 1
    assert stack_events(stack) == [Closed(flow, CloseReason.ABORTED)]
    assert len(stack) == 0
    assert stack.send(flow, b"late") == 0  # calls on a gone flow are ignored


def test_client_rst_resets_the_flow() -> None:
    stack = Stack()
    flow = open_tcp_flow(stack)
    stack.receive(tcp_packet(CLIENT_ISN + 1, 0, RST), 0.1)
    evs = stack_events(stack)
    assert [type(e).__name__ for e in evs] == ["ConnectionReset", "Closed"]
    assert evs[-1] == Closed(flow, CloseReason.RESET)
    assert len(stack) == 0


def _server_closes_first(stack: Stack) -> FlowId:
    flow = open_tcp_flow(stack)
    stack.close(flow)  # server closes first: the stack ends in TIME-WAIT
    (fin,) = sent_tcp(stack)
    assert fin.tcp.flags & FIN
    stack.receive(tcp_packet(CLIENT_ISN + 1, SERVER_ISN + 2, ACK | FIN), 0.1)
    (ack,) = sent_tcp(stack, 0.1)  # the ACK of the client's FIN is still sent
    assert (ack.tcp.seq, ack.tcp.ack, ack.tcp.flags) == (SERVER_ISN + 2, CLIENT_ISN + 2, ACK)
    return flow


def test_time_wait_reports_closed_at_once_and_keeps_the_4_tuple() -> None:
    stack = Stack(StackConfig(tcp=TcpConfig(time_wait=30.0)))
    flow = _server_closes_first(stack)
    # The relay is done with the flow now, not 30 s later.
    assert stack_events(stack)[-1] == Closed(flow, CloseReason.FINISHED)
    assert stack.state_of(flow) is None and len(stack) == 0
    # A repeated FIN (our ACK was lost) is acknowledged again, not reset.
    stack.receive(tcp_packet(CLIENT_ISN + 1, SERVER_ISN + 2, ACK | FIN), 5.0)
    (ack,) = sent_tcp(stack, 5.0)
    assert (ack.tcp.seq, ack.tcp.ack, ack.tcp.flags) == (SERVER_ISN + 2, CLIENT_ISN + 2, ACK)
    # Other segments for the 4-tuple are dropped, RSTs ignored (RFC 1337).
    stack.receive(tcp_packet(CLIENT_ISN + 2, SERVER_ISN + 2, ACK), 6.0)
    stack.receive(tcp_packet(CLIENT_ISN + 2, 0, RST), 6.0)
    assert sent_tcp(stack, 6.0) == [] and stack_events(stack) == []
    # After TIME-WAIT (restarted at 5.0) the 4-tuple is unknown: answered with RST.
    stack.handle_timer(35.1)
    stack.receive(tcp_packet(CLIENT_ISN + 2, SERVER_ISN + 2, ACK), 35.1)
    (rst,) = sent_tcp(stack, 35.1)
    assert rst.tcp.flags == RST


def test_repeated_fins_in_time_wait_refresh_one_entry() -> None:
    # Each repeated FIN is ACKed and restarts the wait, but adds nothing: 10,000
    # of them leave the TIME-WAIT table and the timer heap as the first left them.
    stack = Stack(StackConfig(tcp=TcpConfig(time_wait=30.0)))
    _server_closes_first(stack)
    stack_events(stack)
    fin = tcp_packet(CLIENT_ISN + 1, SERVER_ISN + 2, ACK | FIN)
    stack.receive(fin, 1.0)
    sent_tcp(stack, 1.0)
    tw = stack._time_wait  # white-box: every container the table and the Stack keep

    def sizes() -> list[int]:
        # __slots__ in Python; compiled with mypyc, the attributes are __mypyc_attrs__
        names = getattr(tw, "__slots__", None) or type(tw).__mypyc_attrs__  # type: ignore[attr-defined]
        held = [getattr(tw, name) for name in names]
        return [len(x) for x in held if hasattr(x, "__len__")] + [len(stack._timers)]

    before = sizes()
    now = 1.0
    for _ in range(10_000):
        now += 0.001
        stack.receive(fin, now)
        assert len(sent_tcp(stack, now)) == 1  # the ACK again
    assert sizes() == before
    stack.handle_timer(now + 29.9)  # restarted by the last FIN: still there
    assert len(stack._time_wait) == 1
    stack.handle_timer(now + 30.0)
    assert len(stack._time_wait) == 0


def test_time_wait_4_tuple_is_reused_by_a_newer_syn() -> None:
    stack = Stack(StackConfig(tcp=TcpConfig(time_wait=30.0)))
    flow = _server_closes_first(stack)
    stack_events(stack)
    stack.receive(tcp_packet(CLIENT_ISN, 0, SYN, options=encode_options(mss=1460)), 0.2)
    assert stack_events(stack) == []  # an old SYN is not a new connection
    stack.receive(tcp_packet(CLIENT_ISN + 100_000, 0, SYN, options=encode_options(mss=1460)), 0.3)
    (ev,) = stack_events(stack)
    assert isinstance(ev, ConnectionRequest) and ev.flow == flow
    assert stack.state_of(flow) is State.LISTEN


def test_time_wait_table_is_bounded() -> None:
    stack = Stack(StackConfig(max_time_wait=3))
    for port in range(5000, 5010):
        stack.receive(tcp_packet(CLIENT_ISN, 0, SYN, sport=port), 0.0)
        (ev,) = [e for e in stack_events(stack) if isinstance(e, ConnectionRequest)]
        stack.accept(ev.flow, isn=SERVER_ISN)
        sent_tcp(stack)  # the SYN-ACK
        stack.receive(tcp_packet(CLIENT_ISN + 1, SERVER_ISN + 1, sport=port), 0.0)
        stack.close(ev.flow)
        sent_tcp(stack)  # the FIN
        stack.receive(tcp_packet(CLIENT_ISN + 1, SERVER_ISN + 2, ACK | FIN, sport=port), 0.0)
    assert len(stack._time_wait) == 3  # white-box: the oldest entries were evicted


def test_pending_and_flow_limits_drop_syns() -> None:
    stack = Stack(StackConfig(max_pending=3, max_flows=5))
    for port in range(1000, 1010):
        stack.receive(tcp_packet(1, 0, SYN, sport=port), 0.0)
    reqs = [e for e in stack_events(stack) if isinstance(e, ConnectionRequest)]
    assert len(reqs) == 3
    assert stack.stats.syn_dropped == 7
    for r in reqs:
        stack.accept(r.flow, isn=1)
    for port in range(2000, 2010):
        stack.receive(tcp_packet(1, 0, SYN, sport=port), 0.0)
    assert len([e for e in stack_events(stack) if isinstance(e, ConnectionRequest)]) == 2
    assert len(stack) == 5


def test_malformed_packets_are_counted_and_dropped() -> None:
    stack = Stack()
    good = tcp_packet(1, 0, SYN)
    bad_sum = bytearray(good)
    bad_sum[-1] ^= 0xFF  # flips a byte the TCP checksum covers
    stack.receive(bytes(bad_sum), 0.0)
    stack.receive(good[:30], 0.0)
    stack.receive(b"", 0.0)
    stack.receive(b"\x45" + bytes(50), 0.0)
    assert stack.stats.checksum_errors == 1
    assert stack.stats.parse_errors == 3
    assert stack_events(stack) == [] and sent_tcp(stack) == []


def test_many_flows_are_demultiplexed_by_4_tuple() -> None:
    stack = Stack()
    flows = {}
    for port in range(3000, 3020):
        stack.receive(tcp_packet(CLIENT_ISN, 0, SYN, sport=port), 0.0)
    for ev in stack_events(stack):
        assert isinstance(ev, ConnectionRequest)
        stack.accept(ev.flow, isn=SERVER_ISN)
        flows[ev.flow.client_port] = ev.flow
    sent_tcp(stack)
    for port in flows:
        payload = str(port).encode()
        stack.receive(
            tcp_packet(CLIENT_ISN + 1, SERVER_ISN + 1, ACK | PSH, payload, sport=port), 0.0
        )
    data = {e.flow.client_port: e.data for e in stack_events(stack) if isinstance(e, DataReceived)}
    assert data == {port: str(port).encode() for port in flows}


def test_a_long_lived_interactive_connection_leaves_no_timers_behind() -> None:
    # One request a second, answered and ACKed, keepalive on (as the service runs):
    # after every exchange the connection's deadline jumps 2 h ahead (keepalive)
    # and back. The heap once kept every such 2 h entry until it came due.
    stack = Stack(StackConfig(tcp=TcpConfig(keepalive=True)))
    flow = open_tcp_flow(stack)
    stack_events(stack)
    cseq, sseq = CLIENT_ISN + 1, SERVER_ISN + 1
    now = 0.0
    for _ in range(2000):
        now += 1.0
        stack.receive(tcp_packet(cseq, sseq, ACK | PSH, b"q" * 64), now)
        cseq += 64
        for ev in stack_events(stack):
            if isinstance(ev, DataReceived):
                stack.consumed(flow, len(ev.data))
        stack.send(flow, b"r" * 64)
        (response,) = sent_tcp(stack, now)
        assert (response.tcp.seq, response.payload) == (sseq, b"r" * 64)
        sseq += 64
        now += 0.001
        stack.receive(tcp_packet(cseq, sseq), now)
        assert sent_tcp(stack, now) == []
        stack.get_timer()
    assert len(stack._timers) <= 64  # the heap itself: uncompacted, 1 entry per exchange
    # The timers still run: the keepalive probe (SEG.SEQ = SND.NXT - 1) 2 h after
    # the last exchange. (Its timer may wake earlier, find recent traffic, re-arm.)
    for _ in range(3):
        deadline = stack.get_timer()
        assert deadline is not None
        stack.handle_timer(deadline)
        if sent := sent_tcp(stack, deadline):
            break
    (probe,) = sent
    assert deadline == pytest.approx(now + 7200.0)
    assert (probe.tcp.seq, probe.tcp.flags, probe.payload) == (sseq - 1, ACK, b"")


def test_flows_share_their_address_objects() -> None:
    # Memory per flow: every flow of a client (and to a server) holds one shared
    # address text, not a copy of its own; the table behind it is bounded.
    lifted = ClientQuotas(connects_per_second=1e9, connect_burst=1 << 30)
    cfg = StackConfig(
        connects_per_second=1e9, connect_burst=1 << 30, clients=lifted,
        max_pending=8192, max_pending_per_destination=8192,
    )  # fmt: skip
    stack = Stack(cfg)
    flows = []
    for port in (40000, 40001):
        stack.receive(tcp_packet(CLIENT_ISN, 0, SYN, sport=port), 0.0)
        (ev,) = stack_events(stack)
        assert isinstance(ev, ConnectionRequest)
        flows.append(ev.flow)
    a, b = flows
    assert a.client_ip == b.client_ip and a.client_ip is b.client_ip
    assert a.server_ip is b.server_ip
    assert len(stack._addresses) == 2
    seen = 0
    for i in range(5000):  # distinct spoofed sources: the table never passes its bound
        src = bytes([198, 18, 100 + i // 250, i % 250])
        stack.receive(tcp_packet(CLIENT_ISN, 0, SYN, src=src), 0.0)
        assert len(stack._addresses) <= 4096
        seen = max(seen, len(stack._addresses))
    assert seen == 4096  # it did fill up


def test_an_idle_connection_holds_no_empty_lists_of_its_own() -> None:
    # Memory per idle connection: the usually empty queues share one empty tuple
    # each, before and after they were used.
    from stack.tcp.core import (
        EMPTY_CHUNKS,
        EMPTY_MARKS,
        EMPTY_SEGMENTS,
        EMPTY_SEQS,
    )
    from stack.tcp.sendbuf import _NO_CHUNKS

    stack = Stack()
    flow = open_tcp_flow(stack)
    conn = stack._by_flow[flow]
    assert conn._ctl is EMPTY_SEGMENTS and conn._rx_pending is EMPTY_CHUNKS
    assert conn._rtx_marks is EMPTY_MARKS
    assert conn._sack_recent is EMPTY_SEQS and conn._sndbuf._chunks is _NO_CHUNKS
    stack.receive(tcp_packet(CLIENT_ISN + 1, SERVER_ISN + 1, ACK | PSH, b"ping"), 1.0)
    assert [type(e) for e in stack_events(stack)] == [DataReceived]
    stack.send(flow, b"pong")
    assert sent_tcp(stack, 1.0)  # the reply (with the ACK)
    assert conn._sndbuf.view(0, 4) == b"pong" and conn._sndbuf._chunks is not _NO_CHUNKS
    stack.receive(tcp_packet(CLIENT_ISN + 5, SERVER_ISN + 5, ACK), 1.1)
    assert conn._ctl is EMPTY_SEGMENTS and conn._rx_pending is EMPTY_CHUNKS
    assert not conn._sndbuf and conn._sndbuf._chunks is _NO_CHUNKS  # shared again


def test_super_segments_are_delivered_as_bytes_in_order_and_out_of_order() -> None:
    # GRO super-segments' payloads reach the connection as views of their packets
    # (Stack.receive); what comes out is bytes, each byte once and in order,
    # whether a segment is in order, held out of order, or partly a duplicate.
    stack = Stack()
    flow = open_tcp_flow(stack)
    data = bytes(range(256)) * 120  # 30,720 bytes
    a, b, c = data[:10_000], data[10_000:20_000], data[20_000:]
    base = CLIENT_ISN + 1

    def packet(offset: int, payload: bytes) -> bytes:
        return tcp_packet(base + offset, SERVER_ISN + 1, ACK, payload)

    stack.receive(packet(0, a), 1.0, csum_ok=True, batch=True)
    stack.receive(packet(20_000, c), 1.0, csum_ok=True, batch=True)  # a hole before it
    stack.end_batch(1.0)
    (first,) = stack_events(stack)
    assert isinstance(first, DataReceived) and type(first.data) is bytes and first.data == a
    # b arrives twice, the second time with 4,000 bytes of a in front of it.
    stack.receive(packet(6_000, data[6_000:20_000]), 1.1, csum_ok=True, batch=True)
    stack.receive(packet(10_000, b), 1.1, csum_ok=True, batch=True)
    stack.end_batch(1.1)
    (second,) = stack_events(stack)
    assert isinstance(second, DataReceived) and type(second.data) is bytes
    assert second.data == b + c and second.flow == flow
    stack.consumed(flow, len(data))
    assert sent_tcp(stack, 1.2)[-1].tcp.ack == base + len(data)
