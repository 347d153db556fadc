"""The egress policy through `tunrelay run` (relay.datapath.egress), with real clients and servers.

The lab gets, before the relay starts (all torn down with it):

* a second client, namespace ``<base>-cl2`` behind its own gateway link
  (198.18.4.2, fd00:4::2), which the relay is told is a client network
  (packets between clients go through the relay too, and are denied by
  default);
* on the server's link: 169.254.169.254 (a cloud metadata address; routed
  from the gateway to the server) and 198.18.3.2 / fd00:3::2, a network
  the tests deny with ``--deny``: it stands in for the private ranges,
  which only unit tests cover (no packet ever goes to them);
* services that a denied flow must never reach: a TCP listener and a UDP
  socket on each of those, and on the gateway's 127.0.0.1, ::1 and own
  address 198.18.2.1.

IPv4-mapped (``::ffff:a.b.c.d``) and unspecified (``::``) destinations
cannot be asked for with an ordinary socket: the client's own kernel turns
``connect("::ffff:127.0.0.1")`` into an IPv4 connection to *its own*
loopback (and ``::`` into ``::1``), so ``curl -g
'http://[::ffff:127.0.0.1]:PORT/'`` never leaves the client. A hostile
client writes such packets itself; so does the test, on the client's link
(AF_PACKET), and then checks that no service saw anything. (Without the
policy, the relay connected: 127.0.0.1 in the gateway accepted the SYN to
``::ffff:127.0.0.1``, ::1 the one to ``::``, and the UDP datagram arrived.)

Denied flows are answered with ICMP administratively prohibited (type 3
code 13; ICMPv6 type 1 code 1): the client sockets here have
``IP_RECVERR``, so the code is read from their error queue. ``--allow``
opens each destination again; ``--fwmark`` and ``--bind-address`` are
checked on the gateway's output path (nftables counters) and at the server.

Bounds: socket operations 5 s, flow records 10 s (``--udp-idle-timeout 1``
ends the denied UDP and echo flows), a failing relay's exit 20 s.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.datapath.echo import open_ping_socket
from relay.datapath.icmp_errors import (
    IP_RECVERR,
    IPV6_RECVERR,
    SOL_IP,
    SOL_IPV6,
    read_socket_errors,
)
from relay.host import netns
from relay.lab.topology import Topology, add_address
from stack import FlowId
from stack.wire import build_echo, build_tcp_packet, build_udp_packet
from stack.wire.tcp import SYN

from relay_harness import (
    RelayProcess,
    gateway_leftovers,
    run_in,
)

PORT = 7777  # every service: TCP and UDP
TIMEOUT = 5.0
ADMIN = {4: 13, 6: 1}  # ICMP / ICMPv6 destination unreachable: administratively prohibited
CL2_V4, CL2_V6, GW_CL2_V4, GW_CL2_V6 = "198.18.4.2", "fd00:4::2", "198.18.4.1", "fd00:4::1"
CL2_NETS = ("--client-net", "198.18.4.0/24", "--client-net", "fd00:4::/64")
METADATA = "169.254.169.254"
DENIED_V4, DENIED_V6 = "198.18.3.2", "fd00:3::2"
DENY_NETS = ("--deny", "198.18.3.0/24", "--deny", "[fd00:3::/64]")
QUICK_IDLE = ("--udp-idle-timeout", "1")  # denied UDP/echo flows end (and are logged) soon
_ECHO = struct.Struct("!BBHHH")


# --- the lab's additions ---------------------------------------------------------------


@dataclass
class Service:
    """A TCP listener and a UDP socket on one address, in one namespace."""

    name: str
    ns: str
    addr: str
    tcp: socket.socket
    udp: socket.socket

    def saw(self) -> list[str]:
        """What reached it since the last call (non-blocking)."""
        seen = []
        for sock, what in ((self.tcp, "tcp"), (self.udp, "udp")):
            sock.setblocking(False)
            try:
                for _ in range(16):
                    if what == "tcp":
                        conn, peer = sock.accept()
                        conn.close()
                    else:
                        _, peer = sock.recvfrom(2048)
                    seen.append(f"{self.name}: {what} from {peer[0]}")
            except BlockingIOError:
                pass
            finally:
                sock.settimeout(TIMEOUT)
        return seen


def _service(topo: Topology, ns: str, name: str, addr: str) -> Service:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with netns.entered(ns):
        tcp = socket.socket(family, socket.SOCK_STREAM)
        udp = socket.socket(family, socket.SOCK_DGRAM)
    for sock in (tcp, udp):
        topo.defer(sock.close)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, PORT))
        sock.settimeout(TIMEOUT)
    tcp.listen(8)
    return Service(name, ns, addr, tcp, udp)


def _second_client(topo: Topology) -> str:
    """Namespace ``<base>-cl2``: another client of the relay, behind link gw-cl2."""
    name = f"{topo.base}-cl2"
    netns.create(name)
    topo.defer(lambda: netns.remove(name, missing_ok=True))
    with netns.entered(name), open("/proc/sys/net/ipv6/conf/default/accept_dad", "w") as f:
        f.write("0")
    gw, cl2 = netns.ipr(topo.gw), netns.ipr(name)
    try:
        fd = netns.open_fd(name)
        try:
            gw.link("add", ifname="gw-cl2", kind="veth", peer={"ifname": "cl2-gw", "net_ns_fd": fd})
        finally:
            os.close(fd)
        for ipr, ifname, cidrs in (
            (gw, "gw-cl2", (f"{GW_CL2_V4}/24", f"{GW_CL2_V6}/64")),
            (cl2, "cl2-gw", (f"{CL2_V4}/24", f"{CL2_V6}/64")),
        ):
            index = ipr.link_lookup(ifname=ifname)[0]
            for cidr in cidrs:
                add_address(ipr, index, cidr)
            ipr.link("set", index=index, state="up")
        cl2.link("set", index=cl2.link_lookup(ifname="lo")[0], state="up")
        cl2.route("add", dst="0.0.0.0", dst_len=0, gateway=GW_CL2_V4)
        cl2.route("add", dst="::", dst_len=0, gateway=GW_CL2_V6, family=socket.AF_INET6)
    finally:
        gw.close()
        cl2.close()
    return name


@dataclass
class Lab:
    topo: Topology
    cl2: str
    services: dict[str, Service]

    def seen(self) -> list[str]:
        return [line for s in self.services.values() for line in s.saw()]


def extend(topo: Topology) -> Lab:
    """The additions described in the module docstring; call before starting the relay."""
    cl2 = _second_client(topo)
    srv = topo.netconfig("srv")
    for cidr in (f"{METADATA}/32", f"{DENIED_V4}/32", f"{DENIED_V6}/128"):
        srv.add_address(topo.srv_if, cidr)
    gw = topo.netconfig("gw")
    gw.add_route(f"{METADATA}/32", gateway=topo.srv_v4)
    gw.add_route("198.18.3.0/24", gateway=topo.srv_v4)
    gw.add_route("fd00:3::/64", gateway=topo.srv_v6)
    # The client's ping sockets (root's group), as the relay's own are.
    topo.netconfig("cli").set_sysctl("net.ipv4.ping_group_range", "0 0")
    plan = [
        ("gw-loopback", topo.gw, "127.0.0.1"),
        ("gw-loopback6", topo.gw, "::1"),
        ("gw-own", topo.gw, topo.gw_srv_v4),
        ("metadata", topo.srv, METADATA),
        ("client2", cl2, CL2_V4),
        ("client2-v6", cl2, CL2_V6),
        ("denied", topo.srv, DENIED_V4),
        ("denied-v6", topo.srv, DENIED_V6),
    ]
    services = {name: _service(topo, ns, name, addr) for name, ns, addr in plan}
    return Lab(topo, cl2, services)


def echo_requests(ns: str) -> int:
    """ICMP and ICMPv6 echo requests the kernel of namespace ``ns`` received."""
    total = 0
    with netns.entered(ns):
        # thread-self: /proc/self/net would be the main thread's namespace.
        lines = Path("/proc/thread-self/net/snmp").read_text().splitlines()
        six = Path("/proc/thread-self/net/snmp6").read_text().split()
    for head, values in itertools.pairwise(lines):
        if head.startswith("Icmp:") and values.startswith("Icmp:"):
            total += int(values.split()[head.split().index("InEchos")])
    total += int(six[six.index("Icmp6InEchos") + 1])
    return total


# --- client attempts (sockets in the client namespace, IP_RECVERR on) --------------------


def _recverr(sock: socket.socket, family: int) -> None:
    if family == socket.AF_INET:
        sock.setsockopt(SOL_IP, IP_RECVERR, 1)
    else:
        sock.setsockopt(SOL_IPV6, IPV6_RECVERR, 1)


def _outcome(sock: socket.socket, exc: OSError) -> str:
    sock.setblocking(False)  # read_socket_errors reads until EAGAIN
    codes = [code for code, _ in read_socket_errors(sock)]
    return f"icmp {codes[0]}" if codes else f"{type(exc).__name__} {exc.errno}"


def tcp_attempt(topo: Topology, target: str) -> str:
    """ "connected", or how the connect failed (the ICMP code, if one came)."""
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with netns.entered(topo.cli):
        sock = socket.socket(family, socket.SOCK_STREAM)
    with sock:
        _recverr(sock, family)
        sock.settimeout(TIMEOUT)
        try:
            sock.connect((target, PORT))
        except OSError as exc:
            return _outcome(sock, exc)
        return "connected"


def udp_attempt(topo: Topology, target: str, echo: Service | None = None) -> str:
    """Send one datagram ("probe"; ``echo`` sends it back): the reply, or the ICMP code."""
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    with netns.entered(topo.cli):
        sock = socket.socket(family, socket.SOCK_DGRAM)
    with sock:
        _recverr(sock, family)
        sock.settimeout(TIMEOUT)
        sock.connect((target, PORT))
        sock.send(b"probe")
        if echo is not None:
            data, peer = echo.udp.recvfrom(2048)
            echo.udp.sendto(data, peer)
        try:
            data = sock.recv(2048)
        except TimeoutError:
            return "silence"
        except OSError as exc:
            return _outcome(sock, exc)
        return f"reply {data!r}"


def ping_attempt(topo: Topology, target: str) -> str:
    """One echo request through a ping socket: "reply" or the ICMP code."""
    version = 6 if ":" in target else 4
    client = topo.cli_v6 if version == 6 else topo.cli_v4
    with netns.entered(topo.cli):
        sock = open_ping_socket(FlowId(version, client, 0, target, 0, "icmp"))
    with sock:
        sock.settimeout(TIMEOUT)
        sock.send(_ECHO.pack(8 if version == 4 else 128, 0, 0, 0, 1) + b"ping")
        try:
            data = sock.recv(2048)
        except TimeoutError:
            return "silence"
        except OSError as exc:
            return _outcome(sock, exc)
        return "reply" if data[0] in (0, 129) else f"type {data[0]}"


# --- crafted packets on the client's link ------------------------------------------------


class Link:
    """Raw frames on the client's link: what a client that writes its own packets sends,
    and the ICMPv6 errors that come back to it."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        with netns.entered(topo.cli):
            self.tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
            self.rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x86DD))
        for sock in (self.tx, self.rx):
            topo.defer(sock.close)
            sock.bind((topo.cli_if, 0))
        self.rx.settimeout(0.2)
        self.gw_mac = _mac(topo.gw, topo.gw_cli_if)
        self.cli_mac = _mac(topo.cli, topo.cli_if)
        self.src = ipaddress.ip_address(topo.cli_v6).packed

    def send(self, packet: bytes) -> None:
        self.tx.send(self.gw_mac + self.cli_mac + b"\x86\xdd" + packet)

    def icmp6_errors(self, wait: float) -> list[tuple[str, int, int]]:
        """(source, type, code) of the ICMPv6 errors to the client within ``wait`` seconds."""
        found = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                frame = self.rx.recv(4096)
            except TimeoutError:
                continue
            ip = frame[14:]
            if frame[:6] == self.cli_mac and len(ip) >= 42 and ip[6] == 58 and ip[40] < 128:
                found.append((str(ipaddress.ip_address(ip[8:24])), ip[40], ip[41]))
        return found


