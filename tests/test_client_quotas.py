"""Per-client quotas (stack.clients) through a whole Stack, and their parts."""

from __future__ import annotations

import ipaddress

from stack import (
    ClientQuotas,
    Closed,
    CloseReason,
    ConnectionRequest,
    DatagramConfig,
    DatagramFlowOpened,
    Stack,
    StackConfig,
)
from stack.clients import (
    CONNECT_RATE,
    CONNECT_RATE_ALL,
    DESTINATION,
    ECHO_FLOWS,
    FRAGMENTS,
    PENDING,
    TCP_FLOWS,
    UDP_FLOWS,
    ClientBudget,
    TokenBucket,
    client_key,
    describe_client,
)
from stack.fragments import fragment
from stack.tcp.buffers import MemoryBudget
from stack.wire.icmp import build_echo
from stack.wire.tcp import ACK, RST, SYN
from stack.wire.udp import build_udp_packet

from packets import S4, sent_tcp, stack_events, tcp_packet


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


A, B = ip("198.18.1.2"), ip("198.18.1.3")


def syn(src: bytes = A, sport: int = 40000, dst: bytes = S4, dport: int = 80) -> bytes:
    return tcp_packet(1000, 0, SYN, src=src, dst=dst, sport=sport, dport=dport)


def requests(stack: Stack) -> list[ConnectionRequest]:
    return [e for e in stack_events(stack) if isinstance(e, ConnectionRequest)]


def refused(stack: Stack, reason: str) -> int:
    return stack.stats.clients.refused[reason]


# --- client keys and buckets ---------------------------------------------------------


def test_an_ipv4_client_is_its_address_and_an_ipv6_client_its_64() -> None:
    assert client_key(A) == A and client_key(A) != client_key(B)
    one, two = ip("fd00:1::2"), ip("fd00:1::ffff:1234")
    other = ip("fd00:1:0:1::2")
    assert client_key(one) == client_key(two) != client_key(other)
    assert describe_client(client_key(two)) == "fd00:1::/64"
    assert describe_client(client_key(A)) == "198.18.1.2"


def test_other_ipv6_prefix_lengths_group_on_bit_boundaries() -> None:
    # /60: fd00:1:0:10:: and fd00:1:0:1f:: share their first 60 bits, :20: does not.
    a, b, c = ip("fd00:1:0:10::1"), ip("fd00:1:0:1f::1"), ip("fd00:1:0:20::1")
    assert client_key(a, 60) == client_key(b, 60) != client_key(c, 60)
    assert describe_client(client_key(b, 60), 60) == "fd00:1:0:10::/60"
    # /48 (whole bytes) and /128 (one address)
    assert client_key(a, 48) == client_key(c, 48)
    assert client_key(a, 128) != client_key(ip("fd00:1:0:10::2"), 128)
    assert len(client_key(ip("::"), 32)) != 4  # never mistaken for an IPv4 client


def test_a_token_bucket_gives_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=5)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(0.05) is False  # half a token
    assert bucket.take(0.1) is True
    assert sum(bucket.take(100.0) for _ in range(20)) == 5  # never above the burst


def test_a_client_budget_grants_what_fits_both_it_and_the_stack() -> None:
    stack_budget = MemoryBudget(1000)
    mine, theirs = ClientBudget(300, stack_budget), ClientBudget(900, stack_budget)
    assert mine.reserve(500) == 300 and mine.reserve(1) == 0
    assert theirs.reserve(900) == 700  # the stack's budget is the tighter one now
    mine.release(300)
    assert stack_budget.used == 700 and theirs.reserve(100) == 100
    mine.force(400)
    assert mine.over and theirs.over  # the stack is over-committed: both shrink


# --- TCP --------------------------------------------------------------------------------


def test_past_its_tcp_flow_quota_a_client_gets_rst_and_others_are_served() -> None:
    stack = Stack(StackConfig(clients=ClientQuotas(tcp_flows=3)))
    for port in range(5):
        stack.receive(syn(sport=1000 + port), 0.0)
    assert len(requests(stack)) == 3
    rsts = sent_tcp(stack)
    assert [(p.tcp.flags, p.tcp.dst_port) for p in rsts] == [(RST | ACK, 1003), (RST | ACK, 1004)]
    assert rsts[0].tcp.ack == 1001  # RFC 9293 3.10.7.1: the SYN acknowledged
    assert refused(stack, TCP_FLOWS) == 2
    stack.receive(syn(src=B), 0.0)
    assert len(requests(stack)) == 1
    assert stack.top_refused_clients() == [("198.18.1.2", 2)]


