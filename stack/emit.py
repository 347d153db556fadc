"""Packets out: the raw IP packets the Stack writes toward its clients.

``build_segments`` turns a connection's ``TcpSegment`` list into IPv4/IPv6
packets (``build_segments_offload`` for a writer with checksum and GSO
offloads); ``answer`` and ``reject_icmp`` build the Stack's own replies to
segments that reach no connection. Nothing here keeps state: the Stack
(``stack.stack``) decides what to send and to whom.
"""

from __future__ import annotations

from stack.events import Unreachable
from stack.seq import seq_add
from stack.tcp.segment import TcpSegment
from stack.wire.icmp import (
    ADMIN_PROHIBITED,
    HOST_UNREACH,
    ICMP6_ADDR_UNREACH,
    ICMP6_ADMIN_PROHIBITED,
    ICMP6_NO_ROUTE,
    ICMP6_PORT_UNREACH,
    NET_UNREACH,
    PORT_UNREACH,
    build_icmp_unreachable,
)
from stack.wire.tcp import (
    FIN,
    NO_OPTIONS,
    PSH,
    RST,
    SYN,
    TcpHeader,
    TcpOptions,
    build_tcp_packet,
    build_tcp_packet_partial_csum,
    encode_options,
    offload_packet,
)

__all__ = ["answer", "build_segments", "build_segments_offload", "reject_icmp"]


_ICMP_CODES = {
    Unreachable.NET: (NET_UNREACH, ICMP6_NO_ROUTE),
    Unreachable.HOST: (HOST_UNREACH, ICMP6_ADDR_UNREACH),
    Unreachable.PORT: (PORT_UNREACH, ICMP6_PORT_UNREACH),
    Unreachable.ADMIN: (ADMIN_PROHIBITED, ICMP6_ADMIN_PROHIBITED),
}


def build_segments(
    server: bytes, client: bytes, segs: list[TcpSegment], ttl: int, out: list[bytes]
) -> None:
    """A connection's segments as whole IP packets from ``server`` to ``client``,
    every checksum computed; a several-segment one is cut as GSO would."""
    last: TcpOptions = NO_OPTIONS
    options = b""
    for s in segs:
        # A batch shares one options object: it is encoded once.
        o = s.options
        if o is not last:
            last = o
            options = _encode(o, s.flags)
        if s.gso:
            _cut(server, client, s, options, ttl, out)
            continue
        out.append(
            build_tcp_packet(
                server,
                client,
                s.src_port,
                s.dst_port,
                s.seq,
                s.ack,
                s.flags,
                s.window,
                options,
                s.payload,
                ttl=ttl,
            )
        )


def build_segments_offload(
    server: bytes, client: bytes, segs: list[TcpSegment], ttl: int, gso_max: int, out: list[bytes]
) -> None:
    """``build_segments`` for an offloading writer: partial checksums, GSO super-segments.

    A run of data segments that continue each other in sequence space, with
    the same ACK, window and options, all ``gso_size`` long but the last, and
    PSH/FIN on the last only, leaves as one super-segment: the kernel cuts it
    exactly as the run was cut (tcp_gso_segment). The payload is never
    summed here: the checksum is the kernel's work, which was most of ours.
    """
    ip_len = 20 if len(server) == 4 else 40
    last: TcpOptions | None = None
    options = b""
    i, n = 0, len(segs)
    while i < n:
        s = segs[i]
        o = s.options
        if o is not last:
            last = o
            options = _encode(o, s.flags)
        size = len(s.payload)
        if s.gso:  # already several segments: one GSO write as it is
            packet = build_tcp_packet_partial_csum(
                server, client, s.src_port, s.dst_port, s.seq, s.ack, s.flags, s.window,
                options, s.payload, ttl=ttl,
            )  # fmt: skip
            out.append(offload_packet(packet, ip_len, ip_len + 20 + len(options), s.gso))
            i += 1
            continue
        if not size or s.flags & (SYN | RST):
            packet = build_tcp_packet(
                server, client, s.src_port, s.dst_port, s.seq, s.ack, s.flags,
                s.window, options, s.payload, ttl=ttl,
            )  # fmt: skip
            out.append(packet)
            i += 1
            continue
        j = i + 1
        total = size
        end = seq_add(s.seq, size)
        flags = s.flags
        if not flags & (PSH | FIN):
            while j < n:
                t = segs[j]
                tn = len(t.payload)
                if (
                    t.seq != end
                    or t.gso
                    or not tn
                    or tn > size
                    or total + tn > gso_max
                    or t.options is not o
                    or t.window != s.window
                    or t.ack != s.ack
                    or t.flags & (SYN | RST)
                ):
                    break
                total += tn
                end = seq_add(end, tn)
                flags = t.flags
                j += 1
                if tn < size or flags & (PSH | FIN):
                    break  # short or flagged: the last of the run
        payload = s.payload if j == i + 1 else b"".join([t.payload for t in segs[i:j]])
        packet = build_tcp_packet_partial_csum(
            server, client, s.src_port, s.dst_port, s.seq, s.ack, flags, s.window,
            options, payload, ttl=ttl,
        )  # fmt: skip
        gso = size if j > i + 1 else 0
        out.append(offload_packet(packet, ip_len, ip_len + 20 + len(options), gso))
        i = j


def _cut(
    server: bytes, client: bytes, s: TcpSegment, options: bytes, ttl: int, out: list[bytes]
) -> None:
    """Cut a several-segment TcpSegment into ``s.gso``-sized packets, as GSO would:
    headers repeated, sequence numbers advanced, PSH and FIN on the last only."""
    size, payload = s.gso, s.payload
    last = len(payload) - 1
    for k in range(0, len(payload), size):
        flags = s.flags if k + size > last else s.flags & ~(PSH | FIN)
        packet = build_tcp_packet(
            server, client, s.src_port, s.dst_port, seq_add(s.seq, k), s.ack,
            flags, s.window, options, payload[k : k + size], ttl=ttl,
        )  # fmt: skip
        out.append(packet)


def _encode(o: TcpOptions, flags: int) -> bytes:
    """A segment's options as the connection chose them: MSS, window scale,
    SACK-permitted and TSopt on SYNs; TSopt (RFC 7323 3.2) and SACK blocks
    (RFC 2018) on the rest once negotiated; nothing on RSTs."""
    if o is NO_OPTIONS:
        return b""
    if flags & SYN:
        return encode_options(
            mss=o.mss, wscale=o.wscale, sack_permitted=o.sack_permitted, timestamps=o.timestamps
        )
    return encode_options(timestamps=o.timestamps, sack_blocks=o.sack_blocks)


def answer(
    src: bytes, dst: bytes, tcp: TcpHeader, seq: int, ack: int, flags: int, window: int
) -> bytes:
    """A bare segment back to the sender of ``tcp`` (which went ``src`` -> ``dst``):
    the RST for a segment that reaches no connection (RFC 9293 3.10.7.1), or
    the ACK a TIME-WAIT 4-tuple owes a repeated FIN (3.10.7.4)."""
    return build_tcp_packet(dst, src, tcp.dst_port, tcp.src_port, seq, ack, flags, window)


def reject_icmp(syn: bytes, version: int, unreachable: Unreachable, src: bytes) -> bytes:
    """ICMP/ICMPv6 destination unreachable quoting a refused SYN, sent from ``src``."""
    v4, v6 = _ICMP_CODES[unreachable]
    return build_icmp_unreachable(syn, code=v4 if version == 4 else v6, src=src)
