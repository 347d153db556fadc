"""Tests of the netns harness itself (the plugin's ``tunrelay_lab`` without a relay), the
TUN device and the relay's routing.

(a) plain kernel forwarding through the gateway works (the baseline);
(b) with a TUN device and `route_client_nets_into_tun` the gateway hands the
    client's SYN to the TUN and delivers what is written into it;
(c) tear-down and NetConfig.close() leave nothing behind.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from typing import Any

import pytest
import trio
import trio.testing

from relay.datapath.tun import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TunDevice
from relay.host import netns
from relay.host.netconfig import NetConfig, route_client_nets_into_tun
from relay.lab.lab import Lab
from relay.lab.topology import Topology

# The plugin's lab without a relay: these test the namespaces, the TUN and routing.
pytestmark = pytest.mark.tunrelay(relay=False)
V4_V6 = pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["v4", "v6"])
TABLE = 5197
TCP_SYN, TCP_RST, TCP_ACK = 0x02, 0x04, 0x10
RTN_UNICAST = 1
# (family, conf/all/rp_filter in the gateway): 1 is strict mode, which many
# hosts use; it must not break either direction.
FAMILY_RP = pytest.mark.parametrize(
    ("family", "rp_filter"),
    [(socket.AF_INET, 0), (socket.AF_INET6, 0), (socket.AF_INET, 1)],
    ids=["v4", "v6", "v4-strict-rp"],
)


def addrs(topo: Topology, family: int) -> tuple[str, str]:
    """(client address, server address) for `family`."""
    if family == socket.AF_INET:
        return topo.cli_v4, topo.srv_v4
    return topo.cli_v6, topo.srv_v6


def listener(topo: Topology, family: int) -> tuple[socket.socket, int]:
    srv = topo.socket("srv", family)
    srv.bind((addrs(topo, family)[1], 0))
    srv.listen()
    return srv, srv.getsockname()[1]


# --- (a) baseline: kernel forwarding ----------------------------------------------


@V4_V6
def test_kernel_forwarding_baseline(tunrelay_lab: Lab, family: int) -> None:
    topology = tunrelay_lab.topology
    topology.enable_forwarding()
    cli_addr, srv_addr = addrs(topology, family)
    srv, port = listener(topology, family)
    srv.settimeout(5)
    client = topology.socket("cli", family)
    client.settimeout(5)
    client.connect((srv_addr, port))
    conn, peer = srv.accept()
    topology.defer(conn.close)
    assert peer[0] == cli_addr  # no NAT: the server sees the client itself
    client.sendall(b"ping")
    assert conn.recv(16) == b"ping"
    conn.sendall(b"pong")
    assert client.recv(16) == b"pong"


@pytest.mark.skipif(shutil.which("ping") is None, reason="ping (iputils-ping) not installed")
@V4_V6
def test_spawned_ping_crosses_the_gateway(tunrelay_lab: Lab, family: int) -> None:
    topology = tunrelay_lab.topology
    topology.enable_forwarding()
    flag = "-4" if family == socket.AF_INET else "-6"
    proc = topology.spawn(
        "cli",
        ["ping", flag, "-c", "1", "-W", "3", addrs(topology, family)[1]],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out


def test_spawn_runs_inside_the_namespace(tunrelay_lab: Lab) -> None:
    topology = tunrelay_lab.topology
    code = "import os; print(os.stat('/proc/self/ns/net').st_ino)"
    for role in ("cli", "gw", "srv"):
        proc = topology.spawn(role, [sys.executable, "-c", code], stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=10)
        assert int(out) == os.stat(netns.path(topology.ns(role))).st_ino


# --- (b) the gateway hands client packets to the TUN ------------------------------


def parse_tcp(packet: bytes) -> dict[str, Any] | None:
    """Minimal IPv4/IPv6 + TCP parse (no extension headers); None if not TCP."""
    version = packet[0] >> 4
    if version == 4:
        ihl = (packet[0] & 0x0F) * 4
        if packet[9] != socket.IPPROTO_TCP:
            return None
        src, dst, tcp = packet[12:16], packet[16:20], packet[ihl:]
    elif version == 6:
        if packet[6] != socket.IPPROTO_TCP:
            return None  # MLD, ND and router solicitations from the kernel
        src, dst, tcp = packet[8:24], packet[24:40], packet[40:]
    else:
        return None
    sport, dport, seq, ack, off_flags = struct.unpack("!HHIIH", tcp[:14])
    return {
        "src": str(ipaddress.ip_address(src)),
        "dst": str(ipaddress.ip_address(dst)),
        "sport": sport,
        "dport": dport,
        "seq": seq,
        "ack": ack,
        "flags": off_flags & 0x3F,
    }


def rst_ack(syn: dict[str, Any]) -> bytes:
    """What a closed port answers to `syn`, from the server's address."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6

    ip = IPv6 if ":" in syn["dst"] else IP
    packet = ip(src=syn["dst"], dst=syn["src"]) / TCP(
        sport=syn["dport"], dport=syn["sport"], flags="RA", seq=0, ack=(syn["seq"] + 1) % 2**32
    )
    return bytes(packet)


