"""ICMPv4 (RFC 792) and ICMPv6 (RFC 4443): parse, echo and destination unreachable.

The ICMPv4 checksum covers the ICMP message only; the ICMPv6 checksum also
covers the IPv6 pseudo-header (RFC 4443 2.3). ``parse_icmp`` takes the
pseudo-header sum like the TCP and UDP parsers do, with None meaning "no
pseudo-header" (ICMPv4) rather than "do not verify": an ICMP checksum is
mandatory in both versions. Pass ``verify=False`` to skip the check.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from stack.errors import ChecksumError, TruncatedError
from stack.wire.checksum import ones_sum as _ones_sum
from stack.wire.checksum import verify as _verify
from stack.wire.positional import positional

__all__ = [
    "ADMIN_PROHIBITED",
    "DEST_UNREACH",
    "ECHO_REPLY",
    "ECHO_REQUEST",
    "FRAG_NEEDED",
    "HOST_UNREACH",
    "ICMP6_ADDR_UNREACH",
    "ICMP6_ADMIN_PROHIBITED",
    "ICMP6_DEST_UNREACH",
    "ICMP6_ECHO_REPLY",
    "ICMP6_ECHO_REQUEST",
    "ICMP6_NEIGHBOR_AND_MLD_TYPES",
    "ICMP6_NO_ROUTE",
    "ICMP6_PACKET_TOO_BIG",
    "ICMP6_PORT_UNREACH",
    "ICMP6_TIME_EXCEEDED",
    "NET_UNREACH",
    "PORT_UNREACH",
    "PROTO_UNREACH",
    "TIME_EXCEEDED",
    "IcmpHeader",
    "build_echo",
    "build_icmp_unreachable",
    "parse_icmp",
]

# ICMPv4 types and destination-unreachable codes (RFC 792, RFC 1812 5.2.7.1).
ECHO_REPLY = 0
DEST_UNREACH = 3
NET_UNREACH = 0
HOST_UNREACH = 1
PROTO_UNREACH = 2
PORT_UNREACH = 3
FRAG_NEEDED = 4
ADMIN_PROHIBITED = 13
ECHO_REQUEST = 8
TIME_EXCEEDED = 11

# ICMPv6 types and destination-unreachable codes (RFC 4443 2.1, 3.1).
ICMP6_DEST_UNREACH = 1
ICMP6_NO_ROUTE = 0
ICMP6_ADMIN_PROHIBITED = 1
ICMP6_ADDR_UNREACH = 3
ICMP6_PORT_UNREACH = 4
ICMP6_PACKET_TOO_BIG = 2
ICMP6_TIME_EXCEEDED = 3
ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129
# MLD (RFC 2710, 3810), ND (RFC 4861), router renumbering (RFC 2894), node
# information (RFC 4620), inverse ND (RFC 3122): the kernel's own chatter on a TUN.
ICMP6_NEIGHBOR_AND_MLD_TYPES = frozenset(range(130, 144))

_HDR = struct.Struct("!BBHI")  # type, code, checksum, rest of header
_V4_ICMP = struct.Struct("!BBHHHBBH4s4sBBHI")  # IPv4 header + ICMP header
_V6_ICMP = struct.Struct("!IHBB16s16sBBHI")  # IPv6 header + ICMPv6 header
_U16 = struct.Struct("!H")
_PROTO_ICMP = 1
_PROTO_ICMPV6 = 58
_V4_QUOTE_MAX = 576 - 20 - 8  # RFC 1812 4.3.2.3: the error datagram fits in 576 bytes
_V6_QUOTE_MAX = 1280 - 40 - 8  # RFC 4443 2.4 (c): the error packet fits in the minimum MTU

_from_bytes = int.from_bytes


class IcmpHeader(NamedTuple):
    """The first 8 bytes of an ICMP/ICMPv6 message; the body follows them."""

    type: int
    code: int
    checksum: int
    rest: int  # the 4 bytes after the checksum: echo ident << 16 | seq, MTU, pointer...


_header = positional(IcmpHeader, "type", "code", "checksum", "rest")  # from _HDR, in order


def parse_icmp(
    buf: bytes | bytearray | memoryview,
    offset: int,
    end: int,
    pseudo_sum: int | None = None,
    *,
    verify: bool = True,
) -> IcmpHeader:
    """Parse the ICMP or ICMPv6 message at ``buf[offset:end]``.

    Args:
        buf: the packet buffer.
        offset: index of the ICMP header (``IpHeader.offset``).
        end: index where the message ends (``IpHeader.end``). The caller
            guarantees ``0 <= offset`` and ``end <= len(buf)``, as ``parse_ip``
            does; within that, any bytes raise only ``ParseError``.
        pseudo_sum: for ICMPv6, ``pseudo_sum_v6(src, dst, 58, end - offset)``;
            for ICMPv4, None (the checksum has no pseudo-header).
        verify: verify the checksum (the default).

    Returns:
        The parsed header; the body is ``buf[offset + 8:end]``.

    Raises:
        TruncatedError: fewer than 8 bytes (every message defined by RFC 792
            and RFC 4443 has at least 8).
        ChecksumError: the checksum does not verify.
    """
    avail = end - offset
    if avail < 8:
        raise TruncatedError(f"ICMP message of {avail} bytes")
    hdr = _header(_HDR.unpack_from(buf, offset))
    if verify and not _verify(buf[offset:end], 0 if pseudo_sum is None else pseudo_sum):
        raise ChecksumError("ICMP checksum")
    return hdr


def _icmp_packet(src: bytes, dst: bytes, type_: int, code: int, rest: int, body: bytes) -> bytes:
    # Message sum without the checksum field (RFC 792 / RFC 4443 2.3); body is 2-aligned.
    x = (type_ << 8) + code + rest
    if body:
        x += _ones_sum(body)
    addr = _from_bytes(src, "big") + _from_bytes(dst, "big")
    length = 8 + len(body)
    if len(src) == 4 and len(dst) == 4:
        total = 20 + length
        if total > 0xFFFF:
            raise ValueError(f"IPv4 total length {total} > 65535")
        # An all-zero message sums to +0, whose complement is 0xFFFF, not 0.
        csum = -x % 0xFFFF if x else 0xFFFF
        ip_csum = -(0x4500 + total + 0x4000 + (64 << 8) + _PROTO_ICMP + addr) % 0xFFFF
        hdr = _V4_ICMP.pack(
            0x45, 0, total, 0, 0x4000, 64, _PROTO_ICMP, ip_csum, src, dst, type_, code, csum, rest
        )
    elif len(src) == 16 and len(dst) == 16:
        if length > 0xFFFF:
            raise ValueError(f"ICMPv6 length {length} > 65535")
        csum = -(x + addr + _PROTO_ICMPV6 + length) % 0xFFFF
        hdr = _V6_ICMP.pack(
            0x60000000, length, _PROTO_ICMPV6, 64, src, dst, type_, code, csum, rest
        )
    else:
        raise ValueError("addresses must both be 4 or both be 16 bytes")
    return hdr + body


def build_echo(
    src: bytes, dst: bytes, *, ident: int, seq: int, payload: bytes, reply: bool
) -> bytes:
    """Build an ICMP or ICMPv6 echo request or reply packet (hop limit 64).

    Args:
        src: source address (4 or 16 bytes).
        dst: destination address (same length).
        ident: echo identifier.
        seq: echo sequence number.
        payload: echo data.
        reply: build a reply (type 0 / 129) rather than a request (8 / 128).

    Returns:
        The complete IP packet.
    """
    if len(src) == 4:
        type_ = ECHO_REPLY if reply else ECHO_REQUEST
    else:
        type_ = ICMP6_ECHO_REPLY if reply else ICMP6_ECHO_REQUEST
    return _icmp_packet(src, dst, type_, 0, (ident << 16) | seq, payload)


def build_icmp_unreachable(original_packet: bytes, *, code: int, src: bytes, mtu: int = 0) -> bytes:
    """Build a destination-unreachable error for a client packet.

    The error goes back to the original sender, from ``src`` (normally the
    original destination). ICMPv4 (type 3) quotes the original datagram up to
    576 bytes in total (RFC 1812 4.3.2.3; at least the header and 8 bytes as
    RFC 792 requires); ICMPv6 (type 1) quotes as much as fits in 1280 bytes
    (RFC 4443 2.4 (c)). Link padding beyond the original's length field is
    not quoted.

    The caller decides whether an error may be sent at all (RFC 1122 3.2.2,
    RFC 4443 2.4 (e)): never about an ICMP error, a non-first fragment, or a
    multicast or broadcast packet, and rate-limited.

    Args:
        original_packet: the offending packet, starting at its IP header.
        code: the ICMPv4 or ICMPv6 destination-unreachable code.
        src: the error's source address (same family as the original).
        mtu: the next-hop MTU, sent with the ICMPv4 FRAG_NEEDED code (RFC 1191 4).

    Returns:
        The complete IP packet.

    Raises:
        ValueError: the original is not a plausible IPv4/IPv6 packet or ``src``
            is of the other family.
    """
    n = len(original_packet)
    version = original_packet[0] >> 4 if n else 0
    if version == 4 and n >= 20:
        total = _U16.unpack_from(original_packet, 2)[0]
        limit = min(n, total) if total >= 20 else n
        quote = original_packet[: min(limit, _V4_QUOTE_MAX)]
        rest = mtu & 0xFFFF if code == FRAG_NEEDED else 0
        return _icmp_packet(src, original_packet[12:16], DEST_UNREACH, code, rest, quote)
    if version == 6 and n >= 40:
        limit = min(n, 40 + _U16.unpack_from(original_packet, 4)[0])
        quote = original_packet[: min(limit, _V6_QUOTE_MAX)]
        return _icmp_packet(src, original_packet[8:24], ICMP6_DEST_UNREACH, code, 0, quote)
    raise ValueError("not an IPv4 or IPv6 packet")
