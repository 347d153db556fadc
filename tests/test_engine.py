"""The relay end to end, without root or network.

A scripted TCP client speaks raw packets through a ``MemoryPacketSource`` to
the real ``Stack``; the relay's upstream "server" is the far end of a
``socketpair()`` handed out by a fake connector. Time is trio's autojump clock.
"""

from __future__ import annotations

import errno
import io
import ipaddress
import json
import resource
import socket
import struct
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from relay.analysis.flowlog import FlowLog
from relay.analysis.hooks import Direction, FlowEnd, FlowInfo, Verdict
from relay.datapath import fairshare
from relay.datapath.config import RelayConfig
from relay.datapath.egress import EgressPolicy, parse_rule
from relay.datapath.engine import Relay, raise_nofile_limit
from relay.datapath.isn import IsnGenerator
from relay.datapath.packet_source import MemoryPacketSource
from relay.datapath.tcpflow import TcpFlow, _established
from stack import FlowId, Stack, StackConfig, State, TcpConfig
from stack.seq import seq_add, seq_gt, seq_lt, seq_sub
from stack.wire.ip import parse_ip
from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, build_tcp_packet, encode_options

from packets import parse_tcp_packet

CLIENT_IP = {4: "198.18.0.2", 6: "fd00::2"}
SERVER_IP = {4: "198.19.0.80", 6: "fd00:1::80"}
OPEN = EgressPolicy.open()  # the test servers are in reserved and private ranges
C2S, S2C = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT


async def until(pred: Callable[[], object], timeout: float = 60.0) -> None:
    """Poll ``pred`` (virtual time: polling costs nothing real)."""
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.001)


@dataclass(frozen=True)
class Seg:
    flags: int
    seq: int
    ack: int
    window: int
    payload: bytes
    mss: int | None


class Client:
    """A minimal TCP client: handshake, windowed send, in-order receive, ACKs all."""

    def __init__(self, h: Harness, *, version: int = 4, port: int = 40000, sport: int = 443):
        self.h = h
        self.flow = FlowId(version, CLIENT_IP[version], port, SERVER_IP[version], sport)
        self.src = ipaddress.ip_address(CLIENT_IP[version]).packed
        self.dst = ipaddress.ip_address(SERVER_IP[version]).packed
        self.iss = 0xFFFFF000  # wraps during the bigger transfers
        self.snd_nxt = self.snd_una = self.iss
        self.snd_wnd = 0
        self.rcv_nxt = 0
        self.window = 65535  # what we advertise; 0 pauses the server->client direction
        self.received = bytearray()
        self.segments: list[Seg] = []
        self.icmp: list[tuple[int, int]] = []  # (type, code)
        self.synack: Seg | None = None
        self.fin = self.rst = False
        self.lose_data = 0  # data segments from the relay to lose (not seen, not ACKed)
        h.clients[(version, port)] = self

    def inject(self, flags: int, payload: bytes = b"", options: bytes = b"") -> None:
        f = self.flow
        ack = self.rcv_nxt if flags & ACK else 0
        packet = build_tcp_packet(
            self.src, self.dst, f.client_port, f.server_port, self.snd_nxt, ack, flags,
            self.window, options, payload,
        )  # fmt: skip
        self.h.source.inject(packet)
        self.snd_nxt = seq_add(self.snd_nxt, len(payload) + bool(flags & (SYN | FIN)))

    def syn(self) -> None:
        self.inject(SYN, options=encode_options(mss=1460))

    async def connect(self) -> None:
        self.syn()
        await until(lambda: self.synack is not None or self.rst)
        assert self.synack is not None

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            await until(lambda: self.snd_wnd - seq_sub(self.snd_nxt, self.snd_una) > 0 or self.rst)
            assert not self.rst
            room = self.snd_wnd - seq_sub(self.snd_nxt, self.snd_una)
            n = min(room, 1460, len(view))
            self.inject(ACK | PSH, bytes(view[:n]))
            view = view[n:]

    def finish(self) -> None:
        self.inject(FIN | ACK)

    def reset(self) -> None:
        self.inject(RST | ACK)

    def resume(self) -> None:
        self.window = 65535
        self.inject(ACK)  # window update

    def on_segment(self, seg: Seg) -> None:
        if seg.payload and self.lose_data:
            self.lose_data -= 1
            return
        self.segments.append(seg)
        if seg.flags & RST:
            self.rst = True
            return
        if seg.flags & SYN:
            self.synack = seg
            self.rcv_nxt = seq_add(seg.seq, 1)
        if seg.flags & ACK and seq_gt(seg.ack, self.snd_una):
            self.snd_una = seg.ack
        if seg.flags & ACK:
            self.snd_wnd = seg.window
        if seg.payload and seg.seq == self.rcv_nxt and self.window:
            self.received += seg.payload
            self.rcv_nxt = seq_add(self.rcv_nxt, len(seg.payload))
        if seg.flags & FIN and seq_add(seg.seq, len(seg.payload)) == self.rcv_nxt:
            self.fin = True
            self.rcv_nxt = seq_add(self.rcv_nxt, 1)
        # ACK the SYN-ACK, data, FIN and window probes (an old sequence number).
        if seg.flags & (SYN | FIN) or seg.payload or seq_lt(seg.seq, self.rcv_nxt):
            self.inject(ACK)