async def read_syn(tun: TunDevice, dst: str, dport: int) -> dict[str, Any]:
    with trio.fail_after(5):
        while True:
            await tun.wait_readable()
            for packet in tun.drain(max_batch=64):
                seg = parse_tcp(packet)
                if seg and seg["flags"] & TCP_SYN and seg["dst"] == dst and seg["dport"] == dport:
                    return seg


def open_tun_with_routing(topology: Topology, rp_filter: int = 0) -> tuple[TunDevice, NetConfig]:
    with netns.entered(topology.gw):
        tun = TunDevice.open("tun0")
    topology.defer(tun.close)
    cfg = topology.netconfig("gw")
    cfg.set_sysctl("net.ipv4.conf.all.rp_filter", rp_filter)
    route_client_nets_into_tun(cfg, "tun0", [topology.client_net_v4, topology.client_net_v6])
    return tun, cfg


@FAMILY_RP
async def test_tun_gets_client_syn_and_delivers_rst(
    tunrelay_lab: Lab, family: int, rp_filter: int
) -> None:
    topology = tunrelay_lab.topology
    tun, _ = open_tun_with_routing(topology, rp_filter)
    cli_addr, srv_addr = addrs(topology, family)
    # A real listener on the server: if the SYN were forwarded there instead
    # of into the TUN, connect() would succeed instead of being refused.
    srv, port = listener(topology, family)
    srv.setblocking(False)
    client = topology.socket("cli", family)
    client.setblocking(False)
    assert client.connect_ex((srv_addr, port)) == errno.EINPROGRESS
    client_port = client.getsockname()[1]

    syn = await read_syn(tun, srv_addr, port)
    assert (syn["src"], syn["sport"]) == (cli_addr, client_port)
    assert syn["flags"] & (TCP_SYN | TCP_ACK) == TCP_SYN

    tun.write_all([rst_ack(syn)])
    assert (tun.stats.packets_out, tun.stats.drops_out) == (1, 0)
    with trio.fail_after(5):
        await trio.lowlevel.wait_writable(client)
    assert client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED
    with pytest.raises(BlockingIOError):
        srv.accept()  # the server never saw the connection


@V4_V6
def test_gateway_own_sockets_bypass_the_tun(tunrelay_lab: Lab, family: int) -> None:
    """The relay's upstream sockets (source = gateway address) use the main table."""
    topology = tunrelay_lab.topology
    tun, _ = open_tun_with_routing(topology)
    srv, port = listener(topology, family)
    srv.settimeout(5)
    upstream = topology.socket("gw", family)
    upstream.settimeout(5)
    upstream.connect((addrs(topology, family)[1], port))
    conn, _ = srv.accept()
    conn.close()
    assert all(
        (seg := parse_tcp(p)) is None or seg["dport"] != port for p in tun.drain(max_batch=1000)
    )


