"""HTTP/1.x dissector: keep-alive and pipelining, body framing (length,
chunked, end of connection, HEAD, 1xx/204/304), CONNECT and Upgrade, limits,
any split of either stream, fuzzing."""

from __future__ import annotations

import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.analysis.dissect.http import (
    HttpDissector,
    HttpRecord,
    HttpRequest,
    HttpResponse,
    HttpTransaction,
)
from tests.dissect_helpers import C2S, S2C, bytewise, capture_client_bytes, netns_available

REQUESTS = (
    b"GET /a?x=1 HTTP/1.1\r\nHost: example.test\r\nUser-Agent: probe/1.0\r\n\r\n"
    b"HEAD /b HTTP/1.1\r\nHost: example.test\r\n\r\n"
    b"POST /c HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n"
    b"Expect: 100-continue\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    b"PUT /d HTTP/1.1\r\nHost: example.test\r\nContent-Length: 3\r\n\r\nabc"
    b"GET /e HTTP/1.1\r\nHost: example.test\r\n\r\n"
    b"GET /f HTTP/1.1\r\nHost: example.test\r\n\r\n"
)
RESPONSES = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/html\r\n\r\n"  # HEAD
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    b"HTTP/1.1 204 No Content\r\n\r\n"
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nread to the end"
)


def run(
    flights: list[tuple[object, bytes]], cut: object = None, *, end: bool = True
) -> list[HttpRecord]:
    d = HttpDissector()
    out: list[HttpRecord] = []
    for direction, data in flights:
        pieces = cut(data) if callable(cut) else [data]
        for p in pieces:
            out += d.feed(direction, p, 1.0)  # type: ignore[arg-type]
    if end:
        out += d.end(S2C, 2.0)
    assert d.failed is None, d.failed
    return out


def transactions(records: list[HttpRecord]) -> list[HttpTransaction]:
    return [r for r in records if isinstance(r, HttpTransaction)]


def test_pipelined_requests_and_every_body_framing() -> None:
    records = run([(C2S, REQUESTS), (S2C, RESPONSES)])
    requests = [r for r in records if isinstance(r, HttpRequest)]
    assert [(r.method, r.uri, r.trans_depth) for r in requests] == [
        ("GET", "/a?x=1", 1), ("HEAD", "/b", 2), ("POST", "/c", 3), ("PUT", "/d", 4),
        ("GET", "/e", 5), ("GET", "/f", 6),
    ]  # fmt: skip
    assert requests[0].host == "example.test"
    assert requests[0].user_agent == "probe/1.0"
    assert requests[0].version == "1.1"
    assert requests[1].user_agent is None
    txs = transactions(records)
    got = [
        (t.trans_depth, t.response.status_code if t.response else None,
         t.request_body_len, t.response_body_len, t.info_code)
        for t in txs
    ]  # fmt: skip
    assert got == [
        (1, 200, 0, 5, None),
        (2, 200, 0, 0, None),  # HEAD: no body, whatever Content-Length says
        (3, 201, 11, 3, 100),  # chunked both ways, after a 100 Continue
        (4, 204, 3, 0, None),
        (5, 304, 0, 0, None),
        (6, 200, 0, 15, None),  # delimited by the end of the connection
    ]
    assert txs[0].response is not None and txs[0].response.status_msg == "OK"
    assert txs[2].info_msg == "Continue"
    assert all(t.request is not None for t in txs)


def test_request_record_comes_before_its_body_and_response() -> None:
    d = HttpDissector()
    head = b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n"
    (req,) = d.feed(C2S, head + b"01234", 1.0)
    assert isinstance(req, HttpRequest) and req.method == "POST"
    assert d.feed(C2S, b"56789", 1.5) == []
    (resp, tx) = d.feed(S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 2.0)
    assert isinstance(resp, HttpResponse) and resp.ts == 2.0
    assert isinstance(tx, HttpTransaction) and tx.ts == 1.0 and tx.request_body_len == 10


def test_sequential_keep_alive_any_split() -> None:
    flights: list[tuple[object, bytes]] = []
    reqs = [r + b"\r\n\r\n" for r in REQUESTS.split(b"\r\n\r\n") if r.startswith((b"GET", b"HEAD"))]
    resps = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + (b"" if q.startswith(b"HEAD") else b"ok")
        for q in reqs
    ]
    for q, a in zip(reqs, resps, strict=True):
        flights += [(C2S, q), (S2C, a)]
    whole = run(flights)
    assert len(transactions(whole)) == len(reqs)
    assert run(flights, bytewise) == whole


