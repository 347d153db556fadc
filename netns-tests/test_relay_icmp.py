"""ICMP through `tunrelay run`: ping relayed for real, unreachable as without a relay.

``ping`` (iputils) in the client namespace against the server namespace, over
IPv4 and IPv6. The relay answers nothing itself: replies come from the server
through the relay's ICMP sockets, and a ping to an unrouted address fails
with the ICMP error a router would send ("Destination Net Unreachable"; with
plain kernel forwarding the gateway sends the same). The relay opens those
sockets by widening ``net.ipv4.ping_group_range`` in its namespace, and puts
it back on exit; the same works for a service user.

Bounds: each ping run 15 s.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Sequence

import pytest

from relay.host import netns
from relay.host.netconfig import PING_GROUP_RANGE, enable_ping_sockets
from relay.lab.lab import Lab
from relay.lab.topology import Topology

from relay_harness import (
    RelayProcess,
    addrs,
)

V4_V6 = pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
UNROUTED = {socket.AF_INET: "198.18.99.1", socket.AF_INET6: "fd00:99::1"}
PING_TIMEOUT = 15.0
NOBODY = 65534


def ping(topo: Topology, target: str, *args: str) -> tuple[int, str]:
    """Run iputils ``ping`` in the client namespace; (exit status, output)."""
    proc = topo.spawn(
        "cli",
        ["ping", "-n", *args, target],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out, _ = proc.communicate(timeout=PING_TIMEOUT)
    print(f"\n[ping {' '.join(args)} {target}] exit {proc.returncode}\n{out.strip()}")
    return proc.returncode, out


def received(out: str) -> int:
    m = re.search(r"(\d+) received", out)
    assert m, out
    return int(m.group(1))


def stat(relay: RelayProcess, name: str) -> int:
    found = re.findall(rf"\b{name}=(\d+)", relay.exit_line() or "")
    assert found, f"no {name} in {relay.exit_line()!r}"
    return int(found[0])


def gw_ping_range(topo: Topology) -> str:
    with netns.entered(topo.gw), open("/proc/sys/net/ipv4/ping_group_range") as f:
        return " ".join(f.read().split())


@V4_V6
def test_ping_is_relayed_to_the_real_destination(tunrelay_lab: Lab, family: int) -> None:
    topology, relay = tunrelay_lab.topology, RelayProcess.of(tunrelay_lab)
    server = addrs(topology, family)[1]
    status, out = ping(topology, server, "-c", "3", "-i", "0.2", "-W", "2")
    assert status == 0 and received(out) == 3, out
    assert re.search(rf"from {re.escape(server)}: icmp_seq=1 ", out), out
    relay.stop()
    (flow,) = [r for r in relay.flow_records() if r["proto"] == "icmp"]
    assert (flow["id.orig_h"], flow["id.resp_h"]) == (addrs(topology, family)[0], server)
    assert flow["orig_bytes"] == flow["resp_bytes"] == 3 * 56  # ping's default payload
    assert stat(relay, "echo_in") == stat(relay, "echo_out") == 3
    assert gw_ping_range(topology) == "1 0"  # the relay put the sysctl back


@V4_V6
def test_large_ping_is_reassembled_and_its_reply_fragmented(tunrelay_lab: Lab, family: int) -> None:
    topology, relay = tunrelay_lab.topology, RelayProcess.of(tunrelay_lab)
    server = addrs(topology, family)[1]
    status, out = ping(topology, server, "-c", "2", "-i", "0.2", "-W", "2", "-s", "4000")
    assert status == 0 and received(out) == 2, out
    relay.stop()
    assert stat(relay, "reassembled") == 2
    assert stat(relay, "fragments_out") >= 6


@V4_V6
def test_ping_to_an_unrouted_address_fails_as_without_a_relay(
    tunrelay_lab: Lab, family: int
) -> None:
    topology = tunrelay_lab.topology
    RelayProcess.of(tunrelay_lab)  # checked at tear-down
    status, out = ping(topology, UNROUTED[family], "-c", "2", "-i", "0.2", "-W", "1")
    # Kernel forwarding: "From 198.18.1.1 icmp_seq=1 Destination Net Unreachable" (v6:
    # "Destination unreachable: No route"), "+2 errors", exit status 1.
    assert status == 1, out
    assert received(out) == 0
    expected = "Destination Net Unreachable" if family == socket.AF_INET else "No route"
    assert out.count(expected) == 2, out
    assert "+2 errors" in out


def test_ping_to_a_silent_address_gets_no_reply(tunrelay_lab: Lab) -> None:
    # On the server's link but nobody there: the neighbour lookup fails. The relay
    # never answers an echo itself.
    topology = tunrelay_lab.topology
    RelayProcess.of(tunrelay_lab)  # checked at tear-down
    status, out = ping(topology, "198.18.2.99", "-c", "1", "-W", "1")
    assert status != 0 and received(out) == 0, out
    assert "bytes from" not in out


def _nobody_can_open_icmp_socket(topo: Topology) -> bool:
    code = (
        "import os, socket\n"
        f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "socket.socket(socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6).close()\n"
        "socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()\n"
    )
    argv: Sequence[str] = [sys.executable, "-c", code]
    proc = topo.spawn("gw", argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc.wait(timeout=10) == 0


@pytest.mark.tunrelay(relay=False)
def test_enable_ping_sockets_serves_a_service_user_and_is_undone(
    tunrelay_lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    topology = tunrelay_lab.topology
    assert gw_ping_range(topology) == "1 0"
    assert not _nobody_can_open_icmp_socket(topology)
    net = topology.netconfig("gw")
    monkeypatch.setattr("os.getegid", lambda: NOBODY)  # as if the relay ran as nobody
    assert enable_ping_sockets(net)
    assert gw_ping_range(topology) == f"{NOBODY} {NOBODY}"
    assert _nobody_can_open_icmp_socket(topology)
    assert any(PING_GROUP_RANGE.replace(".", "/") in u for u in net.pending_undo)
    net.close()
    assert gw_ping_range(topology) == "1 0"
