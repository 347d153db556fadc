"""What one relayed connection costs, from SYN to Closed, without root or network.

A scripted client speaks raw IPv4 packets to a ``Relay`` through a
``MemoryPacketSource`` (as ``tests/test_engine.py`` does); the upstream
"server" is the far end of a ``socketpair()`` that the connector hands out.
Each connection is what ``bench_netns.py``'s connrate does: SYN (MSS, window
scale, SACK), ACK, a 64-byte request, the server's 64-byte echo, the
client's FIN, the server's EOF, the relay's FIN, the last ACK; one at a time.
The Stack is configured as ``tunrelay run`` configures it (keepalive, TSO
segments, offload output), with the connection-rate quotas lifted as
bench_netns lifts them. The client side and the server's socket calls are
the benchmark's own cost (the "benchmark" group below).

Run: ``PYTHONPATH=. python benchmarks/profile_connect.py [N] [--profile] [--flow-log]``
(``--profile``: cProfile's self time by part; otherwise CPU µs per connection).
``--pingpong``: instead, one connection and N 64-byte request/response
exchanges through it: the whole relay's cost per exchange (packet loop, flow
task, Stack, trio), where ``bench_stack.py --pingpong`` has the Stack's alone.
For instruction counts, the difference of two N under callgrind
(benchmarks/README.md), with ``--virtual-clock`` so that the counts repeat.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import socket
import struct
import time
from typing import Any

import trio
import trio.testing

from relay.analysis.flowlog import FlowLog
from relay.datapath.config import RelayConfig
from relay.datapath.egress import EgressPolicy
from relay.datapath.engine import Relay
from relay.datapath.packet_source import MemoryPacketSource
from stack import ClientQuotas, FlowId, Stack, StackConfig, TcpConfig
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, build_tcp_packet, encode_options

CLIENT = bytes([198, 18, 1, 2])
SERVER = bytes([198, 18, 2, 2])
PORT = 7
REQUEST = b"q" * 64
SYN_OPTIONS = encode_options(mss=1460, wscale=7, sack_permitted=True)


def stack_config() -> StackConfig:
    """As relay.service.run builds it for the defaults, quotas lifted."""
    tcp = TcpConfig(
        rcv_buf=4 << 20, rcv_buf_initial=64 << 10, snd_buf=4 << 20, snd_buf_initial=256 << 10,
        ooo_limit=4 << 20, mss=1460, keepalive=True, tso_segments=44,
    )  # fmt: skip
    lifted = ClientQuotas(connects_per_second=1e9, connect_burst=1 << 30)
    return StackConfig(
        tcp=tcp, offload=True, connects_per_second=1e9, connect_burst=1 << 30, clients=lifted
    )


def relay_for(
    source: MemoryPacketSource,
    connector: Any,
    stack: Stack | None = None,
    udp_socket: Any = None,
) -> Relay:
    """The relay as the service builds it for the defaults (open egress), on `source`."""
    return Relay(
        source,
        stack=stack or Stack(stack_config()),
        config=RelayConfig(egress=EgressPolicy.open()),
        connector=connector,
        udp_socket=udp_socket,
    )


class Upstream:
    """The connector: one socketpair per flow; the benchmark keeps the server end."""

    def __init__(self) -> None:
        self.server: trio.socket.SocketType | None = None

    async def __call__(self, flow: FlowId) -> trio.socket.SocketType:
        relay_end, self.server = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return relay_end


def _fields(packet: bytes) -> tuple[int, int, int, int]:
    """(flags, seq, ack, payload length) of an IPv4 TCP packet from the relay."""
    ihl = (packet[0] & 15) * 4
    seq, ack, off_flags = struct.unpack_from("!IIH", packet, ihl + 4)
    return off_flags & 0x3F, seq, ack, len(packet) - ihl - (off_flags >> 12) * 4


async def _expect(source: MemoryPacketSource, want: int) -> tuple[int, int, int]:
    """Wait for a segment with every flag of ``want``: its (seq, ack, payload length)."""
    while True:
        for packet in await source.receive_batch():
            flags, seq, ack, n = _fields(packet)
            if flags & RST:
                raise RuntimeError("the relay reset a benchmark connection")
            if flags & want == want:
                return seq, ack, n


async def connections(n: int, flow_log: bool) -> Relay:
    source = MemoryPacketSource()
    upstream = Upstream()
    relay = Relay(
        source,
        stack=Stack(stack_config()),
        config=RelayConfig(egress=EgressPolicy.open()),
        analyzers=[FlowLog(io.StringIO())] if flow_log else [],
        connector=upstream,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        with trio.fail_after(10 + n / 100):  # bounded: a lost packet fails the run
            await _connect_all(n, source, upstream)
            while relay.active_flows:
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    assert relay.stats.flows_accepted == n, relay.stats
    return relay


async def _connect_all(n: int, source: MemoryPacketSource, upstream: Upstream) -> None:
    for i in range(n):
        port = 10000 + i % 50000
        iss = 1000 + i

        def send(
            flags: int, seq: int, ack: int, data: bytes = b"", opts: bytes = b"", port: int = port
        ) -> None:
            packet = build_tcp_packet(
                CLIENT, SERVER, port, PORT, seq, ack, flags, 65535, opts, data
            )  # fmt: skip
            source.inject(packet)

        send(SYN, iss, 0, opts=SYN_OPTIONS)
        s_seq, _, _ = await _expect(source, SYN | ACK)
        server = upstream.server
        assert server is not None
        rcv = s_seq + 1
        send(ACK, iss + 1, rcv)
        send(ACK | PSH, iss + 1, rcv, REQUEST)
        request = await server.recv(4096)
        await server.send(request)
        _, _, length = await _expect(source, ACK | PSH)
        rcv += length
        send(FIN | ACK, iss + 1 + len(REQUEST), rcv)
        while await server.recv(4096):
            pass
        server.close()
        fin_seq, _, length = await _expect(source, FIN | ACK)
        send(ACK, iss + 2 + len(REQUEST), fin_seq + length + 1)


async def exchanges(n: int) -> Relay:
    """One connection, then ``n`` 64-byte request/response exchanges through it
    (each request ACKs the last response, as bench_stack.py's ping-pong)."""
    source = MemoryPacketSource()
    upstream = Upstream()
    relay = relay_for(source, upstream)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        with trio.fail_after(10 + n / 100):
            iss = 1000

            def send(flags: int, seq: int, ack: int, data: bytes = b"", opts: bytes = b"") -> None:
                source.inject(
                    build_tcp_packet(
                        CLIENT, SERVER, 40000, PORT, seq, ack, flags, 65535, opts, data
                    )
                )

            send(SYN, iss, 0, opts=SYN_OPTIONS)
            s_seq, _, _ = await _expect(source, SYN | ACK)
            server = upstream.server
            assert server is not None
            seq, rcv = iss + 1, s_seq + 1
            send(ACK, seq, rcv)
            for _ in range(n):
                send(ACK | PSH, seq, rcv, REQUEST)
                seq += len(REQUEST)
                await server.send(await server.recv(4096))
                _, _, length = await _expect(source, ACK | PSH)
                rcv += length
        nursery.cancel_scope.cancel()
    return relay


GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("benchmark (client packets, server socket)", ("profile_connect", "build_tcp_packet",
                                                  "encode_options", "trio/_socket.py",
                                                  "packet_source.py")),
    ("syscalls (socket, epoll, os.read/write, close)", ("epoll", "posix.", "socket.close",
                                                       "setsockopt", "socketpair", "fileno",
                                                       "_socket.socket")),
    ("trio scheduling, tasks, cancel scopes", ("trio/", "_run.py", "_ki.py", "outcome",
                                               "contextvars", "_core", "contextlib")),
    ("analyzer chain, FlowHooks, FlowInfo, flow log", ("hooks.py", "flowlog.py", "json",
                                                       "encoder", "ipaddress", "secrets",
                                                       "urandom")),
    ("TcpFlow and the engine", ("tcpflow.py", "engine.py", "env.py", "egress.py",
                                "isn.py", "fairshare.py", "looptime.py")),
    ("Stack: SYN, quotas, table, timers", ("stack.py", "clients.py", "timewait.py",
                                           "transitions.py", "heap")),
    ("TCP connection (core, sender, ACK path)", ("stack/tcp", "seq.py")),
    ("wire, emit, checksums", ("wire/", "emit.py", "checksum", "from_bytes", "unpack",
                               "pack")),
    ("builtins (len, min, dict.get, ...), from all of the above", ("~:",)),
]  # fmt: skip


