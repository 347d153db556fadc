"""Fuzzing: whatever bytes arrive, the parsers raise nothing but ParseError."""

from __future__ import annotations

import contextlib
import ipaddress
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_RR
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.packet import Raw

from stack.errors import ParseError
from stack.wire import (
    ACK,
    SYN,
    build_echo,
    build_icmp_unreachable,
    build_tcp_packet,
    build_udp_packet,
    checksum,
    encode_options,
    parse_icmp,
    parse_ip,
    parse_tcp,
    parse_udp,
)

from packets import pseudo_header_sum

SRC4 = ipaddress.IPv4Address("198.18.0.1").packed
DST4 = ipaddress.IPv4Address("198.19.1.2").packed
SRC6 = ipaddress.IPv6Address("fd00::1").packed
DST6 = ipaddress.IPv6Address("fd12:3456::2").packed
TS = (12345, 67890)
SLOW = [HealthCheck.too_slow]  # the machine may be busy; the counts are what matter

SEEDS: list[bytes] = [
    build_tcp_packet(SRC4, DST4, 1, 2, 3, 4, ACK, 5, encode_options(timestamps=TS), b"data"),
    build_tcp_packet(
        SRC6,
        DST6,
        1,
        2,
        3,
        4,
        SYN,
        5,
        encode_options(mss=1440, wscale=7, sack_permitted=True, timestamps=TS),
    ),
    build_tcp_packet(
        SRC4, DST4, 1, 2, 3, 4, ACK, 5, encode_options(sack_blocks=[(1, 2), (3, 4), (5, 6)])
    ),
    build_udp_packet(SRC4, DST4, 53, 5353, b"query"),
    build_udp_packet(SRC6, DST6, 53, 5353, b"odd"),
    build_echo(SRC4, DST4, ident=1, seq=2, payload=b"ping", reply=False),
    build_echo(SRC6, DST6, ident=1, seq=2, payload=b"ping6", reply=True),
    build_icmp_unreachable(build_udp_packet(SRC4, DST4, 1, 2, b"x"), code=3, src=DST4),
    bytes(
        IP(src="198.18.0.1", dst="198.18.0.2", options=[IPOption_RR(routers=["198.18.0.3"])])
        / TCP(options=[("MSS", 1400), (30, b"ab"), ("EOL", None)])
    ),
    bytes(IP(src="198.18.0.1", dst="198.18.0.2", flags="MF", frag=3) / UDP() / Raw(b"f" * 16)),
    bytes(
        IPv6(src="fd00::1", dst="fd00::2")
        / IPv6ExtHdrHopByHop()
        / IPv6ExtHdrRouting(addresses=[])
        / IPv6ExtHdrDestOpt()
        / TCP(options=[("SAck", (1, 2)), ("NOP", None), ("NOP", None)])
    ),
    bytes(
        IPv6(src="fd00::1", dst="fd00::2")
        / IPv6ExtHdrFragment(id=7, m=1)
        / ICMPv6EchoRequest(data=b"a" * 16)
    ),
]


def parse_all(buf: bytes | bytearray) -> None:
    """Parse like the stack does, checking the invariants of every successful parse."""
    ip = parse_ip(buf)
    assert ip.version in (4, 6)
    assert len(ip.src) == len(ip.dst) == (4 if ip.version == 4 else 16)
    assert (20 if ip.version == 4 else 40) <= ip.offset <= ip.end <= len(buf)
    assert ip.version == 6 or ip.offset <= 60
    if ip.fragment is not None and ip.fragment.offset:
        return
    ps = pseudo_header_sum(ip)
    if ip.proto == 6:
        tcp = parse_tcp(buf, ip.offset, ip.end)  # reach the options even if the checksum fails
        assert 20 <= tcp.header_len <= min(60, ip.end - ip.offset)
        assert tcp.options.wscale is None or 0 <= tcp.options.wscale <= 14
        assert len(tcp.options.sack_blocks) <= 4
        assert parse_tcp(buf, ip.offset, ip.end, ps) == tcp
    elif ip.proto == 17:
        udp = parse_udp(buf, ip.offset, ip.end, ps, ipv6=ip.version == 6)
        assert 8 <= udp.length <= ip.end - ip.offset
    elif ip.proto == 1:
        parse_icmp(buf, ip.offset, ip.end)
    elif ip.proto == 58:
        parse_icmp(buf, ip.offset, ip.end, ps)


