"""`tunrelay run` exposed: spoofed sources, privileges, and what a crash leaves.

* ``--iif``: a packet with a client's source address that arrives on the
  gateway's uplink (sent from the server namespace, with rp_filter off) is not
  relayed; without ``--iif`` the same packet is (the control).
* Workers run as ``nobody`` with no capabilities and no_new_privs; an analyzer
  cannot open a raw or packet socket or become root; TCP, UDP and ping still
  relay. The supervisor keeps CAP_NET_ADMIN and CAP_KILL only.
* A run as an ordinary user holding only CAP_NET_ADMIN (as systemd's
  ``AmbientCapabilities=CAP_NET_ADMIN`` with ``NoNewPrivileges=yes``) works.
* ``kill -9`` of every relay process: client traffic is refused, not forwarded
  around the relay (a sniffer on the server's link sees none of it), until
  ``tunrelay cleanup`` restores the gateway exactly; with
  ``--no-fail-closed-routing`` it is forwarded (the control). A run started
  right after a ``kill -9`` cleans up after its predecessor and relays.
* A second run over a live one, and a start that meets a conflicting rule,
  fail with one line and leave nothing behind.

Bounds: every wait and every subprocess is bounded (relay start 20 s, a
`tunrelay` command 30 s, socket operations 5 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from relay.host import netns
from relay.lab.topology import Topology
from relay.service.privileges import CAP_KILL, CAP_NET_ADMIN
from stack.wire.tcp import SYN, build_tcp_packet

from relay_harness import (
    TUN,
    RelayProcess,
    accept,
    addrs,
    connect,
    gateway_snapshot,
    listener,
    proc_status,
)

V4_V6 = pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
HERE = Path(__file__).resolve().parent
NOBODY = 65534
ETH_P_ALL = 0x0003
ETH_TYPE = {socket.AF_INET: 0x0800, socket.AF_INET6: 0x86DD}
COMMAND_TIMEOUT = 30.0
SHORT = 5.0
NO_CAPS = "0000000000000000"


def tunrelay(topo: Topology, args: Sequence[str], prefix: Sequence[str] = ()) -> tuple[int, str]:
    """Run ``tunrelay ARGS`` in the gateway (bounded); (exit status, output)."""
    proc = topo.spawn(
        "gw", [*prefix, sys.executable, "-m", "relay.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, reachable_by="nobody",
    )  # fmt: skip
    out, _ = proc.communicate(timeout=COMMAND_TIMEOUT)
    print(f"\n[tunrelay {' '.join(args[:1])}] exit {proc.returncode}\n{out.strip()}")
    return proc.returncode, out


def run_args(topo: Topology, state_dir: Path, *extra: str) -> list[str]:
    return [
        "run", "--tun", TUN, "--client-net", topo.client_net_v4,
        "--client-net", topo.client_net_v6, "--workers", "1", "--state-dir", str(state_dir),
        *extra,
    ]  # fmt: skip


def exchange(topo: Topology, family: int) -> str:
    """One TCP round trip from the client to a new server listener; the peer the
    server saw (the gateway's address when relayed)."""
    srv, port = listener(topo, family)
    client = connect(topo, family, port)
    conn = accept(srv)
    with client, conn:
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.sendall(b"pong")
        assert client.recv(4) == b"pong"
        return str(conn.getpeername()[0])


def udp_echo_once(topo: Topology, family: int, timeout: float = SHORT) -> bytes:
    """A UDP datagram to a one-shot echo on the server; the reply."""
    server = topo.socket("srv", family, socket.SOCK_DGRAM)
    server.bind((addrs(topo, family)[1], 0))
    server.settimeout(timeout)
    client = topo.socket("cli", family, socket.SOCK_DGRAM)
    client.settimeout(timeout)
    client.sendto(b"hello", server.getsockname()[:2])
    data, peer = server.recvfrom(100)
    server.sendto(data, peer)
    return client.recv(100)


def ping(topo: Topology, target: str) -> int:
    proc = topo.spawn(
        "cli", ["ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", target],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    out, _ = proc.communicate(timeout=15)
    print(f"\n[ping {target}] exit {proc.returncode}\n{out.strip()}")
    return proc.returncode


def caps(*numbers: int) -> str:
    return f"{sum(1 << n for n in numbers):016x}"


# --- spoofed sources -----------------------------------------------------------------


def gateway_uplink_mac(topo: Topology) -> bytes:
    ipr = netns.ipr(topo.gw)
    try:
        (link,) = ipr.link("get", ifname=topo.gw_srv_if)
        return bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))
    finally:
        ipr.close()


