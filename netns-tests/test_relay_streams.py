"""Stream analyzers (``relay.analysis.streams``) in ``tunrelay run``, with real
clients and servers.

* an h11 parser written as straight-line code over the two streams reports
  the requests and responses of real curl through the relay (two requests on
  one keep-alive connection, and a POST with a body that the server answers
  501 and closes);
* a passive stream analyzer that never reads does not slow a flow: 32 MiB
  each way at once, byte-exact, in a time bounded by the same transfer in the
  same relay to a port it leaves alone; the relay logs that it detached it;
* an inline stream analyzer that reads slowly slows its own flow only: a
  download beside it, on another port, is not held back.

Bounds: sockets have ``IO_TIMEOUT``; transfers at most ``TRANSFER_LIMIT``;
curl at most 20 s; the parser's lines are waited for at most 15 s.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stream_analyzers import HTTP_LOG_ENV, IDLE_PORT, INLINE_DELAY, INLINE_PORT
from test_relay_protocols import HTTP_SERVER, run_client, serve

from relay.lab.topology import Topology

from relay_harness import (
    IO_TIMEOUT,
    MIB,
    Received,
    RelayProcess,
    Sent,
    expected_digest,
    recv_stream,
    run_parallel,
    send_pattern,
)

HERE = Path(__file__).resolve().parent
# The analyzers' directory, and this checkout's relay package ahead of any installed one.
PYTHONPATH = os.pathsep.join([str(HERE), str(HERE.parent)])
LINES_TIMEOUT = 15.0
TRANSFER_LIMIT = 60.0
SIZE = 32 * MIB
PLAIN_PORT, PLAIN_PORT_2 = 9100, 9103  # ports the test analyzers leave alone
C2S_STREAM, S2C_STREAM = 1, 2
# The transfer the analyzer ignores may take at most this much longer than the one
# it leaves alone: it is detached after its first MiB, so the rest is the same path.
SLOWDOWN_FACTOR, SLOWDOWN_CONSTANT = 2.0, 1.0


def wait_lines(path: Path, count: int, relay: RelayProcess) -> list[dict[str, Any]]:
    deadline = time.monotonic() + LINES_TIMEOUT
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return [json.loads(line) for line in lines]
        assert time.monotonic() < deadline, (
            f"{len(lines)} of {count} lines in {path}: {lines}\n{relay.log_tail()}"
        )
        time.sleep(0.05)


def test_an_h11_stream_parser_sees_curls_requests_and_responses(
    topology: Topology, start_relay: Callable[..., RelayProcess], relay_files: Path
) -> None:
    out = relay_files / "http.jsonl"
    relay = start_relay(
        analyzers=["stream_analyzers:H11Parser"],
        env={"PYTHONPATH": PYTHONPATH, HTTP_LOG_ENV: str(out)},
    )
    port = 8080
    serve(topology, [sys.executable, "-c", HTTP_SERVER, topology.srv_v4, str(port)], port)
    base = f"http://{topology.srv_v4}:{port}"
    curl = ["curl", "-sS", "--http1.1"]
    two = run_client(topology, [*curl, f"{base}/a", f"{base}/b"])  # one connection
    assert two.returncode == 0 and two.stdout == "path /a\npath /b\n", two
    post = run_client(topology, [*curl, "--data-binary", "name=value", f"{base}/form"])
    assert post.returncode == 0 and "501" in post.stdout, post
    a, b, form = wait_lines(out, 3, relay)
    assert (a["method"], a["target"], a["status"], a["response_body"]) == (
        "GET", "/a", 200, "path /a\n",
    )  # fmt: skip
    assert (b["method"], b["target"], b["status"], b["response_body"]) == (
        "GET", "/b", 200, "path /b\n",
    )  # fmt: skip
    assert a["uid"] == b["uid"] and a["request_body"] == b["request_body"] == ""
    assert (form["method"], form["target"], form["request_body"], form["status"]) == (
        "POST", "/form", "name=value", 501,
    )  # fmt: skip
    assert "501" in form["response_body"] and form["uid"] != a["uid"]
    # The same flows, as the relay logged them.
    for row in (a, form):
        flow = relay.flow_of(row["client_port"])
        assert (flow["uid"], flow["id.resp_p"], flow["ended"]) == (row["uid"], port, "fin")
    assert "fell behind" not in relay.log_text()


def bulk_both_ways(topology: Topology, port: int) -> float:
    """SIZE each way at once on one connection to ``port``; the seconds it took."""
    srv = topology.socket("srv", socket.AF_INET)
    srv.bind((topology.srv_v4, port))
    srv.listen(1)
    srv.settimeout(IO_TIMEOUT)
    client = topology.socket("cli", socket.AF_INET)
    client.settimeout(IO_TIMEOUT)
    t0 = time.perf_counter()
    client.connect((topology.srv_v4, port))
    conn, _ = srv.accept()
    conn.settimeout(IO_TIMEOUT)

    def client_send() -> Sent:
        return send_pattern(client, C2S_STREAM, SIZE)

    def client_recv() -> Received:
        return recv_stream(client)

    def server_send() -> Sent:
        return send_pattern(conn, S2C_STREAM, SIZE)

    def server_recv() -> Received:
        return recv_stream(conn)

    _, got_s2c, _, got_c2s = run_parallel(
        client_send, client_recv, server_send, server_recv, timeout=TRANSFER_LIMIT
    )
    seconds = time.perf_counter() - t0
    assert (got_c2s.count, got_c2s.sha256) == (SIZE, expected_digest(C2S_STREAM, SIZE))
    assert (got_s2c.count, got_s2c.sha256) == (SIZE, expected_digest(S2C_STREAM, SIZE))
    assert got_c2s.eof and got_s2c.eof
    for sock in (client, conn, srv):
        sock.close()
    return seconds


def test_a_passive_stream_analyzer_that_never_reads_does_not_slow_the_flow(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    relay = start_relay(analyzers=["stream_analyzers:Idle"], env={"PYTHONPATH": PYTHONPATH})
    # The baseline before and after: the machine is shared, and a load that changes
    # meanwhile must not pass for the analyzer's cost.
    before = bulk_both_ways(topology, PLAIN_PORT)  # Idle's stream returns at once
    ignored = bulk_both_ways(topology, IDLE_PORT)  # Idle never reads: detached
    after = bulk_both_ways(topology, PLAIN_PORT_2)
    plain = max(before, after)
    bound = SLOWDOWN_FACTOR * plain + SLOWDOWN_CONSTANT
    print(
        f"\n[streams] 32 MiB each way: plain {before:.2f} s and {after:.2f} s,"
        f" never read {ignored:.2f} s"
    )
    assert ignored <= bound, (
        f"with a stream analyzer that never reads: {ignored:.2f} s, over the bound "
        f"{bound:.2f} s ({SLOWDOWN_FACTOR:g} x {plain:.2f} s + {SLOWDOWN_CONSTANT:g} s)"
    )
    lines = [line for line in relay.log_text().splitlines() if "fell behind" in line]
    assert len(lines) == 1, lines  # one flow, one line
    assert f"-> [{topology.srv_v4}]:{IDLE_PORT}:" in lines[0], lines
    assert "detached from this flow" in lines[0], lines
    relay.stop()
    assert relay.counter("analyzer_errors") == 0  # falling behind is not an error


def test_an_inline_stream_analyzer_slows_only_its_own_flow(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    start_relay(analyzers=["stream_analyzers:SlowInline"], env={"PYTHONPATH": PYTHONPATH})
    size = 8 * MIB
    servers = {}
    for port in (PLAIN_PORT, INLINE_PORT):
        srv = topology.socket("srv", socket.AF_INET)
        srv.bind((topology.srv_v4, port))
        srv.listen(1)
        srv.settimeout(IO_TIMEOUT)
        servers[port] = srv
    clients = {}
    conns = {}
    for port, srv in servers.items():
        clients[port] = topology.socket("cli", socket.AF_INET)
        clients[port].settimeout(IO_TIMEOUT)
        clients[port].connect((topology.srv_v4, port))
        conns[port], _ = srv.accept()
        conns[port].settimeout(IO_TIMEOUT)
        clients[port].shutdown(socket.SHUT_WR)

    slow_received = [0]

    def slow_progress(total: int) -> None:
        slow_received[0] = total

    def download(port: int) -> Callable[[], Received]:
        def recv() -> Received:
            return recv_stream(
                clients[port], progress=slow_progress if port == INLINE_PORT else None
            )

        return recv

    def upload(port: int) -> Callable[[], Sent]:
        return lambda: send_pattern(conns[port], S2C_STREAM, size)

    t0 = time.perf_counter()
    fast_done: list[float] = []

    def fast() -> Received:
        got = download(PLAIN_PORT)()
        fast_done.append(time.perf_counter() - t0)
        return got

    results = run_parallel(
        upload(PLAIN_PORT), fast, upload(INLINE_PORT), download(INLINE_PORT),
        timeout=TRANSFER_LIMIT,
    )  # fmt: skip
    total = time.perf_counter() - t0
    got_fast, got_slow = results[1], results[3]
    for got in (got_fast, got_slow):
        assert (got.count, got.sha256) == (size, expected_digest(S2C_STREAM, size))
    print(f"\n[streams] 8 MiB: beside {fast_done[0]:.2f} s, inline-read {total:.2f} s")
    # The inline one waited for its analyzer: one read of at most recv_size (256 KiB)
    # per INLINE_DELAY ...
    assert total >= (size / (256 * 1024)) * INLINE_DELAY
    # ... and the other finished long before it.
    assert fast_done[0] < total / 2, (fast_done, total)
