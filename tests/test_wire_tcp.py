"""TCP header, options and packet building, cross-checked with scapy."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from stack.errors import BadHeaderError, BadLengthError, ChecksumError, ParseError, TruncatedError
from stack.wire import (
    ACK,
    CWR,
    ECE,
    FIN,
    NO_OPTIONS,
    PROTO_TCP,
    PSH,
    RST,
    SYN,
    URG,
    IpHeader,
    TcpHeader,
    TcpOptions,
    build_tcp_packet,
    build_tcp_packet_partial_csum,
    checksum,
    encode_options,
    parse_ip,
    parse_tcp,
    pseudo_sum_v4,
    pseudo_sum_v6,
)

from packets import pseudo_header_sum

A4, B4 = "198.18.0.1", "198.19.1.2"
A6, B6 = "fd00::1", "fd12:3456::2"
SRC4, DST4 = ipaddress.IPv4Address(A4).packed, ipaddress.IPv4Address(B4).packed
SRC6, DST6 = ipaddress.IPv6Address(A6).packed, ipaddress.IPv6Address(B6).packed
TS = (0x01020304, 0xA0B0C0D0)


def parse(raw: bytes | bytearray | memoryview) -> tuple[IpHeader, TcpHeader]:
    ip = parse_ip(raw)
    return ip, parse_tcp(raw, ip.offset, ip.end, pseudo_header_sum(ip))


def tcp_raw(
    options: list[tuple[Any, Any]] | bytes, payload: bytes = b"", *, v6: bool = False
) -> bytes:
    """A scapy-built packet whose TCP options are ``options``.

    Scapy only encodes well-formed options, so raw option bytes (a multiple of
    4) go in front of the payload with the data offset set to cover them.
    """
    l3 = IPv6(src=A6, dst=B6) if v6 else IP(src=A4, dst=B4)
    if isinstance(options, bytes):
        assert len(options) % 4 == 0
        tcp = TCP(sport=1, dport=2, dataofs=5 + len(options) // 4)
        return bytes(l3 / tcp / Raw(options + payload))
    return bytes(l3 / TCP(sport=1, dport=2, options=options) / Raw(payload))


# Parsing


@pytest.mark.parametrize("v6", [False, True])
def test_no_options_fast_path(v6: bool) -> None:
    l3 = IPv6(src=A6, dst=B6) if v6 else IP(src=A4, dst=B4)
    pkt = l3 / TCP(sport=40000, dport=443, seq=0xFFFFFFFF, ack=7, flags="PA", window=65535)
    raw = bytes(pkt / Raw(b"GET / HTTP/1.1\r\n"))
    ip, tcp = parse(raw)
    assert tcp == (40000, 443, 0xFFFFFFFF, 7, PSH | ACK, 65535, 0, 20, NO_OPTIONS)
    assert tcp.options is NO_OPTIONS
    assert raw[ip.offset + 20 : ip.end] == b"GET / HTTP/1.1\r\n"


@pytest.mark.parametrize("v6", [False, True])
def test_timestamps_fast_path(v6: bool) -> None:
    raw = tcp_raw([("NOP", None), ("NOP", None), ("Timestamp", TS)], b"data", v6=v6)
    ip, tcp = parse(raw)
    assert tcp.header_len == 32
    assert tcp.options == TcpOptions(timestamps=TS)
    assert raw[ip.offset + 32 : ip.end] == b"data"


def test_32_byte_header_without_timestamps_takes_the_general_path() -> None:
    raw = tcp_raw([("MSS", 1400), ("NOP", None), ("WScale", 9), ("SAckOK", b""), ("NOP", None)])
    _, tcp = parse(raw)
    assert tcp.header_len == 32
    assert tcp.options == TcpOptions(mss=1400, wscale=9, sack_permitted=True)


@pytest.mark.parametrize("n_blocks", [1, 2, 3, 4])
def test_every_option_kind(n_blocks: int) -> None:
    edges = tuple(range(1000, 1000 + 2 * n_blocks))
    blocks = tuple(zip(edges[::2], edges[1::2], strict=True))
    opts: list[tuple[Any, Any]] = [
        ("SAck", edges),
        (253, b""),  # experimental, empty: skipped by its length
        ("NOP", None),
        ("EOL", None),
    ]
    expected = TcpOptions(sack_blocks=blocks)
    if n_blocks <= 2:
        opts[1:1] = [
            ("MSS", 1460),
            (30, b"\x01\x02"),  # MPTCP, unknown here: skipped by its length
            ("WScale", 7),
            ("SAckOK", b""),
        ]
        expected = expected._replace(mss=1460, wscale=7, sack_permitted=True)
    if n_blocks == 1:
        opts.insert(0, ("Timestamp", TS))
        expected = expected._replace(timestamps=TS)
    raw = tcp_raw(opts, b"x")
    _, tcp = parse(raw)
    assert tcp.options == expected
    assert tcp.header_len == IP(raw)[TCP].dataofs * 4


def test_eol_ends_the_option_list() -> None:
    raw = tcp_raw(bytes([0, 2, 4, 5, 0xB4, 1, 1, 1]))  # EOL, then what would be an MSS
    assert parse(raw)[1].options == NO_OPTIONS


@pytest.mark.parametrize(("shift", "expected"), [(0, 0), (14, 14), (15, 14), (255, 14)])
def test_window_scale_clamped(shift: int, expected: int) -> None:
    raw = tcp_raw(bytes([1, 3, 3, shift]))
    assert parse(raw)[1].options.wscale == expected


@pytest.mark.parametrize(
    "opt",
    [
        bytes([2, 3, 5, 1]),  # MSS of length 3
        bytes([2, 6, 5, 0xB4, 0, 0]),  # MSS of length 6
        bytes([3, 4, 7, 0]),  # WS of length 4
        bytes([4, 3, 0, 1]),  # SACK-permitted of length 3
        bytes([8, 6, 0, 0, 0, 1]) + bytes(2),  # TS of length 6
        bytes([5, 9]) + bytes(7) + bytes(3),  # SACK of length 9
        bytes([5, 2, 1, 1]),  # SACK without blocks
    ],
)
def test_known_option_with_wrong_length_is_ignored(opt: bytes) -> None:
    raw = tcp_raw(opt + bytes(-len(opt) % 4))
    assert parse(raw)[1].options == NO_OPTIONS


@pytest.mark.parametrize(
    "opt",
    [
        bytes([2, 0, 0, 0]),  # length 0 (would loop forever)
        bytes([99, 1, 0, 0]),  # length 1
        bytes([1, 1, 1, 2]),  # MSS kind in the last byte: no length
        bytes([2, 4, 5, 0xB4, 30, 5, 0, 0]),  # unknown option runs past the header
        bytes([8, 10, 0, 0, 0, 0, 0, 0]),  # TS runs past the header
    ],
)
def test_bad_option_lengths(opt: bytes) -> None:
    raw = tcp_raw(opt)
    ip = parse_ip(raw)
    with pytest.raises(BadHeaderError):
        parse_tcp(raw, ip.offset, ip.end, pseudo_header_sum(ip))
    with pytest.raises(BadHeaderError):
        parse_tcp(raw, ip.offset, ip.end)


@pytest.mark.parametrize("flags", [FIN, SYN, RST, PSH, ACK, URG, ECE, CWR, 0xFF, SYN | ACK | ECE])
def test_flags(flags: int) -> None:
    raw = bytes(IP(src=A4, dst=B4) / TCP(flags=flags, urgptr=9))
    tcp = parse(raw)[1]
    assert tcp.flags == flags
    assert tcp.urgent == 9


def test_reserved_bits_are_dropped() -> None:
    raw = bytearray(bytes(IP(src=A4, dst=B4) / TCP(flags="S")))
    raw[32] |= 0x0F  # reserved and AE bits
    assert parse_tcp(raw, 20, len(raw)).flags == SYN


@pytest.mark.parametrize("ctor", [bytes, bytearray, memoryview])
def test_nonzero_offset_and_buffer_types(ctor: type) -> None:
    seg = bytes(TCP(sport=5, dport=6, options=[("MSS", 536)]) / Raw(b"abc"))
    buf = ctor(b"\xee" * 13 + seg + b"\xee" * 5)
    tcp = parse_tcp(buf, 13, 13 + len(seg))
    assert (tcp.src_port, tcp.dst_port, tcp.header_len, tcp.options.mss) == (5, 6, 24, 536)
    assert bytes(buf[13 + tcp.header_len : 13 + len(seg)]) == b"abc"


def test_truncated_segments() -> None:
    raw = tcp_raw([("MSS", 1460)], b"payload")
    for end in range(20, 20 + 20):
        with pytest.raises(TruncatedError):
            parse_tcp(raw, 20, end)
    for end in range(40, 44):  # header claims 24 bytes
        with pytest.raises(BadLengthError):
            parse_tcp(raw, 20, end)
    for end in range(20, len(raw)):  # every shorter segment fails its checksum at least
        ps = pseudo_sum_v4(SRC4, DST4, PROTO_TCP, end - 20)
        with pytest.raises(ParseError):
            parse_tcp(raw, 20, end, ps)


@pytest.mark.parametrize("data_offset", [0, 1, 4])
def test_data_offset_below_5(data_offset: int) -> None:
    raw = bytearray(bytes(IP(src=A4, dst=B4) / TCP() / Raw(b"x" * 40)))
    raw[32] = data_offset << 4
    with pytest.raises(BadLengthError):
        parse_tcp(raw, 20, len(raw))


def test_header_longer_than_segment() -> None:
    raw = bytearray(bytes(IP(src=A4, dst=B4) / TCP() / Raw(b"x" * 10)))
    raw[32] = 8 << 4  # 32-byte header, 30-byte segment
    with pytest.raises(BadLengthError):
        parse_tcp(raw, 20, len(raw))


@pytest.mark.parametrize("v6", [False, True])
def test_bad_checksum(v6: bool) -> None:
    raw = bytearray(tcp_raw([("NOP", None), ("NOP", None), ("Timestamp", TS)], b"abcde", v6=v6))
    ip = parse_ip(raw)
    for i in range(ip.offset, ip.end):
        bad = bytearray(raw)
        bad[i] ^= 0x04
        with pytest.raises(ChecksumError):
            parse_tcp(bad, ip.offset, ip.end, pseudo_header_sum(ip))
    raw[-1] ^= 0x01
    assert parse_tcp(raw, ip.offset, ip.end).options.timestamps == TS  # not verified
    wrong_pseudo = pseudo_sum_v4(SRC4, SRC4, PROTO_TCP, ip.end - ip.offset)
    with pytest.raises(ChecksumError):
        parse_tcp(bytes(tcp_raw([], b"abc")), 20, 43, wrong_pseudo)


# encode_options


def test_encode_linux_layouts() -> None:
    ts = b"\x01\x02\x03\x04\xa0\xb0\xc0\xd0"
    syn = encode_options(mss=1460, sack_permitted=True, timestamps=TS, wscale=7)
    assert syn == bytes.fromhex("020405b4 0402080a").replace(b" ", b"") + ts + b"\x01\x03\x03\x07"
    assert encode_options(timestamps=TS) == b"\x01\x01\x08\x0a" + ts
    assert encode_options(mss=536, sack_permitted=True) == bytes.fromhex("02040218010104 02")
    assert encode_options(mss=1400, timestamps=TS) == bytes.fromhex("02040578") + (
        b"\x01\x01\x08\x0a" + ts
    )
    assert encode_options() == b""
    sack = encode_options(timestamps=TS, sack_blocks=[(1, 2)])
    assert sack == b"\x01\x01\x08\x0a" + ts + bytes.fromhex(
        "0101050a 00000001 00000002".replace(" ", "")
    )


def test_encode_drops_sack_blocks_that_do_not_fit() -> None:
    blocks = [(i, i + 1) for i in range(0, 10, 2)]
    with_ts = encode_options(timestamps=TS, sack_blocks=blocks)
    assert len(with_ts) == 12 + 4 + 3 * 8
    without = encode_options(sack_blocks=blocks)
    assert len(without) == 4 + 4 * 8
    everything = encode_options(
        mss=1, wscale=1, sack_permitted=True, timestamps=TS, sack_blocks=blocks
    )
    assert len(everything) == 20 + 4 + 2 * 8
    raw = build_tcp_packet(SRC4, DST4, 1, 2, 3, 4, ACK, 5, everything)
    assert parse(raw)[1].options.sack_blocks == tuple(blocks[:2])


def test_encode_rejects_bad_window_scale() -> None:
    with pytest.raises(ValueError):
        encode_options(wscale=15)


option_sets = st.fixed_dictionaries(
    {},
    optional={
        "mss": st.integers(0, 0xFFFF),
        "wscale": st.integers(0, 14),
        "sack_permitted": st.booleans(),
        "timestamps": st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
        "sack_blocks": st.lists(
            st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), max_size=5
        ),
    },
)


@settings(max_examples=150, deadline=None)
@given(kw=option_sets)
def test_encode_parse_round_trip(kw: dict[str, Any]) -> None:
    opts = encode_options(**kw)
    assert len(opts) % 4 == 0 and len(opts) <= 40
    raw = build_tcp_packet(SRC6, DST6, 1, 2, 3, 4, SYN, 5, opts, b"p")
    parsed = parse(raw)[1].options
    blocks = tuple(kw.pop("sack_blocks", ()))
    room = (40 - len(encode_options(**kw)) - 4) // 8
    assert parsed.sack_blocks == blocks[:room]
    assert parsed == TcpOptions(sack_blocks=parsed.sack_blocks, **kw)


# Building


def scapy_check(raw: bytes, v6: bool) -> TCP:
    """Parse with scapy, check that its recomputed checksums equal ours."""
    pkt = IPv6(raw) if v6 else IP(raw)
    ours = pkt[TCP].chksum
    del pkt[TCP].chksum
    if not v6:
        ip_ours = pkt.chksum
        del pkt.chksum
    again = IPv6(bytes(pkt)) if v6 else IP(bytes(pkt))
    assert again[TCP].chksum == ours
    if not v6:
        assert again.chksum == ip_ours
    assert bytes(again) == raw
    return again[TCP]


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("payload_len", [0, 1, 2, 3, 536, 1460, 1461, 9001])
@pytest.mark.parametrize("ctor", [bytes, bytearray, memoryview])
def test_build_against_scapy(v6: bool, payload_len: int, ctor: type) -> None:
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    payload = bytes((i * 31 + 7) & 0xFF for i in range(payload_len))
    opts = encode_options(timestamps=TS)
    raw = build_tcp_packet(
        src, dst, 50000, 80, 0xFFFFFFF0, 12345, PSH | ACK, 502, opts, ctor(payload), ttl=9
    )
    assert type(raw) is bytes
    tcp = scapy_check(raw, v6)
    l3 = tcp.underlayer
    assert (l3.src, l3.dst) == ((A6, B6) if v6 else (A4, B4))
    assert (l3.hlim if v6 else l3.ttl) == 9
    if not v6:
        assert (l3.flags, l3.id, l3.len) == ("DF", 0, len(raw))
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack) == (50000, 80, 0xFFFFFFF0, 12345)
    assert (tcp.flags, tcp.window, tcp.urgptr, tcp.dataofs) == (PSH | ACK, 502, 0, 8)
    assert tcp.options == [("NOP", None), ("NOP", None), ("Timestamp", TS)]
    assert bytes(tcp.payload) == payload
    _, parsed = parse(raw)
    assert parsed.options.timestamps == TS


@pytest.mark.parametrize("v6", [False, True])
def test_build_pure_ack_and_syn(v6: bool) -> None:
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    ack = build_tcp_packet(src, dst, 1, 2, 3, 4, ACK, 5)
    assert len(ack) == (60 if v6 else 40)
    scapy_check(ack, v6)
    syn_opts = encode_options(mss=1460, sack_permitted=True, timestamps=TS, wscale=7)
    syn = build_tcp_packet(src, dst, 1, 2, 3, 0, SYN, 65535, syn_opts)
    tcp = scapy_check(syn, v6)
    assert tcp.options == [
        ("MSS", 1460), ("SAckOK", b""), ("Timestamp", TS), ("NOP", None), ("WScale", 7)
    ]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    v6=st.booleans(),
    seq=st.integers(0, 2**32 - 1),
    ack=st.integers(0, 2**32 - 1),
    flags=st.integers(0, 0xFF),
    window=st.integers(0, 0xFFFF),
    ports=st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
    payload=st.binary(max_size=64),
    n_opt_words=st.integers(0, 10),
)
def test_build_property(
    v6: bool,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    ports: tuple[int, int],
    payload: bytes,
    n_opt_words: int,
) -> None:
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    opts = b"\x01" * (4 * n_opt_words)
    raw = build_tcp_packet(src, dst, *ports, seq, ack, flags, window, opts, payload)
    scapy_check(raw, v6)
    ip, tcp = parse(raw)
    assert tcp == (*ports, seq, ack, flags, window, 0, 20 + len(opts), NO_OPTIONS)
    assert raw[ip.offset + 20 + len(opts) : ip.end] == payload


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("payload", [b"", b"a", b"ab" * 700])
def test_partial_checksum(v6: bool, payload: bytes) -> None:
    src, dst = (SRC6, DST6) if v6 else (SRC4, DST4)
    opts = encode_options(timestamps=TS)
    args = (src, dst, 1000, 2000, 1, 2, ACK, 100, opts, payload)
    full = build_tcp_packet(*args)
    part = build_tcp_packet_partial_csum(*args)
    start = 40 if v6 else 20
    assert part[: start + 16] == full[: start + 16]
    assert part[start + 18 :] == full[start + 18 :]
    field = struct.unpack_from("!H", part, start + 16)[0]
    ps = (pseudo_sum_v6 if v6 else pseudo_sum_v4)(src, dst, PROTO_TCP, len(full) - start)
    assert field == ps
    # What the device does (virtio csum_start/csum_offset): checksum from csum_start on.
    completed = checksum(part[start:])
    assert struct.pack("!H", completed) == full[start + 16 : start + 18]


def test_build_argument_errors() -> None:
    with pytest.raises(ValueError):
        build_tcp_packet(SRC4, DST4, 1, 2, 3, 4, ACK, 5, b"\x01\x01\x01")
    with pytest.raises(ValueError):
        build_tcp_packet(SRC4, DST4, 1, 2, 3, 4, ACK, 5, b"\x01" * 44)
    with pytest.raises(ValueError):
        build_tcp_packet(SRC4, DST6, 1, 2, 3, 4, ACK, 5)
    with pytest.raises(ValueError):
        build_tcp_packet(SRC4[:3], DST4[:3], 1, 2, 3, 4, ACK, 5)
    with pytest.raises(ValueError):
        build_tcp_packet(SRC4, DST4, 1, 2, 3, 4, ACK, 5, payload=bytes(65535 - 39))
    assert len(build_tcp_packet(SRC4, DST4, 1, 2, 3, 4, ACK, 5, payload=bytes(65535 - 40)))
    with pytest.raises(ValueError):
        build_tcp_packet(SRC6, DST6, 1, 2, 3, 4, ACK, 5, payload=bytes(65535 - 19))
    with pytest.raises(ValueError):
        build_tcp_packet_partial_csum(SRC6, DST4, 1, 2, 3, 4, ACK, 5)