def send_spoofed_syn(topo: Topology, family: int, sport: int, dport: int) -> None:
    """A SYN from the client's address to the server, sent from the server's side of
    the gateway's uplink straight to the gateway's MAC (as an attacker there would)."""
    cli, srv = addrs(topo, family)
    packet = build_tcp_packet(
        socket.inet_pton(family, cli), socket.inet_pton(family, srv),
        sport, dport, 1000, 0, SYN, 65535,
    )  # fmt: skip
    with netns.entered(topo.srv):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
    with sock:
        sock.sendto(packet, (topo.srv_if, ETH_TYPE[family], 0, 0, gateway_uplink_mac(topo)))


def loose_reverse_path_filter(topo: Topology) -> None:
    """rp_filter off on the gateway, so only the relay's rule can keep spoofs out
    (IPv6 has no rp_filter at all). Undone at tear-down."""
    cfg = topo.netconfig("gw")
    for conf in ("all", "default", topo.gw_srv_if):
        cfg.set_sysctl(f"/proc/sys/net/ipv4/conf/{conf}/rp_filter", 0)


@V4_V6
def test_iif_keeps_packets_spoofed_on_the_uplink_out(
    topology: Topology, start_relay: Callable[..., RelayProcess], family: int
) -> None:
    loose_reverse_path_filter(topology)
    gw_uplink = topology.gw_srv_v4 if family == socket.AF_INET else topology.gw_srv_v6
    srv, port = listener(topology, family)

    # Control: without --iif the spoofed SYN is relayed (the server gets a
    # connection from the gateway) and its SYN-ACK goes to the real client.
    relay = start_relay()
    send_spoofed_syn(topology, family, 40001, port)
    srv.settimeout(SHORT)
    conn, peer = srv.accept()
    conn.close()
    assert peer[0] == gw_uplink
    relay.stop()
    assert [r["id.orig_p"] for r in relay.flow_records()] == [40001]

    relay = start_relay(args=["--iif", topology.gw_cli_if])
    send_spoofed_syn(topology, family, 40002, port)
    srv.settimeout(2.0)
    with pytest.raises(TimeoutError):
        srv.accept()  # the kernel routed it as any router would: no relay, no handshake
    assert exchange(topology, family) == gw_uplink  # the real client is still relayed
    relay.stop()
    assert 40002 not in [r["id.orig_p"] for r in relay.flow_records()]
    assert "only from gw-cli" in relay.log_text()


# --- privileges ----------------------------------------------------------------------


def test_workers_run_as_nobody_without_capabilities(
    topology: Topology, start_relay: Callable[..., RelayProcess], relay_files: Path
) -> None:
    probe_log = relay_files / "probe.jsonl"
    relay = start_relay(
        analyzers=["probe_analyzers:PrivilegeProbe"],
        env={"PYTHONPATH": str(HERE), "TUNRELAY_PROBE_LOG": str(probe_log)},
        args=["--workers", "2"],
    )
    workers = relay.worker_pids()
    assert len(workers) == 2, workers
    for pid in workers:
        status = proc_status(pid)
        assert status["Uid"].split() == [str(NOBODY)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(NOBODY)] * 4, status["Gid"]
        assert status["Groups"] == ""
        for key in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
            assert status[key] == NO_CAPS, (key, status[key])
        assert status["NoNewPrivs"] == "1"
    supervisor = proc_status(relay.pid)
    assert supervisor["Uid"].split()[1] == "0"
    for key in ("CapEff", "CapPrm", "CapBnd"):
        assert supervisor[key] == caps(CAP_NET_ADMIN, CAP_KILL), (key, supervisor[key])
    assert supervisor["CapAmb"] == supervisor["CapInh"] == NO_CAPS
    assert supervisor["NoNewPrivs"] == "1"

    for family in (socket.AF_INET, socket.AF_INET6):
        gw_uplink = topology.gw_srv_v4 if family == socket.AF_INET else topology.gw_srv_v6
        assert exchange(topology, family) == gw_uplink
        assert udp_echo_once(topology, family) == b"hello"
        assert ping(topology, addrs(topology, family)[1]) == 0

    relay.stop()
    records = [json.loads(line) for line in probe_log.read_text().splitlines()]
    assert {r["proto"] for r in records} == {"tcp", "udp", "icmp"}
    for r in records:
        assert r["pid"] in workers and r["uid"] == NOBODY
        assert r["raw_socket"].startswith("PermissionError"), r
        assert r["packet_socket"].startswith("PermissionError"), r
        assert r["setuid_root"].startswith("PermissionError"), r


