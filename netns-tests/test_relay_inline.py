"""Inline analyzers and domain blocking with real clients and servers.

* an analyzer rewrites a server's response to a different length: the client
  gets the rewrite byte-exact, and both TCP connections end with FINs;
* an analyzer's ``Verdict.RESET`` in the middle of a 32 MiB download: the
  client and the server both see a reset, and the flow ends (logged);
* ``--block-domain``: ``dig`` gets NXDOMAIN (UDP and TCP) from the relay,
  ``openssl s_client -servername`` a blocked name is reset before the server
  gets a byte, ``curl`` with a blocked Host gets 403, and other names on the
  same servers work.

Bounds: every socket has ``IO_TIMEOUT``; clients run at most 20 s; log rows
are waited for at most 15 s.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from inline_analyzers import RESET_AFTER, RESET_PORT, REWRITE_PORT
from test_relay_protocols import (
    EXAMPLE_ADDRESS,
    HTTP_SERVER,
    run_client,
    serve,
    start_dnsmasq,
    wait_rows,
)

from relay.lab.topology import Topology

from relay_harness import IO_TIMEOUT, RelayProcess, run_parallel

HERE = Path(__file__).resolve().parent
BLOCKED = "*.blocked.example"


def server_on(topo: Topology, port: int) -> socket.socket:
    srv = topo.socket("srv", socket.AF_INET)
    srv.bind((topo.srv_v4, port))
    srv.listen(8)
    srv.settimeout(IO_TIMEOUT)
    return srv


def client_to(topo: Topology, port: int) -> socket.socket:
    c = topo.socket("cli", socket.AF_INET)
    c.settimeout(IO_TIMEOUT)
    c.connect((topo.srv_v4, port))
    return c


def recv_all(sock: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := sock.recv(1 << 16):
        buf += chunk
    return bytes(buf)


@pytest.fixture(name="inline_relay")
def inline_relay_fixture(start_relay: Callable[..., RelayProcess]) -> RelayProcess:
    return start_relay(
        analyzers=["inline_analyzers:ResponseRewriter", "inline_analyzers:ResetMidDownload"],
        env={"PYTHONPATH": str(HERE)},
    )


def test_a_rewritten_response_arrives_byte_exact_and_both_sides_close_cleanly(
    topology: Topology, inline_relay: RelayProcess
) -> None:
    body = b"ab" * 300_000  # the rewrite (3x the b's) is far beyond one send space
    srv = server_on(topology, REWRITE_PORT)
    client = client_to(topology, REWRITE_PORT)
    conn, _ = srv.accept()
    conn.settimeout(IO_TIMEOUT)

    def server() -> bytes:
        conn.sendall(body)
        conn.shutdown(socket.SHUT_WR)
        return recv_all(conn)  # the client's FIN, relayed

    def client_side() -> bytes:
        got = recv_all(client)  # the server's FIN, after the rewrite
        client.shutdown(socket.SHUT_WR)
        return got

    from_client, got = run_parallel(server, client_side, timeout=60)
    assert from_client == b""
    assert got == body.replace(b"b", b"BBB")
    flow = inline_relay.flow_of(client.getsockname()[1])
    assert (flow["ended"], flow["resp_bytes"], flow["resp_bytes_forwarded"]) == (
        "fin", len(body), 2 * len(body),
    )  # fmt: skip
    assert flow["orig_bytes"] == flow["orig_bytes_forwarded"] == 0
    client.close()
    conn.close()


def test_reset_in_the_middle_of_a_32mib_download_resets_both_ends(
    topology: Topology, inline_relay: RelayProcess
) -> None:
    size = 32 << 20
    srv = server_on(topology, RESET_PORT)
    client = client_to(topology, RESET_PORT)
    conn, _ = srv.accept()
    conn.settimeout(IO_TIMEOUT)
    errors: dict[str, BaseException] = {}
    received = [0]

    def server() -> None:
        block = bytes(1 << 20)
        try:
            for _ in range(size >> 20):
                conn.sendall(block)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # the reset arrives here if the bytes all fit in buffers
        except OSError as exc:
            errors["server"] = exc

    def client_side() -> None:
        try:
            while chunk := client.recv(1 << 16):
                received[0] += len(chunk)
        except OSError as exc:
            errors["client"] = exc

    run_parallel(server, client_side, timeout=60)
    assert isinstance(errors.get("client"), ConnectionResetError), errors
    assert isinstance(errors.get("server"), ConnectionResetError | BrokenPipeError), errors
    assert 0 < received[0] <= RESET_AFTER, received  # the judged bytes never arrived
    flow = inline_relay.flow_of(client.getsockname()[1])
    assert flow["ended"] == "rejected" and flow["resp_bytes_forwarded"] < size
    client.close()
    conn.close()


# --- domain blocking ------------------------------------------------------------------------


@pytest.fixture(name="blocking")
def blocking_fixture(
    start_relay: Callable[..., RelayProcess], relay_files: Path
) -> tuple[RelayProcess, Path]:
    log_dir = relay_files / "zeek"
    log_dir.mkdir()
    relay = start_relay(
        args=["--block-domain", BLOCKED, "--log-dir", str(log_dir), "--udp-idle-timeout", "2"]
    )
    return relay, log_dir


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_dig_gets_nxdomain_for_a_blocked_name(
    proto: str, topology: Topology, blocking: tuple[RelayProcess, Path]
) -> None:
    relay, log_dir = blocking
    start_dnsmasq(topology)
    tcp = ["+tcp"] if proto == "tcp" else []
    dig = ["dig", f"@{topology.srv_v4}", "A", "+tries=1", "+time=5", *tcp]
    done = run_client(topology, [*dig, "www.blocked.example"])
    assert done.returncode == 0 and "status: NXDOMAIN" in done.stdout, done
    ok = run_client(topology, [*dig, "ok.example.test"])  # the same server, another name
    assert ok.returncode == 0 and EXAMPLE_ADDRESS in ok.stdout, ok
    (row,) = wait_rows(
        log_dir, "dns", lambda r: r.get("query") == "www.blocked.example", relay=relay
    )
    assert (row["proto"], row["rcode_name"], row["rule"]) == (
        proto, "NXDOMAIN", f"block-domain {BLOCKED}",
    )  # fmt: skip
    (conn,) = wait_rows(log_dir, "conn", lambda r: r["uid"] == row["uid"], relay=relay)
    assert (conn["ended"], conn["rule"]) == ("blocked", f"block-domain {BLOCKED}")


def test_openssl_with_a_blocked_sni_is_reset_before_the_server_sees_a_byte(
    topology: Topology, blocking: tuple[RelayProcess, Path]
) -> None:
    relay, log_dir = blocking
    port = 4443
    srv = server_on(topology, port)
    got: list[int] = []

    def server() -> None:
        for _ in range(2):
            conn, _ = srv.accept()
            conn.settimeout(IO_TIMEOUT)
            n = 0
            with contextlib.suppress(OSError):
                n = len(conn.recv(1 << 16))
            got.append(n)
            conn.close()

    t = threading.Thread(target=server, daemon=True)
    t.start()
    s_client = ["openssl", "s_client", "-connect", f"{topology.srv_v4}:{port}"]
    blocked = run_client(topology, [*s_client, "-servername", "www.blocked.example"])
    assert blocked.returncode != 0, blocked
    allowed = run_client(topology, [*s_client, "-servername", "fine.example"])
    t.join(IO_TIMEOUT)
    assert got[0] == 0 and got[1] > 0, (got, allowed)  # no ClientHello; then one
    (row,) = wait_rows(
        log_dir, "ssl", lambda r: r.get("server_name") == "www.blocked.example", relay=relay
    )
    assert row["rule"] == f"block-domain {BLOCKED}" and row["established"] is False
    (conn,) = wait_rows(log_dir, "conn", lambda r: r["uid"] == row["uid"], relay=relay)
    assert (conn["ended"], conn["orig_bytes_forwarded"]) == ("blocked", 0)


def test_curl_with_a_blocked_host_gets_403_and_other_names_work(
    topology: Topology, blocking: tuple[RelayProcess, Path]
) -> None:
    relay, log_dir = blocking
    port = 8080
    serve(topology, [sys.executable, "-c", HTTP_SERVER, topology.srv_v4, str(port)], port)
    url = f"http://{topology.srv_v4}:{port}/x"
    curl = ["curl", "-sS", "--http1.1", "-o", "-", "-w", "%{http_code}"]
    blocked = run_client(topology, [*curl, "-H", "Host: ads.blocked.example", url])
    assert blocked.stdout.endswith("403") and "Blocked: ads.blocked.example" in blocked.stdout
    ok = run_client(topology, [*curl, "-H", "Host: www.example.test", url])
    assert ok.stdout == "path /x\n200", ok
    (row,) = wait_rows(
        log_dir, "http", lambda r: r.get("host") == "ads.blocked.example", relay=relay
    )
    assert (row["status_code"], row["rule"]) == (403, f"block-domain {BLOCKED}")
    (conn,) = wait_rows(log_dir, "conn", lambda r: r["uid"] == row["uid"], relay=relay)
    assert (conn["ended"], conn["orig_bytes_forwarded"]) == ("blocked", 0)
    relay.stop()
    assert relay.counter("flows_blocked") == 1