def _mac(ns: str, ifname: str) -> bytes:
    ipr = netns.ipr(ns)
    try:
        (link,) = ipr.link("get", ifname=ifname)
        return bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))
    finally:
        ipr.close()


def wait_denied(relay: RelayProcess, count: int) -> list[dict[str, object]]:
    return relay.wait_records("flow", lambda r: r.get("ended") == "denied", count=count)


# --- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_mapped_and_unspecified_destinations_never_reach_the_gateway(
    topology: Topology, start_relay: Callable[..., RelayProcess], workers: int
) -> None:
    lab = extend(topology)
    relay = start_relay(args=[*CL2_NETS, *QUICK_IDLE, "--workers", str(workers)])
    link = Link(topology)
    targets = {  # destination -> the rule that must deny it
        "::ffff:127.0.0.1": "default:loopback",
        f"::ffff:{CL2_V4}": "default:client-net",  # the other client
        f"::ffff:{topology.gw_srv_v4}": "default:host",  # the gateway's own address
        "::": "default:unspecified",  # the kernel would take it for ::1
        "::ffff:0.0.0.0": "default:unspecified",  # ... and this for 127.0.0.1
    }
    expected = {}
    for i, dst in enumerate(targets):
        d = ipaddress.ip_address(dst).packed
        link.send(build_tcp_packet(link.src, d, 41000 + i, PORT, 1, 0, SYN, 65535))
        link.send(build_udp_packet(link.src, d, 42000 + i, PORT, b"probe"))
        link.send(build_echo(link.src, d, ident=43000 + i, seq=1, payload=b"ping", reply=False))
        for proto, port in (("tcp", 41000 + i), ("udp", 42000 + i), ("icmp", 43000 + i)):
            expected[(proto, port)] = (str(ipaddress.ip_address(dst)), targets[dst])
    errors = link.icmp6_errors(wait=1.0)
    records = wait_denied(relay, count=len(expected))
    got = {(r["proto"], r["id.orig_p"]): (r["id.resp_h"], r["rule"]) for r in records}
    assert got == expected
    assert lab.seen() == [], "a denied flow reached a service"
    # Errors from a mapped source are forwarded to the client (from :: they are not).
    for dst in ("::ffff:127.0.0.1", f"::ffff:{CL2_V4}", f"::ffff:{topology.gw_srv_v4}"):
        src = str(ipaddress.ip_address(dst))
        assert errors.count((src, 1, ADMIN[6])) == 3, (dst, errors)
    relay.stop()
    assert relay.counter("flows_denied") == len(expected)