def test_every_split_of_both_streams() -> None:
    whole = run([(C2S, REQUESTS), (S2C, RESPONSES)])
    assert run([(C2S, REQUESTS), (S2C, RESPONSES)], bytewise) == whole
    for at in range(len(REQUESTS) + 1):
        flights = [(C2S, REQUESTS[:at]), (C2S, REQUESTS[at:]), (S2C, RESPONSES)]
        assert run(flights) == whole, at
    for at in range(len(RESPONSES) + 1):
        flights = [(C2S, REQUESTS), (S2C, RESPONSES[:at]), (S2C, RESPONSES[at:])]
        assert run(flights) == whole, at


def test_unanswered_requests_are_emitted_at_the_end() -> None:
    d = HttpDissector()
    d.feed(C2S, b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n", 1.0)
    d.feed(S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 2.0)
    txs = transactions(d.close(3.0))
    assert [(t.trans_depth, t.response is not None, t.response_body_len) for t in txs] == [
        (1, True, 3),  # cut short: what arrived
        (2, False, 0),
    ]
    assert d.close(4.0) == []


def test_response_without_request() -> None:
    records = run([(S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")])
    (tx,) = transactions(records)
    assert tx.request is None and tx.trans_depth == 1 and tx.response_body_len == 1


def test_connect_tunnel_goes_quiet() -> None:
    d = HttpDissector()
    (req,) = d.feed(C2S, b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n", 1)
    assert isinstance(req, HttpRequest) and req.uri == "example.test:443"
    d.feed(C2S, b"\x16\x03\x01\x02\x00\x01", 1.1)  # the client starts TLS at once
    resp, tx = d.feed(S2C, b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x03", 2.0)
    assert isinstance(resp, HttpResponse) and resp.status_code == 200
    assert isinstance(tx, HttpTransaction) and tx.request is req
    assert d.done and d.failed is None
    assert d.feed(C2S, b"\x17\x03\x03\x00\x10" + bytes(16), 3.0) == []


def test_refused_connect_goes_on() -> None:
    d = HttpDissector()
    out = d.feed(C2S, b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 1.0)
    out += d.feed(C2S, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", 1.1)  # held until the answer
    assert len(out) == 1
    out += d.feed(S2C, b"HTTP/1.1 407 Proxy Auth\r\nContent-Length: 0\r\n\r\n", 2.0)
    out += d.feed(S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 3.0)
    txs = transactions(out)
    assert [(t.request.method if t.request else None, t.response.status_code if t.response else 0)
            for t in txs] == [("CONNECT", 407), ("GET", 200)]  # fmt: skip
    assert d.active


def test_bytes_held_during_a_switch_are_bounded() -> None:
    d = HttpDissector()
    d.feed(C2S, b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", 1.0)
    for _ in range(3):
        d.feed(C2S, bytes(40_000), 1.1)  # the tunnel's bytes, sent before the answer
    assert len(d._held) == 0 and d.failed is None
    out = d.feed(S2C, b"HTTP/1.1 200 OK\r\n\r\n", 2.0)
    assert [type(r) for r in out] == [HttpResponse, HttpTransaction] and d.done


def test_websocket_upgrade_goes_quiet() -> None:
    d = HttpDissector()
    d.feed(C2S, b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n", 1.0)  # fmt: skip
    out = d.feed(S2C, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\n\r\n\x81\x05hello", 2.0)  # fmt: skip
    assert [type(r) for r in out] == [HttpResponse, HttpTransaction]
    assert d.done and d.failed is None
    assert d.feed(C2S, b"\x81\x85garbage", 3.0) == []


def test_refused_upgrade_goes_on() -> None:
    d = HttpDissector()
    d.feed(C2S, b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n", 1)
    out = d.feed(S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 2.0)
    out += d.feed(C2S, b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n", 3.0)
    assert [r.uri for r in out if isinstance(r, HttpRequest)] == ["/next"]
    assert d.active


def test_connection_close_ends_parsing_without_failure() -> None:
    d = HttpDissector()
    d.feed(C2S, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", 1.0)
    out = d.feed(S2C, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nxJUNK", 2)
    assert len(transactions(out)) == 1
    assert d.failed is None


@pytest.mark.parametrize(
    ("direction", "data"),
    [
        (C2S, b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00"),
        (C2S, b"GET / HTTP/1.1\r\nHost: h\r\nBad Header\r\n\r\n"),
        (S2C, b"HTTP/1.1 2x0 OK\r\n\r\n"),
        (S2C, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
    ],
)
def test_not_http_fails(direction: object, data: bytes) -> None:
    d = HttpDissector()
    d.feed(direction, data, 1.0)  # type: ignore[arg-type]
    assert d.failed is not None and not d.failed.startswith("internal"), d.failed
    assert not d.active


def test_header_block_limit() -> None:
    d = HttpDissector(max_header_bytes=4096)
    d.feed(C2S, b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: ", 1.0)
    for _ in range(10):
        d.feed(C2S, b"a" * 1000, 1.0)  # one header value, never finished
        if d.failed:
            break
    assert d.failed is not None and "too large" in d.failed
    d = HttpDissector(max_header_bytes=4096)
    d.feed(C2S, b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 1000, 1.0)
    assert d.failed is not None and "too large" in d.failed


def test_pending_limit() -> None:
    d = HttpDissector(max_pending=4)
    d.feed(C2S, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n" * 5, 1.0)
    assert d.failed is not None and "unanswered" in d.failed


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
@pytest.mark.skipif(not netns_available(), reason="needs root, unshare and ip")
def test_curl_request() -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
    request = capture_client_bytes(
        ["curl", "-s", "-m", "5", "-A", "dissect-test/1.0", "-d", "k=v",
         "http://127.0.0.1:{port}/form?x=1"],
        response,
    )  # fmt: skip
    records = run([(C2S, request), (S2C, response)])
    req, resp, tx = records
    assert isinstance(resp, HttpResponse) and resp.status_code == 200
    assert isinstance(req, HttpRequest)
    assert (req.method, req.uri, req.version, req.user_agent) == (
        "POST", "/form?x=1", "1.1", "dissect-test/1.0",
    )  # fmt: skip
    assert req.host is not None and req.host.startswith("127.0.0.1:")
    assert isinstance(tx, HttpTransaction)
    assert (tx.request_body_len, tx.response_body_len) == (3, 5)
    assert run([(C2S, request), (S2C, response)], bytewise) == records


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_conversation(data: st.DataObject) -> None:
    streams = [bytearray(REQUESTS), bytearray(RESPONSES)]
    for _ in range(data.draw(st.integers(1, 6))):
        s = streams[data.draw(st.integers(0, 1))]
        s[data.draw(st.integers(0, len(s) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, 200))
    d = HttpDissector()
    for direction, s in ((C2S, streams[0]), (S2C, streams[1])):
        for i in range(0, len(s), cut):
            d.feed(direction, bytes(s[i : i + cut]), 1.0)
    d.end(S2C, 2.0)
    d.close(2.0)
    assert d.failed is None or not d.failed.startswith("internal"), d.failed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=200)), max_size=8))
def test_fuzz_random_bytes(chunks: list[tuple[bool, bytes]]) -> None:
    d = HttpDissector()
    for client, chunk in chunks:
        prefix = b"GET / HTTP/1.1\r\n" if client else b"HTTP/1.1 200 OK\r\n"
        d.feed(C2S if client else S2C, prefix + chunk, 1.0)
    d.close(2.0)
    assert d.failed is None or not d.failed.startswith("internal"), d.failed


def test_head_behind_a_large_chunked_response_is_cheap() -> None:
    # While a HEAD response is due the stream is cut at header block ends,
    # not byte by byte: a pipelined HEAD behind 4 MiB of chunks stays fast.
    d = HttpDissector()
    d.feed(C2S, b"GET / HTTP/1.1\r\nHost: h\r\n\r\nHEAD / HTTP/1.1\r\nHost: h\r\n\r\n", 1.0)
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    body = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 64 + b"0\r\n\r\n"
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"
    out: list[HttpRecord] = []
    for i in range(0, len(body + head), 65536):
        out += d.feed(S2C, (body + head)[i : i + 65536], 2.0)
    assert [(t.response_body_len) for t in transactions(out)] == [64 * 0x10000, 0]
    assert d.failed is None
