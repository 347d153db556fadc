"""Dissection wired into the relay's flows, the record hooks, and the Zeek logs.

TCP flows run end to end as in ``test_engine`` (a scripted client through a
``MemoryPacketSource`` and the real ``Stack``; the upstream server is the far
end of a socketpair). UDP flows use datagram socketpairs as their upstream
sockets, so nothing here needs root or a network.
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import dns.message
import dns.rrset
import pytest
import trio
import trio.testing
from dissect_helpers import quic_handshake, tls_conversation
from test_engine import (
    OPEN,
    Client,
    FakeConnector,
    Harness,
    Seg,
    pattern,
    recv_exactly,
    recv_to_eof,
    send_all,
    until,
)

from relay.analysis.dissect import (
    DnsQuery,
    DnsTransaction,
    HttpRequest,
    HttpResponse,
    HttpTransaction,
    QuicClientHello,
    QuicServerHello,
    TlsClientHello,
    TlsEstablished,
    TlsServerHello,
)
from relay.analysis.hooks import RECORD_HOOKS, AnalyzerChain, Direction, FlowEnd, FlowInfo
from relay.analysis.zeeklog import ZeekLogs, conn_state
from relay.datapath import tcpflow
from relay.datapath.config import RelayConfig
from relay.datapath.engine import Relay
from relay.datapath.packet_source import MemoryPacketSource
from relay.datapath.tcpflow import TcpFlow
from stack import FlowId, Stack
from stack.wire import build_udp_packet, parse_ip

from packets import parse_tcp_packet

C2S, S2C = Direction.CLIENT_TO_SERVER, Direction.SERVER_TO_CLIENT


class Records:
    """Records every record hook's calls, in order, as (hook name, client port, record)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, object]] = []
        self.ends: dict[int, FlowEnd] = {}

    def of(self, name: str) -> list[Any]:
        return [r for n, _, r in self.seen if n == name]

    async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
        self.ends[flow.client_port] = end


def _recording(name: str) -> Any:
    async def hook(self: Records, flow: FlowInfo, record: object) -> None:
        self.seen.append((name, flow.client_port, record))

    return hook


for _name in RECORD_HOOKS:
    setattr(Records, _name, _recording(_name))


class Ends:
    """Only ``flow_end``: no record hook."""

    def __init__(self) -> None:
        self.ends: dict[int, FlowEnd] = {}

    async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
        self.ends[flow.client_port] = end


class UdpHarness(Harness):
    """``Harness`` that also takes the relay's UDP datagrams (payloads, by client port)."""

    def __init__(self, relay: Relay, source: MemoryPacketSource, stack: Stack) -> None:
        super().__init__(relay, source, stack)
        self.udp: dict[int, list[bytes]] = {}

    async def deliver(self) -> None:
        while True:
            for packet in await self.source.receive_batch():
                ip = parse_ip(packet)
                if ip.proto == 17:
                    (dport, length) = struct.unpack_from("!2xHH", packet, ip.offset)
                    payload = packet[ip.offset + 8 : ip.offset + length]
                    self.udp.setdefault(dport, []).append(payload)
                    continue
                self._tcp_or_icmp(packet)

    def _tcp_or_icmp(self, packet: bytes) -> None:
        ip = parse_ip(packet)
        if ip.proto == 6:
            _, _, tcp, payload = parse_tcp_packet(packet)
            seg = Seg(tcp.flags, tcp.seq, tcp.ack, tcp.window, payload, tcp.options.mss)
            self.clients[(ip.version, tcp.dst_port)].on_segment(seg)
        else:
            quoted = packet[ip.offset + 8 : ip.end]
            qip = parse_ip(quoted)
            (port,) = struct.unpack_from("!H", quoted, qip.offset)
            self.clients[(ip.version, port)].icmp.append((packet[ip.offset], packet[ip.offset + 1]))