def test_at_its_pending_quota_a_client_loses_its_own_oldest_request() -> None:
    stack = Stack(StackConfig(clients=ClientQuotas(pending=2)))
    for port in (1, 2, 3):
        stack.receive(syn(sport=port), 0.0)
    events = stack_events(stack)
    flows = [e.flow for e in events if isinstance(e, ConnectionRequest)]
    assert [f.client_port for f in flows] == [1, 2, 3]
    assert Closed(flows[0], CloseReason.REJECTED) in events  # the relay drops its connect
    (rst,) = sent_tcp(stack)
    assert (rst.tcp.flags, rst.tcp.dst_port) == (RST | ACK, 1)
    assert refused(stack, PENDING) == 1
    assert stack.state_of(flows[0]) is None and stack.state_of(flows[2]) is not None
    stack.receive(syn(src=B), 0.0)  # another client's request evicts nothing
    assert len(requests(stack)) == 1 and refused(stack, PENDING) == 1
    # Accepted requests no longer count as pending.
    stack.accept(flows[1], isn=1)
    stack.accept(flows[2], isn=1)
    for port in (4, 5):
        stack.receive(syn(sport=port), 0.0)
    assert refused(stack, PENDING) == 1


def test_new_connections_per_client_are_a_token_bucket_and_dropped_silently() -> None:
    quotas = ClientQuotas(connects_per_second=10.0, connect_burst=4)
    stack = Stack(StackConfig(clients=quotas))
    for port in range(10):
        stack.receive(syn(sport=port), 0.0)
    assert len(requests(stack)) == 4
    assert sent_tcp(stack) == []  # silence: the client's SYN retransmission retries
    assert refused(stack, CONNECT_RATE) == 6
    stack.receive(syn(src=B), 0.0)  # another client has its own bucket
    stack.receive(syn(sport=5), 0.1)  # the retransmitted SYN, a token later
    assert len(requests(stack)) == 2


def test_a_client_refused_at_once_upstream_keeps_its_bucket_between_syns() -> None:
    # Each request is rejected before the next SYN (a port that refuses), so the
    # client holds nothing in between: its bucket must not start full each time.
    quotas = ClientQuotas(connects_per_second=1.0, connect_burst=3)
    stack = Stack(StackConfig(clients=quotas))
    admitted = 0
    for port in range(10):
        stack.receive(syn(sport=port), 0.0)
        for req in requests(stack):
            admitted += 1
            stack.reject(req.flow)
    assert admitted == 3 and refused(stack, CONNECT_RATE) == 7
    assert stack.stats.clients.clients == 0  # the entry went; the bucket was kept aside


def test_new_connections_of_all_clients_are_bounded_too() -> None:
    stack = Stack(StackConfig(connects_per_second=100.0, connect_burst=5))
    for i in range(10):
        stack.receive(syn(src=ip(f"198.18.1.{10 + i}")), 0.0)
    assert len(requests(stack)) == 5
    assert refused(stack, CONNECT_RATE_ALL) == 5
    assert len(stack._clients) == 5  # white-box: refused clients hold no entry


def test_a_silent_destination_holds_only_its_share_of_pending_requests() -> None:
    stack = Stack(StackConfig(max_pending_per_destination=3))
    silent, other = ip("198.18.2.9"), ip("198.18.2.2")
    for i in range(6):
        stack.receive(syn(src=ip(f"198.18.1.{10 + i}"), dst=silent), 0.0)
    assert len(requests(stack)) == 3 and refused(stack, DESTINATION) == 3
    stack.receive(syn(src=B, dst=other), 0.0)
    [req] = requests(stack)
    assert req.flow.server_ip == "198.18.2.2"
    # The refused SYNs took no connection tokens: a flood of them cannot starve others.
    assert stack._connects.tokens == StackConfig().connect_burst - 4


def test_entries_go_when_clients_hold_nothing() -> None:
    stack = Stack()
    stack.receive(syn(), 0.0)
    [req] = requests(stack)
    assert stack.stats.clients.clients == 1
    stack.reject(req.flow)
    assert stack.stats.clients.clients == 0


