"""``tunrelay run --capture-dir``: what a flow carried, on disk, read back by tshark.

* 32 MiB each way at once on one connection, with 5% loss on the client's
  link (``relay.lab.impair.Wire``, client -> gateway): the flow's ``.c2s`` and
  ``.s2c`` files hash to what each end sent, and ``tshark -z follow,tcp,raw``
  on its ``.pcap`` gives back both directions byte-exact; tshark's expert
  analysis finds nothing wrong with the synthetic connection.
* an HTTP exchange over IPv4 (selected by a bare CIDR term): tshark's HTTP
  dissector finds the request and the response, the FINs are in order, and
  the expert analysis is clean.
* ``--capture-filter``: a UDP flow to the selected port gets a ``.pcap`` of its
  datagrams, both ways; a TCP flow and a UDP flow to other ports get nothing.

Bounds: the transfer at most TRANSFER_LIMIT s; tshark at most TSHARK_LIMIT s;
every socket has ``IO_TIMEOUT``; log rows are waited for at most 15 s.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from scapy.layers.inet import IP, UDP
from scapy.utils import rdpcap
from test_relay_lossy import check_exact, transfer

from relay.lab.impair import Impairment, Wire
from relay.lab.topology import Topology

from relay_harness import IO_TIMEOUT, MIB, RelayProcess, accept, connect, listener

SIZE = 32 * MIB
TRANSFER_LIMIT = 240.0
TSHARK_LIMIT = 300.0
LOSS = Impairment(loss=0.05)

pytestmark = pytest.mark.skipif(
    shutil.which("tshark") is None, reason="needs tshark (scripts/setup)"
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def tshark(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["tshark", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )  # fmt: skip


def as_data(port: int) -> tuple[str, ...]:
    """Decode the flow's port as plain data. The test streams are random bytes, which
    a heuristic dissector may claim (Thrift did, on one port pair), asking TCP to
    reassemble ever longer "PDUs" and turning 2 s into minutes."""
    return ("-d", f"tcp.port=={port},data")


def follow_digests(pcap: Path, port: int) -> tuple[str, dict[str, tuple[int, str]]]:
    """``tshark -q -z follow,tcp,raw,0``: (node 0's "ip:port", {node: (bytes, sha256)}).

    Node 0 is the connection's initiator; its data lines start at the margin,
    node 1's with a tab. The hex is decoded and hashed as it streams."""
    proc = tshark("-r", str(pcap), *as_data(port), "-q", "-z", "follow,tcp,raw,0")
    assert proc.stdout is not None
    hashes = {"0": hashlib.sha256(), "1": hashlib.sha256()}
    counts = {"0": 0, "1": 0}
    node0 = ""
    in_data = False
    deadline = time.monotonic() + TSHARK_LIMIT
    try:
        for raw in proc.stdout:
            line = raw.rstrip(b"\n")
            if line.startswith(b"Node 0: "):
                node0 = line[8:].decode()
            elif line.startswith(b"Node 1: "):
                in_data = True
            elif line.startswith(b"====="):
                in_data = False
            elif in_data and line:
                node = "1" if line.startswith(b"\t") else "0"
                data = bytes.fromhex(line.strip().decode())
                hashes[node].update(data)
                counts[node] += len(data)
            assert time.monotonic() < deadline, f"tshark took over {TSHARK_LIMIT} s"
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return node0, {n: (counts[n], hashes[n].hexdigest()) for n in hashes}


def expert_problems(pcap: Path, data_port: int | None = None) -> str:
    """tshark's expert-info summary, only its Errors and Warnings sections
    (``data_port``: decode that port as plain data, ``as_data``)."""
    decode = as_data(data_port) if data_port is not None else ()
    out = subprocess.run(
        ["tshark", "-r", str(pcap), *decode, "-q", "-z", "expert,warn"],
        capture_output=True, timeout=TSHARK_LIMIT, check=True,
    ).stdout.decode()  # fmt: skip
    return "\n".join(ln for ln in out.splitlines() if ln.startswith(("Errors", "Warns")))


def test_32mib_each_way_under_5pct_loss_is_captured_byte_exact(
    topology: Topology, start_relay: Callable[..., RelayProcess], relay_files: Path
) -> None:
    wire = Wire.insert(topology)
    capture_dir = relay_files / "capture"  # created by the relay, 0700, for its workers
    relay = start_relay(args=["--capture-dir", str(capture_dir)])
    assert capture_dir.stat().st_mode & 0o777 == 0o700
    wire.start(LOSS, Impairment(), seed=0xCA97)
    try:
        t0 = time.monotonic()
        got = transfer(topology, socket.AF_INET6, SIZE, TRANSFER_LIMIT)
        flow = relay.flow_of(got.client_port, timeout=30.0)
    finally:
        stats = wire.stop()
    print(f"\n  transfer {time.monotonic() - t0:.1f} s; {stats.summary()}")
    assert stats.c2g.get("lost", 0) > 0, "the wire dropped nothing: not a lossy test"
    check_exact(got, SIZE)

    uid = flow["uid"]
    files = sorted(p.name for p in capture_dir.iterdir())
    assert files == [f"{uid}.c2s", f"{uid}.pcap", f"{uid}.s2c"], files
    assert sha256_file(capture_dir / f"{uid}.c2s") == got.sent_c2s.sha256
    assert sha256_file(capture_dir / f"{uid}.s2c") == got.sent_s2c.sha256

    pcap = capture_dir / f"{uid}.pcap"
    t0 = time.monotonic()
    node0, streams = follow_digests(pcap, flow["id.resp_p"])
    seconds = time.monotonic() - t0
    print(f"  tshark follow on {pcap.stat().st_size / MIB:.1f} MiB of pcap: {seconds:.1f} s")
    assert node0 == f"[{topology.cli_v6}]:{got.client_port}"
    assert streams["0"] == (SIZE, got.sent_c2s.sha256)
    assert streams["1"] == (SIZE, got.sent_s2c.sha256)
    assert expert_problems(pcap, flow["id.resp_p"]) == ""


def udp_server(topo: Topology) -> tuple[socket.socket, int]:
    srv = topo.socket("srv", socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind((topo.srv_v4, 0))
    srv.settimeout(IO_TIMEOUT)
    return srv, srv.getsockname()[1]


def udp_exchange(topo: Topology, srv: socket.socket, port: int, n: int) -> int:
    """``n`` datagrams from the client, each answered; the client's port."""
    cli = topo.socket("cli", socket.AF_INET, socket.SOCK_DGRAM)
    cli.settimeout(IO_TIMEOUT)
    cli.connect((topo.srv_v4, port))
    for i in range(n):
        cli.send(b"ping %d" % i)
        data, peer = srv.recvfrom(2048)
        srv.sendto(b"pong " + data, peer)
        assert cli.recv(2048) == b"pong ping %d" % i
    cport: int = cli.getsockname()[1]
    return cport


def test_udp_capture_and_the_filter(
    topology: Topology, start_relay: Callable[..., RelayProcess], relay_files: Path
) -> None:
    selected, port = udp_server(topology)
    other_udp, other_port = udp_server(topology)
    capture_dir = relay_files / "capture"
    relay = start_relay(
        args=["--capture-dir", str(capture_dir), "--capture-filter", f"port {port}"]
    )
    cport = udp_exchange(topology, selected, port, 5)
    other_cport = udp_exchange(topology, other_udp, other_port, 2)
    srv, tcp_port = listener(topology, socket.AF_INET)
    client = connect(topology, socket.AF_INET, tcp_port)
    conn = accept(srv)
    client.sendall(b"not captured")
    assert conn.recv(100) == b"not captured"
    client.close()
    conn.close()
    tcp_cport = client_port_of(relay, tcp_port)
    relay.stop()  # every flow ends: the UDP ones too (their capture is written at the end)

    udp = relay.flow_of(cport)
    uid = udp["uid"]
    assert sorted(p.name for p in capture_dir.iterdir()) == [f"{uid}.pcap"]
    packets = rdpcap(str(capture_dir / f"{uid}.pcap"))
    got = [
        (p[IP].src, p[UDP].sport, p[IP].dst, p[UDP].dport, bytes(p[UDP].payload)) for p in packets
    ]
    cli, srv_ip = topology.cli_v4, topology.srv_v4
    want = []
    for i in range(5):
        want.append((cli, cport, srv_ip, port, b"ping %d" % i))
        want.append((srv_ip, port, cli, cport, b"pong ping %d" % i))
    assert got == want
    assert relay.flow_of(other_cport)["uid"] != uid
    assert relay.flow_of(tcp_cport)["uid"] != uid


def client_port_of(relay: RelayProcess, server_port: int) -> int:
    (rec,) = relay.wait_records("flow", lambda r: r.get("id.resp_p") == server_port)
    port: int = rec["id.orig_p"]
    return port


REQUEST = b"GET /capture HTTP/1.1\r\nHost: capture.example\r\nUser-Agent: test\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


def test_an_http_exchange_reads_back_in_tshark_as_http(
    topology: Topology, start_relay: Callable[..., RelayProcess], relay_files: Path
) -> None:
    """A real client and server over IPv4, selected by a bare CIDR term: tshark's HTTP
    dissector finds the request and the response in the pcap, and the client's
    FIN-first close is there in order."""
    capture_dir = relay_files / "capture"
    relay = start_relay(
        args=["--capture-dir", str(capture_dir), "--capture-filter", f"{topology.srv_v4}/32"]
    )
    srv = topology.socket("srv", socket.AF_INET)
    srv.bind((topology.srv_v4, 80))
    srv.listen(1)
    srv.settimeout(IO_TIMEOUT)
    client = connect(topology, socket.AF_INET, 80)
    conn = accept(srv)
    client.sendall(REQUEST)
    got = b""
    while len(got) < len(REQUEST):
        got += conn.recv(4096)
    conn.sendall(RESPONSE)
    reply = b""
    while len(reply) < len(RESPONSE):
        reply += client.recv(4096)
    client.shutdown(socket.SHUT_WR)  # the client's FIN first
    assert conn.recv(10) == b""
    conn.close()
    assert client.recv(10) == b""
    client.close()
    flow = relay.flow_of(client_port_of(relay, 80))
    uid = flow["uid"]
    assert (capture_dir / f"{uid}.c2s").read_bytes() == REQUEST
    assert (capture_dir / f"{uid}.s2c").read_bytes() == RESPONSE
    pcap = capture_dir / f"{uid}.pcap"
    fields = subprocess.run(
        ["tshark", "-r", str(pcap), "-Y", "http", "-T", "fields",
         "-e", "ip.src", "-e", "http.request.method", "-e", "http.request.uri",
         "-e", "http.host", "-e", "http.response.code", "-e", "http.file_data"],
        capture_output=True, timeout=60, check=True, text=True,
    ).stdout.splitlines()  # fmt: skip
    cli, srv_ip = topology.cli_v4, topology.srv_v4
    assert [ln.split("\t")[:5] for ln in fields] == [
        [cli, "GET", "/capture", "capture.example", ""],
        [srv_ip, "", "", "", "200"],
    ], fields
    flags = subprocess.run(
        ["tshark", "-r", str(pcap), "-T", "fields", "-e", "ip.src", "-e", "tcp.flags.str"],
        capture_output=True, timeout=60, check=True, text=True,
    ).stdout.split("\n")  # fmt: skip
    closing = [ln.split("\t") for ln in flags if "F" in ln.split("\t")[-1]]
    assert [src for src, _ in closing] == [cli, srv_ip]  # the client's FIN, then the server's
    assert expert_problems(pcap) == ""  # with the HTTP dissector