SETPRIV_NET_ADMIN_ONLY = [
    "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
    "--inh-caps=-all,+net_admin", "--ambient-caps=-all,+net_admin",
    "--bounding-set=-all,+net_admin", "--no-new-privs",
]  # fmt: skip


def tun_node_for_everyone() -> list[str]:
    """A prefix that gives the relay a /dev/net/tun it may open, if the host's is
    root's only (distributions make it 0666; some containers do not): a 0666 node
    of the same device in a private mount namespace of the relay's alone."""
    if os.stat("/dev/net/tun").st_mode & 0o006 == 0o006:
        return []
    script = (
        "mount -t tmpfs -o mode=0755 tmpfs /dev/net && "
        'mknod -m 0666 /dev/net/tun c 10 200 && exec "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


def test_runs_as_a_user_with_only_cap_net_admin(
    topology: Topology, start_relay: Callable[..., RelayProcess], relay_files: Path
) -> None:
    # The state directory is the user's own, as systemd's RuntimeDirectory= makes it.
    prefix = [*tun_node_for_everyone(), *SETPRIV_NET_ADMIN_ONLY]
    relay = start_relay(prefix=prefix, state_dir=relay_files)
    supervisor = proc_status(relay.pid)
    assert supervisor["Uid"].split() == [str(NOBODY)] * 4
    assert supervisor["CapEff"] == supervisor["CapPrm"] == caps(CAP_NET_ADMIN)
    worker = proc_status(relay.worker_pid)
    assert worker["Uid"].split() == [str(NOBODY)] * 4
    assert (worker["CapEff"], worker["CapPrm"], worker["CapAmb"]) == (NO_CAPS,) * 3
    assert worker["NoNewPrivs"] == "1"
    for family in (socket.AF_INET, socket.AF_INET6):
        exchange(topology, family)
        assert ping(topology, addrs(topology, family)[1]) == 0
    # relay.stop() at tear-down: a clean exit restores everything, as root's would.


# --- a crash ---------------------------------------------------------------------------


def kill9(relay: RelayProcess, *, workers_too: bool = True) -> None:
    """SIGKILL the supervisor and its workers, as an OOM kill might, or only the
    supervisor (its workers get SIGTERM from the kernel); wait for them all."""
    pids = [relay.pid, *relay.worker_pids()]
    for pid in pids if workers_too else pids[:1]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    relay.proc.wait(timeout=SHORT)
    relay.stopped = True  # nothing for the harness to stop
    deadline = time.monotonic() + SHORT
    while any(_running(pid) for pid in pids[1:]):
        assert time.monotonic() < deadline, f"workers still running: {pids[1:]}"
        time.sleep(0.02)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


class Sniffer:
    """The IP packets the server's link receives (a packet socket in its namespace)."""

    def __init__(self, topo: Topology) -> None:
        with netns.entered(topo.srv):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        topo.defer(self.sock.close)
        self.sock.bind((topo.srv_if, ETH_P_ALL))
        self.sock.setblocking(False)

    def sources(self) -> set[str]:
        """The source addresses of the IP packets received since the last call."""
        found = set()
        for _ in range(100_000):
            try:
                packet, where = self.sock.recvfrom(65536)
            except BlockingIOError:
                break
            if where[2] == socket.PACKET_OUTGOING:
                continue  # the server's own
            if packet and packet[0] >> 4 == 4:
                found.add(socket.inet_ntop(socket.AF_INET, packet[12:16]))
            elif packet and packet[0] >> 4 == 6:
                found.add(socket.inet_ntop(socket.AF_INET6, packet[8:24]))
        return found


def client_traffic_after_a_crash(topo: Topology) -> None:
    """TCP, UDP and ping from the client to the server; each must fail."""
    for family in (socket.AF_INET, socket.AF_INET6):
        srv, port = listener(topo, family)
        with pytest.raises(OSError):
            connect(topo, family, port, timeout=SHORT).close()
        srv.setblocking(False)
        with pytest.raises(BlockingIOError):
            srv.accept()
        with pytest.raises(OSError):
            udp_echo_once(topo, family, timeout=1.0)
        assert ping(topo, addrs(topo, family)[1]) != 0


@pytest.mark.parametrize("fail_closed", [True, False], ids=["fail-closed", "opted-out"])
def test_kill9_fails_closed_and_cleanup_restores_the_gateway(
    topology: Topology, start_relay: Callable[..., RelayProcess], fail_closed: bool
) -> None:
    relay = start_relay(args=[] if fail_closed else ["--no-fail-closed-routing"])
    sniffer = Sniffer(topology)
    assert exchange(topology, socket.AF_INET) == topology.gw_srv_v4
    seen = sniffer.sources()  # the sniffer works: the relay's address, no client's
    assert topology.gw_srv_v4 in seen and not seen & {topology.cli_v4, topology.cli_v6}

    kill9(relay)
    state = json.loads(relay.run_state.read_text())
    assert state["pid"] == relay.pid and state["tun"] == TUN
    kinds = sorted({c["kind"] for c in state["changes"]})
    assert kinds == ["route", "rule", "sysctl"]
    clients = {topology.cli_v4, topology.cli_v6}
    if fail_closed:
        client_traffic_after_a_crash(topology)
        assert sniffer.sources() & clients == set()
    else:
        # Opted out: the kernel forwards the clients with their own addresses.
        assert exchange(topology, socket.AF_INET) == topology.cli_v4
        assert sniffer.sources() & clients == {topology.cli_v4}

    state_dir = str(relay.run_state.parent)
    status, out = tunrelay(topology, ["cleanup", "--tun", TUN, "--state-dir", state_dir])
    assert status == 0, out
    assert "cleaned up after pid" in out
    assert gateway_snapshot(topology) == relay.gateway_before
    assert not relay.run_state.exists()
    status, out = tunrelay(topology, ["cleanup", "--state-dir", state_dir])
    assert status == 0 and "nothing to clean up" in out


def test_a_run_after_kill9_cleans_up_and_relays(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    first = start_relay(args=["--workers", "2"])
    kill9(first, workers_too=False)  # PR_SET_PDEATHSIG still stops them (set after the drop)
    # The same state directory; compared at its stop with the gateway before the
    # first run: nothing of the dead run may be taken for the original state.
    second = start_relay(before=first.gateway_before)
    assert "died without cleaning up" in second.log_text()
    for family in (socket.AF_INET, socket.AF_INET6):
        exchange(topology, family)
        assert ping(topology, addrs(topology, family)[1]) == 0


# --- refusing to start -------------------------------------------------------------------


def test_a_second_run_refuses_to_start_over_a_live_one(
    topology: Topology, relay: RelayProcess, tmp_path: Path
) -> None:
    status, out = tunrelay(topology, run_args(topology, relay.run_state.parent))
    assert status == 2, out
    assert out.strip().splitlines() == [
        f"tunrelay run: a relay is already running on {TUN} (pid {relay.pid}, "
        f"state {relay.run_state}); stop it first"
    ]
    # Another state directory: the TUN itself is taken, and not attached to.
    status, out = tunrelay(topology, run_args(topology, tmp_path / "other"))
    assert status == 1, out
    assert out.strip().splitlines()[-1] == (
        f"tunrelay run: cannot open TUN '{TUN}': a network device of that name exists already"
    )
    assert "Traceback" not in out
    relay.check_running()
    exchange(topology, socket.AF_INET)


def test_a_conflicting_rule_is_one_line_and_leaves_nothing(
    topology: Topology, tmp_path: Path
) -> None:
    cfg = topology.netconfig("gw")
    cfg.add_rule(topology.client_net_v4, 5197, 5197)  # e.g. left by an older version
    before = gateway_snapshot(topology)
    status, out = tunrelay(topology, run_args(topology, tmp_path))
    assert status == 1, out
    assert "Traceback" not in out
    assert out.strip().splitlines()[-1] == (
        f"tunrelay run: cannot add rule 5197: from {topology.client_net_v4} lookup 5197: "
        "File exists"
    )
    assert gateway_snapshot(topology) == before
    assert list(tmp_path.glob("*.json")) == []


def test_bad_start_settings_are_one_line(topology: Topology, tmp_path: Path) -> None:
    cases: list[tuple[list[str], Any, str]] = [
        (["--user", "no-such-user"], 2, "tunrelay run: --user: no such user 'no-such-user'"),
        (["--user", "root"], 2, "tunrelay run: --user: 'root' is root or in group root; the "
         "workers must not run as root"),
        (["--iif", TUN], 2, f"tunrelay run: --iif: '{TUN}' is the TUN device itself"),
    ]  # fmt: skip
    for extra, want_status, want in cases:
        status, out = tunrelay(topology, run_args(topology, tmp_path, *extra))
        assert (status, out.strip()) == (want_status, want)
