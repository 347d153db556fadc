"""UDP and echo relaying end to end: raw packets in through a ``MemoryPacketSource``,
the real ``Stack``, and real UDP sockets upstream, to servers on the ``lo`` of a
private network namespace (the ``private_netns`` fixture; root), never on the
host's own network. Echo upstream is faked with a datagram socketpair, since ICMP
sockets need ``ping_group_range``. Real time, with short idle timeouts.
"""

from __future__ import annotations

import errno
import io
import ipaddress
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio

from relay.analysis.flowlog import FlowLog
from relay.analysis.hooks import Direction, FlowEnd, FlowInfo, Verdict
from relay.datapath.config import RelayConfig
from relay.datapath.echo import PingSocketsUnavailable
from relay.datapath.egress import EgressPolicy
from relay.datapath.engine import Relay
from relay.datapath.icmp_errors import read_socket_errors
from relay.datapath.packet_source import MemoryPacketSource
from relay.datapath.udpflow import open_udp_socket
from stack import DatagramConfig, FlowId, Stack, StackConfig
from stack.wire import build_echo, build_udp_packet, parse_icmp, parse_ip, parse_udp

from packets import pseudo_header_sum

CLIENT = {4: "198.18.1.2", 6: "fd00:1::2"}
OPEN = EgressPolicy.open()  # the test servers use 198.18/fd00 addresses, denied by default
FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
C2S, S2C = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT
IDLE = 0.3
HAS_IPV6 = os.path.exists("/proc/sys/net/ipv6")  # the kernel has IPv6 (not disabled at boot)


V4_V6 = pytest.mark.parametrize(
    "version",
    [4, pytest.param(6, marks=pytest.mark.skipif(not HAS_IPV6, reason="the kernel has no IPv6"))],
)


async def until(pred: Callable[[], object], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.005)


@dataclass
class Tap:
    """Records what the analyzers see; may reject flows to given ports."""

    reject_ports: set[int] = field(default_factory=set)
    starts: list[FlowInfo] = field(default_factory=list)
    seen: list[tuple[int, Direction, bytes]] = field(default_factory=list)
    ends: dict[int, tuple[FlowInfo, FlowEnd]] = field(default_factory=dict)

    async def flow_start(self, flow: FlowInfo) -> Verdict | None:
        self.starts.append(flow)
        return Verdict.REJECT if flow.server_port in self.reject_ports else None

    async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
        self.ends[flow.client_port] = (flow, end)


class DataTap(Tap):
    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
        self.seen.append((flow.client_port, direction, data))


@dataclass
class Client:
    """The VPN side: builds client packets, parses what the relay writes."""

    source: MemoryPacketSource
    version: int = 4
    udp: list[tuple[str, int, int, bytes]] = field(default_factory=list)  # src, sport, dport
    icmp: list[tuple[int, int, int, bytes]] = field(default_factory=list)  # type, code, rest
    others: list[bytes] = field(default_factory=list)

    def send(self, server: str, sport: int, dport: int, payload: bytes) -> None:
        c = ipaddress.ip_address(CLIENT[self.version]).packed
        s = ipaddress.ip_address(server).packed
        self.source.inject(build_udp_packet(c, s, sport, dport, payload))

    def ping(self, server: str, ident: int, seq: int, payload: bytes) -> None:
        c = ipaddress.ip_address(CLIENT[self.version]).packed
        s = ipaddress.ip_address(server).packed
        self.source.inject(build_echo(c, s, ident=ident, seq=seq, payload=payload, reply=False))

    async def run(self) -> None:
        while True:
            for packet in await self.source.receive_batch():
                ip = parse_ip(packet)
                ps = pseudo_header_sum(ip)
                src = str(ipaddress.ip_address(ip.src))
                if ip.proto == 17 and ip.fragment is None:
                    h = parse_udp(packet, ip.offset, ip.end, ps, ipv6=ip.version == 6)
                    body = packet[ip.offset + 8 : ip.offset + h.length]
                    self.udp.append((src, h.src_port, h.dst_port, body))
                elif ip.proto in (1, 58):
                    h2 = parse_icmp(packet, ip.offset, ip.end, None if ip.version == 4 else ps)
                    self.icmp.append((h2.type, h2.code, h2.rest, packet[ip.offset + 8 : ip.end]))
                else:
                    self.others.append(packet)


