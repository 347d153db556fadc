"""UDP through `tunrelay run`: DNS, a 10,000-datagram echo, fragments, closed ports, clean-up.

Real clients and servers: ``dig`` in the client namespace against ``dnsmasq``
in the server namespace; Python UDP sockets elsewhere. The relay runs with the
harness's default analyzers (``StreamDigest`` and the flow log), so every
datagram also passes the analyzer path.

Bounds: any one receive ``IO_TIMEOUT`` (5 s: a lost datagram fails the test,
it is never retried); dnsmasq ready within 10 s; 1,000 flows idle out (1 s
idle timeout) within 30 s, and the relay's fds are back within 10 s more.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.query
import pytest

from relay.host import netns
from relay.lab.lab import Lab
from relay.lab.topology import Topology

from relay_harness import (
    RelayProcess,
    addrs,
)

V4_V6 = pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
HERE = Path(__file__).resolve().parent
IO_TIMEOUT = 5.0
ECHO_COUNT = 10_000
ECHO_WINDOW = 64  # datagrams in flight: well within every socket buffer on the way
FLOWS = 1000
IDLE = 1.0
EXAMPLE_ADDRESS = "198.18.2.77"


# --- helpers -------------------------------------------------------------------------------


def udp_socket(topo: Topology, ns: str, family: int) -> socket.socket:
    """A UDP socket in namespace ``ns``, closed at tear-down."""
    sock = topo.socket(ns, family, socket.SOCK_DGRAM)
    sock.settimeout(IO_TIMEOUT)
    return sock


def echo_server(topo: Topology, family: int) -> int:
    """A UDP echo server thread in the server namespace; returns its port.

    It stops when its socket is closed at tear-down.
    """
    sock = udp_socket(topo, "srv", family)
    sock.bind((addrs(topo, family)[1], 0))
    sock.settimeout(None)

    def serve() -> None:
        try:
            while True:
                data, peer = sock.recvfrom(65536)
                sock.sendto(data, peer)
        except OSError:
            pass  # closed

    threading.Thread(target=serve, daemon=True, name="udp-echo").start()
    port: int = sock.getsockname()[1]
    return port


def start_dnsmasq(topo: Topology) -> None:
    """dnsmasq in the server namespace answering example.test with EXAMPLE_ADDRESS."""
    topo.spawn(
        "srv",
        [
            "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            f"--address=/example.test/{EXAMPLE_ADDRESS}", "--bind-interfaces", "--port=53",
            f"--listen-address={topo.srv_v4}", f"--listen-address={topo.srv_v6}",
            "--user=root", "--pid-file", "--log-facility=-",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    probe = udp_socket(topo, "srv", socket.AF_INET)
    # Non-blocking, as dnspython wants: with IO_TIMEOUT a probe sent before dnsmasq
    # listens would wait that long instead of the query's own 0.2 s.
    probe.setblocking(False)
    query = dns.message.make_query("ready.example.test", "A")
    deadline = time.monotonic() + 10.0
    while True:
        try:
            dns.query.udp(query, topo.srv_v4, timeout=0.2, sock=probe)
            return
        except (OSError, dns.exception.Timeout):
            assert time.monotonic() < deadline, "dnsmasq did not answer within 10 s"


def stats_of(relay: RelayProcess, name: str) -> int:
    """A counter from the relay's exit line ("stopped: stack ...; relay ...")."""
    line = relay.exit_line() or ""
    found = re.findall(rf"\b{name}=(\d+)", line)
    assert found, f"no {name} in {line!r}"
    return int(found[0])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)


# --- DNS -----------------------------------------------------------------------------------


