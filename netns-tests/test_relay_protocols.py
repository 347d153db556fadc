"""Protocol logs from real clients through `tunrelay run --log-dir`.

Real programs in the lab's namespaces: curl against a Python HTTP/1.1 server,
``openssl s_client`` against ``openssl s_server`` (TLS 1.2 and 1.3), Python
``ssl`` with ALPN ``h2`` against a Python TLS server, ``dig`` over UDP and TCP
against dnsmasq, and an aioquic client against an aioquic server. Servers run
in the server namespace on lab addresses only (198.18.0.0/15); the
certificate is self-signed, made here. Each test asserts the rows the relay
wrote to conn.log and the protocol's log, joined on ``uid``.

Bounds: a server listening within 10 s; a client finishes within 20 s; a log
row within ``ROW_TIMEOUT`` (a TCP flow is logged when the stack forgets it;
a UDP flow when it idles out: ``--udp-idle-timeout 2``).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import pytest

from relay.lab.certs import self_signed
from relay.lab.topology import Topology

from relay_harness import RelayProcess

ROW_TIMEOUT = 15.0
CLIENT_TIMEOUT = 20.0
EXAMPLE_ADDRESS = "198.18.2.77"

HTTP_SERVER = """
import http.server, sys

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def do_GET(self):
        body = ("path " + self.path + "\\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
"""

TLS_SERVER = """
import socket, ssl, sys

host, port, cert, key, alpn = sys.argv[1:6]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
ctx.set_alpn_protocols(alpn.split(","))
srv = socket.create_server((host, int(port)))
while True:
    conn, _ = srv.accept()
    conn.settimeout(10)
    try:
        with ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"echo " + tls.recv(100))
    except (OSError, ssl.SSLError):
        pass
"""

QUIC_SERVER = """
import asyncio, sys
from aioquic.asyncio import serve
from aioquic.quic.configuration import QuicConfiguration

async def main():
    config = QuicConfiguration(is_client=False, alpn_protocols=["h3"])
    config.load_cert_chain(sys.argv[3], sys.argv[4])
    await serve(sys.argv[1], int(sys.argv[2]), configuration=config)
    await asyncio.Future()

asyncio.run(main())
"""

QUIC_CLIENT = """
import asyncio, ssl, sys
from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration

async def main():
    config = QuicConfiguration(
        is_client=True, alpn_protocols=["h3"], server_name="quic.example.test",
        verify_mode=ssl.CERT_NONE,
    )
    async with connect(sys.argv[1], int(sys.argv[2]), configuration=config) as client:
        await client.ping()
    print("connected")