@asynccontextmanager
async def running(
    analyzers: Sequence[object] = (),
    *,
    version: int = 4,
    datagram: DatagramConfig | None = None,
    egress: EgressPolicy = OPEN,
    **relay_kw: object,
) -> AsyncIterator[tuple[Client, Relay, Stack, io.StringIO]]:
    source = MemoryPacketSource()
    cfg = datagram or DatagramConfig(
        udp_idle_timeout=IDLE, dns_idle_timeout=IDLE, echo_idle_timeout=IDLE
    )
    stack = Stack(StackConfig(datagram=cfg))
    log = io.StringIO()
    relay = Relay(
        source, stack=stack, config=RelayConfig(egress=egress),
        analyzers=[*analyzers, FlowLog(log)], **relay_kw,  # type: ignore[arg-type]
    )  # fmt: skip
    client = Client(source, version)
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        nursery.start_soon(client.run)
        yield client, relay, stack, log
        nursery.cancel_scope.cancel()


def udp_server(version: int) -> trio.socket.SocketType:
    sock = trio.socket.socket(FAMILY[version], socket.SOCK_DGRAM)
    return sock


async def echo_server(sock: trio.socket.SocketType, seen: list[bytes]) -> None:
    while True:
        data, addr = await sock.recvfrom(65536)
        seen.append(data)
        await sock.sendto(data.upper(), addr)


# --- UDP ------------------------------------------------------------------------------


@V4_V6
async def test_udp_round_trip_with_analyzers_and_flow_log(
    version: int, private_netns: dict[int, str]
) -> None:
    server_ip = private_netns[version]
    tap = DataTap()
    server = udp_server(version)
    await server.bind((server_ip, 0))
    port = server.getsockname()[1]
    seen: list[bytes] = []
    async with running([tap], version=version) as (client, relay, stack, log):
        async with trio.open_nursery() as n:
            n.start_soon(echo_server, server, seen)
            for i in range(5):
                client.send(server_ip, 40000, port, b"query %d" % i)
            await until(lambda: len(client.udp) == 5)
            n.cancel_scope.cancel()
        assert seen == [b"query %d" % i for i in range(5)]
        assert client.udp == [(server_ip, port, 40000, b"QUERY %d" % i) for i in range(5)]
        assert relay.active_datagram_flows == 1
        await until(lambda: 40000 in tap.ends)  # idles out
        assert relay.active_datagram_flows == 0 and stack.datagram_flows == 0
    info, end = tap.ends[40000]
    assert (info.proto, info.server_port, info.version) == ("udp", port, version)
    assert (str(end.how), end.bytes_c2s, end.bytes_s2c) == ("idle", 35, 35)
    assert [d for p, d, _ in tap.seen if d is C2S] == [C2S] * 5
    assert [x for p, d, x in tap.seen if d is S2C] == [b"QUERY %d" % i for i in range(5)]
    (rec,) = [json.loads(line) for line in log.getvalue().splitlines()]
    assert (rec["proto"], rec["id.orig_p"], rec["ended"], rec["orig_bytes"]) == (
        "udp",
        40000,
        "idle",
        35,
    )


async def test_udp_without_data_hooks_sends_straight_from_the_packet_loop(
    private_netns: dict[int, str],
) -> None:
    server_ip = private_netns[4]
    server = udp_server(4)
    await server.bind((server_ip, 0))
    port = server.getsockname()[1]
    seen: list[bytes] = []
    async with running() as (client, relay, _, _), trio.open_nursery() as n:
        n.start_soon(echo_server, server, seen)
        payloads = [bytes([i % 256]) * (1 + i * 7 % 1400) for i in range(500)]
        for i, p in enumerate(payloads):
            client.send(server_ip, 40001, port, p)
            if i % 32 == 31:
                await until(lambda i=i: len(client.udp) > i - 16)  # a window of 32
        await until(lambda: len(client.udp) == 500)
        n.cancel_scope.cancel()
    assert seen == payloads
    assert [u[3] for u in client.udp] == [p.upper() for p in payloads]
    assert relay.stats.datagrams_c2s == relay.stats.datagrams_s2c == 500
    assert relay.stats.datagram_drops == 0


