"""Memory per idle relayed TCP connection, by where it was allocated; no root, no network.

A scripted client opens N connections (SYN with MSS, window scale, SACK and
timestamps; the relay's SYN-ACK; the client's ACK) to a ``Relay`` through a
``MemoryPacketSource``, as ``profile_connect.py`` does; each upstream is the
far end of a ``socketpair()``. Then nothing is sent: every flow waits as an
idle connection of ``bench_netns.py --measures idle`` waits. ``tracemalloc``
compares a snapshot taken after a warm-up (the first connections, closed
again) with one taken when all N are open, and reports the difference per
connection, in total and by the source lines that allocated the most.

Run: ``PYTHONPATH=. python benchmarks/mem_per_flow.py [N] [--top K] [--by file|line]``
"""

from __future__ import annotations

import argparse
import gc
import socket
import struct
import sys
import tracemalloc
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from profile_connect import relay_for

from relay.datapath.engine import Relay
from relay.datapath.packet_source import MemoryPacketSource
from stack import FlowId
from stack.wire.tcp import ACK, RST, SYN, build_tcp_packet, encode_options

CLIENT = bytes([198, 18, 1, 2])
SERVER = bytes([198, 18, 2, 2])
PORT = 7
WARMUP = 200


class Upstream:
    """The connector: one socketpair per flow; the benchmark keeps the server ends."""

    def __init__(self) -> None:
        self.servers: list[trio.socket.SocketType] = []

    async def __call__(self, flow: FlowId) -> trio.socket.SocketType:
        relay_end, server = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.servers.append(server)
        return relay_end


async def _handshake(source: MemoryPacketSource, port: int, ts: int) -> None:
    """SYN, the relay's SYN-ACK, ACK: one idle connection from ``port``."""
    iss = 1000 + port
    opts = encode_options(mss=1460, wscale=7, sack_permitted=True, timestamps=(ts, 0))
    source.inject(build_tcp_packet(CLIENT, SERVER, port, PORT, iss, 0, SYN, 65535, opts, b""))
    while True:
        for packet in await source.receive_batch():
            ihl = (packet[0] & 15) * 4
            _, dport, seq, _, off_flags = struct.unpack_from("!HHIIH", packet, ihl)
            if off_flags & RST:
                raise RuntimeError("the relay reset a benchmark connection")
            if dport == port and off_flags & (SYN | ACK) == SYN | ACK:
                tsval = struct.unpack_from("!I", packet, _ts_offset(packet, ihl))[0]
                echo = encode_options(timestamps=(ts + 1, tsval))
                source.inject(
                    build_tcp_packet(
                        CLIENT, SERVER, port, PORT, iss + 1, seq + 1, ACK, 65535, echo, b""
                    )
                )
                return


def _ts_offset(packet: bytes, ihl: int) -> int:
    """Where the TSval of a TCP packet's timestamp option is."""
    end = ihl + (packet[ihl + 12] >> 4) * 4
    i = ihl + 20
    while i < end:
        kind = packet[i]
        if kind == 8:
            return i + 2
        i += 1 if kind in (0, 1) else packet[i + 1]
    raise RuntimeError("no timestamp option in the SYN-ACK")


async def _open(source: MemoryPacketSource, relay: Relay, ports: range, total: int) -> None:
    for port in ports:
        await _handshake(source, port, port)
    while relay.active_flows < total:
        await trio.sleep(0.01)
    await trio.sleep(0.2)  # every flow task reaches its idle wait


async def measure(n: int) -> tuple[tracemalloc.Snapshot, tracemalloc.Snapshot, int]:
    source = MemoryPacketSource(inbound_capacity=1 << 16, outbound_capacity=1 << 16)
    upstream = Upstream()
    relay = relay_for(source, upstream)
    tracemalloc.start(1)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        with trio.fail_after(30 + n / 100):  # bounded: a lost packet fails the run
            # Warm-up: caches, free lists and lazily built tables, then a baseline.
            await _open(source, relay, range(10000, 10000 + WARMUP), WARMUP)
            gc.collect()
            before = tracemalloc.take_snapshot()
            await _open(source, relay, range(10000 + WARMUP, 10000 + WARMUP + n), WARMUP + n)
            gc.collect()
            after = tracemalloc.take_snapshot()
            flows = relay.active_flows - WARMUP
        nursery.cancel_scope.cancel()
    tracemalloc.stop()
    for server in upstream.servers:
        server.close()
    return before, after, flows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("n", nargs="?", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25, help="source lines or files to list")
    parser.add_argument("--by", choices=("line", "file"), default="line")
    args = parser.parse_args()
    if not 1 <= args.n <= 40000:
        parser.error("N: 1..40000")
    before, after, flows = trio.run(measure, args.n)
    assert flows == args.n, f"{flows} idle flows, wanted {args.n}"
    key = "lineno" if args.by == "line" else "filename"
    diff = after.compare_to(before, key)
    total = sum(d.size_diff for d in diff)
    per = total / args.n / 1024
    print(f"{args.n} idle connections: {per:.2f} KiB per connection (tracemalloc)")
    for d in diff[: args.top]:
        frame = d.traceback[0]
        where = f"{frame.filename}:{frame.lineno}" if args.by == "line" else frame.filename
        print(f"{d.size_diff / args.n:8.0f} B {d.count_diff / args.n:6.2f} blocks  {where}")


if __name__ == "__main__":
    main()