@asynccontextmanager
async def relay_with(
    analyzers: Sequence[object],
    *,
    config: RelayConfig | None = None,
    udp_servers: dict[int, socket.socket] | None = None,
) -> AsyncIterator[Harness]:
    """A relay with exactly ``analyzers`` (no data hooks unless they have some).
    UDP flows get one end of a datagram socketpair; the other is ``udp_servers[port]``."""
    source = MemoryPacketSource()
    stack = Stack()
    connector = FakeConnector()

    def udp_socket(flow: FlowId) -> socket.socket:
        relay_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        relay_end.setblocking(False)
        assert udp_servers is not None
        udp_servers[flow.client_port] = server_end
        return relay_end

    relay = Relay(
        source, stack=stack, config=config or RelayConfig(egress=OPEN),
        analyzers=analyzers, connector=connector, udp_socket=udp_socket,
    )  # fmt: skip
    h = UdpHarness(relay, source, stack)
    h.connector = connector
    async with trio.open_nursery() as nursery:
        await nursery.start(relay.run)
        nursery.start_soon(h.deliver)
        yield h
        nursery.cancel_scope.cancel()


async def rows(logs: ZeekLogs, directory: Path, name: str) -> list[dict[str, Any]]:
    await logs.flush()
    text = (directory / f"{name}.log").read_text()
    return [json.loads(line) for line in text.splitlines()]


def flow_of(h: Harness, c: Client) -> TcpFlow:
    return h.relay._flows[c.flow]


async def tls_through(h: Harness, c: Client, server: trio.socket.SocketType, **kw: Any) -> None:
    """A real TLS handshake (Python ssl, in memory) through the relay, flight by flight."""
    for direction, data in tls_conversation(**kw).flights:
        if direction is C2S:
            await c.send(data)
            assert await recv_exactly(server, len(data)) == data
        else:
            want = len(c.received) + len(data)
            await send_all(server, data)
            await until(lambda want=want: len(c.received) >= want)  # type: ignore[misc]


async def upload(c: Client, server: trio.socket.SocketType, data: bytes) -> None:
    """``data`` from the client to the server, read as it comes."""
    async with trio.open_nursery() as n:
        n.start_soon(c.send, data)
        assert await recv_exactly(server, len(data)) == data


async def close_both(h: Harness, c: Client, server: trio.socket.SocketType) -> None:
    c.finish()
    await recv_to_eof(server)
    server.shutdown(socket.SHUT_WR)
    await until(lambda: c.fin)


# --- TCP: TLS ----------------------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls_records_hooks_and_rows(
    version: ssl.TLSVersion, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rec = Records()
    logs = ZeekLogs(tmp_path)
    async with relay_with([rec, logs]) as h:
        c = Client(h)
        await c.connect()
        server = await h.connector.server(c.flow)
        await tls_through(h, c, server, alpn=["h2", "http/1.1"], server_alpn=["h2"],
                          max_version=version)  # fmt: skip
        await until(lambda: rec.of("tls_established"))
        assert flow_of(h, c)._dx is None  # done after the handshake: never called again
        bulk = pattern(300_000, 3)  # application bytes, not parsed
        await upload(c, server, bulk)
        await close_both(h, c, server)
        await until(lambda: 40000 in rec.ends)
    (hello,) = rec.of("tls_clienthello")
    (server_hello,) = rec.of("tls_serverhello")
    (established,) = rec.of("tls_established")
    assert isinstance(hello, TlsClientHello) and hello.server_name == "example.test"
    assert isinstance(server_hello, TlsServerHello) and isinstance(established, TlsEstablished)
    assert [n for n, _, _ in rec.seen] == ["tls_clienthello", "tls_serverhello", "tls_established"]
    (ssl_row,) = await rows(logs, tmp_path, "ssl")
    tls13 = version is ssl.TLSVersion.TLSv1_3
    assert ssl_row["version"] == ("TLSv13" if tls13 else "TLSv12")
    assert ssl_row["cipher"].startswith("TLS_") and "0x" not in ssl_row["cipher"]
    assert ssl_row["server_name"] == "example.test"
    assert ssl_row["established"] is True and ssl_row["resumed"] is False
    assert ssl_row["ja4"] == hello.ja4 and ssl_row["ja4"].endswith(hello.ja4[-25:])
    assert hello.ja4.split("_")[0].endswith("h2")
    assert ssl_row["ja3"] == hello.ja3_hash and len(ssl_row["ja3"]) == 32
    if tls13:
        assert "next_protocol" not in ssl_row  # encrypted in TLS 1.3
    else:
        assert ssl_row["next_protocol"] == "h2"
    (conn,) = await rows(logs, tmp_path, "conn")
    assert conn["uid"] == ssl_row["uid"]
    assert (conn["service"], conn["conn_state"], conn["history"]) == ("ssl", "SF", "ShADdFf")
    assert conn["missed_bytes"] == 0 and conn["ended"] == "fin"
    assert conn["orig_pkts"] > 200 and conn["resp_pkts"] > 5  # the bulk's segments and ACKs
    assert conn["orig_bytes"] > len(bulk)
    assert rec.ends[40000].packets_c2s == conn["orig_pkts"]


