"""Does a worker's Python heap grow with the flows it served? No root, no network.

The soak's flow mix (netns-tests/test_relay_soak.py), scripted against a
``Relay`` and its ``Stack`` configured as ``tunrelay run`` configures them
(``profile_connect.relay_for``), through a ``MemoryPacketSource``; every
upstream is the far end of an AF_UNIX ``socketpair()`` served by a task here:

* short: SYN, handshake, a 200-byte request, its echo, the client's FIN, the
  server's EOF, the relay's FIN, the last ACK;
* bulk: 256 KiB up (within the relay's window) and echoed back, then as short;
* abandoned: a request, then the client's RST without reading the answer;
* upstream reset: the server closes its end with the request unread (an
  AF_UNIX peer then reads ECONNRESET, as from a TCP RST);
* stops reading: 64 KiB into a server that never reads, the client's FIN
  after 1 s, the server's close 5 s after it accepted (unread: a reset);
* UDP: one datagram to an echo server, its echo; the flow idles out (5 s).

``--threads`` client tasks loop over the mix (the soak's CLIENT_THREADS is 6);
time is trio's MockClock (autojump), so the timers (RTO, keepalive, the UDP
idle timeout, the 1 s and 5 s waits) cost no wall time. After each block of
flows, once every flow is gone from the relay and the stack, it prints the
traced Python memory (``tracemalloc``), VmRSS, live objects, and the length
of the relay's and stack's tables; with ``--service-gc`` the collector runs
as in ``relay.service.run.relay_queue`` (``gc.freeze()``, thresholds 700, 10,
1000) and each block is measured before and after an explicit
``gc.collect()`` (what was freed then is garbage the service's thresholds
left for a full collection). ``--diff`` prints the top allocation sites that
grew between the second block and the last (``compare_to(..., 'traceback')``).

``--loss P`` drops that share of the packets each way (the client retransmits
its SYN, data and FIN; a port it closed answers with an RST, as the kernel's
would). ``--no-trace`` runs without tracemalloc (whose own tables grow in the
C heap), for RSS and glibc's figures (``mallinfo2``: bytes taken with sbrk, in
use, free); ``--trim`` calls ``malloc_trim(0)`` after each block and shows RSS
before and after it: what it gives back was free heap memory, not live data.

Run: ``PYTHONPATH=. python benchmarks/leak_check.py [--blocks 2000,2000,4000]
[--threads 6] [--service-gc] [--loss 0.05] [--no-trace] [--trim] [--diff 10]
[--kinds short,bulk,...]``
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import functools
import gc
import os
import random
import re
import socket
import struct
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from profile_connect import relay_for, stack_config

from relay.datapath.packet_source import MemoryPacketSource
from stack import FlowId, Stack
from stack.config import DatagramConfig
from stack.seq import seq_add, seq_gt, seq_lt
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, build_tcp_packet, encode_options, parse_tcp
from stack.wire.udp import build_udp_packet

CLIENT = bytes([198, 18, 1, 2])
SERVER = bytes([198, 18, 2, 2])
TCP_PORT = 7
UDP_PORT = 9999  # not 53: the soak's UDP echo server has an ephemeral port (udp_idle_timeout)
SYN_OPTIONS = encode_options(mss=1460, wscale=7, sack_permitted=True)
MSS = 1460
BULK = 256 * 1024
STALL = 64 * 1024
KINDS = ("short", "bulk", "abandoned", "upstream_reset", "stops_reading", "udp")


class Client:
    """The client end of one TCP connection: in-order only (the memory source loses
    nothing), every data segment or FIN ACKed at once."""

    def __init__(self, h: Harness, port: int) -> None:
        self.h, self.port = h, port
        self.iss = 1000 + port * 7919 % 100000
        self.snd_nxt = self.snd_una = self.iss
        self.rcv_nxt = 0
        self.wscale = 0
        self.peer_wnd = 0
        self.established = self.fin = self.rst = False
        self.data = bytearray()
        self.lot = trio.lowlevel.ParkingLot()
        self.fin_seq: int | None = None  # our FIN's sequence number, once sent

    def out(self, flags: int, data: bytes = b"", opts: bytes = b"") -> None:
        if flags & FIN:
            self.fin_seq = self.snd_nxt
        if self.h.lost():
            self.snd_nxt = seq_add(self.snd_nxt, len(data) + (1 if flags & (SYN | FIN) else 0))
            return
        self.h.source.inject(
            build_tcp_packet(
                CLIENT, SERVER, self.port, TCP_PORT, self.snd_nxt, self.rcv_nxt, flags,
                65535, opts, data,
            )
        )  # fmt: skip
        self.snd_nxt = seq_add(self.snd_nxt, len(data) + (1 if flags & (SYN | FIN) else 0))

    def on_packet(self, packet: bytes, ihl: int, end: int) -> None:
        tcp = parse_tcp(packet, ihl, end, None)
        flags = tcp.flags
        if self.rst:  # our socket is gone: the kernel would answer with an RST
            self.h.closed_port(packet, ihl, end)
        elif flags & RST:
            self.rst = True
        elif flags & SYN:
            if not self.established:
                self.rcv_nxt = seq_add(tcp.seq, 1)
                self.wscale = tcp.options.wscale or 0
                self.established = True
            self.snd_una = tcp.ack
            self.peer_wnd = tcp.window  # never scaled in a SYN
            self.out(ACK)
        else:
            if flags & ACK and not seq_lt(tcp.ack, self.snd_una):
                self.snd_una = tcp.ack
                self.peer_wnd = tcp.window << self.wscale
            payload = packet[ihl + tcp.header_len : end]
            if payload or flags & FIN:
                if tcp.seq == self.rcv_nxt and not self.fin:
                    self.data += payload
                    self.rcv_nxt = seq_add(self.rcv_nxt, len(payload))
                    if flags & FIN:
                        self.rcv_nxt = seq_add(self.rcv_nxt, 1)
                        self.fin = True
                if not self.rst:
                    self.out(ACK)
        self.lot.unpark_all()

    async def until(self, cond: Callable[[], bool]) -> None:
        """Wait for ``cond``; every 1 s without it, the SYN or FIN again (loss)."""
        while not cond():
            if self.rst:
                raise ConnectionResetError(self.port)
            with trio.move_on_after(1.0) as waited:
                await self.lot.park()
            if waited.cancelled_caught:
                self.retransmit()

    def _moved(self, una: int) -> bool:
        return self.snd_una != una or self.rst

    def retransmit(self) -> None:
        if not self.established:
            self.snd_nxt = self.iss
            self.out(SYN, opts=SYN_OPTIONS)
        elif self.fin_seq is not None and self.snd_una == self.fin_seq:
            self.snd_nxt = self.fin_seq
            self.out(FIN | ACK)
        else:  # a probe: a live connection ignores it, a gone one answers RST
            self.out(ACK)

    async def connect(self) -> None:
        self.h.clients[self.port] = self
        self.out(SYN, opts=SYN_OPTIONS)
        await self.until(lambda: self.established)

    async def send(self, data: bytes) -> None:
        """Within the relay's window; go-back-N after 1 s without progress."""
        start, off = self.snd_nxt, 0
        while off < len(data) or seq_gt(self.snd_nxt, self.snd_una):
            room = min(self.peer_wnd, 1 << 20) - (self.snd_nxt - self.snd_una) % (1 << 32)
            if room <= 0 or off >= len(data):
                una = self.snd_una
                with trio.move_on_after(1.0):
                    await self.until(functools.partial(self._moved, una))
                if self.snd_una == una and not self.rst:
                    self.snd_nxt = una
                    off = (una - start) % (1 << 32)
                continue
            n = min(MSS, len(data) - off, room)
            self.out(ACK | PSH, data[off : off + n])
            off += n

    async def recv_exactly(self, n: int) -> bytes:
        await self.until(lambda: len(self.data) >= n)
        out = bytes(self.data[:n])
        del self.data[:n]
        return out

    async def close(self) -> None:
        """FIN, then wait for the relay's FIN and for the ACK of ours."""
        self.out(FIN | ACK)
        await self.until(lambda: self.fin and not seq_gt(self.snd_nxt, self.snd_una))

    def reset(self) -> None:
        self.out(RST | ACK)
        self.rst = True

    def done(self) -> None:
        self.h.clients.pop(self.port, None)


