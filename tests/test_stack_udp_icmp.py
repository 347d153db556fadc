"""UDP and ICMP in the Stack, packet by packet with a fake clock (stack.datagram)."""

from __future__ import annotations

import ipaddress

from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6MLReport2,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RS,
    IPv6,
    IPv6ExtHdrHopByHop,
    RouterAlert,
)

from stack import (
    ClientQuotas,
    DatagramConfig,
    DatagramFlowClosed,
    DatagramFlowOpened,
    DatagramReceived,
    EchoRequest,
    FlowId,
    Stack,
    StackConfig,
    Unreachable,
)
from stack.fragments import Reassembler
from stack.wire import (
    ECHO_REPLY,
    ICMP6_ECHO_REPLY,
    build_echo,
    build_icmp_unreachable,
    build_udp_packet,
    ipv4_header,
    parse_ip,
    parse_udp,
)

from packets import (
    ADDR_TEXT,
    ADDRS,
    S4,
    V4_V6,
    echo_request_packet,
    parse_icmp_packet,
    pseudo_header_sum,
    stack_events,
    udp_packet,
)


def udp_flow(version: int, sport: int = 40000, dport: int = 5000) -> FlowId:
    c, s = ADDR_TEXT[version]
    return FlowId(version, c, sport, s, dport, "udp")


# --- UDP in ---------------------------------------------------------------------------


@V4_V6
def test_first_datagram_opens_a_flow_then_each_is_one_event(version: int) -> None:
    stack = Stack()
    stack.receive(udp_packet(version, b"one"), 0.0)
    stack.receive(udp_packet(version, b"two"), 0.1)
    flow = udp_flow(version)
    assert stack_events(stack) == [
        DatagramFlowOpened(flow),
        DatagramReceived(flow, b"one"),
        DatagramReceived(flow, b"two"),
    ]
    assert stack.datagram_flows == 1
    assert stack.packets_to_send(0.1) == []  # the stack never answers by itself


def test_flow_id_of_udp_differs_from_tcp() -> None:
    tcp = FlowId(4, "198.18.1.2", 40000, "198.18.2.2", 5000)
    assert tcp.proto == "tcp"
    assert tcp != udp_flow(4) and hash(tcp) != hash(udp_flow(4))


@V4_V6
def test_bad_udp_checksum_is_counted_and_dropped(version: int) -> None:
    packet = bytearray(udp_packet(version, b"payload"))
    packet[-1] ^= 0xFF
    stack = Stack()
    stack.receive(bytes(packet), 0.0)
    assert stack_events(stack) == [] and stack.stats.checksum_errors == 1


def test_zero_udp_checksum_is_accepted_over_ipv4_only() -> None:
    packet = bytearray(udp_packet(4, b"x"))
    packet[26:28] = b"\0\0"
    stack = Stack()
    stack.receive(bytes(packet), 0.0)
    assert [type(e) for e in stack_events(stack)] == [DatagramFlowOpened, DatagramReceived]


@V4_V6
def test_multicast_and_port_zero_are_dropped(version: int) -> None:
    c, _ = ADDRS[version]
    group = ipaddress.ip_address("224.0.0.251" if version == 4 else "ff02::fb").packed
    stack = Stack()
    stack.receive(build_udp_packet(c, group, 5353, 5353, b"mdns"), 0.0)
    stack.receive(udp_packet(version, dport=0), 0.0)
    assert stack_events(stack) == []
    assert stack.stats.datagram.multicast == 1 and stack.stats.datagram.invalid == 1


# --- UDP out --------------------------------------------------------------------------


@V4_V6
def test_reply_comes_from_the_original_destination(version: int) -> None:
    stack = Stack()
    stack.receive(udp_packet(version), 0.0)
    stack_events(stack)
    assert stack.send_datagram(udp_flow(version), b"answer", 0.5)
    (packet,) = stack.packets_to_send(0.5)
    ip = parse_ip(packet)
    c, s = ADDRS[version]
    assert (ip.src, ip.dst, ip.proto) == (s, c, 17)
    h = parse_udp(packet, ip.offset, ip.end, pseudo_header_sum(ip, 17), ipv6=version == 6)
    assert (h.src_port, h.dst_port) == (5000, 40000)
    assert packet[ip.offset + 8 : ip.end] == b"answer"


