"""IPv4/IPv6 header parsing and building, cross-checked with scapy."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, IPOption_RR
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    PadN,
    RouterAlert,
)
from scapy.packet import Raw

from stack.errors import (
    BadHeaderError,
    BadLengthError,
    ChecksumError,
    ParseError,
    TruncatedError,
)
from stack.wire import (
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    Fragment,
    address_text,
    checksum,
    ipv4_header,
    ipv6_header,
    pack_ipv4_header_into,
    pack_ipv6_header_into,
    parse_ip,
    verify,
)

A4, B4 = "198.18.0.1", "198.19.1.2"
A6, B6 = "fd00::1", "fd12:3456::2"
SRC4, DST4 = ipaddress.IPv4Address(A4).packed, ipaddress.IPv4Address(B4).packed
SRC6, DST6 = ipaddress.IPv6Address(A6).packed, ipaddress.IPv6Address(B6).packed


def fix_v4_checksum(pkt: bytes | bytearray) -> bytes:
    """Recompute the IPv4 header checksum after a test edited the header."""
    b = bytearray(pkt)
    hl = (b[0] & 0x0F) * 4
    b[10:12] = b"\x00\x00"
    b[10:12] = struct.pack("!H", checksum(b[:hl]))
    return bytes(b)


# IPv4


def test_ipv4_plain() -> None:
    raw = bytes(IP(src=A4, dst=B4, ttl=33, id=77) / TCP() / Raw(b"hello"))
    h = parse_ip(raw)
    assert h == (4, SRC4, DST4, PROTO_TCP, 20, len(raw), 33, None)
    assert type(h.src) is bytes and type(h.dst) is bytes


def test_ipv4_with_options() -> None:
    opts = [IPOption_RR(routers=["198.18.0.9", "198.18.0.10"]), IPOption_NOP()]
    pkt = IP(src=A4, dst=B4, options=opts) / UDP() / Raw(b"x" * 11)
    raw = bytes(pkt)
    h = parse_ip(raw)
    assert h.offset == IP(raw).ihl * 4 > 20
    assert h.proto == PROTO_UDP
    assert h.end == len(raw)
    assert raw[h.offset : h.end] == bytes(pkt[UDP])


@pytest.mark.parametrize("ctor", [bytes, bytearray, memoryview])
def test_ipv4_buffer_types_and_link_padding(ctor: type) -> None:
    raw = bytes(IP(src=A4, dst=B4) / ICMP())
    h = parse_ip(ctor(raw + b"\x00" * 18))  # Ethernet-style padding is ignored
    assert h.end == len(raw)
    assert h.proto == PROTO_ICMP
    assert h.src == SRC4 and h.dst == DST4


@pytest.mark.parametrize(
    ("flags", "frag", "expected"),
    [
        ("DF", 0, None),
        (0, 0, None),
        ("MF", 0, Fragment(4321, 0, True)),
        ("MF", 185, Fragment(4321, 1480, True)),
        (0, 185, Fragment(4321, 1480, False)),
        ("MF+DF", 1, Fragment(4321, 8, True)),  # nonsense but parseable
    ],
)
def test_ipv4_fragments(flags: str | int, frag: int, expected: Fragment | None) -> None:
    raw = bytes(IP(src=A4, dst=B4, id=4321, flags=flags, frag=frag, proto=6) / Raw(b"y" * 24))
    h = parse_ip(raw)
    assert h.fragment == expected
    assert h.offset == 20 and h.proto == PROTO_TCP


def test_ipv4_fragment_beyond_65535() -> None:
    # The reassembled datagram would be fragment offset + total length > 65535 bytes.
    raw = bytes(IP(src=A4, dst=B4, frag=8187, proto=6) / Raw(b"z" * 24))  # 65496 + 44
    with pytest.raises(BadLengthError):
        parse_ip(raw)
    ok = bytes(IP(src=A4, dst=B4, frag=8186, proto=6) / Raw(b"z" * 24))  # 65488 + 44
    assert parse_ip(ok).fragment == Fragment(1, 8186 * 8, False)


def test_ipv4_bad_checksum() -> None:
    raw = bytearray(bytes(IP(src=A4, dst=B4) / TCP()))
    raw[10] ^= 0x40
    with pytest.raises(ChecksumError):
        parse_ip(raw)


def test_ipv4_every_header_bit_flip_is_rejected() -> None:
    opts = [IPOption_RR(routers=["198.18.0.9"])]
    raw = bytes(IP(src=A4, dst=B4, options=opts) / TCP())
    hl = (raw[0] & 0x0F) * 4
    for bit in range(hl * 8):
        bad = bytearray(raw)
        bad[bit // 8] ^= 0x80 >> (bit % 8)
        with pytest.raises(ParseError):
            parse_ip(bad)


@pytest.mark.parametrize("version", [0, 1, 5, 7, 15])
def test_bad_version(version: int) -> None:
    raw = bytearray(bytes(IP(src=A4, dst=B4) / TCP()))
    raw[0] = (version << 4) | 5
    with pytest.raises(BadHeaderError):
        parse_ip(raw)
    with pytest.raises(BadHeaderError):
        parse_ip(bytes([version << 4]))


@pytest.mark.parametrize("ihl", [0, 1, 4])
def test_ipv4_ihl_below_5(ihl: int) -> None:
    raw = bytearray(bytes(IP(src=A4, dst=B4) / TCP()))
    raw[0] = 0x40 | ihl
    with pytest.raises(BadHeaderError):
        parse_ip(fix_v4_checksum(raw) if ihl else raw)


def test_ipv4_ihl_beyond_total_length() -> None:
    raw = bytearray(bytes(IP(src=A4, dst=B4) / TCP()))  # 40 bytes
    raw[0] = 0x4F  # a 60-byte header in a 40-byte datagram
    with pytest.raises(BadLengthError):
        parse_ip(raw)
    with pytest.raises(BadLengthError):
        parse_ip(raw + bytes(30))  # with padding
    raw[2:4] = struct.pack("!H", 60)
    with pytest.raises(TruncatedError):
        parse_ip(raw)


def test_ipv4_total_length_mismatch() -> None:
    raw = bytes(IP(src=A4, dst=B4) / TCP() / Raw(b"abcd"))
    too_long = bytearray(raw)
    too_long[2:4] = struct.pack("!H", len(raw) + 1)
    with pytest.raises(TruncatedError):
        parse_ip(fix_v4_checksum(too_long))
    too_short = bytearray(raw)
    too_short[2:4] = struct.pack("!H", 19)
    with pytest.raises(BadLengthError):
        parse_ip(fix_v4_checksum(too_short))
    shorter = bytearray(raw)
    shorter[2:4] = struct.pack("!H", 20)  # legal: header only, the rest is padding
    assert parse_ip(fix_v4_checksum(shorter)).end == 20


# IPv6


def test_ipv6_plain() -> None:
    raw = bytes(IPv6(src=A6, dst=B6, hlim=7) / TCP() / Raw(b"hi"))
    assert parse_ip(raw) == (6, SRC6, DST6, PROTO_TCP, 40, len(raw), 7, None)


def test_ipv6_extension_chain() -> None:
    pkt = (
        IPv6(src=A6, dst=B6)
        / IPv6ExtHdrHopByHop(options=[RouterAlert()])
        / IPv6ExtHdrRouting(addresses=[])
        / IPv6ExtHdrDestOpt(options=[PadN(optdata=b"x" * 10)])
        / UDP()
        / Raw(b"payload")
    )
    raw = bytes(pkt)
    h = parse_ip(raw + b"\x00" * 5)  # link padding beyond the payload length
    assert h.proto == PROTO_UDP
    assert h.offset == len(raw) - len(pkt[UDP])
    assert h.end == len(raw)
    assert h.fragment is None


@pytest.mark.parametrize(
    ("offset", "m", "data"),
    [(0, 1, b"a" * 4), (100, 1, b"b" * 16), (100, 0, b"c" * 5), (0, 0, b"d" * 3)],
)
def test_ipv6_fragment_header(offset: int, m: int, data: bytes) -> None:
    pkt = (
        IPv6(src=A6, dst=B6)
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrFragment(id=0xDEADBEEF, offset=offset, m=m, nh=6)
        / Raw(bytes(TCP()) if offset == 0 else b"")
        / Raw(data)
    )
    raw = bytes(pkt)
    h = parse_ip(raw)
    assert h.fragment == Fragment(0xDEADBEEF, offset * 8, bool(m))
    assert h.proto == PROTO_TCP
    assert h.offset == 40 + 8 + 8 + 8
    assert h.end == len(raw)


def test_ipv6_fragment_then_more_extension_headers_stops_at_fragment() -> None:
    pkt = IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(id=9, m=1) / IPv6ExtHdrDestOpt() / TCP()
    raw = bytes(pkt)[:-4]  # TCP 20 -> 16 bytes: 8 + 16 is a multiple of 8
    raw = raw[:4] + struct.pack("!H", len(raw) - 40) + raw[6:]
    h = parse_ip(raw)
    assert h.proto == 60 and h.offset == 48 and h.fragment == Fragment(9, 0, True)


def test_ipv6_fragment_errors() -> None:
    odd = bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(id=1, m=1, nh=17) / Raw(b"x" * 13))
    with pytest.raises(BadLengthError):
        parse_ip(odd)
    huge = bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrFragment(offset=8191, nh=17) / Raw(b"x" * 64))
    with pytest.raises(BadLengthError):
        parse_ip(huge)


@pytest.mark.parametrize("nh", [50, 51, 59, 135, 253])
def test_ipv6_walk_stops_at_other_headers(nh: int) -> None:
    raw = bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt(nh=nh) / Raw(b"\x00" * 16))
    h = parse_ip(raw)
    assert (h.proto, h.offset, h.end) == (nh, 48, 64)


def test_ipv6_hop_by_hop_must_be_first() -> None:
    raw = bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / TCP())
    with pytest.raises(BadHeaderError):
        parse_ip(raw)


def test_ipv6_routing_header_with_segments_left() -> None:
    pkt = IPv6(src=A6, dst=B6) / IPv6ExtHdrRouting(addresses=["fd00::9"]) / TCP()
    with pytest.raises(BadHeaderError):
        parse_ip(bytes(pkt))


def test_ipv6_extension_header_overruns() -> None:
    short = bytes(IPv6(src=A6, dst=B6, nh=60) / Raw(b"\x06\x00\x00\x00"))
    with pytest.raises(TruncatedError):
        parse_ip(short)
    long_len = bytearray(bytes(IPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt() / Raw(b"\x00" * 8)))
    long_len[41] = 2  # claims 24 bytes, 16 present
    with pytest.raises(TruncatedError):
        parse_ip(long_len + b"\x00" * 8)  # the padding is beyond the payload length
    frag = bytes(IPv6(src=A6, dst=B6, nh=44) / Raw(b"\x06\x00\x00\x00"))
    with pytest.raises(TruncatedError):
        parse_ip(frag)


def test_ipv6_payload_length_beyond_buffer() -> None:
    raw = bytes(IPv6(src=A6, dst=B6) / TCP())
    with pytest.raises(TruncatedError):
        parse_ip(raw[:-1])


# Truncation, for every packet kind


TRUNCATION_CASES = [
    IP(src=A4, dst=B4, options=[IPOption_RR(routers=["198.18.0.9"])]) / TCP() / Raw(b"d" * 9),
    IP(src=A4, dst=B4) / UDP() / Raw(b"d"),
    IPv6(src=A6, dst=B6) / TCP(options=[("MSS", 1400)]),
    IPv6(src=A6, dst=B6)
    / IPv6ExtHdrHopByHop()
    / IPv6ExtHdrDestOpt()
    / IPv6ExtHdrFragment(id=5, m=1)
    / Raw(b"e" * 24),
]


@pytest.mark.parametrize("pkt", TRUNCATION_CASES, ids=lambda p: p.summary())
def test_truncated_at_every_length(pkt: IP | IPv6) -> None:
    raw = bytes(pkt)
    parse_ip(raw)
    for n in range(len(raw)):
        with pytest.raises(TruncatedError):
            parse_ip(raw[:n])


# Builders


@settings(max_examples=40, deadline=None)
@given(
    ttl=st.integers(0, 255),
    ident=st.integers(0, 0xFFFF),
    df=st.booleans(),
    payload_len=st.integers(0, 0xFFFF - 20),
    proto=st.sampled_from([1, 6, 17, 99]),
    host=st.integers(0, (1 << 17) - 1),
)
def test_ipv4_header_against_scapy(
    ttl: int, ident: int, df: bool, payload_len: int, proto: int, host: int
) -> None:
    src = (ipaddress.IPv4Address("198.18.0.0") + host).packed
    hdr = ipv4_header(src, DST4, proto, payload_len, ttl=ttl, ident=ident, dont_fragment=df)
    assert len(hdr) == 20 and verify(hdr)
    buf = bytearray(25)
    pack_ipv4_header_into(buf, 5, src, DST4, proto, payload_len, ttl, ident, df)
    assert buf[5:] == hdr
    p = IP(hdr)
    assert (p.version, p.ihl, p.len) == (4, 5, 20 + payload_len)
    assert (p.id, p.ttl, p.proto) == (ident, ttl, proto)
    assert p.flags == ("DF" if df else 0) and p.frag == 0 and p.tos == 0
    assert p.src == str(ipaddress.IPv4Address(src)) and p.dst == B4
    ours = p.chksum
    del p.chksum
    assert IP(bytes(p)).chksum == ours
    h = parse_ip(hdr + bytes(payload_len))
    assert (h.proto, h.ttl, h.offset, h.end) == (proto, ttl, 20, 20 + payload_len)


def test_ipv6_header_against_scapy() -> None:
    hdr = ipv6_header(SRC6, DST6, 17, 1234, hop_limit=3)
    p = IPv6(hdr)
    assert (p.version, p.tc, p.fl, p.plen, p.nh, p.hlim) == (6, 0, 0, 1234, 17, 3)
    assert (p.src, p.dst) == (A6, B6)
    buf = bytearray(41)
    pack_ipv6_header_into(buf, 1, SRC6, DST6, 17, 1234, 3)
    assert buf[1:] == hdr
    assert parse_ip(hdr + bytes(1234)) == (6, SRC6, DST6, 17, 40, 1274, 3, None)


def test_builder_argument_errors() -> None:
    with pytest.raises(ValueError):
        ipv4_header(SRC6, DST4, 6, 0)
    with pytest.raises(ValueError):
        ipv4_header(SRC4, DST4, 6, 0xFFFF - 19)
    with pytest.raises(ValueError):
        pack_ipv4_header_into(bytearray(20), 0, SRC4, DST6, 6, 0)
    with pytest.raises(ValueError):
        ipv6_header(SRC4, DST6, 6, 0)
    with pytest.raises(ValueError):
        pack_ipv6_header_into(bytearray(40), 0, SRC6, DST6, 6, 0x10000)


@given(st.binary(min_size=4, max_size=4) | st.binary(min_size=16, max_size=16))
def test_address_text_is_what_ipaddress_writes(raw: bytes) -> None:
    assert address_text(raw) == str(ipaddress.ip_address(raw))
