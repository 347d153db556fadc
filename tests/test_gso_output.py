"""TCP output for an offloading writer (StackConfig.offload): partial checksums, GSO.

The tests finish each packet the way the kernel does for a virtio NEEDS_CSUM /
GSO write: the checksum is completed over ``csum_start`` onwards (the field
holds the pseudo-header sum), and a super-segment is cut into ``gso_size``
pieces with the headers repeated, PSH/FIN on the last only, and every
checksum computed afresh (tcp_gso_segment). Each piece must then parse with
its checksum verified and carry exactly the bytes the plain path would send.
"""

from __future__ import annotations

import struct

from stack import FlowId, Stack, StackConfig
from stack.wire.checksum import checksum
from stack.wire.tcp import (
    ACK,
    FIN,
    PSH,
    OffloadPacket,
    build_tcp_packet,
    encode_options,
)

from packets import (
    C4,
    C6,
    S4,
    S6,
    SERVER_ISN,
    open_tcp_flow,
    parse_tcp_packet,
)


def connect(stack: Stack, *, src: bytes = C4, dst: bytes = S4, mss: int = 1460) -> FlowId:
    """An established flow that negotiated what Linux offers; the client's window is 4000."""
    syn = encode_options(mss=mss, sack_permitted=True, timestamps=(1000, 0), wscale=7)
    return open_tcp_flow(stack, src=src, dst=dst, syn_options=syn, window=4000, timestamps=True)


def finish_checksum(p: bytes, csum_start: int) -> bytes:
    """What the device does for NEEDS_CSUM: sum from csum_start, store at +16."""
    body = bytearray(p[csum_start:])
    partial = struct.unpack_from("!H", body, 16)[0]
    body[16:18] = b"\0\0"
    struct.pack_into("!H", body, 16, checksum(body, partial))
    return bytes(p[:csum_start]) + bytes(body)


def gso_segment(p: OffloadPacket) -> list[bytes]:
    """What tcp_gso_segment makes of a super-segment (rebuilt with full checksums)."""
    ip_len, hdr_len, size = p.csum_start, p.hdr_len, p.gso_size
    version = p[0] >> 4
    src, dst = (p[12:16], p[16:20]) if version == 4 else (p[8:24], p[24:40])
    sport, dport, seq, ack, off_flags, window = struct.unpack_from("!HHIIHH", p, ip_len)
    flags = off_flags & 0x1FF
    options = bytes(p[ip_len + 20 : hdr_len])
    payload = bytes(p[hdr_len:])
    pieces = [payload[k : k + size] for k in range(0, len(payload), size)]
    out = []
    for k, piece in enumerate(pieces):
        f = flags if k == len(pieces) - 1 else flags & ~(PSH | FIN)
        s = (seq + k * size) & 0xFFFFFFFF
        out.append(build_tcp_packet(src, dst, sport, dport, s, ack, f, window, options, piece))
    return out


def test_a_window_of_full_segments_goes_as_one_super_segment() -> None:
    stack = Stack(StackConfig(offload=True))
    flow = connect(stack)
    stack.send(flow, bytes(range(256)) * 400)
    (p,) = stack.packets_to_send(0.0)  # the initial window, 10 segments, in one write
    assert isinstance(p, OffloadPacket)
    assert p.gso_size == 1448 and p.csum_start == 20 and p.hdr_len == 20 + 20 + 12
    pieces = [parse_tcp_packet(x) for x in gso_segment(p)]  # checksums verified
    assert [len(x.payload) for x in pieces] == [1448] * 10
    assert b"".join(x.payload for x in pieces) == (bytes(range(256)) * 400)[:14480]
    assert [x.tcp.seq for x in pieces] == [SERVER_ISN + 1 + 1448 * k for k in range(10)]
    assert all(len(x) <= 1500 for x in gso_segment(p))
    # The partial checksum is right for the super-segment as a whole too.
    assert parse_tcp_packet(finish_checksum(p, p.csum_start)).payload == b"".join(
        x.payload for x in pieces
    )


def test_the_last_short_segment_ends_the_run_and_keeps_psh() -> None:
    stack = Stack(StackConfig(offload=True))
    flow = connect(stack)
    stack.send(flow, bytes(3 * 1448 + 100))
    (p,) = stack.packets_to_send(0.0)
    assert isinstance(p, OffloadPacket) and p.gso_size == 1448
    pieces = [parse_tcp_packet(x) for x in gso_segment(p)]
    assert [len(x.payload) for x in pieces] == [1448, 1448, 1448, 100]
    assert [x.tcp.flags for x in pieces] == [ACK, ACK, ACK, ACK | PSH]


def test_a_single_segment_and_pure_acks() -> None:
    stack = Stack(StackConfig(offload=True))
    flow = connect(stack)
    stack.send(flow, b"hello")
    (p,) = stack.packets_to_send(0.0)
    assert isinstance(p, OffloadPacket) and p.gso_size == 0  # NEEDS_CSUM only
    assert parse_tcp_packet(finish_checksum(p, p.csum_start)).payload == b"hello"
    # Segments without payload keep full checksums: plain bytes.
    stack.close(flow)
    (fin,) = stack.packets_to_send(0.1)
    assert type(fin) is bytes and parse_tcp_packet(fin).tcp.flags & FIN


def test_ipv6_super_segments_use_the_smaller_mss() -> None:
    stack = Stack(StackConfig(offload=True))
    flow = connect(stack, src=C6, dst=S6, mss=1440)
    stack.send(flow, bytes(20_000))
    (p,) = stack.packets_to_send(0.0)
    assert isinstance(p, OffloadPacket)
    assert p.gso_size == 1428 and p.csum_start == 40  # 1440 - 12 of TSopt, <= 1440
    pieces = gso_segment(p)
    assert all(len(x) <= 1500 for x in pieces)
    assert sum(len(parse_tcp_packet(x).payload) for x in pieces) == 10 * 1428


def test_without_offload_nothing_changes() -> None:
    stack = Stack()
    flow = connect(stack)
    stack.send(flow, bytes(20_000))
    packets = stack.packets_to_send(0.0)
    assert len(packets) == 10 and all(type(p) is bytes for p in packets)
    assert [len(parse_tcp_packet(p).payload) for p in packets] == [1448] * 10


def test_tso_segments_change_nothing_on_the_wire() -> None:
    # tso_segments: the connection hands over several segments at once; cut by the
    # Stack they are the same packets, byte for byte.
    from stack.config import TcpConfig

    plain, tso = Stack(), Stack(StackConfig(tcp=TcpConfig(tso_segments=44)))
    data = bytes(range(256)) * 100
    got = []
    for stack in (plain, tso):
        flow = connect(stack)
        stack.send(flow, data)
        got.append(stack.packets_to_send(0.0))
    assert len(got[0]) == 10 and got[0] == got[1]


def test_tso_segments_with_offload_make_one_gso_write() -> None:
    from stack.config import TcpConfig

    stack = Stack(StackConfig(tcp=TcpConfig(tso_segments=44), offload=True))
    flow = connect(stack)
    stack.send(flow, bytes(range(256)) * 100)
    (p,) = stack.packets_to_send(0.0)
    assert isinstance(p, OffloadPacket) and p.gso_size == 1448
    pieces = [parse_tcp_packet(x) for x in gso_segment(p)]
    assert b"".join(x.payload for x in pieces) == (bytes(range(256)) * 100)[:14480]
