"""Builders for packet-level tests of the Stack (raw IP packets in and out)."""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from stack import ConnectionRequest, FlowId, Stack
from stack.wire.checksum import pseudo_sum_v4, pseudo_sum_v6
from stack.wire.ip import PROTO_TCP, parse_ip
from stack.wire.tcp import ACK, SYN, TcpHeader, build_tcp_packet, encode_options, parse_tcp

C4 = ipaddress.ip_address("198.18.1.2").packed
S4 = ipaddress.ip_address("198.18.2.2").packed
C6 = ipaddress.ip_address("fd00:1::2").packed
S6 = ipaddress.ip_address("fd00:2::2").packed
CPORT = 40000
SPORT = 80
CLIENT_ISN = 0x10000
SERVER_ISN = 0x50000


class Out(NamedTuple):
    """A packet the stack emitted, parsed (checksums verified)."""

    src: bytes
    dst: bytes
    tcp: TcpHeader
    payload: bytes


def parse_out(packet: bytes) -> Out:
    ip = parse_ip(packet)
    assert ip.proto == PROTO_TCP
    length = ip.end - ip.offset
    pseudo = (pseudo_sum_v4 if ip.version == 4 else pseudo_sum_v6)(ip.src, ip.dst, 6, length)
    tcp = parse_tcp(packet, ip.offset, ip.end, pseudo)
    return Out(ip.src, ip.dst, tcp, bytes(packet[ip.offset + tcp.header_len : ip.end]))


def seg(
    seq: int,
    ack: int = 0,
    flags: int = ACK,
    payload: bytes = b"",
    *,
    window: int = 65535,
    src: bytes = C4,
    dst: bytes = S4,
    sport: int = CPORT,
    dport: int = SPORT,
    options: bytes = b"",
) -> bytes:
    return build_tcp_packet(src, dst, sport, dport, seq, ack, flags, window, options, payload)


def out(stack: Stack, now: float = 0.0) -> list[Out]:
    return [parse_out(p) for p in stack.packets_to_send(now)]


def events(stack: Stack) -> list[object]:
    found = []
    while (ev := stack.next_event()) is not None:
        found.append(ev)
    return found


def request(stack: Stack, *, src: bytes = C4, dst: bytes = S4, mss: int = 1460) -> FlowId:
    stack.receive(seg(CLIENT_ISN, 0, SYN, src=src, dst=dst, options=encode_options(mss=mss)), 0.0)
    (ev,) = events(stack)
    assert isinstance(ev, ConnectionRequest)
    return ev.flow


def established(stack: Stack, *, src: bytes = C4, dst: bytes = S4, mss: int = 1460) -> FlowId:
    flow = request(stack, src=src, dst=dst, mss=mss)
    stack.accept(flow, isn=SERVER_ISN)
    (synack,) = out(stack)
    assert synack.tcp.flags == SYN | ACK
    stack.receive(seg(CLIENT_ISN + 1, SERVER_ISN + 1, src=src, dst=dst), 0.0)
    assert out(stack) == []
    events(stack)
    return flow
