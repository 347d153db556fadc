"""The Internet checksum against a plain RFC 1071 word loop."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stack.wire import (
    checksum,
    ones_sum,
    pseudo_sum_v4,
    pseudo_sum_v6,
    udp_checksum_value,
    verify,
)

SRC4 = ipaddress.IPv4Address("198.18.0.1").packed
DST4 = ipaddress.IPv4Address("198.19.255.254").packed
SRC6 = ipaddress.IPv6Address("fd00::1").packed
DST6 = ipaddress.IPv6Address("fdff:ffff:ffff:ffff:ffff:ffff:ffff:fffe").packed


def ref_sum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 4.1, literally: add 16-bit words, then fold the carries."""
    if len(data) % 2:
        data += b"\x00"
    total = initial
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def test_rfc1071_example() -> None:
    # RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ones_sum(data) == 0xDDF2
    assert ref_sum(data) == 0xDDF2
    assert checksum(data) == 0x220D


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", 0),
        (b"\x00", 0),
        (b"\x00" * 64, 0),
        (b"\x01", 0x0100),  # odd byte is the high byte of a zero-padded word
        (b"\x00\x01", 0x0001),
        (b"\xff\xff", 0xFFFF),
        (b"\xff" * 1000, 0xFFFF),
        (b"\xff" * 1001, 0xFF00),
        (b"\x80\x00\x80\x00", 0x0001),  # end-around carry
        (b"\xff\xfe\x00\x01", 0xFFFF),  # a nonzero multiple of 0xFFFF is 0xFFFF, not 0
    ],
)
def test_known_sums(data: bytes, expected: int) -> None:
    assert ones_sum(data) == expected == ref_sum(data)


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.integers(0, 300).map(lambda n: b"\x00" * n),
        st.integers(0, 300).map(lambda n: b"\xff" * n),
        st.binary(min_size=1000, max_size=3000),
    ),
    initial=st.one_of(st.just(0), st.integers(0, 0xFFFF), st.integers(0, 1 << 40)),
)
def test_matches_reference(data: bytes, initial: int) -> None:
    assert ones_sum(data, initial) == ref_sum(data, initial)
    assert ones_sum(bytearray(data), initial) == ref_sum(data, initial)
    assert ones_sum(memoryview(data), initial) == ref_sum(data, initial)
    assert checksum(data, initial) == ~ref_sum(data, initial) & 0xFFFF


@pytest.mark.parametrize("size", [511, 512, 513, 1480, 4095, 9000, 65535, 65536, 200_001])
def test_large_inputs_use_the_fold_path(size: int) -> None:
    data = bytes((i * 7 + 3) & 0xFF for i in range(size))
    assert ones_sum(data, 5) == ref_sum(data, 5)
    assert ones_sum(b"\xff" * size) == ref_sum(b"\xff" * size)


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=300),
    pos=st.integers(0, 150),
    initial=st.integers(0, 0x3FFFF),
)
def test_checksum_in_place_verifies(body: bytes, pos: int, initial: int) -> None:
    pos = min(pos, len(body)) & ~1  # the checksum field is word-aligned
    zeroed = body[:pos] + b"\x00\x00" + body[pos:]
    c = checksum(zeroed, initial)
    filled = zeroed[:pos] + struct.pack("!H", c) + zeroed[pos + 2 :]
    assert verify(filled, initial)
    assert ones_sum(filled, initial) == 0xFFFF
    if ref_sum(zeroed, initial) == 0:  # all zero: the sum is +0, the checksum 0xFFFF
        assert c == 0xFFFF
        assert not verify(zeroed, initial)
    elif c in (0, 0xFFFF):
        # Otherwise 0x0000 and 0xFFFF are the same value in one's complement (RFC 1624 3).
        alt = zeroed[:pos] + struct.pack("!H", c ^ 0xFFFF) + zeroed[pos + 2 :]
        assert verify(alt, initial)
    if c not in (0, 0xFFFF):
        wrong = zeroed[:pos] + struct.pack("!H", c ^ 0x0100) + zeroed[pos + 2 :]
        assert not verify(wrong, initial)


def test_verify_rejects_all_zero() -> None:
    assert not verify(b"")
    assert not verify(b"\x00" * 20)
    assert verify(b"\xff\xff")
    assert verify(b"\x00\x00", 0xFFFF)


@given(length=st.integers(0, 0xFFFF), proto=st.sampled_from([1, 6, 17, 58]))
def test_pseudo_sums_match_reference(length: int, proto: int) -> None:
    hdr4 = SRC4 + DST4 + struct.pack("!BBH", 0, proto, length)
    assert pseudo_sum_v4(SRC4, DST4, proto, length) == ref_sum(hdr4)
    hdr6 = SRC6 + DST6 + struct.pack("!I3xB", length, proto)
    assert pseudo_sum_v6(SRC6, DST6, proto, length) == ref_sum(hdr6)


def test_pseudo_sum_v6_large_length() -> None:
    hdr6 = SRC6 + DST6 + struct.pack("!I3xB", 70000, 6)
    assert pseudo_sum_v6(SRC6, DST6, 6, 70000) == ref_sum(hdr6)


def test_udp_checksum_value() -> None:
    assert udp_checksum_value(0) == 0xFFFF
    assert udp_checksum_value(0x1234) == 0x1234
    assert udp_checksum_value(0xFFFF) == 0xFFFF


def test_zero_checksum_and_its_negative_zero_both_verify() -> None:
    zeroed = b"\xff\xff\x00\x00"  # the sum is already 0xFFFF: the checksum is 0
    assert checksum(zeroed) == 0
    assert verify(zeroed)
    assert verify(b"\xff\xff\xff\xff")