@V4_V6
async def test_closed_port_is_reported_as_icmp_port_unreachable(
    version: int, private_netns: dict[int, str]
) -> None:
    server_ip = private_netns[version]
    holder = socket.socket(FAMILY[version], socket.SOCK_DGRAM)
    holder.bind((server_ip, 0))
    port = holder.getsockname()[1]
    holder.close()  # now closed: the kernel answers with ICMP port unreachable
    tap = Tap()
    async with running([tap], version=version) as (client, relay, _, _):
        client.send(server_ip, 40002, port, b"anyone?")
        await until(lambda: client.icmp)
        client.send(server_ip, 40002, port, b"again?")
        await until(lambda: len(client.icmp) == 2)
    for kind, code, _, quote in client.icmp:
        assert (kind, code) == ((3, 3) if version == 4 else (1, 4))
        q = parse_ip(quote[: 20 if version == 4 else 40] + quote[20 if version == 4 else 40 :])
        assert str(ipaddress.ip_address(q.src)) == CLIENT[version]
        assert struct.unpack_from("!HH", quote, q.offset) == (40002, port)
    assert relay.stats.icmp_relayed == 2


async def test_reject_verdict_answers_port_unreachable_and_opens_no_socket(
    private_netns: dict[int, str],
) -> None:
    server_ip = private_netns[4]
    opened: list[FlowId] = []

    def factory(flow: FlowId) -> socket.socket:
        opened.append(flow)
        return open_udp_socket(flow)

    tap = Tap(reject_ports={53})
    async with running([tap], udp_socket=factory) as (client, relay, _, _):
        client.send(server_ip, 40003, 53, b"query")
        await until(lambda: client.icmp)
        client.send(server_ip, 40003, 53, b"query again")
        await until(lambda: len(client.icmp) == 2)
        assert len(tap.starts) == 1  # asked once per flow, not per datagram
        assert [(t, c) for t, c, _, _ in client.icmp] == [(3, 3), (3, 3)]
        await until(lambda: 40003 in tap.ends, timeout=15)  # DNS idle timeout
    assert opened == []
    assert str(tap.ends[40003][1].how) == "rejected"
    assert relay.stats.flows_rejected == 1


async def test_no_route_answers_net_unreachable() -> None:
    def factory(flow: FlowId) -> socket.socket:
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    tap = Tap()
    async with running([tap], udp_socket=factory) as (client, _, _, _):
        client.send("198.18.99.1", 40004, 9, b"x")
        await until(lambda: client.icmp)
        assert client.icmp[0][:2] == (3, 0)  # net unreachable
        await until(lambda: 40004 in tap.ends)
    assert str(tap.ends[40004][1].how) == "unreachable"


async def test_datagrams_wait_for_a_slow_verdict(private_netns: dict[int, str]) -> None:
    server_ip = private_netns[4]
    gate = trio.Event()

    class SlowStart:
        async def flow_start(self, flow: FlowInfo) -> None:
            await gate.wait()

    server = udp_server(4)
    await server.bind((server_ip, 0))
    port = server.getsockname()[1]
    seen: list[bytes] = []
    async with running([SlowStart()]) as (client, _, _, _), trio.open_nursery() as n:
        n.start_soon(echo_server, server, seen)
        for i in range(10):
            client.send(server_ip, 40005, port, b"%d" % i)
        await trio.sleep(0.05)
        assert seen == []
        gate.set()
        await until(lambda: len(client.udp) == 10)
        n.cancel_scope.cancel()
    assert seen == [b"%d" % i for i in range(10)]