@V4_V6
def test_large_reply_is_fragmented_to_the_mtu(version: int) -> None:
    stack = Stack(StackConfig(mtu=1400))
    stack.receive(udp_packet(version), 0.0)
    stack_events(stack)
    payload = bytes(range(256)) * 16  # 4096 bytes
    assert stack.send_datagram(udp_flow(version), payload, 0.0)
    pieces = stack.packets_to_send(0.0)
    assert len(pieces) == (3 if version == 4 else 4)  # 1376 and 1352 data bytes each
    assert all(len(p) <= 1400 for p in pieces)
    assert stack.stats.datagram.fragments_out == len(pieces)
    r = Reassembler()
    whole = [w for p in pieces if (w := r.add(p, parse_ip(p), 0.0)) is not None]
    (packet,) = whole
    ip = parse_ip(packet)
    # The checksum verifies.
    parse_udp(packet, ip.offset, ip.end, pseudo_header_sum(ip, 17), ipv6=version == 6)
    assert packet[ip.offset + 8 : ip.end] == payload
    # scapy agrees on the format (DF clear, MF set / a fragment header).
    if version == 4:
        assert IP(pieces[0]).flags == "MF" and IP(pieces[-1]).flags == 0
    else:
        assert IPv6(pieces[0]).nh == 44


def test_send_to_a_gone_flow_returns_false() -> None:
    stack = Stack()
    assert not stack.send_datagram(udp_flow(4), b"x", 0.0)
    assert not stack.send_echo_reply(udp_flow(4), 1, b"x", 0.0)
    assert not stack.datagram_unreachable(udp_flow(4), Unreachable.PORT, 0.0)


# --- idle timeouts and limits ---------------------------------------------------------


def test_idle_timeout_and_activity_either_way() -> None:
    stack = Stack(StackConfig(datagram=DatagramConfig(udp_idle_timeout=30.0)))
    flow = udp_flow(4)
    stack.receive(udp_packet(4), 0.0)
    stack_events(stack)
    assert stack.get_timer() == 30.0
    stack.send_datagram(flow, b"r", 20.0)  # server -> client activity counts too
    stack.handle_timer(30.0)
    assert stack_events(stack) == [] and stack.datagram_flows == 1
    assert stack.get_timer() == 50.0
    stack.handle_timer(50.0)
    assert stack_events(stack) == [DatagramFlowClosed(flow, stack_reason("IDLE"))]
    assert stack.datagram_flows == 0 and stack.get_timer() is None
    assert not stack.send_datagram(flow, b"late", 51.0)
    # The same 4-tuple opens a new flow afterwards.
    stack.receive(udp_packet(4), 60.0)
    assert isinstance(stack_events(stack)[0], DatagramFlowOpened)


def stack_reason(name: str) -> object:
    from stack import CloseReason

    return CloseReason[name]


def test_dns_and_echo_flows_idle_sooner() -> None:
    cfg = DatagramConfig(udp_idle_timeout=60.0, dns_idle_timeout=5.0, echo_idle_timeout=7.0)
    stack = Stack(StackConfig(datagram=cfg))
    stack.receive(udp_packet(4, dport=53), 0.0)
    assert stack.get_timer() == 5.0
    stack.receive(echo_request_packet(4), 1.0)
    stack.handle_timer(5.0)
    stack.handle_timer(8.0)
    closed = [e for e in stack_events(stack) if isinstance(e, DatagramFlowClosed)]
    assert [e.flow.proto for e in closed] == ["udp", "icmp"]


def test_flow_limits_per_client_and_in_total() -> None:
    cfg = DatagramConfig(max_flows=5)
    stack = Stack(StackConfig(datagram=cfg, clients=ClientQuotas(udp_flows=3)))
    for port in range(10):
        stack.receive(udp_packet(4, sport=1000 + port), 0.0)
    assert stack.datagram_flows == 3
    assert stack.stats.datagram.flow_limit == 7
    other = ipaddress.ip_address("198.18.1.3").packed
    for port in range(3):
        stack.receive(build_udp_packet(other, S4, 2000 + port, 53, b"q"), 0.0)
    stack.receive(echo_request_packet(6), 0.0)
    assert stack.datagram_flows == 5
    assert stack.stats.datagram.flow_limit == 9
    stack.end_datagram_flow(udp_flow(4, sport=1000))
    stack.receive(echo_request_packet(6), 0.0)
    assert stack.datagram_flows == 5


# --- ICMP errors toward the client ----------------------------------------------------


