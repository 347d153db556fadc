"""Micro-benchmarks of the per-packet wire paths (``python benchmarks/bench_wire.py``).

Reports the best of several timeit repeats, in microseconds per call.
"""

from __future__ import annotations

import ipaddress
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stack.wire import (
    ACK,
    PSH,
    build_tcp_packet,
    build_tcp_packet_partial_csum,
    build_udp_packet,
    encode_options,
    ones_sum,
    parse_ip,
    parse_tcp,
    pseudo_sum_v4,
    pseudo_sum_v6,
)

SRC4 = ipaddress.IPv4Address("198.18.0.1").packed
DST4 = ipaddress.IPv4Address("198.19.0.2").packed
SRC6 = ipaddress.IPv6Address("fd00::1").packed
DST6 = ipaddress.IPv6Address("fd00::2").packed
TS_OPTS = encode_options(timestamps=(123456789, 987654321))
PAYLOAD_1460 = bytes(i & 0xFF for i in range(1460))
PAYLOAD_1448 = PAYLOAD_1460[:1448]  # 1500-byte packet with the 12-byte TS option
PKT4 = build_tcp_packet(SRC4, DST4, 40000, 443, 1, 2, PSH | ACK, 512, TS_OPTS, PAYLOAD_1448)
PKT6 = build_tcp_packet(SRC6, DST6, 40000, 443, 1, 2, PSH | ACK, 512, TS_OPTS, PAYLOAD_1448[:-20])
ACK4 = build_tcp_packet(SRC4, DST4, 40000, 443, 1, 2, ACK, 512, TS_OPTS)
assert len(PKT4) == 1500 and len(PKT6) == 1500


def rx(pkt: bytes) -> object:
    """What the stack does per received segment: parse and verify."""
    ip = parse_ip(pkt)
    ps = pseudo_sum_v4 if ip.version == 4 else pseudo_sum_v6
    return parse_tcp(pkt, ip.offset, ip.end, ps(ip.src, ip.dst, ip.proto, ip.end - ip.offset))


def rx_no_verify(pkt: bytes) -> object:
    ip = parse_ip(pkt)
    return parse_tcp(pkt, ip.offset, ip.end)


CASES: list[tuple[str, Callable[[], object]]] = [
    ("parse_ip+parse_tcp+verify, 1500 B IPv4 + TS", lambda: rx(PKT4)),
    ("parse_ip+parse_tcp+verify, 1500 B IPv6 + TS", lambda: rx(PKT6)),
    ("parse_ip+parse_tcp+verify, pure ACK + TS", lambda: rx(ACK4)),
    ("parse_ip+parse_tcp, no verify (offload)", lambda: rx_no_verify(PKT4)),
    (
        "build_tcp_packet, 1460 B payload, IPv4",
        lambda: build_tcp_packet(SRC4, DST4, 443, 40000, 1, 2, PSH | ACK, 512, b"", PAYLOAD_1460),
    ),
    (
        "build_tcp_packet, 1448 B payload + TS, IPv4",
        lambda: build_tcp_packet(
            SRC4, DST4, 443, 40000, 1, 2, PSH | ACK, 512, TS_OPTS, PAYLOAD_1448
        ),
    ),
    (
        "build_tcp_packet, 1460 B payload, IPv6",
        lambda: build_tcp_packet(SRC6, DST6, 443, 40000, 1, 2, PSH | ACK, 512, b"", PAYLOAD_1460),
    ),
    (
        "build_tcp_packet, pure ACK, IPv4",
        lambda: build_tcp_packet(SRC4, DST4, 443, 1, 2, 3, ACK, 9),
    ),
    (
        "build_tcp_packet, pure ACK + TS, IPv4",
        lambda: build_tcp_packet(SRC4, DST4, 443, 1, 2, 3, ACK, 9, TS_OPTS),
    ),
    (
        "build_tcp_packet_partial_csum, 1448 B + TS",
        lambda: build_tcp_packet_partial_csum(
            SRC4, DST4, 443, 40000, 1, 2, PSH | ACK, 512, TS_OPTS, PAYLOAD_1448
        ),
    ),
    (
        "build_udp_packet, 512 B, IPv4",
        lambda: build_udp_packet(SRC4, DST4, 53, 9, PAYLOAD_1460[:512]),
    ),
    ("encode_options(timestamps=...)", lambda: encode_options(timestamps=(1, 2))),
    ("ones_sum, 1480 B", lambda: ones_sum(PAYLOAD_1460[:1480])),
    ("ones_sum, 64 KiB", lambda: ones_sum(PAYLOAD_1460 * 44 + PAYLOAD_1460[:1296])),
]


def main() -> None:
    for name, fn in CASES:
        number = 2_000
        # Many short repeats: the minimum filters out other processes' noise.
        best = min(timeit.repeat(fn, number=number, repeat=40)) / number
        print(f"{name:48s} {best * 1e6:8.2f} us")


if __name__ == "__main__":
    main()
