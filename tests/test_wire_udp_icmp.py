"""UDP and ICMP/ICMPv6 parsing and building, cross-checked with scapy."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoReply, ICMPv6EchoRequest, IPv6
from scapy.packet import Raw

from stack.errors import BadLengthError, ChecksumError, TruncatedError
from stack.wire import (
    ADMIN_PROHIBITED,
    DEST_UNREACH,
    ECHO_REPLY,
    ECHO_REQUEST,
    FRAG_NEEDED,
    ICMP6_ADMIN_PROHIBITED,
    ICMP6_DEST_UNREACH,
    ICMP6_ECHO_REPLY,
    ICMP6_ECHO_REQUEST,
    ICMP6_NEIGHBOR_AND_MLD_TYPES,
    ICMP6_PORT_UNREACH,
    PORT_UNREACH,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_UDP,
    build_echo,
    build_icmp_unreachable,
    build_udp_packet,
    checksum,
    parse_icmp,
    parse_ip,
    parse_udp,
)

from packets import pseudo_header_sum

A4, B4 = "198.18.0.1", "198.19.1.2"
A6, B6 = "fd00::1", "fd12:3456::2"
SRC4, DST4 = ipaddress.IPv4Address(A4).packed, ipaddress.IPv4Address(B4).packed
SRC6, DST6 = ipaddress.IPv6Address(A6).packed, ipaddress.IPv6Address(B6).packed


# UDP


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("payload", [b"", b"q", b"dns query bytes", bytes(range(256)) * 5])
def test_parse_udp_from_scapy(v6: bool, payload: bytes) -> None:
    l3 = IPv6(src=A6, dst=B6) if v6 else IP(src=A4, dst=B4)
    raw = bytes(l3 / UDP(sport=5353, dport=53) / Raw(payload))
    ip = parse_ip(raw)
    assert ip.proto == PROTO_UDP
    udp = parse_udp(raw, ip.offset, ip.end, pseudo_header_sum(ip), ipv6=v6)
    assert (udp.src_port, udp.dst_port, udp.length) == (5353, 53, 8 + len(payload))
    assert udp.checksum == (IPv6(raw) if v6 else IP(raw))[UDP].chksum
    assert raw[ip.offset + 8 : ip.offset + udp.length] == payload


def test_udp_zero_checksum() -> None:
    raw = bytes(IP(src=A4, dst=B4) / UDP(chksum=0) / Raw(b"abc"))
    ip = parse_ip(raw)
    assert parse_udp(raw, ip.offset, ip.end, pseudo_header_sum(ip)).checksum == 0  # RFC 768: none
    raw6 = bytes(IPv6(src=A6, dst=B6) / UDP(chksum=0) / Raw(b"abc"))
    ip6 = parse_ip(raw6)
    with pytest.raises(ChecksumError):  # RFC 8200 8.1
        parse_udp(raw6, ip6.offset, ip6.end, pseudo_header_sum(ip6), ipv6=True)
    with pytest.raises(ChecksumError):
        parse_udp(raw6, ip6.offset, ip6.end, None, ipv6=True)


@pytest.mark.parametrize("v6", [False, True])
def test_udp_bad_checksum(v6: bool) -> None:
    l3 = IPv6(src=A6, dst=B6) if v6 else IP(src=A4, dst=B4)
    raw = bytes(l3 / UDP() / Raw(b"hello"))
    ip = parse_ip(raw)
    for i in range(ip.offset, ip.end):
        bad = bytearray(raw)
        bad[i] ^= 0x20
        if i in (ip.offset + 4, ip.offset + 5):  # the length field
            continue
        with pytest.raises(ChecksumError):
            parse_udp(bad, ip.offset, ip.end, pseudo_header_sum(ip), ipv6=v6)
        parse_udp(bad, ip.offset, ip.end)  # not verified


def test_udp_lengths() -> None:
    raw = bytes(IP(src=A4, dst=B4) / UDP() / Raw(b"12345678"))
    for end in range(20, 28):
        with pytest.raises(TruncatedError):
            parse_udp(raw, 20, end)
    for bad_len in (0, 7, 17, 0xFFFF):
        b = bytearray(raw)
        b[24:26] = struct.pack("!H", bad_len)
        with pytest.raises(BadLengthError):
            parse_udp(b, 20, len(b))


@pytest.mark.parametrize("v6", [False, True])
def test_udp_length_shorter_than_ip_payload(v6: bool) -> None:
    # Trailing bytes inside the IP payload are not part of the datagram (RFC 768).
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    good = build_udp_packet(src, dst, 1, 2, b"odd")
    raw = bytearray(good + b"TRAILER")
    if v6:
        raw[4:6] = struct.pack("!H", len(raw) - 40)
    else:
        raw[2:4] = struct.pack("!H", len(raw))
        raw[10:12] = b"\x00\x00"
        raw[10:12] = struct.pack("!H", checksum(raw[:20]))
    ip = parse_ip(raw)
    udp = parse_udp(raw, ip.offset, ip.end, pseudo_header_sum(ip), ipv6=v6)
    assert udp.length == 11
    assert raw[ip.offset + 8 : ip.offset + udp.length] == b"odd"


def scapy_udp_check(raw: bytes, v6: bool) -> UDP:
    pkt = IPv6(raw) if v6 else IP(raw)
    ours = pkt[UDP].chksum
    del pkt[UDP].chksum
    if not v6:
        del pkt.chksum
    again = IPv6(bytes(pkt)) if v6 else IP(bytes(pkt))
    assert again[UDP].chksum == ours
    assert bytes(again) == raw
    return again[UDP]


@settings(max_examples=40, deadline=None)
@given(
    v6=st.booleans(),
    ports=st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
    payload=st.binary(max_size=100),
    ttl=st.integers(0, 255),
)
def test_build_udp_against_scapy(
    v6: bool, ports: tuple[int, int], payload: bytes, ttl: int
) -> None:
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    raw = build_udp_packet(src, dst, *ports, payload, ttl=ttl)
    udp = scapy_udp_check(raw, v6)
    assert (udp.sport, udp.dport, udp.len, bytes(udp.payload)) == (
        *ports,
        8 + len(payload),
        payload,
    )
    assert (udp.underlayer.hlim if v6 else udp.underlayer.ttl) == ttl
    ip = parse_ip(raw)
    assert parse_udp(raw, ip.offset, ip.end, pseudo_header_sum(ip), ipv6=v6).length == 8 + len(
        payload
    )


@pytest.mark.parametrize("v6", [False, True])
def test_build_udp_sends_zero_checksum_as_ffff(v6: bool) -> None:
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    # Choose the last payload word so that the one's-complement sum is 0xFFFF.
    probe = build_udp_packet(src, dst, 1000, 2000, b"zero me\x00\x00\x00")
    start = 40 if v6 else 20
    c = struct.unpack_from("!H", probe, start + 6)[0]
    payload = b"zero me\x00" + struct.pack("!H", c)  # the probe's sum plus its complement
    raw = build_udp_packet(src, dst, 1000, 2000, payload)
    assert struct.unpack_from("!H", raw, start + 6)[0] == 0xFFFF
    scapy_udp_check(raw, v6)
    ip = parse_ip(raw)
    parse_udp(raw, ip.offset, ip.end, pseudo_header_sum(ip), ipv6=v6)


def test_build_udp_errors() -> None:
    with pytest.raises(ValueError):
        build_udp_packet(SRC4, DST6, 1, 2, b"")
    with pytest.raises(ValueError):
        build_udp_packet(SRC4, DST4, 1, 2, bytes(0xFFFF - 27))
    with pytest.raises(ValueError):
        build_udp_packet(SRC6, DST6, 1, 2, bytes(0xFFFF - 7))


# ICMP parsing


def test_parse_icmp_v4_echo() -> None:
    raw = bytes(IP(src=A4, dst=B4) / ICMP(type=8, id=0x1234, seq=7) / Raw(b"ping!"))
    ip = parse_ip(raw)
    assert ip.proto == PROTO_ICMP
    h = parse_icmp(raw, ip.offset, ip.end)
    assert (h.type, h.code, h.rest >> 16, h.rest & 0xFFFF) == (ECHO_REQUEST, 0, 0x1234, 7)
    assert h.checksum == IP(raw)[ICMP].chksum


def test_parse_icmp_v6_echo_needs_pseudo_header() -> None:
    raw = bytes(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest(id=3, seq=4, data=b"abc"))
    ip = parse_ip(raw)
    assert ip.proto == PROTO_ICMPV6
    h = parse_icmp(raw, ip.offset, ip.end, pseudo_header_sum(ip))
    assert (h.type, h.code, h.rest) == (ICMP6_ECHO_REQUEST, 0, (3 << 16) | 4)
    with pytest.raises(ChecksumError):  # forgetting the pseudo-header fails closed
        parse_icmp(raw, ip.offset, ip.end)
    assert parse_icmp(raw, ip.offset, ip.end, verify=False) == h


@pytest.mark.parametrize("v6", [False, True])
def test_parse_icmp_errors(v6: bool) -> None:
    if v6:
        raw = bytes(IPv6(src=A6, dst=B6) / ICMPv6EchoReply(data=b"abcde"))
    else:
        raw = bytes(IP(src=A4, dst=B4) / ICMP(type=0) / Raw(b"abcde"))
    ip = parse_ip(raw)
    ps = pseudo_header_sum(ip) if v6 else None
    for end in range(ip.offset, ip.offset + 8):
        with pytest.raises(TruncatedError):
            parse_icmp(raw, ip.offset, end, ps)
    for i in range(ip.offset, ip.end):
        bad = bytearray(raw)
        bad[i] ^= 0x01
        with pytest.raises(ChecksumError):
            parse_icmp(bad, ip.offset, ip.end, ps)


# ICMP building


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("reply", [False, True])
@pytest.mark.parametrize("payload", [b"", b"x", b"0123456789" * 6])
def test_build_echo_against_scapy(v6: bool, reply: bool, payload: bytes) -> None:
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    raw = build_echo(src, dst, ident=0xBEEF, seq=65535, payload=payload, reply=reply)
    pkt = IPv6(raw) if v6 else IP(raw)
    if v6:
        icmp = pkt[ICMPv6EchoReply if reply else ICMPv6EchoRequest]
        assert icmp.type == (ICMP6_ECHO_REPLY if reply else ICMP6_ECHO_REQUEST)
        assert (icmp.id, icmp.seq, icmp.data) == (0xBEEF, 65535, payload)
        assert pkt.nh == PROTO_ICMPV6 and pkt.hlim == 64
    else:
        icmp = pkt[ICMP]
        assert icmp.type == (ECHO_REPLY if reply else ECHO_REQUEST)
        assert (icmp.id, icmp.seq, bytes(icmp.payload)) == (0xBEEF, 65535, payload)
        assert pkt.proto == PROTO_ICMP and pkt.ttl == 64
    assert pkt.src == (A6 if v6 else A4) and pkt.dst == (B6 if v6 else B4)
    ours = icmp.cksum if v6 else icmp.chksum
    if v6:
        del icmp.cksum
    else:
        del icmp.chksum
        del pkt.chksum
    again = IPv6(bytes(pkt)) if v6 else IP(bytes(pkt))
    assert bytes(again) == raw
    ip = parse_ip(raw)
    parse_icmp(raw, ip.offset, ip.end, pseudo_header_sum(ip) if v6 else None)
    assert ours


def test_build_echo_all_zero_message_checksum_is_ffff() -> None:
    raw = build_echo(SRC4, DST4, ident=0, seq=0, payload=b"", reply=True)
    assert raw[22:24] == b"\xff\xff"  # ~(+0), as scapy and Linux compute it
    pkt = IP(raw)
    del pkt[ICMP].chksum
    assert IP(bytes(pkt))[ICMP].chksum == 0xFFFF
    parse_icmp(raw, 20, len(raw))


@pytest.mark.parametrize("payload_len", [0, 8, 9, 100, 527, 528, 529, 1460])
def test_unreachable_v4(payload_len: int) -> None:
    original = bytes(
        IP(src=A4, dst=B4, ttl=61) / TCP(sport=33000, dport=25) / Raw(b"m" * payload_len)
    )
    raw = build_icmp_unreachable(original, code=PORT_UNREACH, src=DST4)
    assert len(raw) == min(576, 28 + len(original))
    pkt = IP(raw)
    assert (pkt.src, pkt.dst, pkt.proto) == (B4, A4, PROTO_ICMP)
    assert (pkt[ICMP].type, pkt[ICMP].code) == (DEST_UNREACH, PORT_UNREACH)
    assert raw[24:28] == bytes(4)  # unused
    assert raw[28:] == original[: len(raw) - 28]
    quoted = pkt[IPerror]
    assert (quoted.src, quoted.dst) == (A4, B4)
    ours = pkt[ICMP].chksum
    del pkt[ICMP].chksum
    assert IP(bytes(pkt))[ICMP].chksum == ours
    ip = parse_ip(raw)
    parse_icmp(raw, ip.offset, ip.end)


def test_unreachable_v4_frag_needed_and_padding() -> None:
    original = bytes(IP(src=A4, dst=B4) / UDP() / Raw(b"abc"))
    raw = build_icmp_unreachable(original + bytes(15), code=FRAG_NEEDED, src=DST4, mtu=1400)
    assert raw[28:] == original  # link padding is not quoted
    icmp = IP(raw)[ICMP]
    assert (icmp.code, icmp.nexthopmtu) == (FRAG_NEEDED, 1400)
    other = build_icmp_unreachable(original, code=ADMIN_PROHIBITED, src=DST4, mtu=1400)
    assert other[24:28] == bytes(4)


@pytest.mark.parametrize("payload_len", [0, 1, 1000, 1172, 1173, 1400])
def test_unreachable_v6(payload_len: int) -> None:
    original = bytes(IPv6(src=A6, dst=B6) / UDP(sport=1, dport=2) / Raw(b"n" * payload_len))
    raw = build_icmp_unreachable(original + bytes(3), code=ICMP6_PORT_UNREACH, src=DST6)
    assert len(raw) == min(1280, 48 + len(original))
    pkt = IPv6(raw)
    assert (pkt.src, pkt.dst, pkt.nh, pkt.plen) == (B6, A6, PROTO_ICMPV6, len(raw) - 40)
    icmp = pkt[ICMPv6DestUnreach]
    assert (icmp.type, icmp.code) == (ICMP6_DEST_UNREACH, ICMP6_PORT_UNREACH)
    assert raw[48:] == original[: len(raw) - 48]
    ours = icmp.cksum
    del icmp.cksum
    assert IPv6(bytes(pkt))[ICMPv6DestUnreach].cksum == ours
    ip = parse_ip(raw)
    assert parse_icmp(raw, ip.offset, ip.end, pseudo_header_sum(ip)).code == ICMP6_PORT_UNREACH


def test_unreachable_bad_original() -> None:
    for junk in (b"", b"\x45" * 19, b"\x60" * 39, b"\x50" * 60):
        with pytest.raises(ValueError):
            build_icmp_unreachable(junk, code=0, src=DST4)
    v4 = bytes(IP(src=A4, dst=B4) / UDP())
    with pytest.raises(ValueError):
        build_icmp_unreachable(v4, code=ICMP6_ADMIN_PROHIBITED, src=DST6)


def test_icmp6_nd_and_mld_types() -> None:
    for t in (130, 131, 132, 133, 134, 135, 136, 137, 143):
        assert t in ICMP6_NEIGHBOR_AND_MLD_TYPES
    for t in (1, 2, 3, 4, 128, 129, 144):
        assert t not in ICMP6_NEIGHBOR_AND_MLD_TYPES