@V4_V6
def test_unreachable_quotes_the_flow_so_the_client_socket_matches(version: int) -> None:
    stack = Stack()
    stack.receive(udp_packet(version), 0.0)
    stack_events(stack)
    assert stack.datagram_unreachable(udp_flow(version), Unreachable.PORT, 0.0, quote=b"query")
    (err,) = stack.packets_to_send(0.0)
    if version == 4:
        pkt = IP(err)
        assert (pkt.src, pkt.dst) == (ADDR_TEXT[4][1], ADDR_TEXT[4][0])
        assert (pkt[ICMP].type, pkt[ICMP].code) == (3, 3)
        assert pkt[IPerror].src == ADDR_TEXT[4][0] and pkt[IPerror].dst == ADDR_TEXT[4][1]
        assert (pkt[UDPerror].sport, pkt[UDPerror].dport) == (40000, 5000)
    else:
        pkt = IPv6(err)
        assert (pkt[ICMPv6DestUnreach].type, pkt[ICMPv6DestUnreach].code) == (1, 4)
    parse_icmp_packet(err)  # the checksum verifies
    assert err.endswith(b"query")


def test_unreachable_from_a_router_address_and_raw_codes() -> None:
    stack = Stack()
    stack.receive(udp_packet(4), 0.0)
    stack_events(stack)
    assert stack.datagram_unreachable(udp_flow(4), 10, 0.0, src="198.18.2.1")
    assert not stack.datagram_unreachable(udp_flow(4), 1, 0.0, src="fd00::1")  # wrong family
    (err,) = stack.packets_to_send(0.0)
    assert IP(err).src == "198.18.2.1" and IP(err)[ICMP].code == 10


@V4_V6
def test_refused_flow_answers_port_unreachable_and_delivers_nothing(version: int) -> None:
    stack = Stack()
    stack.receive(udp_packet(version, b"first"), 0.0)
    flow = udp_flow(version)
    stack_events(stack)
    stack.refuse_datagrams(flow, Unreachable.PORT)
    second = udp_packet(version, b"second")
    stack.receive(second, 0.1)
    assert stack_events(stack) == []
    (err,) = stack.packets_to_send(0.1)
    expected = build_icmp_unreachable(second, code=3 if version == 4 else 4, src=ADDRS[version][1])
    assert err == expected
    assert stack.stats.datagram.refused == 1
    # Silently, when so refused; the flow still idles out as usual.
    stack.refuse_datagrams(flow, None)
    stack.receive(second, 0.2)
    assert stack.packets_to_send(0.2) == [] and stack_events(stack) == []
    stack.handle_timer(100.0)
    assert [type(e) for e in stack_events(stack)] == [DatagramFlowClosed]


def test_icmp_errors_are_rate_limited() -> None:
    cfg = DatagramConfig(icmp_errors_per_second=10.0, icmp_error_burst=5)
    stack = Stack(StackConfig(datagram=cfg))
    stack.receive(udp_packet(4), 0.0)
    stack_events(stack)
    stack.refuse_datagrams(udp_flow(4), Unreachable.PORT)
    for _ in range(20):
        stack.receive(udp_packet(4), 0.0)
    assert len(stack.packets_to_send(0.0)) == 5
    for _ in range(20):
        stack.receive(udp_packet(4), 0.5)  # 0.5 s at 10/s refills the bucket to its burst
    assert len(stack.packets_to_send(0.5)) == 5
    assert stack.stats.datagram.icmp_errors == 10
    assert stack.stats.datagram.icmp_rate_limited == 30


# --- ICMP echo ------------------------------------------------------------------------


@V4_V6
def test_echo_request_is_an_event_and_the_reply_keeps_the_client_id(version: int) -> None:
    stack = Stack()
    stack.receive(echo_request_packet(version, ident=0x4242, seq=7, payload=b"hello"), 0.0)
    c, s = ADDR_TEXT[version]
    flow = FlowId(version, c, 0x4242, s, 0, "icmp")
    assert stack_events(stack) == [DatagramFlowOpened(flow), EchoRequest(flow, 7, b"hello")]
    # Whatever identifier the relay's own socket used upstream, the client sees its own.
    assert stack.send_echo_reply(flow, 7, b"hello", 0.01)
    (reply,) = stack.packets_to_send(0.01)
    ip, icmp = parse_icmp_packet(reply)
    assert (ip.src, ip.dst) == (ADDRS[version][1], ADDRS[version][0])
    assert icmp.type == (ECHO_REPLY if version == 4 else ICMP6_ECHO_REPLY)
    assert (icmp.rest >> 16, icmp.rest & 0xFFFF) == (0x4242, 7)
    assert reply[ip.offset + 8 :] == b"hello"
    assert not stack.send_datagram(flow, b"x", 0.0)  # not a UDP flow


def test_echo_flows_are_per_identifier() -> None:
    stack = Stack()
    stack.receive(echo_request_packet(4, ident=1), 0.0)
    stack.receive(echo_request_packet(4, ident=2), 0.0)
    stack.receive(echo_request_packet(4, ident=1, seq=2), 0.0)
    opened = [e.flow.client_port for e in stack_events(stack) if isinstance(e, DatagramFlowOpened)]
    assert opened == [1, 2]