@V4_V6
@pytest.mark.tunrelay(
    analyzers=["udp_analyzers:DnsRecorder"],  # from this directory (the plugin's pythonpath)
    env={"TUNRELAY_UDP_LOG": "{files}/udp.jsonl"},  # written by the workers (nobody)
    setup=lambda lab: start_dnsmasq(lab.topology),
)
def test_dns_resolves_through_the_relay_and_the_analyzer_sees_the_name(
    tunrelay_lab: Lab, family: int
) -> None:
    topology, relay = tunrelay_lab.topology, RelayProcess.of(tunrelay_lab)
    udp_log = tunrelay_lab.files / "udp.jsonl"
    server = addrs(topology, family)[1]
    name = f"host-{family}.example.test"
    proc = topology.spawn(
        "cli",
        ["dig", "+short", "+time=2", "+tries=1", f"@{server}", name, "A"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = proc.communicate(timeout=10)
    print(f"\n[dns] dig @{server} {name}: {out.strip()!r}")
    assert proc.returncode == 0 and out.split() == [EXAMPLE_ADDRESS], out
    wait_for(lambda: udp_log.exists() and len(udp_log.read_text().splitlines()) >= 2, 5, "log")
    records = [json.loads(line) for line in udp_log.read_text().splitlines()]
    query = [r for r in records if r["direction"] == "c2s"]
    answer = [r for r in records if r["direction"] == "s2c"]
    assert len(query) == len(answer) == 1, records
    rec = query[0]
    assert (rec["server_ip"], rec["server_port"], rec["proto"]) == (server, 53, "udp")
    q = dns.message.from_wire(bytes.fromhex(query[0]["data"]))
    assert str(q.question[0].name) == name + "."
    a = dns.message.from_wire(bytes.fromhex(answer[0]["data"]))
    assert [rr.address for rr in a.answer[0]] == [EXAMPLE_ADDRESS]
    relay.stop()
    (flow,) = [r for r in relay.flow_records() if r["id.resp_p"] == 53]
    assert (flow["proto"], flow["id.resp_h"]) == ("udp", server)
    assert flow["orig_bytes"] == len(bytes.fromhex(rec["data"]))


# --- datagram echo ---------------------------------------------------------------------------


@V4_V6
def test_10000_datagrams_echoed_exactly(tunrelay_lab: Lab, family: int) -> None:
    topology, relay = tunrelay_lab.topology, RelayProcess.of(tunrelay_lab)
    port = echo_server(topology, family)
    client = udp_socket(topology, "cli", family)
    client.connect((addrs(topology, family)[1], port))
    rng = random.Random(0xD6)
    sizes = [1, 4, 1400] + [rng.randint(4, 1400) for _ in range(ECHO_COUNT - 3)]
    payloads = []
    for i, n in enumerate(sizes):
        body = struct.pack("!I", i) + rng.randbytes(max(0, n - 4))
        payloads.append(body[:n] if n < 4 else body)
    got = [0] * ECHO_COUNT
    sent = received = 0
    t0 = time.perf_counter()
    while received < ECHO_COUNT:
        while sent < ECHO_COUNT and sent - received < ECHO_WINDOW:
            client.send(payloads[sent])
            sent += 1
        try:
            data = client.recv(2048)
        except TimeoutError:
            pytest.fail(f"datagram lost: {received} of {sent} sent came back")
        i = struct.unpack_from("!I", data)[0] if len(data) >= 4 else 0  # only #0 is shorter
        assert data == payloads[i], f"datagram {i} came back changed"
        got[i] += 1
        received += 1
    seconds = time.perf_counter() - t0
    assert got == [1] * ECHO_COUNT
    total = sum(sizes)
    print(
        f"\n[udp echo] {ECHO_COUNT} datagrams ({total / 1e6:.1f} MB) each way in {seconds:.2f} s:"
        f" {ECHO_COUNT / seconds:,.0f} round trips/s"
    )
    # The relay saw (and hashed) every datagram, in order, both ways.
    relay.stop()
    rec = relay.digest_of(client.getsockname()[1])
    digest = hashlib.sha256(b"".join(payloads)).hexdigest()
    assert rec["proto"] == "udp"
    assert rec["c2s"] == {"bytes": total, "sha256": digest}
    assert rec["s2c"] == {"bytes": total, "sha256": digest}


# --- fragments -------------------------------------------------------------------------------


@V4_V6
def test_4000_byte_datagram_is_reassembled_both_ways(tunrelay_lab: Lab, family: int) -> None:
    topology, relay = tunrelay_lab.topology, RelayProcess.of(tunrelay_lab)
    server_sock = udp_socket(topology, "srv", family)
    server_sock.bind((addrs(topology, family)[1], 0))
    client = udp_socket(topology, "cli", family)
    client.connect(server_sock.getsockname()[:2])
    request = random.Random(1).randbytes(4000)
    reply = random.Random(2).randbytes(4000)
    client.send(request)
    data, peer = server_sock.recvfrom(65536)
    assert data == request  # the client's fragments, reassembled by the relay, sent whole
    server_sock.sendto(reply, peer)
    assert client.recv(65536) == reply  # fragmented by the relay to the 1500 MTU
    relay.stop()
    assert stats_of(relay, "reassembled") >= 1
    assert stats_of(relay, "fragments_out") >= 3


# --- closed port -----------------------------------------------------------------------------


@V4_V6
def test_closed_port_refuses_the_connected_client_socket(tunrelay_lab: Lab, family: int) -> None:
    topology, relay = tunrelay_lab.topology, RelayProcess.of(tunrelay_lab)
    with netns.entered(topology.srv):
        holder = socket.socket(family, socket.SOCK_DGRAM)
    holder.bind((addrs(topology, family)[1], 0))
    port = holder.getsockname()[1]
    holder.close()  # closed: the server's kernel answers with ICMP port unreachable
    client = udp_socket(topology, "cli", family)
    client.connect((addrs(topology, family)[1], port))
    t0 = time.perf_counter()
    client.send(b"anyone there?")
    with pytest.raises(ConnectionRefusedError):
        client.recv(100)
    print(f"\n[udp refused] ECONNREFUSED after {(time.perf_counter() - t0) * 1000:.1f} ms")
    relay.stop()
    assert stats_of(relay, "icmp_relayed") >= 1


# --- flow clean-up ---------------------------------------------------------------------------


@pytest.mark.tunrelay(args=["--udp-idle-timeout", str(IDLE)])
def test_1000_flows_idle_out_without_leaking_sockets(tunrelay_lab: Lab) -> None:
    topology, relay = tunrelay_lab.topology, RelayProcess.of(tunrelay_lab)
    port = echo_server(topology, socket.AF_INET)
    server = topology.srv_v4
    fds_before = fd_count(relay.worker_pid)
    t0 = time.perf_counter()
    for i in range(FLOWS):
        with netns.entered(topology.cli):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.settimeout(IO_TIMEOUT)
            sock.bind((topology.cli_v4, 30000 + i))  # distinct flows (ephemeral ports repeat)
            sock.connect((server, port))
            sock.send(b"flow %d" % i)
            assert sock.recv(100) == b"flow %d" % i
    opened = time.perf_counter() - t0
    peak = fd_count(relay.worker_pid)
    print(f"\n[udp flows] {FLOWS} flows opened in {opened:.2f} s; relay fds {fds_before} -> {peak}")
    relay.wait_records(
        "flow", lambda r: r.get("proto") == "udp" and r.get("ended") == "idle", FLOWS, timeout=30
    )
    wait_for(lambda: fd_count(relay.worker_pid) <= fds_before, 10, "relay fds back to the start")
    fds = fd_count(relay.worker_pid)
    print(f"[udp flows] all idle after {time.perf_counter() - t0:.2f} s; fds {fds}")
    relay.stop()
    assert stats_of(relay, "flows_opened") == FLOWS
    assert stats_of(relay, "flows_closed") == FLOWS
    assert stats_of(relay, "datagram_flows_active") == 0