asyncio.run(asyncio.wait_for(main(), 15))
"""


# --- helpers -------------------------------------------------------------------------------


def make_cert(directory: Path) -> tuple[str, str]:
    """A self-signed P-256 certificate for example.test: (cert path, key path)."""
    return self_signed(directory, "example.test")


def run_client(
    topo: Topology, argv: Sequence[str], timeout: float = CLIENT_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """A client program in the client namespace, stdin closed, bounded."""
    cmd = [sys.executable, "-m", "relay.lab.nsexec", topo.ns("cli"), "--", *argv]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False
    )


def wait_listening(topo: Topology, port: int, *, udp: bool = False, timeout: float = 10.0) -> None:
    """Until something in the server namespace listens on ``port``."""
    cmd = [sys.executable, "-m", "relay.lab.nsexec", topo.ns("srv"), "--", "ss", "-Hn"]
    cmd.append("-lu" if udp else "-lt")
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False).stdout
        if f":{port} " in out:
            return
        assert time.monotonic() < deadline, f"nothing listens on port {port} after {timeout} s"
        time.sleep(0.05)


def serve(topo: Topology, argv: Sequence[str], port: int, *, udp: bool = False) -> None:
    topo.spawn("srv", argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(topo, port, udp=udp)


def read_rows(log_dir: Path, name: str) -> list[dict[str, Any]]:
    path = log_dir / f"{name}.log"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        rows.append(json.loads(line))  # a partial line would be a bug: let it fail
    return rows


def wait_rows(
    log_dir: Path,
    name: str,
    match: Callable[[dict[str, Any]], bool],
    count: int = 1,
    relay: RelayProcess | None = None,
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + ROW_TIMEOUT
    while True:
        rows = [r for r in read_rows(log_dir, name) if match(r)]
        if len(rows) >= count:
            return rows
        if time.monotonic() >= deadline:
            tail = relay.log_tail() if relay is not None else ""
            raise AssertionError(
                f"{name}.log: {len(rows)} of {count} rows after {ROW_TIMEOUT} s; all: "
                f"{read_rows(log_dir, name)}\nrelay log tail:\n{tail}"
            )
        time.sleep(0.05)


def conn_of(log_dir: Path, uid: str, relay: RelayProcess) -> dict[str, Any]:
    (row,) = wait_rows(log_dir, "conn", lambda r: r["uid"] == uid, relay=relay)
    return row


def check_ids(row: dict[str, Any], topo: Topology, port: int) -> None:
    assert (row["id.orig_h"], row["id.resp_h"], row["id.resp_p"]) == (
        topo.cli_v4,
        topo.srv_v4,
        port,
    )
    assert isinstance(row["ts"], float) and row["ts"] > 1.6e9
    assert row["uid"].startswith("C") and len(row["uid"]) == 18


@pytest.fixture(name="logged")
def logged_fixture(
    start_relay: Callable[..., RelayProcess], relay_files: Path
) -> tuple[RelayProcess, Path]:
    """The relay with ``--log-dir`` (and a short UDP idle timeout), and that directory."""
    log_dir = relay_files / "zeek"
    log_dir.mkdir()
    relay = start_relay(args=["--log-dir", str(log_dir), "--udp-idle-timeout", "2"])
    return relay, log_dir


# --- HTTP ----------------------------------------------------------------------------------


def test_curl_keep_alive_two_requests_on_one_connection(
    topology: Topology, logged: tuple[RelayProcess, Path]
) -> None:
    relay, log_dir = logged
    port = 8080
    serve(topology, [sys.executable, "-c", HTTP_SERVER, topology.srv_v4, str(port)], port)
    base = f"http://{topology.srv_v4}:{port}"
    done = run_client(topology, ["curl", "-sS", "--http1.1", f"{base}/first", f"{base}/second"])
    assert done.returncode == 0 and done.stdout == "path /first\npath /second\n", done
    rows = wait_rows(log_dir, "http", lambda r: r["id.resp_p"] == port, count=2, relay=relay)
    assert [(r["trans_depth"], r["uri"]) for r in rows] == [(1, "/first"), (2, "/second")]
    assert rows[0]["uid"] == rows[1]["uid"]  # one connection
    for r in rows:
        check_ids(r, topology, port)
        assert (r["method"], r["host"], r["version"]) == ("GET", f"{topology.srv_v4}:{port}", "1.1")
        assert r["user_agent"].startswith("curl/")
        assert (r["status_code"], r["status_msg"], r["request_body_len"]) == (200, "OK", 0)
    assert [r["response_body_len"] for r in rows] == [12, 13]
    conn = conn_of(log_dir, rows[0]["uid"], relay)
    check_ids(conn, topology, port)
    assert (conn["proto"], conn["service"], conn["conn_state"]) == ("tcp", "http", "SF")
    assert conn["history"].startswith("ShAD") and set(conn["history"]) == set("ShADdFf")
    assert conn["missed_bytes"] == 0 and conn["ended"] == "fin"
    assert conn["orig_pkts"] >= 5 and conn["resp_pkts"] >= 4  # SYN, ACK, 2 requests, FIN...
    assert conn["orig_bytes"] > 0 and conn["resp_bytes"] > 12 + 13  # headers and bodies


# --- TLS -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "version"), [("-tls1_2", "TLSv12"), ("-tls1_3", "TLSv13")])
def test_openssl_s_client(
    flag: str,
    version: str,
    topology: Topology,
    logged: tuple[RelayProcess, Path],
    tmp_path: Path,
) -> None:
    relay, log_dir = logged
    cert, key = make_cert(tmp_path)
    port = 4443
    server = ["openssl", "s_server", "-accept", f"{topology.srv_v4}:{port}", "-cert", cert]
    serve(topology, [*server, "-key", key, "-www", "-quiet"], port)
    client = ["openssl", "s_client", "-connect", f"{topology.srv_v4}:{port}"]
    done = run_client(topology, [*client, "-servername", "example.test", flag])
    assert "CONNECTED" in done.stdout, done
    (row,) = wait_rows(log_dir, "ssl", lambda r: r["id.resp_p"] == port, relay=relay)
    check_ids(row, topology, port)
    assert (row["version"], row["server_name"], row["established"]) == (
        version, "example.test", True,
    )  # fmt: skip
    assert row["cipher"].startswith("TLS_") and not row["cipher"].startswith("0x")
    assert row["resumed"] is False and "next_protocol" not in row  # no ALPN offered
    assert row["ja4"].startswith("t12d" if version == "TLSv12" else "t13d")
    assert row["ja4"].split("_")[0].endswith("00")  # no ALPN
    assert len(row["ja3"]) == 32 and int(row["ja3"], 16) >= 0
    conn = conn_of(log_dir, row["uid"], relay)
    assert (conn["service"], conn["missed_bytes"]) == ("ssl", 0)
    assert conn["history"].startswith("ShAD") and "d" in conn["history"]


@pytest.mark.parametrize(
    "tls", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"]
)
def test_python_ssl_with_alpn_h2(
    tls: ssl.TLSVersion, topology: Topology, logged: tuple[RelayProcess, Path], tmp_path: Path
) -> None:
    relay, log_dir = logged
    cert, key = make_cert(tmp_path)
    port = 8443
    argv = [sys.executable, "-c", TLS_SERVER, topology.srv_v4, str(port), cert, key, "h2"]
    serve(topology, argv, port)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.maximum_version = tls
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    sock = topology.socket("cli", socket.AF_INET)
    sock.settimeout(CLIENT_TIMEOUT)
    sock.connect((topology.srv_v4, port))
    with ctx.wrap_socket(sock, server_hostname="example.test") as client:
        assert client.selected_alpn_protocol() == "h2"
        client.sendall(b"hello")
        assert client.recv(100) == b"echo hello"
    (row,) = wait_rows(log_dir, "ssl", lambda r: r["id.resp_p"] == port, relay=relay)
    check_ids(row, topology, port)
    assert row["ja4"].split("_")[0].endswith("h2")  # the first ALPN offered: h2
    assert row["established"] is True and row["server_name"] == "example.test"
    if tls is ssl.TLSVersion.TLSv1_2:
        assert (row["version"], row["next_protocol"]) == ("TLSv12", "h2")
    else:
        assert row["version"] == "TLSv13" and "next_protocol" not in row  # encrypted
    conn = conn_of(log_dir, row["uid"], relay)
    assert conn["service"] == "ssl" and conn["orig_pkts"] >= 4


# --- DNS -----------------------------------------------------------------------------------


def start_dnsmasq(topo: Topology) -> None:
    """dnsmasq in the server namespace answering example.test with EXAMPLE_ADDRESS."""
    topo.spawn(
        "srv",
        [
            "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            f"--address=/example.test/{EXAMPLE_ADDRESS}", "--bind-interfaces", "--port=53",
            f"--listen-address={topo.srv_v4}", "--user=root", "--pid-file", "--log-facility=-",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    probe = topo.socket("srv", socket.AF_INET, socket.SOCK_DGRAM)
    # Non-blocking, as dnspython wants: a socket timeout would make a probe sent before
    # dnsmasq listens wait that long instead of the query's own 0.2 s.
    probe.setblocking(False)
    query = dns.message.make_query("ready.example.test", "A")
    deadline = time.monotonic() + 10.0
    while True:
        try:
            dns.query.udp(query, topo.srv_v4, timeout=0.2, sock=probe)
            return
        except (OSError, dns.exception.Timeout):
            assert time.monotonic() < deadline, "dnsmasq did not answer within 10 s"


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_dig(proto: str, topology: Topology, logged: tuple[RelayProcess, Path]) -> None:
    relay, log_dir = logged
    start_dnsmasq(topology)
    name = f"{proto}.example.test"
    argv = ["dig", f"@{topology.srv_v4}", name, "A", "+tries=1", "+time=5"]
    done = run_client(topology, [*argv, "+tcp"] if proto == "tcp" else argv)
    assert done.returncode == 0 and EXAMPLE_ADDRESS in done.stdout, done
    (row,) = wait_rows(log_dir, "dns", lambda r: r.get("query") == name, relay=relay)
    check_ids(row, topology, 53)
    assert (row["proto"], row["qtype_name"], row["qclass_name"]) == (proto, "A", "C_INTERNET")
    assert (row["rcode"], row["rcode_name"], row["answers"]) == (0, "NOERROR", [EXAMPLE_ADDRESS])
    assert len(row["TTLs"]) == 1 and isinstance(row["TTLs"][0], float)
    assert (row["RD"], row["RA"], row["AA"], row["TC"], row["rejected"]) == (
        True, True, True, False, False,
    )  # fmt: skip
    assert 0 <= row["rtt"] < 5 and 0 <= row["trans_id"] < 65536
    conn = conn_of(log_dir, row["uid"], relay)  # UDP: once the flow idled out (2 s)
    assert (conn["proto"], conn["service"]) == (proto, "dns")
    if proto == "udp":
        assert (conn["conn_state"], conn["history"]) == ("SF", "Dd")
        assert (conn["orig_pkts"], conn["resp_pkts"]) == (1, 1)
    else:
        assert conn["conn_state"] == "SF" and conn["history"].startswith("ShAD")


# --- QUIC ----------------------------------------------------------------------------------


def test_aioquic(topology: Topology, logged: tuple[RelayProcess, Path], tmp_path: Path) -> None:
    relay, log_dir = logged
    cert, key = make_cert(tmp_path)
    port = 4433
    argv = [sys.executable, "-c", QUIC_SERVER, topology.srv_v4, str(port), cert, key]
    serve(topology, argv, port, udp=True)
    done = run_client(topology, [sys.executable, "-c", QUIC_CLIENT, topology.srv_v4, str(port)])
    assert done.returncode == 0 and "connected" in done.stdout, done
    (row,) = wait_rows(log_dir, "quic", lambda r: r["id.resp_p"] == port, relay=relay)
    check_ids(row, topology, port)
    assert (row["server_name"], row["client_protocol"], row["version"]) == (
        "quic.example.test", "h3", "1",
    )  # fmt: skip
    assert row["ja4"].startswith("q13") and row["ja4"].split("_")[0].endswith("h3")
    assert len(row["client_initial_dcid"]) >= 16 and row["server_scid"]
    conn = conn_of(log_dir, row["uid"], relay)
    assert (conn["proto"], conn["service"], conn["conn_state"]) == ("udp", "quic", "SF")
    assert conn["orig_pkts"] >= 2 and conn["resp_pkts"] >= 2
    relay.stop()
    assert "; logs LogStats(" in (relay.exit_line() or ""), relay.describe()
    assert "dropped=0" in (relay.exit_line() or "")
