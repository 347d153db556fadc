"""TCP header (RFC 9293 3.1) and options (RFC 7323, RFC 2018): parse and build.

Theory of operation: the 20-byte fixed header is one ``struct.Struct``.
Options take two fast paths: none at all (``NO_OPTIONS``, no loop), and the
NOP,NOP,TS layout that Linux puts on every data segment (one more ``struct``
call). Anything else goes through the general option loop.

``build_tcp_packet`` emits a whole IPv4 or IPv6 packet. It computes both
checksums arithmetically before packing anything: the TCP checksum is the
sum of the header field values, the pseudo-header, the options (read as one
big-endian int: they start on a 16-bit boundary, so the int is congruent to
their word sum modulo 0xFFFF, RFC 1071) and ``ones_sum`` of the payload.
The IP and TCP headers are then packed by a single ``Struct.pack`` and joined
with the options and payload in one allocation.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from stack.compiled import mypyc_attr
from stack.errors import BadHeaderError, BadLengthError, ChecksumError, TruncatedError
from stack.wire.checksum import ones_sum as _ones_sum
from stack.wire.checksum import verify as _verify
from stack.wire.positional import positional

__all__ = [
    "ACK",
    "CWR",
    "ECE",
    "FIN",
    "NO_OPTIONS",
    "PSH",
    "RST",
    "SYN",
    "URG",
    "TcpHeader",
    "TcpOptions",
    "build_tcp_packet",
    "build_tcp_packet_partial_csum",
    "encode_options",
    "parse_tcp",
]

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20
ECE = 0x40
CWR = 0x80

# Option kinds (RFC 9293 3.2, RFC 7323, RFC 2018).
_EOL = 0
_NOP = 1
_MSS = 2
_WS = 3
_SACK_PERM = 4
_SACK = 5
_TS = 8
_MAX_WSCALE = 14  # RFC 7323 2.3

_HDR = struct.Struct("!HHIIHHHH")  # ports, seq, ack, offset/flags, window, checksum, urgent
_NOP_NOP_TS = 0x0101080A  # NOP, NOP, kind 8, length 10 (Linux data-segment layout)
_SACKP_TS = 0x0402080A  # SACK-permitted, kind 8, length 10 (Linux SYN layout)
_TS_OPT = struct.Struct("!III")  # 4 option bytes as one word, TSval, TSecr
_U16 = struct.Struct("!H")
_U32X2 = struct.Struct("!II")
_MSS_OPT = struct.Struct("!HH")
_SACK_BLOCKS = [struct.Struct(f"!{2 * n}I") for n in range(5)]  # at most 4 fit in 40 bytes

_V4_TCP = struct.Struct("!BBHHHBBH4s4sHHIIHHHH")  # IPv4 header + TCP fixed header
_V6_TCP = struct.Struct("!IHBB16s16sHHIIHHHH")  # IPv6 header + TCP fixed header
_PROTO_TCP = 6

_from_bytes = int.from_bytes


class TcpOptions(NamedTuple):
    """The TCP options the stack understands; unknown kinds are skipped."""

    mss: int | None = None  # RFC 9293 3.7.1
    wscale: int | None = None  # RFC 7323 2, already clamped to 14
    sack_permitted: bool = False  # RFC 2018 2
    timestamps: tuple[int, int] | None = None  # (TSval, TSecr), RFC 7323 3
    sack_blocks: tuple[tuple[int, int], ...] = ()  # (left, right) edges, RFC 2018 3


NO_OPTIONS = TcpOptions()
_options = positional(TcpOptions, "mss", "wscale", "sack_permitted", "timestamps", "sack_blocks")


class TcpHeader(NamedTuple):
    """A parsed TCP header; the payload is ``buf[offset + header_len:end]``."""

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int  # FIN..CWR bits (the reserved/AE bits are dropped)
    window: int  # raw field value, not scaled
    urgent: int
    header_len: int  # bytes, options included
    options: TcpOptions


_header = positional(
    TcpHeader,
    "src_port", "dst_port", "seq", "ack", "flags", "window", "urgent", "header_len", "options",
)  # fmt: skip


def parse_tcp(
    buf: bytes | bytearray | memoryview,
    offset: int,
    end: int,
    pseudo_sum: int | None = None,
) -> TcpHeader:
    """Parse and validate the TCP segment at ``buf[offset:end]``.

    Options with a known kind but a wrong length are ignored, as Linux does;
    an option whose length byte is missing, below 2 or runs past the header is
    an error. A window-scale shift above 14 is clamped to 14 (RFC 7323 2.3).

    Args:
        buf: the packet buffer.
        offset: index of the TCP header (``IpHeader.offset``).
        end: index where the segment ends (``IpHeader.end``). The caller
            guarantees ``0 <= offset`` and ``end <= len(buf)``, as ``parse_ip``
            does; within that, any bytes raise only ``ParseError``.
        pseudo_sum: the pseudo-header sum (``pseudo_sum_v4``/``pseudo_sum_v6``
            with ``length = end - offset``) to verify the checksum, or None to
            skip verification (e.g. a checksum already validated by offload).

    Returns:
        The parsed header.

    Raises:
        TruncatedError: fewer than 20 bytes.
        BadLengthError: data offset below 5 or header longer than the segment.
        BadHeaderError: a malformed option.
        ChecksumError: the checksum does not verify.
    """
    seg_len = end - offset
    if seg_len < 20:
        raise TruncatedError(f"TCP segment of {seg_len} bytes")
    sport, dport, seq, ack, off_flags, window, _csum, urgent = _HDR.unpack_from(buf, offset)
    hl = (off_flags >> 10) & 0x3C  # data offset in 32-bit words, times 4
    if hl < 20:
        raise BadLengthError(f"TCP data offset {hl >> 2} < 5")
    if hl > seg_len:
        raise BadLengthError(f"TCP header length {hl} > segment length {seg_len}")
    # RFC 9293 3.1: the whole segment plus the pseudo-header sums to 0xFFFF.
    if pseudo_sum is not None and not _verify(buf[offset:end], pseudo_sum):
        raise ChecksumError("TCP checksum")
    if hl == 20:
        options = NO_OPTIONS
    elif hl == 32:
        word, tsval, tsecr = _TS_OPT.unpack_from(buf, offset + 20)
        if word == _NOP_NOP_TS:
            options = _options((None, None, False, (tsval, tsecr), ()))
        else:
            options = _parse_options(buf, offset + 20, offset + 32)
    else:
        options = _parse_options(buf, offset + 20, offset + hl)
    return _header((sport, dport, seq, ack, off_flags & 0xFF, window, urgent, hl, options))


def _parse_options(buf: bytes | bytearray | memoryview, i: int, end: int) -> TcpOptions:
    mss: int | None = None
    wscale: int | None = None
    sack_permitted = False
    timestamps: tuple[int, int] | None = None
    sack_blocks: tuple[tuple[int, int], ...] = ()
    while i < end:
        kind = buf[i]
        if kind == _NOP:
            i += 1
            continue
        if kind == _EOL:  # RFC 9293 3.2: end of the option list
            break
        if i + 1 >= end:
            raise BadHeaderError(f"TCP option {kind} without a length")
        length = buf[i + 1]
        if length < 2 or i + length > end:
            raise BadHeaderError(f"TCP option {kind} with bad length {length}")
        if kind == _TS:
            if length == 10:
                timestamps = _U32X2.unpack_from(buf, i + 2)
        elif kind == _SACK:
            n, rem = divmod(length - 2, 8)
            if n and not rem:
                edges = _SACK_BLOCKS[n].unpack_from(buf, i + 2)
                sack_blocks = tuple(zip(edges[::2], edges[1::2], strict=True))
        elif kind == _MSS:
            if length == 4:
                mss = _U16.unpack_from(buf, i + 2)[0]
        elif kind == _WS:
            if length == 3:
                wscale = min(buf[i + 2], _MAX_WSCALE)
        elif kind == _SACK_PERM and length == 2:
            sack_permitted = True
        i += length
    return _options((mss, wscale, sack_permitted, timestamps, sack_blocks))


def encode_options(
    *,
    mss: int | None = None,
    wscale: int | None = None,
    sack_permitted: bool = False,
    timestamps: tuple[int, int] | None = None,
    sack_blocks: Sequence[tuple[int, int]] = (),
) -> bytes:
    """Encode TCP options in the layouts Linux uses (``tcp_options_write``).

    Order: MSS; SACK-permitted+TS (or NOP,NOP,TS, or NOP,NOP,SACK-permitted);
    NOP,WS; NOP,NOP,SACK. Every group is 4-byte aligned, so the result needs
    no padding. SACK blocks that do not fit in the 40-byte option space are
    dropped (RFC 2018 3: at most 4, or 3 alongside timestamps).

    Args:
        mss: maximum segment size (SYN only).
        wscale: window-scale shift, 0..14 (SYN only).
        sack_permitted: send SACK-permitted (SYN only).
        timestamps: (TSval, TSecr).
        sack_blocks: (left, right) edges, most recent first (RFC 2018 4).

    Returns:
        The option bytes, a multiple of 4 and at most 40 long.

    Raises:
        ValueError: ``wscale`` outside 0..14.
    """
    if mss is None and wscale is None and not sack_permitted and not sack_blocks:
        if timestamps is None:
            return b""
        return _TS_OPT.pack(_NOP_NOP_TS, timestamps[0], timestamps[1])
    parts: list[bytes] = []
    if mss is not None:
        parts.append(_MSS_OPT.pack(0x0204, mss))
    if timestamps is not None:
        lead = _SACKP_TS if sack_permitted else _NOP_NOP_TS
        parts.append(_TS_OPT.pack(lead, timestamps[0], timestamps[1]))
    elif sack_permitted:
        parts.append(b"\x01\x01\x04\x02")
    if wscale is not None:
        if not 0 <= wscale <= _MAX_WSCALE:
            raise ValueError(f"window scale {wscale} outside 0..14")
        parts.append(bytes((_NOP, _WS, 3, wscale)))
    if sack_blocks:
        used = sum(map(len, parts))
        n = min(len(sack_blocks), (40 - used - 4) // 8)
        if n > 0:
            parts.append(bytes((_NOP, _NOP, _SACK, 2 + 8 * n)))
            parts.append(_SACK_BLOCKS[n].pack(*[e for block in sack_blocks[:n] for e in block]))
    return b"".join(parts)


def build_tcp_packet(
    src: bytes,
    dst: bytes,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: bytes = b"",
    payload: bytes | bytearray | memoryview = b"",
    *,
    ttl: int = 64,
) -> bytes:
    """Build a complete IPv4 or IPv6 packet carrying one TCP segment.

    IPv4 is used when the addresses are 4 bytes (DF set, ident 0: RFC 6864
    atomic datagrams), IPv6 when they are 16. The urgent pointer is 0.

    Args:
        src: source address (4 or 16 bytes).
        dst: destination address (same length).
        src_port: source port.
        dst_port: destination port.
        seq: sequence number.
        ack: acknowledgment number.
        flags: TCP flag bits (``SYN | ACK`` ...).
        window: the raw 16-bit window field (already scaled down).
        options: encoded options (``encode_options``), a multiple of 4 bytes.
        payload: segment data.
        ttl: IPv4 TTL or IPv6 hop limit.

    Returns:
        The packet bytes, with the IPv4 header and TCP checksums computed.

    Raises:
        ValueError: bad address lengths, options not a multiple of 4 or over
            40 bytes, or a packet too large for the length fields.
    """
    olen = len(options)
    if olen & 3 or olen > 40:
        raise ValueError(f"TCP options of {olen} bytes")
    hl = 20 + olen
    tcp_len = hl + len(payload)
    off_flags = (hl << 10) | flags
    # RFC 9293 3.1 checksum: header fields (checksum 0), options, payload, pseudo-header.
    x = src_port + dst_port + seq + ack + off_flags + window + _PROTO_TCP + tcp_len
    if olen:
        x += _from_bytes(options, "big")
    if payload:
        x += _ones_sum(payload)  # starts 32-bit aligned
    addr = _from_bytes(src, "big") + _from_bytes(dst, "big")
    if len(src) == 4 and len(dst) == 4:
        total = 20 + tcp_len
        if total > 0xFFFF:
            raise ValueError(f"IPv4 total length {total} > 65535")
        # IPv4 header checksum (RFC 791, RFC 1071): 0x4500, total, ident 0, DF, ttl/proto.
        ip_csum = -(0x4500 + total + 0x4000 + (ttl << 8) + _PROTO_TCP + addr) % 0xFFFF
        hdr = _V4_TCP.pack(
            0x45, 0, total, 0, 0x4000, ttl, _PROTO_TCP, ip_csum, src, dst,
            src_port, dst_port, seq, ack, off_flags, window, -(x + addr) % 0xFFFF, 0,
        )  # fmt: skip
    elif len(src) == 16 and len(dst) == 16:
        if tcp_len > 0xFFFF:
            raise ValueError(f"IPv6 payload length {tcp_len} > 65535")
        hdr = _V6_TCP.pack(
            0x60000000, tcp_len, _PROTO_TCP, ttl, src, dst,
            src_port, dst_port, seq, ack, off_flags, window, -(x + addr) % 0xFFFF, 0,
        )  # fmt: skip
    else:
        raise ValueError("addresses must both be 4 or both be 16 bytes")
    if payload:
        return b"".join((hdr, options, payload))
    return hdr + options if olen else hdr


@mypyc_attr(native_class=False)  # a native class cannot subclass bytes
class OffloadPacket(bytes):
    """A TCP packet for a writer with checksum and segmentation offload.

    Its TCP checksum field holds only the folded pseudo-header sum (virtio
    NEEDS_CSUM: the kernel completes it from ``csum_start``); with ``gso_size``
    > 0 it is a super-segment that the kernel cuts into ``gso_size``-byte
    segments (GSO), repeating the headers and keeping PSH and FIN for the last.
    Only ``Stack`` with ``StackConfig.offload`` makes them, for ``relay.datapath.tun``
    with virtio-net headers; to anything else they are ordinary bytes.
    """

    gso_size: int  # payload bytes per wire segment; 0: one segment
    csum_start: int  # the TCP header's offset (the IP header length)
    hdr_len: int  # IP + TCP header bytes


def offload_packet(packet: bytes, csum_start: int, hdr_len: int, gso_size: int) -> OffloadPacket:
    p = OffloadPacket(packet)
    p.csum_start, p.hdr_len, p.gso_size = csum_start, hdr_len, gso_size
    return p


def build_tcp_packet_partial_csum(
    src: bytes,
    dst: bytes,
    src_port: int,
    dst_port: int,
    seq: int,
    ack: int,
    flags: int,
    window: int,
    options: bytes = b"",
    payload: bytes | bytearray | memoryview = b"",
    *,
    ttl: int = 64,
) -> bytes:
    """Like ``build_tcp_packet`` but for TUN checksum offload (virtio NEEDS_CSUM).

    The TCP checksum field holds the folded, non-inverted pseudo-header sum
    (length = TCP header + payload); the device completes the checksum over
    ``csum_start`` (the TCP header) onwards and stores it at ``csum_offset`` 16.
    The IPv4 header checksum is computed in full. The payload is not summed.
    """
    olen = len(options)
    if olen & 3 or olen > 40:
        raise ValueError(f"TCP options of {olen} bytes")
    hl = 20 + olen
    tcp_len = hl + len(payload)
    off_flags = (hl << 10) | flags
    addr = _from_bytes(src, "big") + _from_bytes(dst, "big")
    partial = (addr + _PROTO_TCP + tcp_len) % 0xFFFF or 0xFFFF
    if len(src) == 4 and len(dst) == 4:
        total = 20 + tcp_len
        if total > 0xFFFF:
            raise ValueError(f"IPv4 total length {total} > 65535")
        ip_csum = -(0x4500 + total + 0x4000 + (ttl << 8) + _PROTO_TCP + addr) % 0xFFFF
        hdr = _V4_TCP.pack(
            0x45, 0, total, 0, 0x4000, ttl, _PROTO_TCP, ip_csum, src, dst,
            src_port, dst_port, seq, ack, off_flags, window, partial, 0,
        )  # fmt: skip
    elif len(src) == 16 and len(dst) == 16:
        if tcp_len > 0xFFFF:
            raise ValueError(f"IPv6 payload length {tcp_len} > 65535")
        hdr = _V6_TCP.pack(
            0x60000000, tcp_len, _PROTO_TCP, ttl, src, dst,
            src_port, dst_port, seq, ack, off_flags, window, partial, 0,
        )  # fmt: skip
    else:
        raise ValueError("addresses must both be 4 or both be 16 bytes")
    return b"".join((hdr, options, payload))
