"""UDP (RFC 768; IPv6 rules from RFC 8200 8.1): parse and build.

The checksum is computed the same way as TCP's in ``stack.wire.tcp``: from the
field values, the pseudo-header and ``ones_sum`` of the payload.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from stack.errors import BadLengthError, ChecksumError, TruncatedError
from stack.wire.checksum import ones_sum as _ones_sum
from stack.wire.checksum import verify as _verify
from stack.wire.positional import positional

__all__ = ["UdpHeader", "build_udp_packet", "parse_udp"]

_HDR = struct.Struct("!HHHH")
_V4_UDP = struct.Struct("!BBHHHBBH4s4sHHHH")  # IPv4 header + UDP header
_V6_UDP = struct.Struct("!IHBB16s16sHHHH")  # IPv6 header + UDP header
_PROTO_UDP = 17

_from_bytes = int.from_bytes


class UdpHeader(NamedTuple):
    """A parsed UDP header; the payload is ``buf[offset + 8:offset + length]``."""

    src_port: int
    dst_port: int
    length: int  # header + data, from the length field
    checksum: int  # 0 on IPv4 means "not computed"


_header = positional(UdpHeader, "src_port", "dst_port", "length", "checksum")


def parse_udp(
    buf: bytes | bytearray | memoryview,
    offset: int,
    end: int,
    pseudo_sum: int | None = None,
    *,
    ipv6: bool = False,
) -> UdpHeader:
    """Parse and validate the UDP datagram at ``buf[offset:end]``.

    Bytes between ``offset + length`` and ``end`` are ignored, as Linux trims
    them.

    Args:
        buf: the packet buffer.
        offset: index of the UDP header (``IpHeader.offset``).
        end: index where the IP payload ends (``IpHeader.end``). The caller
            guarantees ``0 <= offset`` and ``end <= len(buf)``, as ``parse_ip``
            does; within that, any bytes raise only ``ParseError``.
        pseudo_sum: the pseudo-header sum computed with
            ``length = end - offset``, like for TCP (it is corrected here when
            the UDP length field is shorter), or None to skip verification.
        ipv6: the datagram came over IPv6, where a zero checksum is invalid
            (RFC 8200 8.1); over IPv4 it means "no checksum" (RFC 768).

    Returns:
        The parsed header.

    Raises:
        TruncatedError: fewer than 8 bytes.
        BadLengthError: the length field is below 8 or beyond ``end``.
        ChecksumError: the checksum does not verify, or is zero over IPv6 (even
            when ``pseudo_sum`` is None).
    """
    avail = end - offset
    if avail < 8:
        raise TruncatedError(f"UDP datagram of {avail} bytes")
    sport, dport, length, csum = _HDR.unpack_from(buf, offset)
    if length < 8 or length > avail:
        raise BadLengthError(f"UDP length {length} outside 8..{avail}")
    if csum == 0:
        if ipv6:
            raise ChecksumError("zero UDP checksum over IPv6")
    elif pseudo_sum is not None:
        # RFC 768: the pseudo-header carries the UDP length. pseudo_sum was computed
        # with avail; the length adds linearly, so subtract the difference (mod 0xFFFF).
        initial = pseudo_sum - (avail - length) + 0x1FFFE
        if not _verify(buf[offset : offset + length], initial):
            raise ChecksumError("UDP checksum")
    return _header((sport, dport, length, csum))


def build_udp_packet(
    src: bytes,
    dst: bytes,
    src_port: int,
    dst_port: int,
    payload: bytes | bytearray | memoryview,
    *,
    ttl: int = 64,
) -> bytes:
    """Build a complete IPv4 or IPv6 packet carrying one UDP datagram.

    A computed checksum of 0 is sent as 0xFFFF (RFC 768, RFC 8200 8.1).

    Args:
        src: source address (4 or 16 bytes; IPv4 uses DF set and ident 0).
        dst: destination address (same length).
        src_port: source port.
        dst_port: destination port.
        payload: the datagram data.
        ttl: IPv4 TTL or IPv6 hop limit.

    Returns:
        The packet bytes.

    Raises:
        ValueError: bad address lengths or a datagram too large.
    """
    length = 8 + len(payload)
    # Header fields twice the length: once in the header, once in the pseudo-header.
    x = src_port + dst_port + length + length + _PROTO_UDP
    if payload:
        x += _ones_sum(payload)
    addr = _from_bytes(src, "big") + _from_bytes(dst, "big")
    csum = -(x + addr) % 0xFFFF or 0xFFFF
    if len(src) == 4 and len(dst) == 4:
        total = 20 + length
        if total > 0xFFFF:
            raise ValueError(f"IPv4 total length {total} > 65535")
        ip_csum = -(0x4500 + total + 0x4000 + (ttl << 8) + _PROTO_UDP + addr) % 0xFFFF
        hdr = _V4_UDP.pack(
            0x45, 0, total, 0, 0x4000, ttl, _PROTO_UDP, ip_csum, src, dst,
            src_port, dst_port, length, csum,
        )  # fmt: skip
    elif len(src) == 16 and len(dst) == 16:
        if length > 0xFFFF:
            raise ValueError(f"UDP length {length} > 65535")
        hdr = _V6_UDP.pack(
            0x60000000, length, _PROTO_UDP, ttl, src, dst, src_port, dst_port, length, csum
        )
    else:
        raise ValueError("addresses must both be 4 or both be 16 bytes")
    return hdr + payload if payload else hdr