def only_parse_errors(buf: bytes | bytearray) -> None:
    with contextlib.suppress(ParseError):
        parse_all(buf)


def fix_lengths(buf: bytearray) -> bytearray:
    """Repair the IP length fields and header checksum so a mutation reaches deeper."""
    if len(buf) >= 20 and buf[0] >> 4 == 4:
        hl = (buf[0] & 0x0F) * 4
        if 20 <= hl <= len(buf):
            struct.pack_into("!H", buf, 2, min(len(buf), 0xFFFF))
            struct.pack_into("!H", buf, 10, 0)
            struct.pack_into("!H", buf, 10, checksum(buf[:hl]))
    elif len(buf) >= 40 and buf[0] >> 4 == 6:
        struct.pack_into("!H", buf, 4, min(len(buf) - 40, 0xFFFF))
    return buf


def test_seeds_are_valid() -> None:
    for seed in SEEDS:
        parse_all(seed)


@settings(max_examples=1000, deadline=None, suppress_health_check=SLOW)
@given(
    st.one_of(
        st.binary(max_size=120),
        st.tuples(st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x40]), st.binary(max_size=120)).map(
            lambda t: bytes([t[0]]) + t[1]
        ),
    )
)
def test_random_bytes(buf: bytes) -> None:
    only_parse_errors(buf)
    only_parse_errors(fix_lengths(bytearray(buf)))


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 8)),
)


def mutate(seed: bytes, ops: list[tuple[str, int, int]]) -> bytearray:
    buf = bytearray(seed)
    for op, pos, arg in ops:
        pos = pos % (len(buf) + 1)
        if op == "flip" and pos < len(buf):
            buf[pos] ^= 1 << arg
        elif op == "set" and pos < len(buf):
            buf[pos] = arg
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = bytes([arg])
        elif op == "delete":
            del buf[pos : pos + arg]
    return buf


@settings(max_examples=1000, deadline=None, suppress_health_check=SLOW)
@given(
    seed=st.sampled_from(SEEDS),
    ops=st.lists(mutation, min_size=1, max_size=6),
    fix=st.booleans(),
)
def test_mutated_packets(seed: bytes, ops: list[tuple[str, int, int]], fix: bool) -> None:
    buf = mutate(seed, ops)
    only_parse_errors(fix_lengths(buf) if fix else buf)


# Transport segments that are valid on their own, to put behind generated IP headers.
SEGMENTS = [b""] + [seed[40 if seed[0] >> 4 == 6 else 20 :] for seed in SEEDS[:8]]


@st.composite
def ipv4_packets(draw: st.DrawFn) -> bytes:
    """IPv4 headers with random IHL, options, flags and lengths, checksum fixed."""
    ihl = draw(st.integers(0, 15))
    options = draw(st.binary(min_size=max(0, ihl * 4 - 20), max_size=max(0, ihl * 4 - 20)))
    proto = draw(st.sampled_from([1, 6, 17, 58, 0, 255]))
    frag = draw(st.one_of(st.just(0x4000), st.just(0x2000), st.integers(0, 0xFFFF)))
    body = draw(st.sampled_from(SEGMENTS)) + draw(st.binary(max_size=16))
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 0, 1, frag, 64, proto, 0,
                                SRC4, DST4)) + options  # fmt: skip
    total = draw(st.one_of(st.just(len(hdr) + len(body)), st.integers(0, 0xFFFF)))
    struct.pack_into("!H", hdr, 2, total)
    hl = ihl * 4
    if 20 <= hl <= len(hdr):
        struct.pack_into("!H", hdr, 10, checksum(hdr[:hl]))
    pkt = bytes(hdr) + body
    return pkt[: draw(st.integers(0, len(pkt)))] if draw(st.booleans()) else pkt


