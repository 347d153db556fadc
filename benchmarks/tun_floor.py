"""The floor of tunrelay's costs: the same TUN path, no TCP stack.

``bench_netns.py`` configurations f and l. It opens the TUN device exactly as
``tunrelay run --offload`` does (``relay.service.run.open_queue`` and
``route_into``; with ``--workers N``, N processes on N queues of a multi-queue
device, as the relay's workers) and runs the same kinds of trio task -- one
packet loop draining the TUN queue, one task per flow reading its upstream
socket and writing the answer to the TUN itself -- with the least Python a
relay can do per packet. In: a struct unpack, the bytes held per flow, and at
the end of each pass (four packets: about the relay's 256 KiB share) one
``writev`` upstream and at most one ACK per flow; segments beyond a hole wait
in a dict until it fills, since a client's segments reach the queue out of
order routinely. Out: an ``os.read``, one header and a TUN write. It
negotiates the window scale and timestamps (RFC 7323), and has no
retransmission, congestion control, SACK or timers.

That holds in-order uploads and short request/response connections, which is
what the benchmark runs on it: one stream up, connections/s and latency. What
it shows is how much of tunrelay's cost is the TUN path, trio and the
interpreter, which no TCP implementation in Python can remove, and how much
is tunrelay's own (the stack, the relay's dispatch). ``--epoll``
(configuration g) does the request/response part without trio, in one thread
blocking in ``epoll_wait``: the difference is what trio's scheduler costs.

Run by bench_netns.py inside its gateway namespace:
``python benchmarks/tun_floor.py --tun trb0 --client-net 198.18.1.0/24``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import select
import signal
import socket
import struct
import sys
import time

import trio

from relay.datapath.tun import TunDevice
from relay.host.netconfig import NetConfig
from relay.service.run import RunOptions, open_queue, route_into, validate
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
    parse_tcp,
)

_IP_TCP = struct.Struct("!2xH4xBBxx4s4sHHIIH")  # IPv4 header (from total length), TCP to flags
_TS_OPTION = struct.Struct("!4sII")  # NOP, NOP, kind 8, length 10, TSval, TSecr
_TS_PREFIX = b"\x01\x01\x08\x0a"  # how Linux lays it out (tcp_options_write)
_ISS = 1000
_WINDOW = 65535  # the SYN-ACK's (never scaled, RFC 7323 2.2)
_WSCALE = 7
_RCV_BUF = 4 << 20  # the window after the handshake: the relay's TcpConfig.rcv_buf
_ACK_EVERY = 2 * 1460  # unacknowledged bytes that get their own ACK at the end of a pass
_MASK = 0xFFFFFFFF


def _ts_now() -> int:
    """Our TSval: a millisecond clock (RFC 7323 5.4)."""
    return time.monotonic_ns() // 1_000_000 & _MASK


class Flow:
    """One client connection: the two sequence numbers and the upstream socket."""

    __slots__ = (
        "acked", "blocked", "client", "cport", "fin", "held", "held_bytes", "ooo", "rcv_nxt",
        "server", "shut", "snd_nxt", "sock", "sport", "ts_recent", "wake",
    )  # fmt: skip

    def __init__(self, client: bytes, cport: int, server: bytes, sport: int, seq: int) -> None:
        self.client, self.cport, self.server, self.sport = client, cport, server, sport
        self.rcv_nxt = self.acked = (seq + 1) & _MASK
        self.snd_nxt = _ISS
        self.sock: socket.socket | None = None
        # RFC 7323 timestamps, when the SYN offered them: the client's last TSval, echoed
        # in every segment. (Without them a client's TIME_WAIT ports cannot be reused
        # for a second (tcp_tw_reuse), and connect() slows as they pile up.)
        self.ts_recent: int | None = None
        # Client bytes the upstream socket has not taken yet (they shrink the window).
        self.held: list[bytes | memoryview] = []
        self.held_bytes = 0
        self.blocked = False  # the upstream socket is full: the flow's writer has the bytes
        self.wake: trio.Event | None = None  # the writer's (started when first needed)
        self.fin = False  # the client's FIN came (in order): sent on once all is written
        self.shut = False  # ... and it was: shutdown(SHUT_WR) upstream
        # Segments beyond a hole, by sequence number (no SACK: the client's
        # retransmission of the hole's first segment lands exactly on rcv_nxt).
        self.ooo: dict[int, tuple[bytes | memoryview, int]] = {}

    def window(self) -> int:
        return max(0, _RCV_BUF - self.held_bytes) >> _WSCALE

    def flush(self) -> bool:
        """Write what is held upstream (one writev); whether all of it went."""
        assert self.sock is not None
        try:
            n = os.writev(self.sock.fileno(), self.held)
        except BlockingIOError:
            n = 0
        self.held_bytes -= n
        if not self.held_bytes:
            self.held.clear()
            return True
        while n:
            first = self.held[0]
            if len(first) <= n:
                n -= len(first)
                del self.held[0]
            else:
                self.held[0] = memoryview(first)[n:]
                n = 0
        return False


class Floor:
    def __init__(self, tun: TunDevice) -> None:
        self.tun = tun
        self.flows: dict[tuple[bytes, int, bytes, int], Flow] = {}
        self.dirty: dict[tuple[bytes, int, bytes, int], Flow] = {}  # got bytes this pass
        self.nursery: trio.Nursery | None = None

    def send(self, flow: Flow, flags: int, payload: bytes = b"") -> None:
        window = _WINDOW if flags & SYN else flow.window()
        flow.acked = flow.rcv_nxt
        ts = flow.ts_recent
        if flags & SYN:
            timestamps = None if ts is None else (_ts_now(), ts)
            options = encode_options(mss=1460, wscale=_WSCALE, timestamps=timestamps)
        elif ts is not None:
            options = _TS_OPTION.pack(_TS_PREFIX, _ts_now(), ts)
        else:
            options = b""
        if payload:
            packet = build_tcp_packet_partial_csum(
                flow.server, flow.client, flow.sport, flow.cport, flow.snd_nxt, flow.rcv_nxt,
                flags, window, options, payload,
            )  # fmt: skip
            self.tun.write_all([offload_packet(packet, 20, 40 + len(options), 0)])
        else:
            packet = build_tcp_packet(
                flow.server, flow.client, flow.sport, flow.cport, flow.snd_nxt, flow.rcv_nxt,
                flags, window, options,
            )  # fmt: skip
            self.tun.write_all([packet])
        flow.snd_nxt = (flow.snd_nxt + len(payload) + (1 if flags & (SYN | FIN) else 0)) & (
            0xFFFFFFFF
        )

    async def run(self, pass_packets: int) -> None:
        tun = self.tun
        async with trio.open_nursery() as self.nursery:
            while True:
                await tun.wait_readable()
                while True:
                    packets, _ = tun.drain_csum(pass_packets)
                    for packet in packets:
                        self.on_packet(packet)
                    self.end_pass()
                    if len(packets) < pass_packets:
                        break
                    await trio.lowlevel.checkpoint()  # a full pass: let the flows' tasks run

    def open(self, key: tuple[bytes, int, bytes, int], flow: Flow) -> None:
        """A new flow: connect upstream, then answer the SYN (in the flow's task)."""
        assert self.nursery is not None
        self.nursery.start_soon(self.serve, key, flow)

    def on_packet(self, p: bytes | memoryview) -> None:
        if len(p) < 40 or p[0] != 0x45:
            return  # IPv4 without options only: the benchmark's traffic
        total, _ttl, proto, src, dst, sport, dport, seq, _ack, off_flags = _IP_TCP.unpack_from(p)
        if proto != 6:
            return
        flags = off_flags & 0x3F
        key = (src, sport, dst, dport)
        flow = self.flows.get(key)
        doff = (off_flags >> 12) << 2
        if flags & SYN:
            if flow is None:
                flow = self.flows[key] = Flow(src, sport, dst, dport, seq)
                ts = parse_tcp(p, 20, total).options.timestamps
                flow.ts_recent = None if ts is None else ts[0]
                self.open(key, flow)
            return
        if flow is None or flow.sock is None:
            return
        if flow.ts_recent is not None and doff == 32 and p[40:44] == _TS_PREFIX:
            flow.ts_recent = _TS_OPTION.unpack_from(p, 40)[1]
        if flags & RST:
            self.end(key, flow)
            return
        payload = p[20 + doff : total]
        rcv_nxt = flow.rcv_nxt
        if seq != rcv_nxt:
            ahead = (seq - rcv_nxt) & _MASK
            if ahead < _RCV_BUF:
                # Ahead of a hole. Segments that a client sends from two CPUs (its
                # send call, and its ACK processing run by our TUN write) reach the
                # queue out of order, so this is routine: keep them until the hole
                # fills, and say where it is at the end of the pass (RFC 5681 4.2).
                if payload or flags & FIN:
                    flow.ooo[seq] = (payload, flags & FIN)
            elif (behind := (rcv_nxt - seq) & _MASK) < len(payload):
                self.take(flow, payload[behind:], flags & FIN)  # partly new
                self.dirty[key] = flow
                return
            flow.acked = (flow.rcv_nxt - _ACK_EVERY) & _MASK  # an ACK this pass
            self.dirty[key] = flow
            return
        if payload or flags & FIN:
            self.take(flow, payload, flags & FIN)
            self.dirty[key] = flow

    def take(self, flow: Flow, payload: bytes | memoryview, fin: int) -> None:
        """In-order bytes (and FIN): held for upstream, with what they make in order."""
        while True:
            if payload:
                flow.rcv_nxt = (flow.rcv_nxt + len(payload)) & _MASK
                flow.held.append(payload)
                flow.held_bytes += len(payload)
            if fin:
                flow.rcv_nxt = (flow.rcv_nxt + 1) & _MASK
                flow.fin = True
                return
            if not flow.ooo:
                return
            nxt = flow.ooo.pop(flow.rcv_nxt, None)
            if nxt is None:
                return
            payload, fin = nxt

    def end_pass(self) -> None:
        """Per flow that got bytes this pass: one writev upstream, at most one ACK."""
        dirty = self.dirty
        for key, flow in dirty.items():
            if flow.sock is None:
                continue
            if flow.held and not flow.blocked:
                try:
                    done = flow.flush()
                except OSError:
                    self.end(key, flow)
                    continue
                if not done:  # the flow's writer takes over until it is all out
                    flow.blocked = True
                    self.on_full(key, flow)
            if flow.fin and not flow.held:
                self.half_close(key, flow)
            elif (flow.rcv_nxt - flow.acked) & _MASK >= _ACK_EVERY:
                self.send(flow, ACK)
        dirty.clear()

    def on_full(self, key: tuple[bytes, int, bytes, int], flow: Flow) -> None:
        """The upstream socket took part of the bytes: wake the flow's writer (started
        the first time)."""
        if flow.wake is None:
            flow.wake = trio.Event()
            assert self.nursery is not None and flow.sock is not None
            self.nursery.start_soon(self.write_held, key, flow, flow.sock)
        flow.wake.set()

    def written(self, key: tuple[bytes, int, bytes, int], flow: Flow) -> None:
        """All held bytes are upstream again: a window update, or the FIN behind them."""
        flow.blocked = False
        if flow.fin:
            self.half_close(key, flow)
        else:
            self.send(flow, ACK)

    def half_close(self, key: tuple[bytes, int, bytes, int], flow: Flow) -> None:
        """The client's FIN, once every byte before it is upstream, passed on as a
        half-close, as a relay must (the server may still answer): our FIN, which
        also ACKs the client's, follows the server's."""
        if flow.shut or flow.sock is None:
            return
        flow.shut = True
        try:
            flow.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.end(key, flow)

    def _close(self, sock: socket.socket) -> None:
        trio.lowlevel.notify_closing(sock)  # wakes the flow's tasks waiting on it
        sock.close()

    def end(self, key: tuple[bytes, int, bytes, int], flow: Flow) -> None:
        self.flows.pop(key, None)
        if flow.sock is not None:
            self._close(flow.sock)
            flow.sock = None
        if flow.wake is not None:
            flow.wake.set()  # its writer ends

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
        self.send(flow, SYN | ACK)
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

    async def write_held(
        self, key: tuple[bytes, int, bytes, int], flow: Flow, sock: socket.socket
    ) -> None:
        """What the upstream socket could not take at the end of a pass, once it can;
        then a window update (and the FIN the client sent meanwhile)."""
        while True:
            assert flow.wake is not None
            await flow.wake.wait()
            if flow.sock is not sock:
                return
            try:
                await trio.lowlevel.wait_writable(sock)
                done = flow.sock is sock and flow.flush()
            except (OSError, trio.ClosedResourceError):
                if flow.sock is sock:
                    self.end(key, flow)
                return
            if done:
                flow.wake = trio.Event()
                self.written(key, flow)
                if flow.fin:
                    return


class EpollFloor(Floor):
    """The same without trio: one thread blocking in ``epoll_wait`` on the TUN
    queue and every upstream socket (``--epoll``: what trio's scheduler costs)."""

    def __init__(self, tun: TunDevice) -> None:
        super().__init__(tun)
        self.ep = select.epoll()
        self.by_fd: dict[int, tuple[tuple[bytes, int, bytes, int], Flow]] = {}

    def loop(self, seconds: float, pass_packets: int) -> None:
        tun_fd = self.tun.fileno()
        self.ep.register(tun_fd, select.EPOLLIN)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for fd, events in self.ep.poll(1.0):
                if fd == tun_fd:  # level-triggered: a full pass comes back at once
                    packets, _ = self.tun.drain_csum(pass_packets)
                    for packet in packets:
                        self.on_packet(packet)
                    self.end_pass()
                    continue
                if events & select.EPOLLOUT and fd in self.by_fd:
                    self.on_writable(fd)
                if events & ~select.EPOLLOUT and fd in self.by_fd:
                    self.on_upstream(fd)

    def on_full(self, key: tuple[bytes, int, bytes, int], flow: Flow) -> None:
        assert flow.sock is not None
        self.ep.modify(flow.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def on_writable(self, fd: int) -> None:
        key, flow = self.by_fd[fd]
        try:
            done = flow.flush()
        except OSError:
            self.end(key, flow)
            return
        if done:
            self.ep.modify(fd, select.EPOLLIN)
            self.written(key, flow)

    def open(self, key: tuple[bytes, int, bytes, int], flow: Flow) -> None:
        """A new flow: connect upstream (blocking: the floor serves one), answer the SYN."""
        dst = socket.inet_ntoa(flow.server)
        sock = socket.create_connection((dst, flow.sport), timeout=5)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        flow.sock = sock
        self.by_fd[sock.fileno()] = (key, flow)
        self.ep.register(sock.fileno(), select.EPOLLIN)
        self.send(flow, SYN | ACK)

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

    def _close(self, sock: socket.socket) -> None:
        sock.close()  # epoll drops a closed fd by itself

    def end(self, key: tuple[bytes, int, bytes, int], flow: Flow) -> None:
        if flow.sock is not None:
            self.by_fd.pop(flow.sock.fileno(), None)
        super().end(key, flow)


def serve_queue(tun: TunDevice, args: argparse.Namespace) -> None:
    """One queue's floor, in this process, for at most ten minutes."""
    if args.epoll:
        EpollFloor(tun).loop(600, max(1, args.pass_packets))  # bench_netns stops it sooner
        return

    async def run() -> None:
        with trio.move_on_after(600):
            await Floor(tun).run(max(1, args.pass_packets))

    trio.run(run)


def fork_worker(opts: RunOptions, args: argparse.Namespace) -> int:
    """A child process on one more queue of the device (as a relay worker's): its PID,
    once its queue is attached."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(ready_r)
            with open_queue(opts, attach=True) as tun:
                os.write(ready_w, b"1")
                os.close(ready_w)
                serve_queue(tun, args)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    try:
        if os.read(ready_r, 1) != b"1":
            raise RuntimeError("a floor worker failed to attach its queue")
    finally:
        os.close(ready_r)
    return pid


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tun", required=True)
    parser.add_argument("--client-net", action="append", required=True)
    parser.add_argument("--epoll", action="store_true", help="no trio: a plain epoll loop")
    parser.add_argument(
        "--pass-packets",
        type=int,
        default=4,
        help="packets per pass (default 4: four GRO super-segments, about the relay's "
        "256 KiB share of a pass, --flow-pass-bytes)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes, each on its own queue of a multi-queue device, as the relay's "
        "workers (default 1)",
    )
    args = parser.parse_args(argv)
    workers = max(1, args.workers)
    opts = validate(tun=args.tun, client_nets=args.client_net, offload=True, workers=workers)
    with NetConfig() as net, open_queue(opts, multi_queue=workers > 1) as tun:
        route_into(net, tun, opts)
        if workers == 1:
            print("relaying TCP (the floor: no TCP stack)", flush=True)
            serve_queue(tun, args)
            return 0
        tun.detach()  # the device stays; the workers' queues take its packets
        pids = [fork_worker(opts, args) for _ in range(workers)]
        print(f"relaying TCP (the floor: no TCP stack, {workers} workers)", flush=True)
        try:
            for pid in pids:
                os.waitpid(pid, 0)
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ChildProcessError):
                    os.kill(pid, signal.SIGTERM)
                    os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main(sys.argv[1:]))