async def test_idle_flows_close_their_sockets(private_netns: dict[int, str]) -> None:
    server_ip = private_netns[4]
    sockets: list[socket.socket] = []

    def factory(flow: FlowId) -> socket.socket:
        sock = open_udp_socket(flow)
        sockets.append(sock)
        return sock

    server = udp_server(4)
    await server.bind((server_ip, 0))
    port = server.getsockname()[1]
    tap = Tap()
    async with running([tap], udp_socket=factory) as (client, relay, stack, _):
        for i in range(200):
            client.send(server_ip, 20000 + i, port, b"hi")
        # Each flow opened its socket; no count of flows open at once is asserted,
        # since the first may idle out (0.3 s) before the last opens on a busy machine.
        await until(lambda: len(sockets) == 200)
        await until(lambda: len(tap.ends) == 200)
        assert relay.active_datagram_flows == 0 and stack.datagram_flows == 0
        assert relay.stats.datagram_flows_active == 0
    assert all(s.fileno() == -1 for s in sockets)
    assert {str(end.how) for _, end in tap.ends.values()} == {"idle"}


async def test_shutdown_ends_flows_with_shutdown(private_netns: dict[int, str]) -> None:
    server_ip = private_netns[4]
    server = udp_server(4)
    await server.bind((server_ip, 0))
    port = server.getsockname()[1]
    tap = Tap()
    cfg = DatagramConfig(udp_idle_timeout=60.0)
    async with running([tap], datagram=cfg) as (client, relay, _, _):
        client.send(server_ip, 40006, port, b"hi")
        await until(lambda: relay.stats.datagram_flows_active == 1)
    assert str(tap.ends[40006][1].how) == "shutdown"


def test_read_socket_errors_reports_port_unreachable(private_netns: dict[int, str]) -> None:
    server_ip = private_netns[4]
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind((server_ip, 0))
    port = holder.getsockname()[1]
    holder.close()
    sock = open_udp_socket(FlowId(4, "198.18.1.2", 1, server_ip, port, "udp"))
    with sock:
        sock.send(b"payload")
        with pytest.raises(ConnectionRefusedError):
            sock.recv(100)
        assert read_socket_errors(sock) == [(3, b"payload")]
        assert read_socket_errors(sock) == []


# --- echo -----------------------------------------------------------------------------


class FakePing:
    """A stand-in for the kernel's ICMP sockets: a datagram socketpair per flow."""

    def __init__(self) -> None:
        self.kernel: dict[FlowId, socket.socket] = {}
        self.error: OSError | None = None

    def __call__(self, flow: FlowId) -> socket.socket:
        if self.error is not None:
            raise self.error
        relay_end, kernel_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        relay_end.setblocking(False)
        kernel_end.settimeout(5.0)
        self.kernel[flow] = kernel_end
        return relay_end


@V4_V6
async def test_echo_is_relayed_and_the_client_keeps_its_identifier(version: int) -> None:
    ping = FakePing()
    tap = Tap()
    server = "198.18.2.2" if version == 4 else "fd00:2::2"
    async with running([tap], version=version, echo_socket=ping) as (client, relay, _, log):
        client.ping(server, ident=0x4242, seq=1, payload=b"hello")
        await until(lambda: ping.kernel)
        ((flow, kernel),) = ping.kernel.items()
        assert (flow.proto, flow.client_port, flow.server_ip) == ("icmp", 0x4242, server)
        request = await trio.to_thread.run_sync(kernel.recv, 100)
        req_type = 8 if version == 4 else 128
        assert request == struct.pack("!BBHHH", req_type, 0, 0, 0, 1) + b"hello"
        # The kernel's socket has its own identifier (0x0777); the client never sees it.
        reply_type = 0 if version == 4 else 129
        kernel.send(struct.pack("!BBHHH", reply_type, 0, 0, 0x0777, 1) + b"hello")
        await until(lambda: client.icmp)
        kind, code, rest, body = client.icmp[0]
        assert (kind, code, rest >> 16, rest & 0xFFFF, body) == (reply_type, 0, 0x4242, 1, b"hello")
        await until(lambda: 0x4242 in tap.ends)
    info, end = tap.ends[0x4242]
    assert (info.proto, str(end.how), end.bytes_c2s, end.bytes_s2c) == ("icmp", "idle", 5, 5)
    assert json.loads(log.getvalue())["proto"] == "icmp"
    assert relay.stats.datagrams_c2s == relay.stats.datagrams_s2c == 1