@V4_V6
def test_echo_unreachable_quotes_the_clients_request(version: int) -> None:
    stack = Stack()
    stack.receive(echo_request_packet(version, ident=0x4242, seq=9), 0.0)
    (opened, _) = stack_events(stack)
    assert isinstance(opened, DatagramFlowOpened)
    # The kernel's error queue quotes the request with *its* identifier (here 0x0999).
    kernel_msg = build_echo(*ADDRS[version], ident=0x0999, seq=9, payload=b"abc", reply=False)
    quote = kernel_msg[20 if version == 4 else 40 :]
    assert stack.datagram_unreachable(opened.flow, Unreachable.HOST, 0.0, quote=quote)
    (err,) = stack.packets_to_send(0.0)
    ip = parse_ip(err)
    inner = err[ip.offset + 8 :]
    assert inner == echo_request_packet(version, ident=0x4242, seq=9, payload=b"abc")


@V4_V6
def test_refused_echo_flow_gets_one_error_per_request(version: int) -> None:
    stack = Stack()
    stack.receive(echo_request_packet(version, seq=1), 0.0)
    (opened, _) = stack_events(stack)
    assert isinstance(opened, DatagramFlowOpened)
    stack.refuse_datagrams(opened.flow, Unreachable.NET)
    for seq in (2, 3):
        stack.receive(echo_request_packet(version, seq=seq), 0.0)
    errs = stack.packets_to_send(0.0)
    assert len(errs) == 2 and stack_events(stack) == []
    assert parse_icmp_packet(errs[0])[1].code == 0  # net unreachable / no route


# --- what is dropped quietly ----------------------------------------------------------


def test_neighbor_discovery_and_mld_are_dropped_quietly() -> None:
    noise = [
        IPv6(src="fe80::1", dst="ff02::16", hlim=1)
        / IPv6ExtHdrHopByHop(options=[RouterAlert()])
        / ICMPv6MLReport2(),
        IPv6(src="::", dst="ff02::1:ff00:2", hlim=255) / ICMPv6ND_NS(tgt="fd00:1::2"),
        IPv6(src="fe80::1", dst="ff02::2", hlim=255) / ICMPv6ND_RS(),
        IPv6(src="fe80::1", dst="fe80::2", hlim=255) / ICMPv6ND_NA(tgt="fe80::1"),
    ]
    stack = Stack()
    for pkt in noise:
        stack.receive(bytes(pkt), 0.0)
    assert stack_events(stack) == [] and stack.packets_to_send(0.0) == []
    assert stack.stats.datagram.neighbor_discovery == 4
    assert stack.stats.parse_errors == stack.stats.checksum_errors == 0


def test_other_icmp_and_other_protocols_are_counted_and_dropped() -> None:
    c, s = ADDRS[4]
    stack = Stack()
    stack.receive(build_echo(c, s, ident=1, seq=1, payload=b"", reply=True), 0.0)
    stack.receive(build_icmp_unreachable(udp_packet(4), code=3, src=c), 0.0)
    gre = ipv4_header(c, s, 47, 4) + b"\0\0\x08\0"
    stack.receive(gre, 0.0)
    esp = bytes(IPv6(src="fd00:1::2", dst="fd00:2::2", nh=50) / (b"\0" * 16))
    stack.receive(esp, 0.0)
    stack.receive(bytes(IP(src="198.18.1.2", dst="198.18.2.2") / ICMP(type=13)), 0.0)
    assert stack_events(stack) == [] and stack.packets_to_send(0.0) == []
    assert stack.stats.datagram.icmp_other == 3
    assert stack.stats.not_tcp == 2


def test_hostile_udp_and_icmp_never_raise() -> None:
    import random

    rng = random.Random(3)
    stack = Stack(StackConfig(datagram=DatagramConfig(max_flows=16)))
    seeds = [
        udp_packet(4),
        udp_packet(6),
        echo_request_packet(4),
        echo_request_packet(6),
        bytes(UDP()),
        udp_packet(4, b"x" * 3000),
    ]
    for i in range(3000):
        p = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            p[rng.randrange(len(p))] = rng.randrange(256)
        if rng.random() < 0.3:
            del p[rng.randrange(len(p)) :]
        stack.receive(bytes(p), i * 0.01)
        stack.handle_timer(i * 0.01)
        stack_events(stack)
        stack.packets_to_send(i * 0.01)
        assert stack.datagram_flows <= 16