# --- (c) nothing is left behind ------------------------------------------------------


def links(fd: int) -> list[str]:
    with netns.entered_fd(fd):
        ipr = netns.ipr_here()
    try:
        return sorted(link.get("ifname") for link in ipr.get_links())
    finally:
        ipr.close()


def test_teardown_removes_namespaces_links_and_processes(netns_root: None) -> None:
    topo = Topology.build()
    names = (topo.cli, topo.gw, topo.srv)
    # Hold the namespaces open so we can look inside after tear-down: the
    # links must be gone even while something still references a namespace.
    fds = [netns.open_fd(name) for name in names]
    try:
        proc = topo.spawn("srv", ["sleep", "60"])
        with netns.entered(topo.gw):
            tun = TunDevice.open("tun0")
        topo.defer(tun.close)
        sock = topo.socket("cli")
        assert links(fds[1]) == ["gw-cli", "gw-srv", "lo", "tun0"]
        topo.close()
        assert topo.setup_seconds < 1.0 and topo.teardown_seconds < 1.0
        assert not any(netns.exists(name) for name in names)
        assert not set(names) & set(os.listdir(netns.NETNS_RUN_DIR))
        assert proc.returncode == -signal.SIGTERM
        assert tun.closed and sock.fileno() == -1
        assert [links(fd) for fd in fds] == [["lo"], ["lo"], ["lo"]]
        topo.close()  # a second close is a no-op
    finally:
        for fd in fds:
            os.close(fd)
        topo.close()


def rules(ipr: Any, family: int) -> list[Any]:
    return [r for r in ipr.get_rules(family=family) if r.get_attr("FRA_TABLE") == TABLE]


def table_routes(ipr: Any, family: int) -> list[Any]:
    return list(ipr.get_routes(family=family, table=TABLE))


def test_netconfig_close_undoes_everything(tunrelay_lab: Lab) -> None:
    topology = tunrelay_lab.topology
    with netns.entered(topology.gw):
        tun = TunDevice.open("tun0", mtu=1500, txqueuelen=4000)
    topology.defer(tun.close)
    observer = netns.ipr(topology.gw)
    topology.defer(observer.close)
    cfg = NetConfig(topology.gw)
    try:
        assert cfg.read_sysctl("net.ipv4.ip_forward") == "0"
        route_client_nets_into_tun(cfg, "tun0", [topology.client_net_v4, topology.client_net_v6])
        cfg.add_address("tun0", "198.18.3.1/32")
        cfg.add_address("tun0", "fd00:3::1/128")
        cfg.add_route("198.18.4.0/24", gateway=topology.gw_srv_v4, table=TABLE + 1)
        cfg.set_mtu("tun0", 1400)
        cfg.set_txqueuelen("tun0", 1000)
        for family in (socket.AF_INET, socket.AF_INET6):
            assert len(rules(observer, family)) == 1
            kinds = sorted(r["type"] for r in table_routes(observer, family))
            assert kinds == [RTN_UNICAST]  # default dev tun0
        assert cfg.read_sysctl("net.ipv4.ip_forward") == "1"
        assert cfg.read_sysctl("net.ipv6.conf.all.forwarding") == "1"
        assert cfg.read_sysctl("net/ipv4/conf/tun0/rp_filter") == "0"
    finally:
        cfg.close()
    for family in (socket.AF_INET, socket.AF_INET6):
        assert rules(observer, family) == []
        assert table_routes(observer, family) == []
    assert list(observer.get_routes(family=socket.AF_INET, table=TABLE + 1)) == []
    (index,) = observer.link_lookup(ifname="tun0")
    assert [
        a.get("address")
        for a in observer.get_addr(index=index)
        if not a.get("address").startswith("fe80")
    ] == []
    link = observer.link("get", index=index)[0]
    assert (link.get("mtu"), link.get("txqlen")) == (1500, 4000)
    with NetConfig(topology.gw) as check:
        assert check.read_sysctl("net.ipv4.ip_forward") == "0"
        assert check.read_sysctl("net.ipv6.conf.all.forwarding") == "0"
    cfg.close()  # safe twice
    assert cfg.pending_undo == []