async def test_echo_never_answered_by_the_relay_itself() -> None:
    ping = FakePing()
    async with running(echo_socket=ping) as (client, _, _, _):
        for seq in range(3):
            client.ping("198.18.2.2", ident=7, seq=seq, payload=b"x")
        await until(lambda: ping.kernel)
        await trio.sleep(0.1)
        assert client.icmp == []  # no reply unless the destination replied


async def test_echo_without_a_route_gets_net_unreachable_per_request() -> None:
    ping = FakePing()
    ping.error = OSError(errno.ENETUNREACH, "Network is unreachable")
    async with running(echo_socket=ping) as (client, _, _, _):
        for seq in range(3):
            client.ping("198.18.99.1", ident=9, seq=seq, payload=b"x")
            await until(lambda seq=seq: len(client.icmp) == seq + 1)
    assert [(t, c) for t, c, _, _ in client.icmp] == [(3, 0)] * 3
    for seq, (_, _, _, quote) in enumerate(client.icmp):
        q = parse_ip(quote)
        assert struct.unpack_from("!BBHHH", quote, q.offset)[3:] == (9, seq)


async def test_echo_without_icmp_sockets_is_dropped_quietly() -> None:
    ping = FakePing()
    ping.error = PingSocketsUnavailable(errno.EACCES, "ICMP sockets not allowed")
    tap = Tap()
    async with running([tap], echo_socket=ping) as (client, _, _, _):
        client.ping("198.18.2.2", ident=3, seq=1, payload=b"x")
        await until(lambda: 3 in tap.ends)
    assert client.icmp == []
    assert str(tap.ends[3][1].how) == "error"


# --- the egress policy ------------------------------------------------------------------


class Forbidden:
    """A socket factory that must not be called: the policy denies first."""

    def __init__(self) -> None:
        self.calls: list[FlowId] = []

    def __call__(self, flow: FlowId) -> socket.socket:
        self.calls.append(flow)
        raise AssertionError(f"a socket for a denied flow: {flow}")


@V4_V6
async def test_denied_udp_and_echo_get_admin_prohibited_and_no_socket(version: int) -> None:
    udp, ping, tap = Forbidden(), Forbidden(), Tap()
    # Only the in-memory stack sees this address: the policy denies it before any socket.
    loopback = {4: "127.0.0.1", 6: "::1"}[version]
    admin = (3, 13) if version == 4 else (1, 1)
    async with running(
        [tap], version=version, egress=EgressPolicy(), udp_socket=udp, echo_socket=ping
    ) as (client, relay, stack, log):
        client.send(loopback, 40010, 53, b"query")
        client.ping(loopback, ident=0x77, seq=1, payload=b"x")
        await until(lambda: len(client.icmp) == 2)
        assert sorted((t, c) for t, c, _, _ in client.icmp) == [admin, admin]
        client.send(loopback, 40010, 53, b"again")  # answered by the stack itself
        await until(lambda: len(client.icmp) == 3)
        assert relay.stats.flows_denied == 2 and relay.stats.datagrams_c2s == 2
        assert stack.stats.datagram.refused == 1
        await until(lambda: 40010 in tap.ends and 0x77 in tap.ends)
    assert udp.calls == ping.calls == [] and tap.starts == []  # not even asked
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    assert sorted((r["proto"], r["ended"], r["rule"]) for r in lines) == [
        ("icmp", "denied", "default:loopback"),
        ("udp", "denied", "default:loopback"),
    ]
