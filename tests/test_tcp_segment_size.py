"""Segments we send fit the path the peer's MSS describes, options included.

RFC 6691: the MSS option counts payload after bare 20-byte IP and TCP headers,
so TSopt and SACK blocks come out of it. A Linux client on a 1500-byte link
offers MSS 1460; a 1460-byte payload behind 12 bytes of TSopt is a 1512-byte
packet that the client's link drops. (This stalled every download through the
relay once timestamps were negotiated.)
"""

from __future__ import annotations

from stack import FlowId, Stack
from stack.config import TcpConfig
from stack.tcp.connection import TcpConnection
from stack.tcp.segment import TcpSegment
from stack.wire.tcp import ACK, SYN, TcpOptions, encode_options

from packets import CLIENT_ISN, SERVER_ISN, open_tcp_flow, parse_tcp_packet, tcp_packet

LINUX_SYN = encode_options(mss=1460, sack_permitted=True, timestamps=(1000, 0), wscale=7)
MTU = 1500


def handshake(stack: Stack, syn_options: bytes) -> FlowId:
    """An established flow; the client's window is 2000."""
    return open_tcp_flow(stack, syn_options=syn_options, window=2000)


def test_full_segments_with_timestamps_fit_the_mtu() -> None:
    stack = Stack()
    flow = handshake(stack, LINUX_SYN)
    stack.send(flow, bytes(100_000))
    packets = stack.packets_to_send(0.0)
    assert len(packets) >= 10  # the initial window
    assert max(len(p) for p in packets) == MTU  # full-sized, and not a byte over
    assert len(out_payloads(packets)[0]) == 1448  # 1460 - 12 bytes of TSopt


def test_without_timestamps_a_segment_carries_the_whole_mss() -> None:
    stack = Stack()
    flow = handshake(stack, encode_options(mss=1460, sack_permitted=True, wscale=7))
    stack.send(flow, bytes(100_000))
    packets = stack.packets_to_send(0.0)
    assert max(len(p) for p in packets) == MTU
    assert len(out_payloads(packets)[0]) == 1460


def test_data_carrying_sack_blocks_still_fits() -> None:
    # Both directions busy: our data segments also carry SACK blocks for a hole
    # in the client's stream, which take further room from the payload.
    stack = Stack()
    flow = handshake(stack, LINUX_SYN)
    for k in (1, 3, 5):  # three islands beyond a hole at the start
        stack.receive(
            tcp_packet(CLIENT_ISN + 1 + 100 * k, SERVER_ISN + 1, payload=bytes(100),
                options=encode_options(timestamps=(1002, 0))),
            0.0,
        )  # fmt: skip
    stack.packets_to_send(0.0)  # the duplicate ACKs
    stack.send(flow, bytes(100_000))
    packets = stack.packets_to_send(0.0)
    assert packets and max(len(p) for p in packets) == MTU
    # 1460 - 12 (TSopt) - 28 (NOP,NOP + three 8-byte blocks) = 1420.
    assert len(out_payloads(packets)[0]) == 1420


def test_a_tiny_mss_is_raised_to_the_floor() -> None:
    # Linux's tcp_min_snd_mss: an MSS of 1 would cost a segment per byte.
    conn = TcpConnection(local_port=80, remote_port=40000, config=TcpConfig())
    conn.listen(TcpSegment(40000, 80, 7, 0, SYN, 65535, options=TcpOptions(mss=1)))
    conn.accept(isn=100)
    assert conn.snd_mss == 48


def out_payloads(packets: list[bytes]) -> list[bytes]:
    return [parse_tcp_packet(p).payload for p in packets if parse_tcp_packet(p).tcp.flags & ACK]