class Harness:
    def __init__(self, kinds: tuple[str, ...], loss: float = 0.0) -> None:
        self.source = MemoryPacketSource(inbound_capacity=1 << 20, outbound_capacity=1 << 20)
        self.clients: dict[int, Client] = {}
        self.udp_waiting: dict[int, trio.Event] = {}
        self.servers: dict[int, trio.socket.SocketType] = {}
        self.server_ready: dict[int, trio.Event] = {}
        self.kinds = kinds
        self.loss = loss
        self.random = random.Random(1)
        self.next_port = 0
        self.done = collections.Counter[str]()
        self.failed = collections.Counter[str]()
        cfg = stack_config()
        cfg = dataclasses.replace(cfg, datagram=DatagramConfig(udp_idle_timeout=5.0))
        self.stack = Stack(cfg)
        self.relay = relay_for(
            self.source, self.connect, stack=self.stack, udp_socket=self.udp_socket
        )
        self.nursery: trio.Nursery | None = None

    def lost(self) -> bool:
        return self.loss > 0 and self.random.random() < self.loss

    def port(self) -> int:
        self.next_port += 1
        return 10000 + self.next_port % 50000

    async def connect(self, flow: FlowId) -> trio.socket.SocketType:
        relay_end, server = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.servers[flow.client_port] = server
        self.server_ready.setdefault(flow.client_port, trio.Event()).set()
        return relay_end

    def udp_socket(self, flow: FlowId) -> socket.socket:
        relay_end, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        relay_end.setblocking(False)
        assert self.nursery is not None
        self.nursery.start_soon(self.udp_echo, trio.socket.from_stdlib_socket(server))
        return relay_end

    async def udp_echo(self, sock: trio.socket.SocketType) -> None:
        with sock:
            data = await sock.recv(2048)
            await sock.send(data)

    async def server_of(self, port: int) -> trio.socket.SocketType:
        await self.server_ready.setdefault(port, trio.Event()).wait()
        del self.server_ready[port]
        return self.servers.pop(port)

    async def dispatch(self) -> None:
        while True:
            for packet in await self.source.receive_batch():
                if self.lost():
                    continue
                ihl = (packet[0] & 15) * 4
                end = struct.unpack_from("!H", packet, 2)[0] or len(packet)
                proto = packet[9]
                dport = struct.unpack_from("!H", packet, ihl + 2)[0]
                if proto == 6:
                    c = self.clients.get(dport)
                    if c is not None:
                        c.on_packet(packet, ihl, end)
                    else:
                        self.closed_port(packet, ihl, end)
                elif proto == 17:
                    ev = self.udp_waiting.get(dport)
                    if ev is not None:
                        ev.set()

    def closed_port(self, packet: bytes, ihl: int, end: int) -> None:
        """A segment for a socket the client closed: RST, as the kernel answers it."""
        tcp = parse_tcp(packet, ihl, end, None)
        if tcp.flags & RST:
            return
        if tcp.flags & ACK:
            seq, ack, flags = tcp.ack, 0, RST
        else:
            seq, ack, flags = 0, seq_add(tcp.seq, end - ihl - tcp.header_len + 1), RST | ACK
        self.source.inject(
            build_tcp_packet(CLIENT, SERVER, tcp.dst_port, TCP_PORT, seq, ack, flags, 0, b"", b"")
        )

    # --- the kinds -----------------------------------------------------------

    async def short(self, c: Client) -> None:
        await c.connect()
        server = await self.server_of(c.port)
        with server:
            request = b"q" * 200
            await c.send(request)
            got = b""
            while len(got) < len(request):
                got += await server.recv(4096)
            await server.send(got)
            assert await c.recv_exactly(len(request)) == request

            async def drain() -> None:
                while await server.recv(4096):
                    pass
                server.close()

            async with trio.open_nursery() as n:
                n.start_soon(drain)
                await c.close()

    async def bulk(self, c: Client) -> None:
        await c.connect()
        server = await self.server_of(c.port)
        payload = bytes(range(256)) * (BULK // 256)

        async def serve() -> None:
            with server:
                got = bytearray()
                while len(got) < BULK:
                    got += await server.recv(65536)
                view = memoryview(bytes(got))
                while view:
                    n = await server.send(view)
                    view = view[n:]
                while await server.recv(4096):
                    pass

        async with trio.open_nursery() as n:
            n.start_soon(serve)
            await c.send(payload)
            assert await c.recv_exactly(BULK) == payload
            await c.close()

    async def abandoned(self, c: Client) -> None:
        await c.connect()
        server = await self.server_of(c.port)
        with server:
            await c.send(b"a" * 200)
            c.reset()
            try:
                got = b""
                while len(got) < 200:
                    chunk = await server.recv(4096)
                    if not chunk:
                        break
                    got += chunk
                await server.send(got)
                while await server.recv(4096):
                    pass
            except OSError:
                pass

    async def upstream_reset(self, c: Client) -> None:
        await c.connect()
        server = await self.server_of(c.port)
        with server:
            await c.send(b"R" * 200)
            await trio.lowlevel.wait_readable(server)  # the request arrived: close unread
        try:
            await c.until(lambda: c.fin)
        except ConnectionResetError:
            return
        raise AssertionError("upstream reset: no RST")

    async def stops_reading(self, c: Client) -> None:
        await c.connect()
        server = await self.server_of(c.port)

        async def serve() -> None:
            with server:
                await trio.sleep(5.0)  # never reads; closes with 64 KiB unread: a reset

        async with trio.open_nursery() as n:
            n.start_soon(serve)
            await c.send(b"S" * STALL)
            await trio.sleep(1.0)
            c.out(FIN | ACK)
            with contextlib.suppress(ConnectionResetError):
                await c.until(lambda: c.fin)

    async def udp(self, port: int) -> None:
        ev = self.udp_waiting[port] = trio.Event()
        self.source.inject(build_udp_packet(CLIENT, SERVER, port, UDP_PORT, b"u" * 64))
        with trio.move_on_after(2.0):
            await ev.wait()
        del self.udp_waiting[port]
        if not ev.is_set():
            raise TimeoutError("udp: no echo")

    async def one(self, kind: str) -> None:
        port = self.port()
        try:
            with trio.fail_after(60):
                if kind == "udp":
                    await self.udp(port)
                else:
                    c = Client(self, port)
                    try:
                        await getattr(self, kind)(c)
                    finally:
                        c.done()
            self.done[kind] += 1
        except Exception as exc:  # counted: the report says if any failed
            self.failed[f"{kind}: {type(exc).__name__}"] += 1

    async def block(self, n: int, threads: int) -> None:
        kinds = self.kinds
        counter = iter(range(n))

        async def worker(t: int) -> None:
            for i in counter:
                await self.one(kinds[i % len(kinds)])

        async with trio.open_nursery() as nursery:
            for t in range(threads):
                nursery.start_soon(worker, t)

    async def idle(self) -> None:
        """Until nothing is left: no flow, connection, datagram flow, timer."""
        for _ in range(600):
            if (
                not self.relay.active_flows
                and not self.relay.active_datagram_flows
                and not len(self.stack)
                and self.stack.gauges().timers == 0
            ):
                break
            await trio.sleep(1.0)
        await trio.sleep(120.0)  # TIME-WAIT records, the last timers
        self.servers.clear()
        self.server_ready.clear()


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def malloc_kib() -> tuple[int, int, int]:
    """glibc's main arena: (bytes from sbrk, in use, free in it) in KiB, mmapped apart."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    m = libc.mallinfo2()
    return m.arena // 1024, m.uordblks // 1024, m.fordblks // 1024


def pymalloc_arenas() -> tuple[int, int]:
    """(arenas allocated now, highwater) from sys._debugmallocstats (1 MiB each)."""
    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode()
    now = re.search(r"# arenas allocated current\s*=\s*([\d,]+)", text)
    high = re.search(r"# arenas highwater mark\s*=\s*([\d,]+)", text)
    return (
        int(now.group(1).replace(",", "")) if now else -1,
        int(high.group(1).replace(",", "")) if high else -1,
    )


def tables(h: Harness) -> dict[str, int]:
    s: Any = h.stack
    r: Any = h.relay
    dg: Any = s._datagrams
    out = {
        "relay._flows": len(r._flows),
        "relay.datagrams": len(r._datagrams),
        "stack._by_key": len(s._by_key),
        "_by_flow": len(s._by_flow),
        "_entries": len(s._entries),
        "_orphans": len(s._orphans),
        "_touched": len(s._touched),
        "_filed": len(s._filed),
        "_timers": len(s._timers),
        "_time_wait": len(s._time_wait),
        "_addresses": len(s._addresses),
        "_dst_pending": len(s._dst_pending),
        "clients": len(s._clients),
        "datagrams": len(dg),
        "trio tasks": _tasks(root) if (root := trio.lowlevel.current_root_task()) else -1,
    }
    return out


def _tasks(task: trio.lowlevel.Task) -> int:
    return 1 + sum(_tasks(t) for n in task.child_nurseries for t in n.child_tasks)


def type_counts() -> collections.Counter[str]:
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


async def main_async(args: argparse.Namespace) -> None:
    h = Harness(tuple(args.kinds.split(",")), args.loss)
    blocks = [int(b) for b in args.blocks.split(",")]
    snaps: list[tracemalloc.Snapshot] = []
    counts: list[collections.Counter[str]] = []
    async with trio.open_nursery() as nursery:
        h.nursery = nursery
        await nursery.start(h.relay.run)
        nursery.start_soon(h.dispatch)
        if args.service_gc:
            gc.freeze()
            gc.set_threshold(700, 10, 1000)
        served = 0
        print(
            "| flows | traced KiB | traced KiB after collect | freed by collect | RSS KiB "
            "| malloc sbrk/used/free KiB | pymalloc arenas now/high | gc objects | tables |"
        )
        for i, n in enumerate(blocks):
            await h.block(n, args.threads)
            served += n
            await h.idle()
            if args.service_gc:
                before = tracemalloc.get_traced_memory()[0]
                freed = gc.collect()
            else:
                gc.collect()
                before = tracemalloc.get_traced_memory()[0]
                freed = gc.collect()
            after = tracemalloc.get_traced_memory()[0]
            objects = len(gc.get_objects())
            if args.diff and (i == min(1, len(blocks) - 1) or i == len(blocks) - 1):
                snaps.append(tracemalloc.take_snapshot())
                counts.append(type_counts())
            t = tables(h)
            nonzero: dict[str, object] = {k: v for k, v in t.items() if v}
            if args.trim:  # free heap memory back to the OS: what is left is in use
                rss = rss_kib()
                ctypes.CDLL(None).malloc_trim(0)
                nonzero["RSS before/after malloc_trim"] = f"{rss}/{rss_kib()}"
            print(
                f"| {served} | {before / 1024:.0f} | {after / 1024:.0f} | {freed} "
                f"| {rss_kib()} | {'/'.join(map(str, malloc_kib()))} "
                f"| {'/'.join(map(str, pymalloc_arenas()))} | {objects} | {nonzero} |",
                flush=True,
            )
        print(f"served {dict(h.done)}; failed {dict(h.failed)}")
        print(f"relay {h.relay.stats}")
        st = h.stack.stats
        print(
            f"stack connections_opened={st.connections_opened} "
            f"closed={st.connections_closed} rst_sent={st.rst_sent}"
        )
        if len(snaps) == 2:
            grown = served - blocks[0] - (blocks[1] if len(blocks) > 1 else 0)
            per = max(grown, 1)
            diff = snaps[1].compare_to(snaps[0], "traceback")
            print(f"top allocation sites grown over the last {grown} flows:")
            for d in diff[: args.diff]:
                each = d.size_diff / per
                print(f"{d.size_diff:+9d} B {d.count_diff:+7d} blocks ({each:.2f} B/flow)")
                for line in d.traceback.format()[-2 * args.depth :]:
                    print("    " + line)
            delta = counts[1] - counts[0]
            print("object types grown:", delta.most_common(args.diff))
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--blocks", default="2000,2000,4000")
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--service-gc", action="store_true")
    parser.add_argument("--loss", type=float, default=0.0, help="drop this share each way")
    parser.add_argument("--diff", type=int, default=0, help="top K grown allocation sites")
    parser.add_argument("--depth", type=int, default=6, help="traceback frames kept")
    parser.add_argument("--no-trace", action="store_true", help="RSS without tracemalloc")
    parser.add_argument("--trim", action="store_true", help="malloc_trim(0) after each block")
    args = parser.parse_args()
    if not args.no_trace:
        tracemalloc.start(args.depth)
    trio.run(main_async, args, clock=trio.testing.MockClock(autojump_threshold=0))


if __name__ == "__main__":
    main()