def test_netconfig_undo_tolerates_objects_already_gone(
    tunrelay_lab: Lab, caplog: pytest.LogCaptureFixture
) -> None:
    topology = tunrelay_lab.topology
    with netns.entered(topology.gw):
        tun = TunDevice.open("tun0")
    topology.defer(tun.close)
    cfg = NetConfig(topology.gw)
    route_client_nets_into_tun(cfg, "tun0", [topology.client_net_v4, topology.client_net_v6])
    cfg.add_address("tun0", "198.18.3.1/32")
    tun.close()  # the link, its address, routes and sysctls vanish with it
    with caplog.at_level(logging.WARNING, logger="relay.host.netconfig"):
        cfg.close()
    assert caplog.records == []
    with NetConfig(topology.gw) as check:
        for family in (socket.AF_INET, socket.AF_INET6):
            assert rules(check.ipr, family) == []  # rules do not go with the link
        assert check.read_sysctl("net.ipv4.ip_forward") == "0"


@FAMILY_RP
def test_clients_still_reach_the_gateway_itself(
    tunrelay_lab: Lab, family: int, rp_filter: int
) -> None:
    """The gateway's own address inside the client net (a VPN server's usual
    set-up) must not have its replies to clients routed into the TUN."""
    topology = tunrelay_lab.topology
    tun, _ = open_tun_with_routing(topology, rp_filter)
    gw_addr = topology.gw_cli_v4 if family == socket.AF_INET else topology.gw_cli_v6
    service = topology.socket("gw", family)
    service.bind((gw_addr, 0))
    service.listen()
    service.settimeout(5)
    client = topology.socket("cli", family)
    client.settimeout(5)
    client.connect((gw_addr, service.getsockname()[1]))
    conn, _ = service.accept()
    topology.defer(conn.close)
    conn.sendall(b"hello")
    assert client.recv(16) == b"hello"
    assert [seg for p in tun.drain(max_batch=1000) if (seg := parse_tcp(p))] == []


async def test_tun_device_options(tunrelay_lab: Lab) -> None:
    topology = tunrelay_lab.topology
    with netns.entered(topology.gw):
        tun = TunDevice.open("tun0", mtu=1400, txqueuelen=3000)
        topology.defer(tun.close)
        with pytest.raises(OSError) as busy:
            TunDevice.open("tun0")  # taken, and not multi-queue
        assert busy.value.errno == errno.EBUSY
        queues = [TunDevice.open("mq0", vnet_hdr=True, multi_queue=True) for _ in range(2)]
        for q in queues:
            topology.defer(q.close)
    assert not os.get_blocking(tun.fileno()) and not os.get_inheritable(tun.fileno())
    observer = netns.ipr(topology.gw)
    topology.defer(observer.close)
    link = observer.link("get", index=observer.link_lookup(ifname="tun0")[0])[0]
    assert (link.get("mtu"), link.get("txqlen"), link["flags"] & 1) == (1400, 3000, 1)

    queues[0].set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    with pytest.raises(OSError) as invalid:
        queues[1].set_offload(TUN_F_TSO4)  # TSO needs CSUM
    assert invalid.value.errno == errno.EINVAL
    assert tun.drain(max_batch=0) == []

    async def waiter() -> None:
        with pytest.raises(trio.ClosedResourceError):
            while True:  # the kernel may send MLD/ND packets meanwhile
                await tun.wait_readable()
                tun.drain(max_batch=64)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            tun.close()  # wakes the parked reader
    tun.close()
    assert tun.closed
    with pytest.raises(trio.ClosedResourceError):
        tun.drain(max_batch=1)  # never os.read() an fd number that may be reused