async def test_a_clienthello_is_seen_before_its_bytes_go_upstream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    release = trio.Event()

    class Holding:
        async def tls_clienthello(self, flow: FlowInfo, hello: TlsClientHello) -> None:
            await release.wait()

    async with relay_with([Holding()]) as h:
        c = Client(h)
        await c.connect()
        server = await h.connector.server(c.flow)
        first = tls_conversation().flights[0][1]
        await c.send(first[:3])  # a first piece: detection undecided, forwarded at once
        assert await recv_exactly(server, 3) == first[:3]
        await c.send(first[3:])
        with trio.move_on_after(5):
            await server.recv(100)
            pytest.fail("the ClientHello went upstream before its hook returned")
        release.set()
        assert await recv_exactly(server, len(first) - 3) == first[3:]


# --- TCP: HTTP, DNS ------------------------------------------------------------------------


async def test_http_keep_alive_two_rows(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rec = Records()
    logs = ZeekLogs(tmp_path)
    async with relay_with([rec, logs]) as h:
        c = Client(h, sport=80)
        await c.connect()
        server = await h.connector.server(c.flow)
        for path, body in ((b"/a", b"first body"), (b"/b", b"second")):
            req = b"GET %s HTTP/1.1\r\nHost: example.test\r\nUser-Agent: t/1\r\n\r\n" % path
            await c.send(req)
            assert await recv_exactly(server, len(req)) == req
            resp = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            want = len(c.received) + len(resp)
            await send_all(server, resp)
            await until(lambda want=want: len(c.received) == want)  # type: ignore[misc]
        await close_both(h, c, server)
        await until(lambda: 40000 in rec.ends)
    assert [r.uri for r in rec.of("http_request")] == ["/a", "/b"]
    assert all(isinstance(r, HttpRequest) for r in rec.of("http_request"))
    assert [r.status_code for r in rec.of("http_response")] == [200, 200]
    assert all(isinstance(r, HttpResponse) for r in rec.of("http_response"))
    assert all(isinstance(r, HttpTransaction) for r in rec.of("http_transaction"))
    http = await rows(logs, tmp_path, "http")
    assert [(r["trans_depth"], r["uri"], r["response_body_len"]) for r in http] == [
        (1, "/a", 10),
        (2, "/b", 6),
    ]
    for r in http:
        assert (r["method"], r["host"], r["version"], r["user_agent"]) == (
            "GET", "example.test", "1.1", "t/1",
        )  # fmt: skip
        assert (r["status_code"], r["status_msg"], r["request_body_len"]) == (200, "OK", 0)
    (conn,) = await rows(logs, tmp_path, "conn")
    assert conn["service"] == "http" and {r["uid"] for r in http} == {conn["uid"]}


def dns_query_wire(name: str, qid: int) -> bytes:
    q = dns.message.make_query(name, "A")
    q.id = qid
    return q.to_wire()


def dns_answer_wire(query: bytes, address: str) -> bytes:
    q = dns.message.from_wire(query)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(q.question[0].name, 300, "IN", "A", address))
    return r.to_wire()