@st.composite
def ipv6_packets(draw: st.DrawFn) -> bytes:
    """IPv6 packets with a random chain of extension headers, maybe truncated."""
    kinds = draw(st.lists(st.sampled_from([0, 43, 44, 60]), max_size=4))
    final = draw(st.sampled_from([6, 17, 58, 59, 50, 0, 43, 44, 60, 255]))
    nexts = [*kinds[1:], final]
    body = b""
    for kind, nxt in zip(kinds, nexts, strict=False):  # no kinds: final only
        if kind == 44:
            fo = draw(st.one_of(st.sampled_from([0, 1, 8, 9]), st.integers(0, 0xFFFF)))
            body += struct.pack("!BxHI", nxt, fo, draw(st.integers(0, 2**32 - 1)))
        else:
            hlen = draw(st.integers(0, 3))
            third = draw(st.integers(0, 255))
            fourth = draw(st.sampled_from([0, 1, 255])) if kind == 43 else 0
            body += bytes([nxt, hlen, third, fourth]) + bytes(4 + 8 * hlen)
    body += draw(st.sampled_from(SEGMENTS)) + draw(st.binary(max_size=16))
    plen = draw(st.one_of(st.just(len(body)), st.integers(0, len(body) + 8)))
    pkt = struct.pack("!IHBB16s16s", 0x60000000, plen, kinds[0] if kinds else final, 64,
                      SRC6, DST6) + body  # fmt: skip
    cut = draw(st.integers(0, len(pkt)))
    if draw(st.booleans()):  # truncate and repair the payload length
        pkt = pkt[:cut]
        if cut >= 40:
            pkt = pkt[:4] + struct.pack("!H", cut - 40) + pkt[6:]
    return pkt


@settings(max_examples=1500, deadline=None, suppress_health_check=SLOW)
@given(st.one_of(ipv4_packets(), ipv6_packets()))
def test_generated_headers(buf: bytes) -> None:
    only_parse_errors(buf)


@st.composite
def option_bytes(draw: st.DrawFn) -> bytes:
    """TCP option lists built from plausible pieces, padded to a multiple of 4."""
    piece = st.one_of(
        st.just(b"\x01"),
        st.just(b"\x00"),
        st.integers(0, 255).map(lambda b: bytes([b])),
        st.tuples(
            st.sampled_from([2, 3, 4, 5, 8, 30, 253, 99]),
            st.integers(0, 12),
            st.binary(max_size=34),
        ).map(lambda t: bytes([t[0], t[1]]) + t[2][: max(0, t[1] - 2)]),
        st.tuples(st.sampled_from([2, 3, 4, 5, 8, 30, 99]), st.binary(max_size=34)).map(
            lambda t: bytes([t[0], 2 + len(t[1])]) + t[1]
        ),
    )
    raw = b"".join(draw(st.lists(piece, max_size=8)))[:40]
    pad = draw(st.sampled_from([b"\x00", b"\x01", b"\x02", b"\x08"]))
    return raw + pad * (-len(raw) % 4)


@settings(max_examples=600, deadline=None, suppress_health_check=SLOW)
@given(
    buf=st.binary(max_size=80),
    offset=st.integers(0, 80),
    length=st.integers(0, 80),
    pseudo=st.one_of(st.none(), st.integers(0, 0x1FFFF)),
    v6=st.booleans(),
)
def test_transport_parsers_directly(
    buf: bytes, offset: int, length: int, pseudo: int | None, v6: bool
) -> None:
    # Precondition of the transport parsers: 0 <= offset <= end <= len(buf).
    offset = min(offset, len(buf))
    end = min(offset + length, len(buf))
    for parse in (
        lambda: parse_tcp(buf, offset, end, pseudo),
        lambda: parse_udp(buf, offset, end, pseudo, ipv6=v6),
        lambda: parse_icmp(buf, offset, end, pseudo),
        lambda: parse_icmp(buf, offset, end, verify=False),
    ):
        with contextlib.suppress(ParseError):
            parse()


@settings(max_examples=1000, deadline=None, suppress_health_check=SLOW)
@given(
    options=st.one_of(option_bytes(), st.binary(max_size=40).map(lambda b: b + bytes(-len(b) % 4))),
    payload=st.one_of(st.just(b""), st.binary(max_size=16)),
)
def test_random_tcp_options(options: bytes, payload: bytes) -> None:
    # Valid packets with random option bytes: the option loop must fail cleanly.
    raw = build_tcp_packet(SRC4, DST4, 1, 2, 3, 4, ACK, 5, options, payload)
    with contextlib.suppress(ParseError):
        parse_all(raw)