DENIED_TARGETS = [  # (target, the service, the rule)
    (METADATA, "metadata", "default:link-local"),
    (CL2_V4, "client2", "default:client-net"),
    (CL2_V6, "client2-v6", "default:client-net"),
    (DENIED_V4, "denied", "deny 198.18.3.0/24"),
    (DENIED_V6, "denied-v6", "deny [fd00:3::/64]"),
]


def test_denied_destinations_get_admin_prohibited(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    lab = extend(topology)
    relay = start_relay(rules=DENY_NETS, args=[*CL2_NETS, *QUICK_IDLE])
    echoes = {ns: echo_requests(ns) for ns in (topology.srv, lab.cl2)}
    for target, _, _ in DENIED_TARGETS:
        code = f"icmp {ADMIN[6 if ':' in target else 4]}"
        outcome = (
            tcp_attempt(topology, target),
            udp_attempt(topology, target),
            ping_attempt(topology, target),
        )
        assert outcome == (code, code, code), target
    assert lab.seen() == [], "a denied flow reached a service"
    assert {ns: echo_requests(ns) for ns in echoes} == echoes, "a denied ping went out"
    records = wait_denied(relay, count=3 * len(DENIED_TARGETS))
    rules = {(r["proto"], r["id.resp_h"]): r["rule"] for r in records}
    assert rules == {
        (proto, target): rule
        for target, _, rule in DENIED_TARGETS
        for proto in ("tcp", "udp", "icmp")
    }
    relay.stop()
    assert relay.counter("flows_denied") == 3 * len(DENIED_TARGETS)


ALLOW_EACH = (
    "--allow", METADATA,
    "--allow", "198.18.4.0/24", "--allow", "[fd00:4::/64]",  # the other client's networks
    # First match: the host is allowed, the rest of its network stays denied.
    "--allow", DENIED_V4, "--deny", "198.18.3.0/24",
    "--allow", f"[{DENIED_V6}]", "--deny", "[fd00:3::/64]",
)  # fmt: skip


def test_allow_opens_each(topology: Topology, start_relay: Callable[..., RelayProcess]) -> None:
    lab = extend(topology)
    relay = start_relay(rules=ALLOW_EACH, args=[*CL2_NETS, *QUICK_IDLE])
    for target, name, _ in DENIED_TARGETS:
        service = lab.services[name]
        assert tcp_attempt(topology, target) == "connected", target
        conn, _ = service.tcp.accept()
        conn.close()
        assert udp_attempt(topology, target, echo=service) == "reply b'probe'", target
        assert ping_attempt(topology, target) == "reply", target
    # 198.18.3.0/24 itself stays denied: only 198.18.3.2 was allowed.
    assert tcp_attempt(topology, "198.18.3.3") == f"icmp {ADMIN[4]}"
    relay.stop()
    assert relay.counter("flows_denied") == 1
    (record,) = [r for r in relay.flow_records() if r["ended"] == "denied"]
    assert (record["id.resp_h"], record["rule"]) == ("198.18.3.3", "deny 198.18.3.0/24")


def test_allow_client_to_client(
    topology: Topology, start_relay: Callable[..., RelayProcess]
) -> None:
    lab = extend(topology)
    relay = start_relay(args=[*CL2_NETS, "--allow-client-to-client"])
    for target, name in ((CL2_V4, "client2"), (CL2_V6, "client2-v6")):
        assert tcp_attempt(topology, target) == "connected", target
        conn, peer = lab.services[name].tcp.accept()
        conn.close()
        # Relayed, not forwarded: the other client sees the gateway's address.
        assert peer[0] == (GW_CL2_V6 if ":" in target else GW_CL2_V4)
    relay.stop()
    assert relay.counter("flows_denied") == 0


NFT_RULES = """
table inet tregress {
    chain out {
        type filter hook output priority 0; policy accept;
        meta mark 0x5197 ip saddr 198.18.2.9 meta l4proto tcp counter comment "tcp4"
        meta mark 0x5197 ip saddr 198.18.2.9 meta l4proto udp counter comment "udp4"
        meta mark 0x5197 ip saddr 198.18.2.9 icmp type echo-request counter comment "ping4"
        meta mark 0x5197 ip6 saddr fd00:2::9 meta l4proto tcp counter comment "tcp6"
        meta mark 0x5197 ip6 saddr fd00:2::9 meta l4proto udp counter comment "udp6"
        meta mark 0x5197 ip6 saddr fd00:2::9 icmpv6 type echo-request counter comment "ping6"
        meta mark != 0x5197 ip daddr 198.18.2.2 meta l4proto { tcp, udp } counter comment "bare4"
        meta mark != 0x5197 ip daddr 198.18.2.2 icmp type echo-request counter comment "bare4"
        meta mark != 0x5197 ip6 daddr fd00:2::2 meta l4proto { tcp, udp } counter comment "bare6"
        meta mark != 0x5197 ip6 daddr fd00:2::2 icmpv6 type echo-request counter comment "bare6"
    }
}
"""


def nft_counters(topo: Topology) -> dict[str, int]:
    out = run_in(topo, "gw", ["nft", "-j", "list", "table", "inet", "tregress"])
    counts: dict[str, int] = {}
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule is None:
            continue
        packets = next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
        counts[rule["comment"]] = counts.get(rule["comment"], 0) + packets
    return counts


def test_fwmark_and_bind_address(
    topology: Topology, start_relay: Callable[..., RelayProcess], tmp_path: Path
) -> None:
    gw = topology.netconfig("gw")
    gw.add_address(topology.gw_srv_if, "198.18.2.9/32")
    gw.add_address(topology.gw_srv_if, "fd00:2::9/128")
    topology.netconfig("cli").set_sysctl("net.ipv4.ping_group_range", "0 0")
    rules = tmp_path / "rules.nft"
    rules.write_text(NFT_RULES)
    assert run_in(topology, "gw", ["nft", "-f", str(rules)]) == ""
    servers = {
        target: _service(topology, topology.srv, target, target)
        for target in (topology.srv_v4, topology.srv_v6)
    }
    start_relay(
        args=[
            "--fwmark", "0x5197", "--bind-interface", topology.gw_srv_if,
            "--bind-address", "198.18.2.9", "--bind-address", "fd00:2::9",
        ]
    )  # fmt: skip
    for target, service in servers.items():
        source = "fd00:2::9" if ":" in target else "198.18.2.9"
        assert tcp_attempt(topology, target) == "connected"
        conn, peer = service.tcp.accept()
        conn.close()
        assert peer[0] == source
        with netns.entered(topology.cli):
            client = socket.socket(service.udp.family, socket.SOCK_DGRAM)
        with client:
            client.sendto(b"probe", (target, PORT))
            _, peer = service.udp.recvfrom(2048)
        assert peer[0] == source
        assert ping_attempt(topology, target) == "reply"
    counts = nft_counters(topology)
    marked = {k: v for k, v in counts.items() if not k.startswith("bare")}
    assert all(n > 0 for n in marked.values()) and len(marked) == 6, counts
    assert counts["bare4"] == counts["bare6"] == 0, counts  # nothing unmarked to the server


@pytest.mark.parametrize(
    ("option", "workers", "message"),
    [
        (("--bind-interface", "no-such0"), 1, "--bind-interface: no-such0: No such device"),
        (("--bind-address", "198.18.2.99"), 2, "--bind-address: 198.18.2.99: Cannot assign"),
    ],
)
def test_an_upstream_option_the_host_refuses_stops_the_start(
    topology: Topology, option: tuple[str, str], workers: int, message: str
) -> None:
    argv = [
        sys.executable, "-m", "relay.cli", "run", "--tun", "trtun0",
        "--client-net", topology.client_net_v4, "--workers", str(workers), *option,
    ]  # fmt: skip
    proc = topology.spawn("gw", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the relay did not stop within 20 s: {out}")
    assert proc.returncode == 2 and f"tunrelay run: {message}" in out, out
    assert gateway_leftovers(topology) == []