class FakeConnector:
    """Hands out one end of a socketpair per flow; errors and delays on demand."""

    def __init__(self) -> None:
        self.calls: list[FlowId] = []
        self.servers: dict[FlowId, trio.socket.SocketType] = {}
        self.relay_ends: dict[FlowId, trio.socket.SocketType] = {}
        self.watch: dict[FlowId, trio.socket.SocketType] = {}  # dup of the relay's end
        self.errors: dict[int, OSError] = {}  # by server port
        self.hang: set[int] = set()
        self.gate: trio.Event | None = None

    async def __call__(self, flow: FlowId) -> trio.socket.SocketType:
        self.calls.append(flow)
        if self.gate is not None:
            await self.gate.wait()
        if flow.server_port in self.hang:
            await trio.sleep_forever()
        if (err := self.errors.get(flow.server_port)) is not None:
            raise err
        relay_end, server_end = trio.socket.socketpair()
        self.servers[flow] = server_end
        self.relay_ends[flow] = relay_end
        self.watch[flow] = relay_end.dup()
        return relay_end

    async def server(self, flow: FlowId) -> trio.socket.SocketType:
        await until(lambda: flow in self.servers)
        return self.servers[flow]

    def closed_with_rst(self, flow: FlowId) -> bool:
        """The relay closed its end with SO_LINGER (1, 0): an RST on a TCP socket."""
        if self.relay_ends[flow].fileno() != -1:
            return False
        linger = self.watch[flow].getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
        return struct.unpack("ii", linger) == (1, 0)


class Tap:
    """An analyzer recording what it sees, per client port."""

    def __init__(self) -> None:
        self.starts: dict[int, FlowInfo] = {}
        self.streams: defaultdict[tuple[int, Direction], bytearray] = defaultdict(bytearray)
        self.ends: dict[int, FlowEnd] = {}

    async def flow_start(self, flow: FlowInfo) -> None:
        self.starts[flow.client_port] = flow

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
        self.streams[(flow.client_port, direction)] += data

    async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
        self.ends[flow.client_port] = end

    async def end_of(self, port: int) -> FlowEnd:
        await until(lambda: port in self.ends)
        return self.ends[port]


class EndsTap(Tap):
    """A Tap without a ``data`` hook: no analyzer may change the bytes, so the
    relay may write the client's bytes upstream straight from the packet loop."""

    data = None  # type: ignore[assignment]


class Harness:
    def __init__(self, relay: Relay, source: MemoryPacketSource, stack: Stack) -> None:
        self.relay, self.source, self.stack = relay, source, stack
        self.connector = FakeConnector()
        self.tap = Tap()
        self.log = io.StringIO()
        self.clients: dict[tuple[int, int], Client] = {}

    def log_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]

    async def deliver(self) -> None:
        """Parse (and checksum-verify) what the relay writes; hand it to the clients."""
        while True:
            for packet in await self.source.receive_batch():
                ip = parse_ip(packet)
                if ip.proto == 6:
                    _, _, tcp, payload = parse_tcp_packet(packet)
                    seg = Seg(tcp.flags, tcp.seq, tcp.ack, tcp.window, payload, tcp.options.mss)
                    self.clients[(ip.version, tcp.dst_port)].on_segment(seg)
                else:
                    assert ip.proto in (1, 58)
                    quoted = packet[ip.offset + 8 : ip.end]  # the client's SYN
                    qip = parse_ip(quoted)
                    (port,) = struct.unpack_from("!H", quoted, qip.offset)
                    kind = (packet[ip.offset], packet[ip.offset + 1])
                    self.clients[(ip.version, port)].icmp.append(kind)


@asynccontextmanager
async def harness(
    config: RelayConfig | None = None,
    analyzers: Sequence[object] = (),
    isn: Callable[[FlowId], int] | None = None,
    stack: Stack | None = None,
    data_hooks: bool = True,
) -> AsyncIterator[Harness]:
    source = MemoryPacketSource()
    stack = Stack() if stack is None else stack  # (a Stack with no flows is falsy)
    connector = FakeConnector()
    tap, log = (Tap() if data_hooks else EndsTap()), io.StringIO()
    relay = Relay(
        source,
        stack=stack,
        config=config or RelayConfig(egress=OPEN),
        analyzers=[*analyzers, tap, FlowLog(log)],
        connector=connector,
        isn=isn,
    )
    h = Harness(relay, source, stack)
    h.connector, h.tap, h.log = connector, tap, log
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        nursery.start_soon(h.deliver)
        yield h
        nursery.cancel_scope.cancel()