async def test_dns_over_tcp(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    logs = ZeekLogs(tmp_path)
    async with relay_with([logs]) as h:
        c = Client(h, sport=53)
        await c.connect()
        server = await h.connector.server(c.flow)
        query = dns_query_wire("example.test", 0x1234)
        framed = len(query).to_bytes(2, "big") + query
        await c.send(framed)
        assert await recv_exactly(server, len(framed)) == framed
        answer = dns_answer_wire(query, "198.18.7.7")
        await send_all(server, len(answer).to_bytes(2, "big") + answer)
        await until(lambda: len(c.received) == 2 + len(answer))
        await close_both(h, c, server)
        await until(lambda: h.relay.active_flows == 0)
        await trio.sleep(1)
    (row,) = await rows(logs, tmp_path, "dns")
    assert (row["proto"], row["trans_id"], row["query"], row["qtype_name"]) == (
        "tcp", 0x1234, "example.test", "A",
    )  # fmt: skip
    assert (row["rcode_name"], row["answers"], row["TTLs"]) == ("NOERROR", ["198.18.7.7"], [300.0])
    assert row["rtt"] >= 0 and row["RD"] is True and row["rejected"] is False
    (conn,) = await rows(logs, tmp_path, "conn")
    assert conn["service"] == "dns" and conn["uid"] == row["uid"]


# --- UDP: DNS and QUIC --------------------------------------------------------------------


CLIENT_V4 = bytes([198, 18, 0, 2])
SERVER_V4 = bytes([198, 19, 0, 53])


def udp_from_client(sport: int, dport: int, payload: bytes) -> bytes:
    return build_udp_packet(CLIENT_V4, SERVER_V4, sport, dport, payload)


async def test_dns_over_udp_hooks_and_rows(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rec = Records()
    logs = ZeekLogs(tmp_path)
    servers: dict[int, socket.socket] = {}
    async with relay_with([rec, logs], udp_servers=servers) as h:
        queries = [dns_query_wire("one.example.test", 1), dns_query_wire("two.example.test", 2)]
        for q in queries:
            h.source.inject(udp_from_client(40053, 53, q))
        await until(lambda: 40053 in servers)
        server = servers[40053]
        server.setblocking(False)
        got: list[bytes] = []

        def read() -> bool:
            with contextlib.suppress(BlockingIOError):
                got.append(server.recv(2048))
            return len(got) == 2

        await until(read)
        assert got == queries
        server.send(dns_answer_wire(queries[0], "198.18.9.1"))  # the second goes unanswered
        await until(lambda: rec.of("dns_answer"))
        await until(lambda: 40053 in rec.ends, timeout=60)  # the DNS idle timeout
    assert [q.query for q in rec.of("dns_query")] == ["one.example.test", "two.example.test"]
    assert all(isinstance(q, DnsQuery) for q in rec.of("dns_query"))
    answered, unanswered = rec.of("dns_answer")
    assert isinstance(answered, DnsTransaction) and answered.answers == ("198.18.9.1",)
    assert unanswered.saw_reply is False
    dns_rows = await rows(logs, tmp_path, "dns")
    assert [(r["query"], r.get("answers")) for r in dns_rows] == [
        ("one.example.test", ["198.18.9.1"]),
        ("two.example.test", None),
    ]
    assert all(r["proto"] == "udp" for r in dns_rows)
    (conn,) = await rows(logs, tmp_path, "conn")
    assert (conn["proto"], conn["service"], conn["conn_state"], conn["history"]) == (
        "udp", "dns", "SF", "Dd",
    )  # fmt: skip
    assert (conn["orig_pkts"], conn["resp_pkts"]) == (2, 1)


async def test_quic_clienthello_hook_and_row(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    rec = Records()
    logs = ZeekLogs(tmp_path)
    servers: dict[int, socket.socket] = {}
    c2s, s2c = quic_handshake(["h3"], 1, server_name="quic.example.test")
    async with relay_with([rec, logs], udp_servers=servers) as h:
        for d in c2s:
            h.source.inject(udp_from_client(40443, 443, d))
        await until(lambda: 40443 in servers)
        for d in s2c:
            servers[40443].send(d)
        await until(lambda: rec.of("quic_serverhello"))
        await until(lambda: 40443 in rec.ends, timeout=120)
    (hello,) = rec.of("quic_clienthello")
    assert isinstance(hello, QuicClientHello) and hello.hello.server_name == "quic.example.test"
    assert isinstance(rec.of("quic_serverhello")[0], QuicServerHello)
    (row,) = await rows(logs, tmp_path, "quic")
    assert (row["server_name"], row["client_protocol"], row["version"]) == (
        "quic.example.test", "h3", "1",
    )  # fmt: skip
    assert row["ja4"].startswith("q") and row["ja4"] == hello.hello.ja4
    (conn,) = await rows(logs, tmp_path, "conn")
    assert conn["service"] == "quic" and conn["uid"] == row["uid"]


# --- conn_state and history ------------------------------------------------------------------


async def _conn_row(
    tmp_path: Path, scenario: str, config: RelayConfig | None = None
) -> dict[str, Any]:
    logs = ZeekLogs(tmp_path)
    async with relay_with([logs], config=config) as h:
        c = Client(h)
        if scenario == "refused":
            h.connector.errors[443] = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
        if scenario in ("refused", "denied", "timeout"):
            if scenario == "timeout":
                h.connector.hang.add(443)
            c.syn()
            await until(lambda: h.relay.stats.flows_ended == 1, timeout=120)
        else:
            await c.connect()
            server = await h.connector.server(c.flow)
            await c.send(b"hello")
            assert await recv_exactly(server, 5) == b"hello"
            await send_all(server, b"world")
            await until(lambda: c.received == b"world")
            if scenario == "fin":
                await close_both(h, c, server)
            elif scenario == "client_rst":
                c.reset()
            await until(lambda: h.relay.active_flows == 0, timeout=120)
        await trio.sleep(1)
    (row,) = await rows(logs, tmp_path, "conn")
    return row


@pytest.mark.parametrize(
    ("scenario", "state", "history", "ended"),
    [
        ("fin", "SF", "ShADdFf", "fin"),
        ("client_rst", "RSTO", "ShADdR", "rst"),
        ("refused", "REJ", "Sr", "refused"),
        ("denied", "S0", "S", "denied"),
        ("timeout", "S0", "S", "connect_timeout"),
    ],
)
async def test_conn_state_and_history(
    scenario: str,
    state: str,
    history: str,
    ended: str,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = RelayConfig() if scenario == "denied" else None  # 198.19/16 is denied by default
    row = await _conn_row(tmp_path, scenario, config)
    assert (row["conn_state"], row["history"], row["ended"]) == (state, history, ended)
    assert row["missed_bytes"] == 0 and row["orig_pkts"] >= 1
    if scenario == "refused":
        assert (row["orig_pkts"], row["resp_pkts"]) == (1, 1)  # the SYN, the RST
    if scenario == "denied":
        assert row["rule"] == "default:reserved" and row["resp_pkts"] == 0


async def test_server_reset_is_rstr(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    logs = ZeekLogs(tmp_path)
    async with relay_with([logs]) as h:
        c = Client(h)
        await c.connect()
        server = await h.connector.server(c.flow)
        await c.send(b"never read")
        await trio.sleep(1)
        server.close()  # unread data: the relay's end gets ECONNRESET
        await until(lambda: c.rst)
        await until(lambda: h.relay.active_flows == 0)
        await trio.sleep(1)
    (row,) = await rows(logs, tmp_path, "conn")
    assert (row["conn_state"], row["history"], row["ended"]) == ("RSTR", "ShADr", "rst")


def test_conn_state_table() -> None:
    cases = {
        "S": "S0", "Sr": "REJ", "SR": "RSTOS0", "SF": "SH", "Sh": "S1", "ShAD": "S1",
        "ShADdFf": "SF", "ShADdfF": "SF", "ShADF": "S2", "ShADdf": "S3", "ShADR": "RSTO",
        "ShADr": "RSTR", "ShADFr": "RSTR", "ShADRr": "RSTR",
    }  # fmt: skip
    for history, state in cases.items():
        assert conn_state("tcp", history) == state, history
    assert [conn_state("udp", h) for h in ("D", "Dd", "d", "")] == ["S0", "SF", "SHR", "OTH"]
    assert conn_state("icmp", "") == "OTH"


# --- isolation, cost ----------------------------------------------------------------------


async def test_an_analyzer_raising_in_a_record_hook_is_detached(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    class Broken:
        def __init__(self) -> None:
            self.calls = 0
            self.ended = False

        async def tls_clienthello(self, flow: FlowInfo, hello: TlsClientHello) -> None:
            self.calls += 1
            raise RuntimeError("analyzer bug")

        async def tls_serverhello(self, flow: FlowInfo, hello: TlsServerHello) -> None:
            self.calls += 1

        async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
            self.ended = True

    broken, rec = Broken(), Records()
    logs = ZeekLogs(tmp_path)
    async with relay_with([broken, rec, logs]) as h:
        c = Client(h)
        await c.connect()
        server = await h.connector.server(c.flow)
        await tls_through(h, c, server)
        await close_both(h, c, server)
        await until(lambda: 40000 in rec.ends)
        assert h.relay.stats.analyzer_errors == 1
    assert broken.calls == 1 and not broken.ended  # no more calls for that flow
    assert [n for n, _, _ in rec.seen][:2] == ["tls_clienthello", "tls_serverhello"]
    (row,) = await rows(logs, tmp_path, "ssl")
    assert row["established"] is True


async def test_malformed_tls_ends_dissection_not_the_flow(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    logs = ZeekLogs(tmp_path)
    junk = b"\x16\x03\x01\x00\x30\x01" + bytes(range(200))  # a ClientHello header, then junk
    async with relay_with([logs]) as h:
        c = Client(h)
        await c.connect()
        server = await h.connector.server(c.flow)
        await c.send(junk)
        assert await recv_exactly(server, len(junk)) == junk
        assert flow_of(h, c)._dx is None
        await close_both(h, c, server)
        await until(lambda: h.relay.active_flows == 0)
        await trio.sleep(1)
    assert await rows(logs, tmp_path, "ssl") == []
    (conn,) = await rows(logs, tmp_path, "conn")
    assert "service" not in conn and conn["conn_state"] == "SF"


async def test_dissection_off_creates_nothing_and_keeps_the_direct_path(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    import relay.datapath.dissection as dissection

    made: list[object] = []
    monkeypatch.setattr(dissection.StreamDissection, "__init__", made.append)
    pumps: list[TcpFlow] = []
    original = tcpflow.TcpFlow._pump_c2s

    async def counting(self: TcpFlow) -> None:
        pumps.append(self)
        await original(self)

    monkeypatch.setattr(tcpflow.TcpFlow, "_pump_c2s", counting)
    rec = Ends()
    async with relay_with([rec]) as h:  # only flow_end: no record hooks
        assert h.relay._env.dissection is None
        c = Client(h)
        await c.connect()
        server = await h.connector.server(c.flow)
        await tls_through(h, c, server)
        data = pattern(100_000, 9)
        await upload(c, server, data)
        assert flow_of(h, c)._dx is None
        await close_both(h, c, server)
        await until(lambda: 40000 in rec.ends)
    assert made == [] and pumps == []  # every chunk went straight upstream
    assert rec.ends[40000].services == ()
    assert rec.ends[40000].history == "ShADdFf"  # the conn.log history is kept regardless


async def test_with_dissection_only_the_clienthello_chunk_takes_the_queue(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    pumps: list[TcpFlow] = []
    original = tcpflow.TcpFlow._pump_c2s

    async def counting(self: TcpFlow) -> None:
        pumps.append(self)
        await original(self)

    monkeypatch.setattr(tcpflow.TcpFlow, "_pump_c2s", counting)
    rec = Records()
    async with relay_with([rec]) as h:
        c = Client(h)
        await c.connect()
        server = await h.connector.server(c.flow)
        await tls_through(h, c, server, max_version=ssl.TLSVersion.TLSv1_2)
        started = len(pumps)
        data = pattern(200_000, 4)
        await upload(c, server, data)
        assert len(pumps) == started  # after the handshake: the direct path again
    assert started == 1  # the chunk that completed the ClientHello


def test_record_hooks_turn_on_only_their_protocols() -> None:
    class OnlyTls:
        async def tls_clienthello(self, flow: FlowInfo, hello: TlsClientHello) -> None:
            pass

    chain = AnalyzerChain([OnlyTls()])
    assert chain.record_protocols == {"tls"} and set(chain.record_hooks) == {"tls_clienthello"}
    assert AnalyzerChain([Records()]).record_protocols == {"tls", "http", "dns", "quic"}
    assert AnalyzerChain([object()]).record_protocols == frozenset()


# --- the writer --------------------------------------------------------------------------


async def test_a_full_buffer_drops_and_counts(tmp_path: Path) -> None:
    logs = ZeekLogs(tmp_path, buffer_limit=1000)
    flow = FlowInfo.from_flow(FlowId(4, "198.18.0.2", 40000, "198.19.0.80", 443))
    end = FlowEnd(tcpflow.EndReason.FIN, 1, 2, 0.1, history="ShADdFf")
    for _ in range(20):
        await logs.flow_end(flow, end)
    assert logs.stats.dropped > 0 and logs.stats.rows + logs.stats.dropped == 20
    await logs.flush()
    lines = (tmp_path / "conn.log").read_text().splitlines()
    assert len(lines) == logs.stats.rows and all(json.loads(x)["uid"] == flow.uid for x in lines)
    await logs.flow_end(flow, end)  # room again
    logs.close()
    logs.close()
    assert len((tmp_path / "conn.log").read_text().splitlines()) == logs.stats.rows


async def test_bytes_after_the_servers_close_meet_its_reset(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # A kernel answers bytes for a closed socket with an RST; the relay sees EPIPE or
    # ENOTCONN (not ECONNRESET) once it read the FIN: still the server's reset.
    logs = ZeekLogs(tmp_path)
    async with relay_with([logs]) as h:
        c = Client(h)
        await c.connect()
        server = await h.connector.server(c.flow)
        await send_all(server, b"bye")
        server.close()
        await until(lambda: c.fin)
        await c.send(b"too late")
        await until(lambda: c.rst)
        await until(lambda: h.relay.active_flows == 0)
        await trio.sleep(1)
    (row,) = await rows(logs, tmp_path, "conn")
    assert (row["conn_state"], row["history"], row["ended"]) == ("RSTR", "ShAdfDr", "rst")


async def test_the_readme_server_names_example(capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    _, found, rest = readme.partition("<!-- example: server-names -->\n```python\n")
    assert found, "the README's example is gone"
    code = rest.split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 12
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    analyzer = namespace["ServerNames"]()
    chain = AnalyzerChain([analyzer])
    assert chain.record_protocols == {"tls", "quic"}
    flow = FlowInfo.from_flow(FlowId(4, "198.18.1.2", 40000, "198.18.2.2", 443))
    hooks = chain.open(flow)
    hello = dissect_first(tls_conversation(server_name="sni.example").side(C2S))
    c2s, _ = quic_handshake(["h3"], 1, server_name="quic.example")
    quic = dissect_quic(c2s)
    assert await hooks.records([("tls_clienthello", hello), ("quic_clienthello", quic)]) is None
    assert capsys.readouterr().out.splitlines() == [
        f"198.18.1.2 sni.example {hello.ja4}",
        f"198.18.1.2 quic.example {quic.hello.ja4}",
    ]


def dissect_first(client_bytes: bytes) -> TlsClientHello:
    from relay.analysis.dissect import TlsDissector

    (hello, *_) = TlsDissector().feed(C2S, client_bytes, 0.0)
    assert isinstance(hello, TlsClientHello)
    return hello


def dissect_quic(datagrams: list[bytes]) -> QuicClientHello:
    from relay.analysis.dissect import QuicDissector

    d = QuicDissector()
    records = [r for dg in datagrams for r in d.datagram(C2S, dg, 0.0)]
    (hello,) = [r for r in records if isinstance(r, QuicClientHello)]
    return hello
