"""Domain blocking (relay.analysis.blocklist): the patterns, and each protocol's
block through an in-process relay with the Zeek logs."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import dns.message
import dns.rcode
import pytest
import trio
import trio.testing
from dissect_helpers import quic_handshake, tls_conversation
from test_engine import Client, recv_exactly, recv_to_eof, send_all, until
from test_protocol_logs import (
    close_both,
    dns_answer_wire,
    dns_query_wire,
    relay_with,
    rows,
    udp_from_client,
)

from relay.analysis.blocklist import (
    BlockListError,
    DomainBlocker,
    parse_pattern,
    read_block_list,
)
from relay.analysis.zeeklog import ZeekLogs
from relay.service.run import ConfigError, validate

RULES = [
    ("*.blocked.test", "block-domain *.blocked.test"),
    ("ads.example.test", "block-domain ads.example.test"),
]


def blocker_and_logs(tmp_path: Path) -> tuple[DomainBlocker, ZeekLogs]:
    logs = ZeekLogs(tmp_path)
    return DomainBlocker(RULES, on_block=logs.note_block), logs


# --- patterns -------------------------------------------------------------------------


def test_patterns_match_by_name_case_and_trailing_dot_aside() -> None:
    b = DomainBlocker(RULES)
    assert b.match("blocked.test") == "block-domain *.blocked.test"  # the name itself too
    assert b.match("WWW.Blocked.Test.") == "block-domain *.blocked.test"
    assert b.match("a.b.blocked.test") == "block-domain *.blocked.test"
    assert b.match("ads.example.test") == "block-domain ads.example.test"
    for name in ("notblocked.test", "x.ads.example.test", "example.test", "test", ""):
        assert b.match(name) is None, name


@pytest.mark.parametrize("text", ["", "*", "*.", "a..b", "*.*.x", "a*.x", "-a.x", "a b.x"])
def test_bad_patterns(text: str) -> None:
    with pytest.raises(BlockListError):
        parse_pattern(text)


def test_block_list_file(tmp_path: Path) -> None:
    path = tmp_path / "list"
    path.write_text("# ads\n\nads.example.test  # trailing comment\n*.Tracker.Test.\n")
    assert read_block_list(str(path)) == [
        ("ads.example.test", f"block-list {path}:3 ads.example.test"),
        ("*.tracker.test", f"block-list {path}:4 *.tracker.test"),
    ]
    path.write_text("good.test\nbad..test\n")
    with pytest.raises(BlockListError, match=rf"^{path}:2: "):
        read_block_list(str(path))


def test_run_options(tmp_path: Path) -> None:
    path = tmp_path / "list"
    path.write_text("one.test\n")
    opts = validate(
        tun="t0", client_nets=["198.18.0.0/24"], block_domains=["*.Two.Test"],
        block_lists=[str(path)],
    )  # fmt: skip
    assert opts.block_rules == (
        ("*.two.test", "block-domain *.two.test"),
        ("one.test", f"block-list {path}:1 one.test"),
    )
    with pytest.raises(ConfigError, match=r"^--block-domain: "):
        validate(tun="t0", client_nets=["198.18.0.0/24"], block_domains=["*x"])
    path.write_text("ok.test\n*bad\n")
    with pytest.raises(ConfigError, match=rf"^--block-list: {path}:2: "):
        validate(tun="t0", client_nets=["198.18.0.0/24"], block_lists=[str(path)])
    with pytest.raises(ConfigError, match=r"^--block-list: cannot read"):
        validate(tun="t0", client_nets=["198.18.0.0/24"], block_lists=[str(tmp_path / "no")])


# --- DNS ----------------------------------------------------------------------------------


async def test_udp_dns_query_for_a_blocked_name_gets_nxdomain_from_the_relay(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    blocker, logs = blocker_and_logs(tmp_path)
    servers: dict[int, socket.socket] = {}
    async with relay_with([blocker, logs], udp_servers=servers) as h:
        blocked = dns_query_wire("www.blocked.test", 0x4242)
        h.source.inject(udp_from_client(40053, 53, blocked))
        await until(lambda: h.udp.get(40053))
        (answer_wire,) = h.udp[40053]
        answer = dns.message.from_wire(answer_wire)
        query = dns.message.from_wire(blocked)
        assert answer.id == 0x4242 and answer.rcode() == dns.rcode.NXDOMAIN
        assert answer.question == query.question and not answer.answer
        assert answer.flags & dns.flags.QR and answer.flags & dns.flags.RD
        # The same flow goes on: a name not blocked reaches the server.
        allowed = dns_query_wire("ok.example.test", 7)
        h.source.inject(udp_from_client(40053, 53, allowed))
        await until(lambda: 40053 in servers)
        server = servers[40053]
        server.setblocking(False)
        got: list[bytes] = []

        def read() -> bool:
            with contextlib.suppress(BlockingIOError):
                got.append(server.recv(2048))
            return bool(got)

        await until(read)
        assert got == [allowed]  # only this one
        server.send(dns_answer_wire(allowed, "198.18.9.9"))
        await until(lambda: len(h.udp[40053]) == 2)
        with pytest.raises(BlockingIOError):
            server.recv(2048)
        await until(lambda: h.relay.active_flows == 0 and not h.relay._datagrams._flows, 120)
        assert h.relay.stats.flows_blocked == 1
    dns_rows = await rows(logs, tmp_path, "dns")
    by_query = {r["query"]: r for r in dns_rows}
    assert by_query["www.blocked.test"]["rcode_name"] == "NXDOMAIN"
    assert by_query["www.blocked.test"]["rule"] == "block-domain *.blocked.test"
    assert by_query["ok.example.test"]["rcode_name"] == "NOERROR"
    assert "rule" not in by_query["ok.example.test"]
    (conn,) = await rows(logs, tmp_path, "conn")
    assert (conn["ended"], conn["rule"]) == ("blocked", "block-domain *.blocked.test")
    assert conn["orig_bytes_forwarded"] == len(allowed) < conn["orig_bytes"]


async def test_tcp_dns_query_for_a_blocked_name_gets_nxdomain_and_the_connection_closes(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    blocker, logs = blocker_and_logs(tmp_path)
    async with relay_with([blocker, logs]) as h:
        c = Client(h, sport=53)
        await c.connect()
        server = await h.connector.server(c.flow)
        query = dns_query_wire("ads.example.test", 0x99)
        await c.send(len(query).to_bytes(2, "big") + query)
        await until(lambda: c.fin)
        size = int.from_bytes(c.received[:2], "big")
        assert size == len(c.received) - 2
        answer = dns.message.from_wire(bytes(c.received[2:]))
        assert answer.id == 0x99 and answer.rcode() == dns.rcode.NXDOMAIN
        assert await recv_to_eof(server) == b""  # the server saw a FIN and nothing else
        c.finish()
        await until(lambda: h.relay.active_flows == 0)
    (row,) = await rows(logs, tmp_path, "dns")
    assert (row["proto"], row["query"], row["rcode_name"], row["rule"]) == (
        "tcp", "ads.example.test", "NXDOMAIN", "block-domain ads.example.test",
    )  # fmt: skip
    (conn,) = await rows(logs, tmp_path, "conn")
    assert (conn["ended"], conn["orig_bytes_forwarded"]) == ("blocked", 0)


# --- TLS, QUIC, HTTP ------------------------------------------------------------------------


async def test_blocked_sni_resets_both_sides_before_the_hello_goes_up(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    blocker, logs = blocker_and_logs(tmp_path)
    async with relay_with([blocker, logs]) as h:
        c = Client(h)
        await c.connect()
        server = await h.connector.server(c.flow)
        hello = tls_conversation(server_name="blocked.test").flights[0][1]
        await c.send(hello)
        await until(lambda: c.rst)
        await until(lambda: h.connector.closed_with_rst(c.flow))
        with pytest.raises(BlockingIOError):  # not one byte of the ClientHello
            os.read(server.fileno(), 65536)  # (non-blocking: trio's socket)
        # Another name on the same server is relayed.
        ok = Client(h, port=40001)
        await ok.connect()
        ok_server = await h.connector.server(ok.flow)
        other = tls_conversation(server_name="fine.test").flights[0][1]
        await ok.send(other)
        assert await recv_exactly(ok_server, len(other)) == other
        await close_both(h, ok, ok_server)
        await until(lambda: h.relay.active_flows == 0)
    ssl_rows = {r["server_name"]: r for r in await rows(logs, tmp_path, "ssl")}
    assert ssl_rows["blocked.test"]["rule"] == "block-domain *.blocked.test"
    assert ssl_rows["blocked.test"]["established"] is False
    assert "rule" not in ssl_rows["fine.test"]
    conns = {r["id.orig_p"]: r for r in await rows(logs, tmp_path, "conn")}
    assert (conns[40000]["ended"], conns[40000]["rule"]) == (
        "blocked",
        "block-domain *.blocked.test",
    )
    assert conns[40000]["orig_bytes_forwarded"] == 0
    assert conns[40001]["ended"] == "fin" and "rule" not in conns[40001]


async def test_blocked_quic_initial_is_dropped(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    blocker, logs = blocker_and_logs(tmp_path)
    servers: dict[int, socket.socket] = {}
    c2s, _ = quic_handshake(["h3"], 1, server_name="video.blocked.test")
    async with relay_with([blocker, logs], udp_servers=servers) as h:
        for _ in range(2):  # a retransmitted Initial is dropped too
            for d in c2s:
                h.source.inject(udp_from_client(40443, 443, d))
            await trio.sleep(1)
        await until(lambda: h.relay.stats.flows_blocked == 1)
        server = servers[40443]
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.recv(2048)
        assert 40443 not in h.udp
        await until(lambda: not h.relay._datagrams._flows, 300)
    (conn,) = await rows(logs, tmp_path, "conn")
    assert (conn["ended"], conn["rule"], conn["orig_bytes_forwarded"]) == (
        "blocked", "block-domain *.blocked.test", 0,
    )  # fmt: skip


def http_request(host: str) -> bytes:
    return f"GET /x HTTP/1.1\r\nHost: {host}\r\nUser-Agent: t/1\r\n\r\n".encode()


async def test_blocked_http_host_gets_403_from_the_relay(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    blocker, logs = blocker_and_logs(tmp_path)
    async with relay_with([blocker, logs]) as h:
        c = Client(h, sport=80)
        await c.connect()
        server = await h.connector.server(c.flow)
        await c.send(http_request("ads.example.test:80"))
        await until(lambda: c.fin)
        head, _, body = bytes(c.received).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert b"Connection: close" in head and body == b"Blocked: ads.example.test:80\n"
        assert await recv_to_eof(server) == b""  # the request never went up
        c.finish()
        # The same server, another name: relayed.
        ok = Client(h, port=40001, sport=80)
        await ok.connect()
        ok_server = await h.connector.server(ok.flow)
        request = http_request("www.example.test")
        await ok.send(request)
        assert await recv_exactly(ok_server, len(request)) == request
        response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
        await send_all(ok_server, response)
        await until(lambda: bytes(ok.received) == response)
        await close_both(h, ok, ok_server)
        await until(lambda: h.relay.active_flows == 0)
        assert h.relay.stats.flows_blocked == 1
    http = {r["host"]: r for r in await rows(logs, tmp_path, "http")}
    blocked = http["ads.example.test:80"]
    assert (blocked["status_code"], blocked["rule"]) == (403, "block-domain ads.example.test")
    assert http["www.example.test"]["status_code"] == 200 and "rule" not in http["www.example.test"]
    conns = {r["id.orig_p"]: r for r in await rows(logs, tmp_path, "conn")}
    assert conns[40000]["ended"] == "blocked" and conns[40000]["orig_bytes_forwarded"] == 0
    assert conns[40000]["resp_bytes"] == 0 and conns[40000]["resp_bytes_forwarded"] > 0