def test_the_top_clients_table_stays_bounded_and_keeps_the_heavy_hitter() -> None:
    stack = Stack(StackConfig(clients=ClientQuotas(tcp_flows=1, top=4)))
    for i in range(200):
        stack.receive(syn(src=ip(f"198.18.3.{i}"), sport=1), 0.0)
        stack.receive(syn(src=ip(f"198.18.3.{i}"), sport=2), 0.0)  # one refusal each
        stack.receive(syn(sport=100 + i), 0.0)  # the heavy client: 199 refusals
    top = stack.top_refused_clients(10)
    assert len(top) == 4
    assert top[0][0] == "198.18.1.2" and top[0][1] >= 199


# --- SYN-RECEIVED bound -------------------------------------------------------------------


def test_an_unanswered_syn_ack_is_dropped_after_synrecv_timeout() -> None:
    stack = Stack()  # TcpConfig.synrecv_timeout: 5 s
    stack.receive(syn(), 0.0)
    [req] = requests(stack)
    stack.accept(req.flow, isn=7)
    stack.packets_to_send(0.0)  # the SYN-ACK, at t=0
    t = 0.0
    while (deadline := stack.get_timer()) is not None and deadline < 5.0:
        t = deadline
        stack.handle_timer(t)
        stack.packets_to_send(t)  # SYN-ACK retransmissions (1 s, 3 s)
    assert stack.get_timer() == 5.0
    stack.handle_timer(5.0)
    assert stack_events(stack) == [Closed(req.flow, CloseReason.TIMED_OUT)]
    assert sent_tcp(stack, 5.0) == []  # silently, as Linux drops the request
    assert len(stack) == 0 and stack.stats.clients.clients == 0


def test_a_completed_handshake_is_not_cut_by_the_synrecv_bound() -> None:
    stack = Stack()
    stack.receive(syn(), 0.0)
    [req] = requests(stack)
    stack.accept(req.flow, isn=7)
    stack.packets_to_send(0.0)
    stack.receive(tcp_packet(1001, 8, ACK), 4.0)
    stack_events(stack)
    stack.handle_timer(10.0)
    stack.packets_to_send(10.0)
    assert stack.state_of(req.flow) is not None
    assert stack_events(stack) == []


# --- UDP, echo, fragments -----------------------------------------------------------------


def test_udp_flows_from_many_addresses_of_one_64_share_one_quota() -> None:
    stack = Stack(StackConfig(clients=ClientQuotas(udp_flows=5)))
    server = ip("fd00:2::2")
    for i in range(20):
        src = ip(f"fd00:1::{i + 1:x}")
        stack.receive(build_udp_packet(src, server, 40000, 53, b"q"), 0.0)
    opened = [e for e in stack_events(stack) if isinstance(e, DatagramFlowOpened)]
    assert len(opened) == 5 and refused(stack, UDP_FLOWS) == 15
    assert sent_tcp(stack) == [] and stack.packets_to_send(0.0) == []  # dropped silently
    stack.receive(build_udp_packet(ip("fd00:1:0:1::1"), server, 40000, 53, b"q"), 0.0)
    assert stack.datagram_flows == 6  # the next /64 is another client


def test_echo_flows_have_their_own_quota() -> None:
    stack = Stack(StackConfig(clients=ClientQuotas(echo_flows=2)))
    for ident in range(4):
        stack.receive(build_echo(A, S4, ident=ident, seq=1, payload=b"p", reply=False), 0.0)
    assert stack.datagram_flows == 2 and refused(stack, ECHO_FLOWS) == 2
    stack.receive(build_udp_packet(A, S4, 40000, 53, b"q"), 0.0)
    assert stack.datagram_flows == 3


def test_a_client_holds_only_its_share_of_the_fragment_pool() -> None:
    quotas = ClientQuotas(fragment_bytes=3000)
    stack = Stack(StackConfig(clients=quotas, datagram=DatagramConfig()))
    big = build_udp_packet(A, S4, 40000, 5000, b"x" * 2000)
    for ident in range(4):  # each datagram leaves its first 1480 bytes held
        first = fragment(big, 1500, ident)[0]
        stack.receive(first, 0.0)
    assert stack._fragments.held_bytes == 2 * 1480  # white-box
    assert refused(stack, FRAGMENTS) == 2
    assert stack.stats.reassembly.client_quota == 2
    pieces = fragment(build_udp_packet(B, S4, 40000, 5000, b"y" * 2000), 1500, 99)
    for piece in pieces:  # another client reassembles in full
        stack.receive(piece, 0.0)
    assert stack.stats.reassembly.reassembled == 1
