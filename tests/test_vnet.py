"""virtio-net framing (relay.datapath.vnet, TunDevice in vnet mode) and the stack's ``csum_ok``.

The super-segment headers below were captured from a real TUN (kernel 6.18,
IFF_VNET_HDR, TUNSETOFFLOAD CSUM|TSO4|TSO6) while a client uploaded through a
veth path with MTU 1500 and TCP timestamps: the virtio-net header, then the IP
and TCP headers. The TCP checksum field holds only the pseudo-header sum
(NEEDS_CSUM), and the IP length fields are the super-segment's real lengths.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator

import pytest
import trio

from relay.datapath.config import RelayConfig
from relay.datapath.engine import Relay
from relay.datapath.packet_source import CsumPacketSource, MemoryPacketSource
from relay.datapath.tun import TunDevice
from relay.datapath.vnet import (
    DATA_VALID,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    NEEDS_CSUM,
    VNET_HDR_LEN,
    ZERO_HEADER,
    VnetHeader,
    csum_trusted,
    frame,
    pack_header,
    parse_header,
    strip,
)
from stack import DataReceived, Stack
from stack.wire.ip import parse_ip
from stack.wire.tcp import ACK, RST, offload_packet, parse_tcp

from packets import (
    C4,
    C6,
    CLIENT_ISN,
    CPORT,
    S4,
    S6,
    SERVER_ISN,
    SPORT,
    open_tcp_flow,
    pseudo_header_sum,
    sent_tcp,
    stack_events,
    tcp_packet,
)

# (virtio-net header + IPv4 + TCP with timestamps) of a 65,222-byte read: 45 x 1448 bytes.
CAPTURED_V4 = bytes.fromhex(
    "01013400a8051400100045" "00febcf37a40003f06ba97c6120102c6120202a49415b3ef44a687000003e9"
    "8018003f8dd800000101080a04a5e51908f90140"
)  # fmt: skip
CAPTURED_V4_LEN = 65222
# (virtio-net header + IPv6 + TCP with timestamps) of a 64,342-byte read: 45 x 1428 bytes.
CAPTURED_V6 = bytes.fromhex(
    "0104480094052800100060" "0efc18fb24063ffd000001000000000000000000000002fd00000200000000"
    "0000000000000002ecb815b32ed356eb000003e980180040f53300000101080ae9a62dcb08f982a5"
)  # fmt: skip
CAPTURED_V6_LEN = 64342
# A SYN: NEEDS_CSUM, no GSO.
CAPTURED_SYN_HEADER = bytes.fromhex("01000000000014001000")


def super_segment(captured: bytes, length: int) -> bytes:
    """The captured headers with a payload up to the captured read length."""
    payload = bytes(i & 0xFF for i in range(length - len(captured)))
    return captured + payload


# --- the header ------------------------------------------------------------------------


def test_captured_headers_decode() -> None:
    assert parse_header(CAPTURED_V4) == VnetHeader(NEEDS_CSUM, GSO_TCPV4, 52, 1448, 20, 16)
    assert parse_header(CAPTURED_V6) == VnetHeader(NEEDS_CSUM, GSO_TCPV6, 72, 1428, 40, 16)
    syn = parse_header(CAPTURED_SYN_HEADER)
    assert syn == VnetHeader(NEEDS_CSUM, GSO_NONE, 0, 0, 20, 16) and not syn.gso
    assert parse_header(CAPTURED_V4).gso and parse_header(CAPTURED_V6).gso


def test_pack_parse_round_trip_and_zero_header() -> None:
    hdr = VnetHeader(NEEDS_CSUM, GSO_TCPV6 | 0x80, 72, 1440, 40, 16)
    assert parse_header(pack_header(hdr)) == hdr
    assert pack_header(VnetHeader()) == ZERO_HEADER == bytes(VNET_HDR_LEN)
    assert pack_header(parse_header(CAPTURED_V4)) == CAPTURED_V4[:VNET_HDR_LEN]
    assert frame(b"ip") == ZERO_HEADER + b"ip"
    assert strip(frame(b"ip", hdr)) == (b"ip", hdr)
    with pytest.raises(ValueError):
        parse_header(b"\x01" * 9)


@pytest.mark.parametrize(
    ("flags", "trusted"),
    [(0, False), (NEEDS_CSUM, True), (DATA_VALID, True), (NEEDS_CSUM | DATA_VALID, True)],
)
def test_csum_trusted(flags: int, trusted: bool) -> None:
    assert csum_trusted(flags) is trusted


# --- super-segments through parse_ip and the stack -------------------------------------


@pytest.mark.parametrize(
    ("captured", "length", "payload"),
    [(CAPTURED_V4, CAPTURED_V4_LEN, 45 * 1448), (CAPTURED_V6, CAPTURED_V6_LEN, 45 * 1428)],
    ids=["v4", "v6"],
)
def test_captured_super_segment_parses_with_real_lengths(
    captured: bytes, length: int, payload: int
) -> None:
    packet, hdr = strip(super_segment(captured, length))
    ip = parse_ip(packet)
    assert (ip.offset, ip.end, ip.fragment) == (hdr.csum_start, len(packet), None)
    tcp = parse_tcp(packet, ip.offset, ip.end)  # no checksum check: it is partial
    assert hdr.hdr_len == ip.offset + tcp.header_len
    assert ip.end - hdr.hdr_len == payload
    # The checksum field is the folded pseudo-header sum, not a checksum: verifying fails.
    pseudo = pseudo_header_sum(ip, 6)
    field = struct.unpack_from("!H", packet, ip.offset + hdr.csum_offset)[0]
    assert field == pseudo % 0xFFFF
    with pytest.raises(ValueError, match="checksum"):
        parse_tcp(packet, ip.offset, ip.end, pseudo)


def _as_flow(captured: bytes, length: int, src: bytes, dst: bytes) -> bytes:
    """A captured super-segment moved onto the test flow: the client's address, ports,
    sequence and acknowledgment numbers (the partial checksum covers none of them)."""
    packet = bytearray(strip(super_segment(captured, length))[0])
    ip = parse_ip(packet)
    assert (ip.src, ip.dst) == (src, dst)  # the test flow's addresses (packets.C4, ...)
    struct.pack_into("!HHII", packet, ip.offset, CPORT, SPORT, CLIENT_ISN + 1, SERVER_ISN + 1)
    return bytes(packet)


@pytest.mark.parametrize(
    ("captured", "length", "src", "dst"),
    [(CAPTURED_V4, CAPTURED_V4_LEN, C4, S4), (CAPTURED_V6, CAPTURED_V6_LEN, C6, S6)],
    ids=["v4", "v6"],
)
def test_stack_takes_a_super_segment_as_one_segment(
    captured: bytes, length: int, src: bytes, dst: bytes
) -> None:
    packet = _as_flow(captured, length, src, dst)
    ip = parse_ip(packet)
    payload = packet[ip.offset + 32 :]
    stack = Stack()
    flow = open_tcp_flow(stack, src=src, dst=dst)

    stack.receive(packet, 0.1)  # verified: the partial checksum is wrong
    assert stack.stats.checksum_errors == 1 and stack_events(stack) == []

    stack.receive(packet, 0.2, csum_ok=True)
    (ev,) = stack_events(stack)
    assert isinstance(ev, DataReceived) and ev.flow == flow and ev.data == payload
    assert type(ev.data) is bytes  # not a view of the packet (Stack.receive)
    stack.consumed(flow, len(payload))
    acks = sent_tcp(stack, 0.3)
    assert acks and acks[-1].tcp.flags == ACK
    assert acks[-1].tcp.ack == (CLIENT_ISN + 1 + len(payload)) & 0xFFFFFFFF


def test_csum_ok_skips_udp_verification_only() -> None:
    from stack.wire.udp import build_udp_packet

    good = build_udp_packet(C4, S4, 5000, 53, b"query")
    bad = bytearray(good)
    bad[26:28] = b"\x12\x34"  # a partial checksum, as with NEEDS_CSUM
    stack = Stack()
    stack.receive(bytes(bad), 0.0)
    assert stack.stats.checksum_errors == 1
    stack.receive(bytes(bad), 0.0, csum_ok=True)
    assert stack.stats.checksum_errors == 1 and stack.stats.datagram.udp_in == 1


# --- TunDevice in vnet mode, over a SOCK_SEQPACKET pair (one read = one packet) ----------


class _FakeDev:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        os.close(self._fd)


@pytest.fixture
def vnet_tun() -> Iterator[tuple[TunDevice, socket.socket]]:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = ours.detach()
    os.set_blocking(fd, False)
    tun = TunDevice(_FakeDev(fd), "fake0", vnet_hdr=True)
    try:
        yield tun, kernel
    finally:
        tun.close()
        kernel.close()


def test_tun_vnet_drain_strips_and_marks(vnet_tun: tuple[TunDevice, socket.socket]) -> None:
    tun, kernel = vnet_tun
    big = super_segment(CAPTURED_V4, CAPTURED_V4_LEN)
    plain = frame(b"\x45plain")
    valid = frame(b"\x45valid", VnetHeader(flags=DATA_VALID))
    for f in (big, plain, valid, b"\x01\x00"):  # the last: too short to hold a packet
        kernel.send(f)
    packets, trusted = tun.drain_csum(max_batch=10)
    assert packets == [big[VNET_HDR_LEN:], b"\x45plain", b"\x45valid"]
    assert trusted == [True, False, True]
    # The super-segment is a view of the frame read (not copied); the rest bytes.
    assert [type(p) for p in packets] == [memoryview, bytes, bytes]
    s = tun.stats
    assert (s.packets_in, s.gso_packets_in, s.csum_trusted_in, s.drops_in) == (3, 1, 2, 1)
    assert s.bytes_in == len(big) - VNET_HDR_LEN + 12
    kernel.send(plain)
    kernel.send(big)
    # drain() strips as well, and gives bytes only
    assert tun.drain(max_batch=10) == [b"\x45plain", big[VNET_HDR_LEN:]]
    assert tun.stats.packets_in == 5
    assert tun.drain_csum(max_batch=10) == ([], [])


def test_tun_vnet_write_prepends_zero_header(vnet_tun: tuple[TunDevice, socket.socket]) -> None:
    tun, kernel = vnet_tun
    tun.write_all([b"\x45one", b"\x60two!"])
    assert kernel.recv(100) == ZERO_HEADER + b"\x45one"
    assert kernel.recv(100) == ZERO_HEADER + b"\x60two!"
    assert (tun.stats.packets_out, tun.stats.bytes_out) == (2, 9)


def test_tun_vnet_write_frames_offload_packets(vnet_tun: tuple[TunDevice, socket.socket]) -> None:
    # NEEDS_CSUM from the TCP header; a TCP gso_type and gso_size for super-segments.
    tun, kernel = vnet_tun
    v4 = offload_packet(b"\x45" + bytes(99), csum_start=20, hdr_len=52, gso_size=1448)
    v6 = offload_packet(b"\x60" + bytes(99), csum_start=40, hdr_len=72, gso_size=1428)
    one = offload_packet(b"\x45" + bytes(59), csum_start=20, hdr_len=52, gso_size=0)
    tun.write_all([v4, v6, one])
    frames = [kernel.recv(200) for _ in range(3)]
    assert [parse_header(f) for f in frames] == [
        VnetHeader(NEEDS_CSUM, GSO_TCPV4, 52, 1448, 20, 16),
        VnetHeader(NEEDS_CSUM, GSO_TCPV6, 72, 1428, 40, 16),
        VnetHeader(NEEDS_CSUM, GSO_NONE, 52, 0, 20, 16),
    ]
    assert [f[VNET_HDR_LEN:] for f in frames] == [v4, v6, one]
    assert (tun.stats.packets_out, tun.stats.gso_packets_out) == (3, 2)


def test_tun_without_vnet_marks_nothing() -> None:
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = ours.detach()
    os.set_blocking(fd, False)
    tun = TunDevice(_FakeDev(fd), "fake1", vnet_hdr=False)
    try:
        assert not tun.csum_offload
        kernel.send(b"\x01\x00raw")
        assert tun.drain_csum(max_batch=4) == ([b"\x01\x00raw"], [False])
        tun.write_all([b"\x45x"])
        assert kernel.recv(100) == b"\x45x"
    finally:
        tun.close()
        kernel.close()


# --- the packet loop hands the marks to the stack -------------------------------------


class _MarkingSource(MemoryPacketSource):
    """Marks every other packet as checksum-trusted, as a vnet TUN would."""

    csum_offload = True

    def drain_csum(self, max_batch: int) -> tuple[list[bytes], list[bool]]:
        packets = self.drain(max_batch)
        return packets, [i % 2 == 0 for i in range(len(packets))]


class _RecordingStack(Stack):
    def __init__(self) -> None:
        super().__init__()
        self.marks: list[bool] = []

    def receive(
        self, packet: bytes, now: float, *, csum_ok: bool = False, batch: bool = False
    ) -> None:
        self.marks.append(csum_ok)
        super().receive(packet, now, csum_ok=csum_ok, batch=batch)


async def test_relay_passes_checksum_marks_to_the_stack(autojump_clock: object) -> None:
    source = _MarkingSource()
    assert isinstance(source, CsumPacketSource)
    stack = _RecordingStack()
    relay = Relay(source, stack=stack, config=RelayConfig())
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        for port in range(3):
            source.inject(tcp_packet(1, 0, RST, sport=CPORT + port))  # RSTs for no connection
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert stack.marks == [True, False, True]
    assert relay.stats.packets_in == 3 and stack.stats.checksum_errors == 0