async def connected(h: Harness) -> tuple[Client, trio.socket.SocketType]:
    """A client on port 40000 with its connection established, and the server's end."""
    c = Client(h)
    await c.connect()
    return c, await h.connector.server(c.flow)


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed + i // 251) & 0xFF for i in range(n))


async def recv_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await sock.recv(n - len(buf))
        assert chunk, f"EOF after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


async def recv_to_eof(sock: trio.socket.SocketType) -> bytes:
    buf = bytearray()
    while chunk := await sock.recv(65536):
        buf += chunk
    return bytes(buf)


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view) :]


# --- connect before accept ---------------------------------------------------


async def test_syn_ack_only_after_the_upstream_connect_succeeded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness(isn=lambda flow: 0x12345678) as h:
        h.connector.gate = trio.Event()
        c = Client(h)
        c.syn()
        await until(lambda: h.connector.calls == [c.flow])
        await trio.sleep(5)  # the connect is still in progress: nothing to the client
        assert c.segments == [] and h.stack.state_of(c.flow) is State.LISTEN
        h.connector.gate.set()
        await until(lambda: c.synack is not None)
        assert c.synack is not None and c.synack.flags == SYN | ACK
        assert c.synack.seq == 0x12345678 and c.synack.ack == seq_add(c.iss, 1)
        assert c.synack.mss is not None
        await until(lambda: h.stack.state_of(c.flow) is State.ESTABLISHED)
        assert h.relay.stats.flows_accepted == 1