def profile(n: int, flow_log: bool) -> None:
    prof = cProfile.Profile()
    prof.enable()
    trio.run(connections, n, flow_log)
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    totals: dict[str, list[float]] = {name: [0.0, 0.0] for name, _ in GROUPS}
    totals["other"] = [0.0, 0.0]
    all_time = 0.0
    for (file, _, function), (_, calls, self_time, _, _) in stats.items():
        key = f"{file}:{function}"
        group = next((name for name, pats in GROUPS if any(p in key for p in pats)), "other")
        totals[group][0] += self_time
        totals[group][1] += calls / n
        all_time += self_time
    print(f"{1e6 * all_time / n:.0f} µs of profiled self time per connection")
    print("| part | share of self time | calls per connection |")
    for name, (t, c) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        print(f"| {name} | {100 * t / all_time:.0f} % | {c:.0f} |")
    print()
    pstats.Stats(prof).sort_stats("tottime").print_stats(40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("n", nargs="?", type=int, default=2000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--flow-log", action="store_true", help="a FlowLog analyzer (--flow-log)")
    parser.add_argument(
        "--pingpong", action="store_true", help="N exchanges through one connection instead"
    )
    parser.add_argument(
        "--virtual-clock",
        action="store_true",
        help="trio's MockClock, autojump: no timer fires by chance (for callgrind counts)",
    )
    args = parser.parse_args()
    clock = trio.testing.MockClock(autojump_threshold=0) if args.virtual_clock else None
    if args.pingpong:
        t0 = time.process_time()
        trio.run(exchanges, args.n, clock=clock)
        cpu = time.process_time() - t0
        print(f"{args.n} exchanges: {1e6 * cpu / args.n:.0f} µs of CPU per exchange")
        return
    if args.profile:
        profile(args.n, args.flow_log)
        return
    t0 = time.process_time()
    trio.run(connections, args.n, args.flow_log, clock=clock)
    cpu = time.process_time() - t0
    print(f"{args.n} connections: {1e6 * cpu / args.n:.0f} µs of CPU per connection")


if __name__ == "__main__":
    main()
