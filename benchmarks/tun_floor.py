"""The floor of tunrelay's request/response latency: the same TUN path, no TCP.

``bench_netns.py`` configuration f. It opens the TUN device exactly as
``tunrelay run --offload --workers 1`` does (``relay.service.run.open_queue`` and
``route_into``) and runs the same two kinds of trio task -- one packet loop
draining the TUN queue, one task per flow reading its upstream socket and
writing the answer to the TUN itself -- with the least Python a relay can do
per packet: a struct unpack in, an ``os.write`` upstream; an ``os.read``, one
header built and a TUN write back. There is no TCP state machine: no
retransmission, windows, options or timers; the SYN-ACK offers only an MSS.

That is enough for one clean request/response connection and nothing else,
so the benchmark runs only its latency measure on it. What it shows is how
much of tunrelay's latency is the TUN path, trio and the interpreter, which
no TCP implementation in Python can remove, and how much is tunrelay's own
(the stack, the relay's dispatch). ``--epoll`` (configuration g) does the
same without trio, in one thread blocking in ``epoll_wait``: the difference
is what trio's scheduler costs.

Run by bench_netns.py inside its gateway namespace:
``python benchmarks/tun_floor.py --tun trb0 --client-net 198.18.1.0/24``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import socket
import struct
import sys
import time

import trio

from relay.datapath.tun import TunDevice
from relay.host.netconfig import NetConfig
from relay.service.run import open_queue, route_into, validate
from stack.wire.tcp import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    build_tcp_packet,
    build_tcp_packet_partial_csum,
    encode_options,
    offload_packet,
)

_IP_TCP = struct.Struct("!2xH4xBBxx4s4sHHIIH")  # IPv4 header (from total length), TCP to flags
_SYNACK_OPTIONS = encode_options(mss=1460)
_ISS = 1000
_WINDOW = 65535


class Flow:
    """One client connection: the two sequence numbers and the upstream socket."""

    __slots__ = ("client", "cport", "rcv_nxt", "server", "snd_nxt", "sock", "sport")

    def __init__(self, client: bytes, cport: int, server: bytes, sport: int, seq: int) -> None:
        self.client, self.cport, self.server, self.sport = client, cport, server, sport
        self.rcv_nxt = (seq + 1) & 0xFFFFFFFF
        self.snd_nxt = _ISS
        self.sock: socket.socket | None = None


class Floor:
    def __init__(self, tun: TunDevice) -> None:
        self.tun = tun
        self.flows: dict[tuple[bytes, int, bytes, int], Flow] = {}
        self.nursery: trio.Nursery | None = None

    def send(self, flow: Flow, flags: int, payload: bytes = b"", options: bytes = b"") -> None:
        if payload:
            packet = build_tcp_packet_partial_csum(
                flow.server, flow.client, flow.sport, flow.cport, flow.snd_nxt, flow.rcv_nxt,
                flags, _WINDOW, options, payload,
            )  # fmt: skip
            self.tun.write_all([offload_packet(packet, 20, 40 + len(options), 0)])
        else:
            packet = build_tcp_packet(
                flow.server, flow.client, flow.sport, flow.cport, flow.snd_nxt, flow.rcv_nxt,
                flags, _WINDOW, options,
            )  # fmt: skip
            self.tun.write_all([packet])
        flow.snd_nxt = (flow.snd_nxt + len(payload) + (1 if flags & (SYN | FIN) else 0)) & (
            0xFFFFFFFF
        )

    async def run(self) -> None:
        tun = self.tun
        async with trio.open_nursery() as self.nursery:
            while True:
                await tun.wait_readable()
                packets, _ = tun.drain_csum(64)
                for packet in packets:
                    self.on_packet(packet)

    def open(self, key: tuple[bytes, int, bytes, int], flow: Flow) -> None:
        """A new flow: connect upstream, then answer the SYN (in the flow's task)."""
        assert self.nursery is not None
        self.nursery.start_soon(self.serve, key, flow)

    def on_packet(self, p: bytes) -> None:
        if len(p) < 40 or p[0] != 0x45:
            return  # IPv4 without options only: the latency client's traffic
        total, _ttl, proto, src, dst, sport, dport, seq, _ack, off_flags = _IP_TCP.unpack_from(p)
        if proto != 6:
            return
        flags = off_flags & 0x3F
        key = (src, sport, dst, dport)
        flow = self.flows.get(key)
        if flags & SYN:
            if flow is None:
                flow = self.flows[key] = Flow(src, sport, dst, dport, seq)
                self.open(key, flow)
            return
        if flow is None or flow.sock is None:
            return
        if flags & RST:
            self.end(key, flow)
            return
        payload = p[20 + ((off_flags >> 12) << 2) : total]
        if payload:
            flow.rcv_nxt = (seq + len(payload)) & 0xFFFFFFFF
            try:
                os.write(flow.sock.fileno(), payload)  # 64 bytes: the socket buffer takes them
            except OSError:
                self.end(key, flow)
                return
        if flags & FIN:
            flow.rcv_nxt = (seq + len(payload) + 1) & 0xFFFFFFFF
            self.send(flow, FIN | ACK)
            self.end(key, flow)

    def end(self, key: tuple[bytes, int, bytes, int], flow: Flow) -> None:
        self.flows.pop(key, None)
        if flow.sock is not None:
            flow.sock.close()
            flow.sock = None

    async def serve(self, key: tuple[bytes, int, bytes, int], flow: Flow) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((socket.inet_ntoa(flow.server), flow.sport))
        if err == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            self.flows.pop(key, None)
            return
        flow.sock = sock
        self.send(flow, SYN | ACK, options=_SYNACK_OPTIONS)
        fd = sock.fileno()
        while flow.sock is sock:
            try:
                await trio.lowlevel.wait_readable(fd)
                data = os.read(fd, 65536)
            except (OSError, trio.ClosedResourceError):
                break
            if not data:
                break
            self.send(flow, ACK | PSH, data)
        if flow.sock is sock:
            self.send(flow, FIN | ACK)
            self.end(key, flow)


class EpollFloor(Floor):
    """The same without trio: one thread blocking in ``epoll_wait`` on the TUN
    queue and every upstream socket (``--epoll``: what trio's scheduler costs)."""

    def __init__(self, tun: TunDevice) -> None:
        super().__init__(tun)
        self.ep = select.epoll()
        self.by_fd: dict[int, tuple[tuple[bytes, int, bytes, int], Flow]] = {}

    def loop(self, seconds: float) -> None:
        tun_fd = self.tun.fileno()
        self.ep.register(tun_fd, select.EPOLLIN)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for fd, _ in self.ep.poll(1.0):
                if fd == tun_fd:
                    packets, _ = self.tun.drain_csum(64)
                    for packet in packets:
                        self.on_packet(packet)
                elif fd in self.by_fd:
                    self.on_upstream(fd)

    def open(self, key: tuple[bytes, int, bytes, int], flow: Flow) -> None:
        """A new flow: connect upstream (blocking: the floor serves one), answer the SYN."""
        dst = socket.inet_ntoa(flow.server)
        sock = socket.create_connection((dst, flow.sport), timeout=5)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        flow.sock = sock
        self.by_fd[sock.fileno()] = (key, flow)
        self.ep.register(sock.fileno(), select.EPOLLIN)
        self.send(flow, SYN | ACK, options=_SYNACK_OPTIONS)

    def on_upstream(self, fd: int) -> None:
        key, flow = self.by_fd[fd]
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.send(flow, ACK | PSH, data)
        else:
            self.send(flow, FIN | ACK)
            self.end(key, flow)

    def end(self, key: tuple[bytes, int, bytes, int], flow: Flow) -> None:
        if flow.sock is not None:
            self.by_fd.pop(flow.sock.fileno(), None)
        super().end(key, flow)


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tun", required=True)
    parser.add_argument("--client-net", action="append", required=True)
    parser.add_argument("--epoll", action="store_true", help="no trio: a plain epoll loop")
    args = parser.parse_args(argv)
    opts = validate(tun=args.tun, client_nets=args.client_net, offload=True, workers=1)
    with NetConfig() as net, open_queue(opts) as tun:
        route_into(net, tun, opts)
        print("relaying TCP (the floor: no TCP stack)", flush=True)
        if args.epoll:
            EpollFloor(tun).loop(600)  # bench_netns stops it long before this
            return 0
        with trio.move_on_after(600):
            await Floor(tun).run()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(trio.run(main, sys.argv[1:]))
