"""Raw IP packets for tests that drive a whole ``Stack`` (or the relay) by its wire.

Connection-level helpers, which put one ``TcpConnection`` in a known state,
are in ``tcp_helpers``; this module builds and parses the packets a client
sends and the packets the stack sends back, checksums verified.

The test flow runs from a client (``C4``/``C6``, port ``CPORT``) to a server
(``S4``/``S6``, port ``SPORT``); addresses come from 198.18.0.0/15 and
fd00::/8 only.

* addresses: ``C4``, ``S4``, ``C6``, ``S6`` (packed), ``ADDRS[version]`` =
  (client, server) packed, ``ADDR_TEXT[version]`` = the same as strings;
  ``V4_V6`` parametrizes a test over ``version`` 4 and 6;
* TCP: ``tcp_packet`` builds a client segment, ``parse_tcp_packet`` parses
  one (a ``ParsedTcp``), ``sent_tcp`` is everything the stack sends, parsed;
  ``request_tcp_flow`` delivers a SYN and returns the ``ConnectionRequest``'s
  flow, ``open_tcp_flow`` completes the handshake (ESTABLISHED, quiet);
* UDP and ICMP: ``udp_packet``, ``echo_request_packet``, ``parse_icmp_packet``;
* ``pseudo_header_sum`` of a parsed IP header, ``stack_events`` pops every
  pending event of a ``Stack``.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

import pytest

from stack import ConnectionRequest, FlowId, Stack
from stack.wire.checksum import pseudo_sum_v4, pseudo_sum_v6
from stack.wire.icmp import IcmpHeader, build_echo, parse_icmp
from stack.wire.ip import PROTO_TCP, IpHeader, parse_ip
from stack.wire.tcp import ACK, SYN, TcpHeader, build_tcp_packet, encode_options, parse_tcp
from stack.wire.udp import build_udp_packet

ADDR_TEXT = {4: ("198.18.1.2", "198.18.2.2"), 6: ("fd00:1::2", "fd00:2::2")}
C4, S4 = (ipaddress.ip_address(a).packed for a in ADDR_TEXT[4])
C6, S6 = (ipaddress.ip_address(a).packed for a in ADDR_TEXT[6])
ADDRS = {4: (C4, S4), 6: (C6, S6)}
V4_V6 = pytest.mark.parametrize("version", [4, 6])

CPORT = 40000
SPORT = 80
CLIENT_ISN = 0x10000
SERVER_ISN = 0x50000


def pseudo_header_sum(ip: IpHeader, proto: int | None = None) -> int:
    """The pseudo-header sum for the payload of ``ip`` (``proto`` defaults to ``ip.proto``)."""
    sums = pseudo_sum_v4 if ip.version == 4 else pseudo_sum_v6
    return sums(ip.src, ip.dst, ip.proto if proto is None else proto, ip.end - ip.offset)


def stack_events(stack: Stack) -> list[object]:
    """Pop every pending event of ``stack``."""
    found = []
    while (ev := stack.next_event()) is not None:
        found.append(ev)
    return found


# --- TCP ------------------------------------------------------------------------------


class ParsedTcp(NamedTuple):
    """A TCP packet, parsed (checksums verified)."""

    src: bytes
    dst: bytes
    tcp: TcpHeader
    payload: bytes


def parse_tcp_packet(packet: bytes) -> ParsedTcp:
    ip = parse_ip(packet)
    assert ip.proto == PROTO_TCP
    tcp = parse_tcp(packet, ip.offset, ip.end, pseudo_header_sum(ip, PROTO_TCP))
    return ParsedTcp(ip.src, ip.dst, tcp, bytes(packet[ip.offset + tcp.header_len : ip.end]))


def tcp_packet(
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
    """A TCP segment from the client, as a raw IP packet."""
    return build_tcp_packet(src, dst, sport, dport, seq, ack, flags, window, options, payload)


def sent_tcp(stack: Stack, now: float = 0.0) -> list[ParsedTcp]:
    """Every packet ``stack`` sends at ``now``, parsed as TCP."""
    return [parse_tcp_packet(p) for p in stack.packets_to_send(now)]


def request_tcp_flow(
    stack: Stack,
    *,
    src: bytes = C4,
    dst: bytes = S4,
    mss: int = 1460,
    syn_options: bytes | None = None,
) -> FlowId:
    """The client's SYN (``CLIENT_ISN``; options: ``syn_options``, else only ``mss``);
    returns the flow of the ``ConnectionRequest``, not yet accepted."""
    options = encode_options(mss=mss) if syn_options is None else syn_options
    stack.receive(tcp_packet(CLIENT_ISN, 0, SYN, src=src, dst=dst, options=options), 0.0)
    (ev,) = stack_events(stack)
    assert isinstance(ev, ConnectionRequest)
    return ev.flow


def open_tcp_flow(
    stack: Stack,
    *,
    src: bytes = C4,
    dst: bytes = S4,
    mss: int = 1460,
    syn_options: bytes | None = None,
    window: int = 65535,
    client_tsval: int = 1001,
    timestamps: bool | None = None,
) -> FlowId:
    """A flow through the whole handshake at time 0: ESTABLISHED, nothing left to send
    and no event pending. The stack accepts with ``SERVER_ISN``; the client's ACK
    advertises ``window`` and, if the SYN-ACK carries timestamps, echoes its TSval
    with ``client_tsval`` as its own. ``timestamps``, if given, is whether the SYN-ACK
    must carry them."""
    flow = request_tcp_flow(stack, src=src, dst=dst, mss=mss, syn_options=syn_options)
    stack.accept(flow, isn=SERVER_ISN)
    (synack,) = sent_tcp(stack)
    assert synack.tcp.flags == SYN | ACK
    ts = synack.tcp.options.timestamps
    if timestamps is not None:
        assert (ts is not None) is timestamps, synack
    options = b"" if ts is None else encode_options(timestamps=(client_tsval, ts[0]))
    ack = tcp_packet(
        CLIENT_ISN + 1, SERVER_ISN + 1, src=src, dst=dst, window=window, options=options
    )
    stack.receive(ack, 0.0)
    assert sent_tcp(stack) == []
    stack_events(stack)
    return flow


# --- UDP and ICMP ---------------------------------------------------------------------


def udp_packet(version: int, payload: bytes = b"q", sport: int = 40000, dport: int = 5000) -> bytes:
    """A UDP datagram from the client to the server."""
    c, s = ADDRS[version]
    return build_udp_packet(c, s, sport, dport, payload)


def echo_request_packet(
    version: int, ident: int = 0x4242, seq: int = 1, payload: bytes = b"abc"
) -> bytes:
    """An ICMP (ICMPv6) echo request from the client to the server."""
    c, s = ADDRS[version]
    return build_echo(c, s, ident=ident, seq=seq, payload=payload, reply=False)


def parse_icmp_packet(packet: bytes) -> tuple[IpHeader, IcmpHeader]:
    """An ICMP or ICMPv6 packet, parsed (ICMPv6 checksums cover the pseudo-header)."""
    ip = parse_ip(packet)
    pseudo = None if ip.version == 4 else pseudo_header_sum(ip, 58)
    return ip, parse_icmp(packet, ip.offset, ip.end, pseudo)