async def test_refused_connect_is_an_rst(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        h.connector.errors[443] = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        c = Client(h)
        c.syn()
        assert (await h.tap.end_of(40000)).how == "refused"
        assert c.rst and c.synack is None
        assert c.segments[-1].flags == RST | ACK and c.segments[-1].ack == seq_add(c.iss, 1)
        await until(lambda: h.relay.active_flows == 0)
        assert h.stack.state_of(c.flow) is None
        assert h.log_lines()[0]["ended"] == "refused"


@pytest.mark.parametrize(
    ("version", "err", "icmp"),
    [
        (4, errno.EHOSTUNREACH, (3, 1)),
        (4, errno.ENETUNREACH, (3, 0)),
        (4, errno.EACCES, (3, 13)),
        (6, errno.EHOSTUNREACH, (1, 3)),
        (6, errno.ENETUNREACH, (1, 0)),
        (6, errno.EPERM, (1, 1)),
    ],
)
async def test_unreachable_is_an_icmp_error(
    version: int, err: int, icmp: tuple[int, int], autojump_clock: trio.testing.MockClock
) -> None:
    async with harness() as h:
        h.connector.errors[443] = OSError(err, "unreachable")
        c = Client(h, version=version)
        c.syn()
        assert (await h.tap.end_of(40000)).how == "unreachable"
        await until(lambda: c.icmp)
        assert c.icmp == [icmp] and c.segments == []


@pytest.mark.parametrize(("version", "icmp", "rule"), [
    (4, (3, 13), "default:reserved"),  # 198.19.0.80: benchmarking range
    (6, (1, 1), "default:private"),  # fd00:1::80: unique local
])  # fmt: skip
async def test_denied_flow_gets_admin_prohibited_and_no_socket(
    version: int, icmp: tuple[int, int], rule: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(RelayConfig()) as h:  # the default policy
        c = Client(h, version=version)
        c.syn()
        end = await h.tap.end_of(40000)
        assert (end.how, end.rule) == ("denied", rule)
        await until(lambda: c.icmp)
        assert c.icmp == [icmp] and c.segments == []
        assert h.connector.calls == [] and 40000 not in h.tap.starts  # nothing asked, opened
        await until(lambda: h.relay.active_flows == 0)
        assert h.relay.stats.flows_denied == 1 and h.relay.stats.connect_failed == 0
        assert "flows_denied=1" in repr(h.relay.stats)
        (line,) = h.log_lines()
        assert (line["ended"], line["rule"], line["id.resp_p"]) == ("denied", rule, 443)


async def test_allow_opens_a_denied_range(autojump_clock: trio.testing.MockClock) -> None:
    rules = (parse_rule("198.19.0.0/16:443", allow=True), parse_rule("[fd00:1::/64]", allow=True))
    async with harness(RelayConfig(egress=EgressPolicy(rules))) as h:
        for version in (4, 6):
            c = Client(h, version=version)
            await c.connect()
        await until(lambda: len(h.connector.calls) == 2)
        c = Client(h, port=40001, sport=80)  # not an allowed port
        c.syn()
        assert (await h.tap.end_of(40001)).rule == "default:reserved"
        assert h.relay.stats.flows_denied == 1
        for version in (4, 6):
            h.clients[(version, 40000)].reset()  # the relayed flows end, without a rule
        await until(lambda: len(h.log_lines()) == 3)
        assert {(r["id.orig_p"], r.get("rule")) for r in h.log_lines()} == {
            (40000, None),
            (40001, "default:reserved"),
        }


async def test_connect_timeout_is_silence(autojump_clock: trio.testing.MockClock) -> None:
    async with harness(RelayConfig(egress=OPEN, connect_timeout=3.0)) as h:
        h.connector.hang.add(443)
        c = Client(h)
        c.syn()
        start = trio.current_time()
        end = await h.tap.end_of(40000)
        assert end.how == "connect_timeout" and trio.current_time() - start == pytest.approx(
            3.0, abs=0.01
        )
        await trio.sleep(10)
        assert c.segments == [] and c.icmp == []
        assert h.stack.state_of(c.flow) is None and h.relay.stats.connect_failed == 1


async def test_an_unanswered_syn_ack_resets_the_upstream_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # TcpConfig.synrecv_timeout (5 s): the client (or whoever spoofed it) never
    # ACKs the SYN-ACK; the upstream connection must not outlive that by a minute.
    class Unanswering(Client):
        def on_segment(self, seg: Seg) -> None:
            self.segments.append(seg)  # and never an ACK
            if seg.flags & SYN:
                self.synack = self.synack or seg

    async with harness() as h:
        c = Unanswering(h)
        await c.connect()
        start = trio.current_time()
        end = await h.tap.end_of(40000)
        assert end.how == "timeout"
        assert [s.flags for s in c.segments] == [SYN | ACK] * 3  # at 0, 1 and 3 s, then silence
        assert trio.current_time() - start == pytest.approx(5.0, abs=0.05)
        assert h.connector.closed_with_rst(c.flow)  # SO_LINGER 0: an RST to the target
        assert h.stack.state_of(c.flow) is None


async def test_analyzer_verdict_rejects_before_connecting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Deny:
        async def flow_start(self, flow: FlowInfo) -> Verdict:
            return Verdict.REJECT if flow.server_port == 25 else Verdict.ALLOW

    async with harness(analyzers=[Deny()]) as h:
        c = Client(h, sport=25)
        c.syn()
        assert (await h.tap.end_of(40000)).how == "rejected"
        await until(lambda: c.rst)
        assert h.connector.calls == [] and h.relay.stats.flows_rejected == 1
        ok = Client(h, port=40001)
        await ok.connect()


# --- bytes both ways -----------------------------------------------------------


@pytest.mark.parametrize("version", [4, 6])
async def test_data_both_ways_byte_exact_and_seen_by_analyzers(
    version: int, autojump_clock: trio.testing.MockClock
) -> None:
    up, down = pattern(200_000, 1), pattern(300_000, 2)  # both exceed one window
    async with harness() as h:
        c = Client(h, version=version)
        await c.connect()
        server = await h.connector.server(c.flow)
        async with trio.open_nursery() as n:
            n.start_soon(c.send, up)
            n.start_soon(send_all, server, down)
            assert await recv_exactly(server, len(up)) == up
            await until(lambda: len(c.received) >= len(down))
        assert c.received == down
        assert h.tap.streams[(40000, C2S)] == up and h.tap.streams[(40000, S2C)] == down
        info = h.tap.starts[40000]
        assert (info.client_ip, info.server_ip, info.server_port, info.version) == (
            CLIENT_IP[version], SERVER_IP[version], 443, version,
        )  # fmt: skip
        stats = h.relay.stats
        assert (stats.bytes_c2s, stats.bytes_s2c) == (len(up), len(down))


async def test_without_data_hooks_client_bytes_go_straight_upstream(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # The direct path (TcpFlow.on_data -> _send_now): bytes written from the packet
    # loop, the rest queued behind them when the socket is full, all in order.
    direct: list[tuple[int, int]] = []  # (bytes offered, bytes the socket took)
    send_now = TcpFlow._send_now

    def counted(flow: TcpFlow, data: bytes) -> int:
        sent = send_now(flow, data)
        direct.append((len(data), sent))
        return sent

    monkeypatch.setattr(TcpFlow, "_send_now", counted)
    up = pattern(3_000_000, 7)  # more than the socket pair buffers: some must queue
    async with harness(data_hooks=False) as h:
        c, server = await connected(h)
        async with trio.open_nursery() as n:
            n.start_soon(c.send, up)
            await trio.sleep(5)  # the server reads nothing meanwhile: the socket fills
            assert await recv_exactly(server, len(up)) == up
        # Went direct, and met a full socket (a short write: the rest was queued).
        assert sum(sent for _, sent in direct) > 0
        assert any(sent < offered for offered, sent in direct)
        assert h.relay.stats.bytes_c2s == len(up)
        assert (40000, C2S) not in h.tap.streams  # nothing watched the bytes


async def test_data_hooks_keep_client_bytes_off_the_direct_path(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    calls: list[bytes] = []
    monkeypatch.setattr(TcpFlow, "_send_now", lambda flow, data: calls.append(data) or 0)
    async with harness() as h:
        c, server = await connected(h)
        await c.send(b"watched")
        assert await recv_exactly(server, 7) == b"watched"
    assert calls == [] and h.tap.streams[(40000, C2S)] == b"watched"


async def test_a_lost_response_is_retransmitted_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The flow task writes the server's bytes itself (Relay.flush) while the packet
    # loop sleeps; the retransmission timer that send armed must still wake the loop.
    async with harness() as h:
        c, server = await connected(h)
        await until(lambda: h.relay.stats.flows_accepted == 1)
        await trio.sleep(5.0)  # the loop goes to sleep with no timer due soon
        c.lose_data = 1
        t0 = trio.current_time()
        await send_all(server, b"response")
        await until(lambda: c.received == b"response", timeout=5.0)
        rto = h.stack.config.tcp.rto_initial
        assert trio.current_time() - t0 <= rto + 0.01  # the first RTO, not a later timer


async def test_slow_server_closes_the_client_window(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        c, server = await connected(h)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        data = pattern(2_000_000, 3)
        async with trio.open_nursery() as n:
            n.start_soon(c.send, data)
            await trio.sleep(30)  # the server reads nothing meanwhile
            in_flight = seq_sub(c.snd_nxt, c.iss)
            # Bounded by the stack's window (64 KiB) plus the kernel socket buffers.
            assert in_flight < 600_000 and c.snd_wnd == 0
            assert await recv_exactly(server, len(data)) == data


async def test_slow_client_stops_upstream_reads(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        c, server = await connected(h)
        c.window = 0
        c.inject(ACK)
        data = pattern(3_000_000, 4)
        async with trio.open_nursery() as n:
            n.start_soon(send_all, server, data)
            await trio.sleep(30)
            snd_buf = h.stack.config.tcp.snd_buf
            # What the relay read is what the client got plus the stack's send buffer.
            assert h.relay.stats.bytes_s2c <= len(c.received) + snd_buf
            c.resume()
            await until(lambda: len(c.received) >= len(data), timeout=600)
        assert c.received == data


async def test_exactly_full_send_buffer_still_resumes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Reads sized to the free space fill the send buffer exactly; the stack's
    # send_space() of 0 must still arm a SendSpace event, or the flow would hang.
    stack = Stack(StackConfig(tcp=TcpConfig(snd_buf=1000)))
    async with harness(stack=stack) as h:
        c, server = await connected(h)
        data = pattern(6000, 6)
        await send_all(server, data[:1000])
        await until(lambda: len(c.received) == 1000)
        await send_all(server, data[1000:])
        await until(lambda: len(c.received) == 6000)
        assert c.received == data


async def test_many_flows_each_get_a_log_line(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        clients = [Client(h, version=4 + 2 * (i % 2), port=41000 + i) for i in range(20)]
        for c in clients:
            c.syn()
        for c in clients:
            await until(lambda c=c: c.synack is not None)  # type: ignore[misc]
        for c in clients:
            server = await h.connector.server(c.flow)
            await c.send(b"ping %d" % c.flow.client_port)
            c.finish()
            assert await recv_to_eof(server) == b"ping %d" % c.flow.client_port
            await send_all(server, b"pong")
            server.close()
        await until(lambda: len(h.tap.ends) == 20)
        assert all(c.received == b"pong" and c.fin for c in clients)
        lines = h.log_lines()
        assert len(lines) == 20 and {line["ended"] for line in lines} == {"fin"}
        assert {line["id.orig_p"] for line in lines} == {c.flow.client_port for c in clients}
        assert {line["id.resp_h"] for line in lines} == set(SERVER_IP.values())
        assert all(line["orig_bytes"] == 10 and line["resp_bytes"] == 4 for line in lines)
        assert len({line["uid"] for line in lines}) == 20
        await until(lambda: h.relay.active_flows == 0)
        assert h.relay.stats.flows_active == 0


# --- close and reset ------------------------------------------------------------


async def test_half_close_client_first(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        c, server = await connected(h)
        await c.send(b"request")
        c.finish()
        assert await recv_to_eof(server) == b"request"  # data, then EOF: shutdown(SHUT_WR)
        await send_all(server, b"response after the client's FIN")
        assert not c.fin
        server.shutdown(socket.SHUT_WR)
        await until(lambda: c.fin)
        assert c.received == b"response after the client's FIN"
        end = await h.tap.end_of(40000)
        assert (end.how, end.bytes_c2s, end.bytes_s2c) == ("fin", 7, 31)
        assert not h.connector.closed_with_rst(c.flow)  # closed normally
        assert h.log_lines()[0]["ended"] == "fin"


def test_a_connect_is_established_once_the_socket_has_a_peer() -> None:
    # make_connector's shortcut: getpeername fails (ENOTCONN) until connect() is done.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unconnected:
        assert not _established(unconnected)
    a, b = socket.socketpair()
    with a, b:
        assert _established(a)


async def test_a_server_that_speaks_before_the_clients_ack_waits_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The flow waits for its upstream before it waits for the handshake's end:
    # bytes the server sends while the client has not ACKed the SYN-ACK stay
    # with the relay (nothing goes to a client in SYN-RECEIVED) until it does.
    class Slow(Client):
        def on_segment(self, seg: Seg) -> None:
            if seg.flags & SYN:  # keep the SYN-ACK; ACK it later, by hand
                self.segments.append(seg)
                self.synack = seg
                self.rcv_nxt = seq_add(seg.seq, 1)
                self.snd_una, self.snd_wnd = seg.ack, seg.window
                return
            super().on_segment(seg)

    async with harness() as h:
        c = Slow(h)
        await c.connect()
        server = await h.connector.server(c.flow)
        await send_all(server, b"220 banner\r\n")
        await trio.sleep(0.5)
        assert [s for s in c.segments if s.payload] == []
        assert h.stack.state_of(c.flow) is State.SYN_RECEIVED
        c.inject(ACK)  # the handshake's end
        await until(lambda: c.received == b"220 banner\r\n")
        await c.send(b"EHLO")
        assert await recv_exactly(server, 4) == b"EHLO"


async def test_half_close_server_first(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        c, server = await connected(h)
        await send_all(server, b"banner")
        server.shutdown(socket.SHUT_WR)
        await until(lambda: c.fin)
        assert c.received == b"banner"
        await c.send(b"the client still talks")
        assert await recv_exactly(server, 22) == b"the client still talks"
        c.finish()
        assert await server.recv(100) == b""
        end = await h.tap.end_of(40000)  # after the stack's TIME-WAIT
        assert end.how == "fin" and end.duration < h.stack.config.tcp.time_wait
        assert not h.connector.closed_with_rst(c.flow)


async def test_orderly_close_still_delivers_queued_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        c, server = await connected(h)
        h.connector.relay_ends[c.flow].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = pattern(60_000, 7)
        await c.send(data)
        c.finish()
        server.shutdown(socket.SHUT_WR)  # done talking; reads later
        await until(lambda: c.fin and h.stack.state_of(c.flow) is None)  # Closed(FINISHED)
        await trio.sleep(1)
        assert 40000 not in h.tap.ends  # still writing the queued bytes upstream
        assert await recv_to_eof(server) == data
        assert (await h.tap.end_of(40000)).how == "fin"
        assert not h.connector.closed_with_rst(c.flow)


async def test_orderly_close_drain_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    async with harness(RelayConfig(egress=OPEN, close_drain_timeout=5.0)) as h:
        c, server = await connected(h)
        h.connector.relay_ends[c.flow].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        await c.send(pattern(60_000, 8))
        c.finish()
        server.shutdown(socket.SHUT_WR)  # and never reads
        await until(lambda: h.stack.state_of(c.flow) is None)
        closed_at = trio.current_time()
        assert (await h.tap.end_of(40000)).how == "error"
        assert trio.current_time() - closed_at == pytest.approx(5.0, abs=0.01)
        assert h.connector.closed_with_rst(c.flow)


async def test_a_bug_in_the_c2s_writer_ends_only_its_flow(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The c2s writer is a task of its own (in the engine's nursery, not a nursery
    # per flow): an exception there must still be contained to the flow, RST
    # the client, close upstream with an RST and leave the relay running.
    def broken(self: TcpFlow, n: int) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(TcpFlow, "_release_c2s", broken)
    async with harness() as h:  # the Tap's data hook: the bytes go through the writer
        c, _server = await connected(h)
        await c.send(b"hello")
        await until(lambda: c.rst)
        assert (await h.tap.end_of(40000)).how == "error"
        assert h.relay.stats.flow_errors == 1
        assert h.connector.closed_with_rst(c.flow)
        await until(lambda: h.relay.active_flows == 0)
        monkeypatch.undo()
        c2 = Client(h, port=40001)
        await c2.connect()
        server = await h.connector.server(c2.flow)
        await c2.send(b"still relaying")
        assert await recv_exactly(server, 14) == b"still relaying"


async def test_client_rst_resets_upstream(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        c = Client(h)
        await c.connect()
        await h.connector.server(c.flow)
        await c.send(b"some bytes")
        await until(lambda: h.tap.streams[(40000, C2S)] == b"some bytes")
        c.reset()
        assert (await h.tap.end_of(40000)).how == "rst"
        assert h.connector.closed_with_rst(c.flow)


async def test_upstream_reset_is_an_rst_to_the_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        c, server = await connected(h)
        await c.send(b"never read")
        await until(lambda: h.tap.streams[(40000, C2S)] == b"never read")
        await trio.sleep(1)
        server.close()  # unread data: the relay's end gets ECONNRESET
        await until(lambda: c.rst)
        assert c.segments[-1].flags & RST and c.segments[-1].seq == c.rcv_nxt
        assert (await h.tap.end_of(40000)).how == "rst"
        assert h.relay.stats.upstream_errors == 1
        await until(lambda: h.stack.state_of(c.flow) is None)


# --- analyzers inside the relay ----------------------------------------------------


async def test_slow_analyzer_delays_only_its_own_flow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = trio.Event()

    class Slow:
        async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
            if flow.client_port == 40000:
                await release.wait()

    async with harness(analyzers=[Slow()]) as h:
        slow, fast = Client(h, port=40000), Client(h, port=40001)
        await slow.connect()
        await fast.connect()
        slow_server = await h.connector.server(slow.flow)
        fast_server = await h.connector.server(fast.flow)
        await slow.send(b"held by the analyzer")
        data = pattern(150_000, 5)
        async with trio.open_nursery() as n:
            n.start_soon(fast.send, data)
            assert await recv_exactly(fast_server, len(data)) == data
        with trio.move_on_after(5):
            await slow_server.recv(100)
            pytest.fail("the slow flow's bytes went upstream before its analyzer returned")
        release.set()
        assert await recv_exactly(slow_server, 20) == b"held by the analyzer"


async def test_raising_analyzer_is_detached_and_the_flow_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Flaky:
        def __init__(self) -> None:
            self.calls = 0

        async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
            self.calls += 1
            raise RuntimeError("analyzer bug")

    flaky = Flaky()
    async with harness(analyzers=[flaky]) as h:
        c, server = await connected(h)
        await c.send(b"first")
        assert await recv_exactly(server, 5) == b"first"
        await c.send(b"second")
        assert await recv_exactly(server, 6) == b"second"
        await send_all(server, b"reply")
        await until(lambda: c.received == b"reply")
        assert flaky.calls == 1 and h.relay.stats.analyzer_errors == 1
        assert h.tap.streams[(40000, C2S)] == b"firstsecond"


async def test_fail_closed_aborts_the_flow(autojump_clock: trio.testing.MockClock) -> None:
    class Broken:
        async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
            raise RuntimeError("analyzer bug")

    async with harness(RelayConfig(egress=OPEN, fail_closed=True), analyzers=[Broken()]) as h:
        c = Client(h)
        await c.connect()
        await h.connector.server(c.flow)
        await c.send(b"x")
        await until(lambda: c.rst)
        assert (await h.tap.end_of(40000)).how == "aborted"
        assert h.connector.closed_with_rst(c.flow)


# --- the loop itself ------------------------------------------------------------


async def test_malformed_packets_are_counted_and_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class FragileStack(Stack):
        def receive(
            self, packet: bytes, now: float, *, csum_ok: bool = False, batch: bool = False
        ) -> None:
            if packet == b"crash":
                raise RuntimeError("a stack bug")
            super().receive(packet, now, csum_ok=csum_ok, batch=batch)

    async with harness(stack=FragileStack()) as h:
        good = Client(h)
        for junk in (b"", b"\x45", b"\x60" + bytes(50), bytes(range(256)), b"crash"):
            h.source.inject(junk)
        bad_sum = bytearray(
            build_tcp_packet(good.src, good.dst, 1, 2, 3, 0, SYN, 100)
        )  # fmt: skip
        bad_sum[-3] ^= 0xFF
        h.source.inject(bytes(bad_sum))
        await good.connect()
        assert h.relay.stats.receive_errors == 1
        assert h.stack.stats.parse_errors + h.stack.stats.checksum_errors >= 4


async def test_idle_relay_sleeps(autojump_clock: trio.testing.MockClock) -> None:
    async with harness() as h:
        c = Client(h)
        await c.connect()
        await trio.sleep(1)
        before = h.relay.stats.iterations
        await trio.sleep(1000)
        assert h.relay.stats.iterations - before <= 2


async def test_shutdown_resets_upstream_and_reports_flows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        c = Client(h)
        await c.connect()
        await h.connector.server(c.flow)
    # Leaving the harness cancelled the relay with the flow still open.
    assert h.tap.ends[40000].how == "shutdown"
    assert h.connector.closed_with_rst(c.flow)
    assert h.relay.stats.flows_active == 0


async def test_source_close_stops_the_relay(autojump_clock: trio.testing.MockClock) -> None:
    source = MemoryPacketSource()
    relay = Relay(source, stack=Stack(), config=RelayConfig(egress=OPEN), connector=FakeConnector())
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            await n.start(relay.run)
            source.close()


# --- helpers ---------------------------------------------------------------------


def test_raise_nofile_limit() -> None:
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    now = raise_nofile_limit()
    assert now >= before and resource.getrlimit(resource.RLIMIT_NOFILE)[0] == now
    if hard != resource.RLIM_INFINITY:
        assert now == hard


def test_isn_is_keyed_per_tuple_and_follows_a_4us_clock() -> None:
    t = [0]
    key = bytes(range(32))
    gen = IsnGenerator(key, clock_ns=lambda: t[0])
    a = FlowId(4, "198.18.0.2", 40000, "198.19.0.80", 443)
    b = FlowId(4, "198.18.0.2", 40001, "198.19.0.80", 443)
    assert gen(a) == IsnGenerator(key, clock_ns=lambda: 0)(a)
    assert gen(a) != gen(b) and gen(a) != IsnGenerator(clock_ns=lambda: 0)(a)
    first = gen(a)
    t[0] = 4000 * 1000  # 4 ms: 1000 ticks
    assert gen(a) == (first + 1000) & 0xFFFFFFFF
    with pytest.raises(ValueError):
        IsnGenerator(b"short")


# --- fair share of a loop pass -------------------------------------------------


class _CountingStack(Stack):
    """A Stack that counts its ``receive`` calls (a subclass, not an instance's
    method patched: the Stack compiled with mypyc has no instance ``__dict__``)."""

    def __init__(self, received: list[int]) -> None:
        super().__init__()
        self.received = received

    def receive(
        self, packet: bytes, now: float, *, csum_ok: bool = False, batch: bool = False
    ) -> None:
        self.received[0] += 1
        super().receive(packet, now, csum_ok=csum_ok, batch=batch)


@pytest.mark.parametrize("carry_limit", [fairshare.CARRY_BYTES, 1], ids=["reads-on", "waits"])
async def test_a_request_is_not_received_behind_a_whole_bulk_batch(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock, carry_limit: int
) -> None:
    # One pass of the packet loop gives each flow at most flow_pass_bytes
    # (relay.datapath.fairshare): a request read in the same batch as a burst of
    # another flow reaches its upstream after a few of the burst's packets, not
    # after all of them; the rest of the burst follows in order, byte-exact,
    # whether the loop reads on while packets are carried or waits for them.
    monkeypatch.setattr(fairshare, "CARRY_BYTES", carry_limit)
    received = [0]
    order: list[tuple[int, int, int]] = []  # (client port, bytes, receives so far)
    stack = _CountingStack(received)
    on_data = TcpFlow.on_data

    def seen(flow: TcpFlow, data: bytes) -> None:
        order.append((flow.flow.client_port, len(data), received[0]))
        on_data(flow, data)

    monkeypatch.setattr(TcpFlow, "on_data", seen)
    config = RelayConfig(egress=OPEN, flow_pass_bytes=4000)
    burst = pattern(20 * 1000, 3)
    async with harness(config, stack=stack, data_hooks=False) as h:
        bulk, bulk_server = await connected(h)
        chat = Client(h, port=40001)
        await chat.connect()
        chat_server = await h.connector.server(chat.flow)
        start = received[0]
        for i in range(20):  # one batch: the loop has not run between these
            bulk.inject(ACK | PSH, burst[i * 1000 : (i + 1) * 1000])
        chat.inject(ACK | PSH, b"request")
        assert await recv_exactly(chat_server, 7) == b"request"
        assert await recv_exactly(bulk_server, len(burst)) == burst
    (chat_at,) = [n - start for port, _, n in order if port == 40001]
    # Four of the burst's 1,040-byte packets fill its share, then the request: 5 receives.
    assert chat_at <= 6, order
    assert [size for port, size, _ in order if port == 40000 and size] != [len(burst)]


async def test_without_a_flow_bound_the_request_waits_for_the_whole_batch(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # The same burst with flow_pass_bytes=0: what the bound above changes.
    received = [0]
    order: list[tuple[int, int]] = []
    stack = _CountingStack(received)
    on_data = TcpFlow.on_data

    def seen(flow: TcpFlow, data: bytes) -> None:
        order.append((flow.flow.client_port, received[0]))
        on_data(flow, data)

    monkeypatch.setattr(TcpFlow, "on_data", seen)
    async with harness(RelayConfig(egress=OPEN, flow_pass_bytes=0), stack=stack) as h:
        bulk, _ = await connected(h)
        chat = Client(h, port=40001)
        await chat.connect()
        chat_server = await h.connector.server(chat.flow)
        start = received[0]
        for _ in range(20):
            bulk.inject(ACK | PSH, bytes(1000))
        chat.inject(ACK | PSH, b"request")
        assert await recv_exactly(chat_server, 7) == b"request"
    (chat_at,) = [n - start for port, n in order if port == 40001]
    assert chat_at >= 21  # after every packet of the burst
