"""The egress policy (relay.datapath.egress): normalisation, defaults, rule order, ports, parsing.

Addresses here are plain values given to the policy function; no packet is sent.
"""

from __future__ import annotations

import ipaddress
import os
import pickle
import socket

import pytest

from relay.datapath.egress import (
    DEFAULT_RANGES,
    SO_MARK,
    EgressPolicy,
    Embedded,
    HostRoutes,
    RuleError,
    Upstream,
    normalise,
    parse_rule,
)
from stack import FlowId

CLIENT_NETS = ("10.8.0.0/24", "fd00:8::/64")
HOST = HostRoutes(
    local=(
        "127.0.0.0/8",
        "127.0.0.1/32",
        "::1/128",
        "10.1.2.3/32",
        "fd00:9::1/128",
        "198.18.2.1/32",
    ),
    broadcast=("10.1.2.255",),
)


def policy(*rules: str, **kw: object) -> EgressPolicy:
    """Rules as on the command line: "allow 10.0.0.0/8", "deny [fd00::/8]:443"."""
    parsed = []
    for text in rules:
        kind, spec = text.split(" ", 1)
        parsed.append(parse_rule(spec, allow=kind == "allow"))
    kw.setdefault("client_nets", CLIENT_NETS)
    kw.setdefault("host", HOST)
    return EgressPolicy(tuple(parsed), **kw)  # type: ignore[arg-type]


def judge(p: EgressPolicy, dst: str, port: int = 443, proto: str = "tcp") -> str | None:
    version = 6 if ":" in dst else 4
    client = "10.8.0.2" if version == 4 else "fd00:8::2"
    return p.denied_by(FlowId(version, client, 40000, dst, port, proto))


# --- normalisation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dst", "judged_as", "how"),
    [
        ("::ffff:127.0.0.1", "127.0.0.1", Embedded.MAPPED),
        ("::ffff:7f00:1", "127.0.0.1", Embedded.MAPPED),  # how Python 3.11 prints it
        ("::ffff:0.0.0.0", "0.0.0.0", Embedded.MAPPED),
        ("::127.0.0.1", "127.0.0.1", Embedded.COMPATIBLE),
        ("::198.18.0.7", "198.18.0.7", Embedded.COMPATIBLE),
        ("64:ff9b::198.18.0.7", "198.18.0.7", Embedded.NAT64),
        ("::", "::", Embedded.NONE),
        ("::1", "::1", Embedded.NONE),
        ("fd00::1", "fd00::1", Embedded.NONE),
        ("198.18.0.7", "198.18.0.7", Embedded.NONE),
    ],
)
def test_normalise(dst: str, judged_as: str, how: Embedded) -> None:
    assert normalise(dst) == (ipaddress.ip_address(judged_as), how)


def test_normalise_refuses_what_is_not_an_address() -> None:
    with pytest.raises(ValueError):
        normalise("not-an-address")


def test_pythons_own_check_is_fooled_where_the_policy_is_not() -> None:
    mapped = ipaddress.ip_address("::ffff:7f00:1")
    assert not mapped.is_loopback  # Python 3.11: why the policy normalises first
    assert judge(policy(), "::ffff:7f00:1") == "default:loopback"


@pytest.mark.parametrize(
    ("dst", "rule"),
    [
        ("::ffff:127.0.0.1", "default:loopback"),
        ("::ffff:7f00:1", "default:loopback"),
        ("::127.0.0.1", "default:loopback"),
        ("::ffff:10.8.0.3", "default:client-net"),  # another client
        ("::ffff:169.254.169.254", "default:link-local"),
        ("::ffff:10.1.2.3", "default:host"),
        ("::", "default:unspecified"),
        ("0.0.0.0", "default:unspecified"),
        ("::ffff:0.0.0.0", "default:unspecified"),
        # Allowed as IPv4, but never connected from an IPv6 socket (IPV6_V6ONLY).
        ("::ffff:93.184.216.34", "default:ipv4-mapped"),
        ("::93.184.216.34", "default:ipv4-compatible"),
        # NAT64: judged as the IPv4 address it carries, then as itself.
        ("64:ff9b::127.0.0.1", "default:loopback"),
        ("64:ff9b::10.0.0.1", "default:private"),
        ("64:ff9b::93.184.216.34", None),
    ],
)
def test_embedded_ipv4_is_judged_as_ipv4(dst: str, rule: str | None) -> None:
    assert judge(policy(), dst) == rule


def test_embedded_ipv4_cannot_be_opened_but_unspecified_never() -> None:
    p = policy("allow 127.0.0.1", "allow 0.0.0.0")
    assert judge(p, "127.0.0.1") is None
    assert judge(p, "::ffff:127.0.0.1") == "default:ipv4-mapped"
    assert judge(p, "0.0.0.0") == judge(p, "::ffff:0.0.0.0") == "default:unspecified"
    assert judge(EgressPolicy.open(), "::") == "default:unspecified"
    assert judge(EgressPolicy.open(), "::ffff:127.0.0.1") == "default:ipv4-mapped"
    assert judge(EgressPolicy.open(), "127.0.0.1") is None


# --- the defaults ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dst", "rule"),
    [
        ("127.0.0.1", "default:loopback"),
        ("127.255.0.9", "default:loopback"),
        ("::1", "default:loopback"),
        ("169.254.169.254", "default:link-local"),
        ("fe80::1", "default:link-local"),
        ("224.0.0.1", "default:multicast"),
        ("239.255.255.250", "default:multicast"),
        ("ff02::1", "default:multicast"),
        ("255.255.255.255", "default:broadcast"),
        ("10.1.2.255", "default:broadcast"),  # a host subnet's directed broadcast
        ("10.8.0.255", "default:broadcast"),  # the client network's
        ("10.1.2.3", "default:host"),
        ("fd00:9::1", "default:host"),
        ("198.18.2.1", "default:host"),
        ("10.8.0.3", "default:client-net"),
        ("fd00:8::3", "default:client-net"),
        ("10.0.0.1", "default:private"),
        ("172.16.0.1", "default:private"),
        ("172.31.255.254", "default:private"),
        ("192.168.1.1", "default:private"),
        ("100.64.0.1", "default:private"),
        ("fc00::1", "default:private"),
        ("fd12:3456::1", "default:private"),
        ("fec0::1", "default:private"),
        ("0.1.2.3", "default:reserved"),
        ("192.0.2.1", "default:reserved"),
        ("198.18.0.1", "default:reserved"),
        ("198.51.100.1", "default:reserved"),
        ("203.0.113.1", "default:reserved"),
        ("240.0.0.1", "default:reserved"),
        ("2001:db8::1", "default:reserved"),
        ("100::1", "default:reserved"),
        # Globally reachable: allowed.
        ("93.184.216.34", None),
        ("172.32.0.1", None),
        ("100.128.0.1", None),
        ("2606:4700::1", None),
    ],
)
def test_default_categories(dst: str, rule: str | None) -> None:
    assert judge(policy(), dst) == rule


def test_every_default_range_is_denied() -> None:
    p = EgressPolicy()
    for name, cidrs in DEFAULT_RANGES:
        for cidr in cidrs:
            net = ipaddress.ip_network(cidr)
            for addr in (net.network_address, net.broadcast_address):
                if int(addr) == 0:
                    continue  # unspecified, judged before the rules
                # 255.255.255.255 ends 240/4 too, and is named by the narrower range.
                want = "broadcast" if str(addr) == "255.255.255.255" else name
                assert judge(p, str(addr)) == f"default:{want}", addr


def test_client_to_client_is_an_opt_in() -> None:
    p = policy(client_to_client=True)
    assert judge(p, "10.8.0.3") == "default:private"  # now only the private default
    assert judge(p, "fd00:8::3") == "default:private"
    assert judge(p, "10.8.0.255") == "default:broadcast"
    assert judge(policy("allow 10.8.0.0/24", client_to_client=True), "10.8.0.3") is None


def test_without_defaults_only_the_rules_apply() -> None:
    p = policy("deny 198.18.3.0/24", defaults=False)
    assert judge(p, "127.0.0.1") is None
    assert judge(p, "198.18.3.1") == "deny 198.18.3.0/24"


# --- rule order ---------------------------------------------------------------------------


def test_allow_beats_a_default() -> None:
    p = policy("allow 10.0.0.0/8", "allow [fd00::/8]", "allow 169.254.169.254")
    assert judge(p, "10.20.30.40") is None
    assert judge(p, "fd12::1") is None
    assert judge(p, "169.254.169.254") is None
    assert judge(p, "169.254.0.1") == "default:link-local"


def test_an_allow_opens_only_what_lies_inside_it() -> None:
    # 10/8 is the corporate LAN: not the relay's own 10.x address, its broadcast,
    # or the client network inside 10/8.
    p = policy("allow 10.0.0.0/8")
    assert judge(p, "10.1.2.3") == "default:host"
    assert judge(p, "10.1.2.255") == "default:broadcast"
    assert judge(p, "10.8.0.3") == "default:client-net"
    # Too wide to open anything the defaults deny.
    p = policy("allow 0.0.0.0/0", "allow [::/0]")
    for dst in ("127.0.0.1", "10.0.0.1", "169.254.169.254", "::1", "fd00::1"):
        assert judge(p, dst) is not None, dst
    # A later, narrower allow still can.
    p = policy("allow 0.0.0.0/0:443", "allow 127.0.0.1:443")
    assert judge(p, "127.0.0.1", 443) is None
    assert judge(p, "127.0.0.2", 443) == "default:loopback"


def test_deny_beats_a_later_allow_and_the_other_way_round() -> None:
    p = policy("deny 198.18.3.0/24", "allow 198.18.0.0/15")
    assert judge(p, "198.18.3.9") == "deny 198.18.3.0/24"
    assert judge(p, "198.18.4.9") is None
    p = policy("allow 198.18.0.0/15", "deny 198.18.3.0/24")
    assert judge(p, "198.18.3.9") is None


def test_deny_applies_to_any_address() -> None:
    p = policy("deny 93.184.216.0/24", "deny [2606:4700::/32]")
    assert judge(p, "93.184.216.34") == "deny 93.184.216.0/24"
    assert judge(p, "::ffff:93.184.216.34") == "deny 93.184.216.0/24"
    assert judge(p, "64:ff9b::93.184.216.34") == "deny 93.184.216.0/24"
    assert judge(p, "2606:4700::1") == "deny [2606:4700::/32]"
    assert judge(p, "93.184.217.1") is None


def test_nat64_is_judged_as_ipv6_as_well() -> None:
    p = policy("deny [64:ff9b::/96]")
    assert judge(p, "64:ff9b::93.184.216.34") == "deny [64:ff9b::/96]"


# --- ports -----------------------------------------------------------------------------------


def test_port_matching() -> None:
    p = policy("allow 10.0.0.0/8:22,80,8000-8100", "deny 93.184.216.0/24:25")
    for port in (22, 80, 8000, 8050, 8100):
        assert judge(p, "10.0.0.1", port) is None, port
    for port in (21, 23, 443, 7999, 8101):
        assert judge(p, "10.0.0.1", port) == "default:private", port
    assert judge(p, "93.184.216.34", 25) == "deny 93.184.216.0/24:25"
    assert judge(p, "93.184.216.34", 25, "udp") == "deny 93.184.216.0/24:25"
    assert judge(p, "93.184.216.34", 587) is None


def test_rules_with_ports_never_match_ping() -> None:
    p = policy("allow 10.0.0.0/8:443", "deny 93.184.216.0/24:80")
    assert judge(p, "10.0.0.1", 0, "icmp") == "default:private"
    assert judge(p, "93.184.216.34", 0, "icmp") is None
    assert judge(policy("allow 10.0.0.0/8"), "10.0.0.1", 0, "icmp") is None


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "network", "ports", "name"),
    [
        ("198.18.3.0/24", "198.18.3.0/24", (), "198.18.3.0/24"),
        ("198.18.3.7", "198.18.3.7/32", (), "198.18.3.7/32"),
        ("10.0.0.0/8:443", "10.0.0.0/8", ((443, 443),), "10.0.0.0/8:443"),
        (
            "10.0.0.0/8:8000-8100,80, 443",
            "10.0.0.0/8",
            ((80, 80), (443, 443), (8000, 8100)),
            "10.0.0.0/8:80,443,8000-8100",
        ),
        ("[fd00::/8]:443", "fd00::/8", ((443, 443),), "[fd00::/8]:443"),
        ("[fd00::/8]", "fd00::/8", (), "[fd00::/8]"),
        ("fd00::/8", "fd00::/8", (), "[fd00::/8]"),
        ("[::1]:53", "::1/128", ((53, 53),), "[::1/128]:53"),
    ],
)
def test_parse_rule(text: str, network: str, ports: tuple[tuple[int, int], ...], name: str) -> None:
    rule = parse_rule(text, allow=False)
    assert (rule.network, rule.ports) == (ipaddress.ip_network(network), ports)
    assert rule.name == f"deny {name}"
    assert parse_rule(text, allow=True).name == f"allow {name}"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "is not a network"),
        ("example.com", "is not a network"),
        ("10.0.0.1/8", "has host bits set"),
        ("10.0.0.0/33", "is not a network"),
        ("10.0.0.0/8:", "is not a port"),
        ("10.0.0.0/8:http", "is not a port"),
        ("10.0.0.0/8:0", "within 1-65535"),
        ("10.0.0.0/8:65536", "within 1-65535"),
        ("10.0.0.0/8:90-80", "within 1-65535"),
        ("10.0.0.0/8:80,,443", "is not a port"),
        ("[fd00::/8", "no closing"),
        ("[fd00::/8]443", "expected ':PORTS'"),
        ("[10.0.0.0/8]:443", "brackets are for IPv6"),
        ("fd00::/8:443", "is not a network"),
        ("[::ffff:10.0.0.0/104]", "IPv4-mapped"),
        ("[::ffff:127.0.0.1]", "IPv4-mapped"),
        ("[::127.0.0.1]", "IPv4-compatible"),
    ],
)
def test_parse_errors(text: str, why: str) -> None:
    with pytest.raises(RuleError, match=why):
        parse_rule(text, allow=True)


# --- the policy object -----------------------------------------------------------------------


def test_policy_survives_pickling_and_host_routes_are_added() -> None:
    p = policy("allow 10.0.0.0/8", "deny [fd00::/8]:443", host=HostRoutes())
    q = pickle.loads(pickle.dumps(p))
    assert q == p and judge(q, "10.0.0.1") is None and judge(q, "fd00::1", 443) is not None
    assert judge(p, "10.1.2.3") is None
    hosted = p.with_host(HOST)
    assert judge(hosted, "10.1.2.3") == "default:host"
    assert pickle.loads(pickle.dumps(hosted)) == hosted
    assert "allow 10.0.0.0/8, deny [fd00::/8]:443" in hosted.describe()


def test_host_routes_from_the_local_table() -> None:
    class Route(dict[str, object]):
        def get_attr(self, name: str) -> object:
            return self.get(name)

    class FakeIpr:
        def get_routes(self, family: int, table: int) -> list[Route]:
            assert table == 255
            if family == socket.AF_INET:
                return [
                    Route(type=2, dst_len=32, RTA_DST="198.18.2.1"),
                    Route(type=2, dst_len=8, RTA_DST="127.0.0.0"),
                    Route(type=3, dst_len=32, RTA_DST="198.18.2.255"),
                ]
            return [
                Route(type=2, dst_len=128, RTA_DST="fd00:2::1"),
                Route(type=4, dst_len=128, RTA_DST="fd00:2::"),
                Route(type=5, dst_len=8, RTA_DST="ff00::"),  # multicast: the defaults' job
            ]

    from relay.datapath.egress import host_routes

    routes = host_routes(FakeIpr())
    assert routes == HostRoutes(
        local=("127.0.0.0/8", "198.18.2.1/32", "fd00:2::/128", "fd00:2::1/128"),
        broadcast=("198.18.2.255",),
    )


# --- upstream socket options ---------------------------------------------------------------


def test_ipv6_upstream_sockets_are_v6only() -> None:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET6, kind) as sock:
            Upstream().prepare(sock, socket.AF_INET6, stream=kind == socket.SOCK_STREAM)
            assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
            # The kernel refuses what would become an IPv4 connection.
            with pytest.raises(OSError):
                sock.connect(("::ffff:127.0.0.1", 9))


def test_bind_address_is_the_source() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        Upstream(bind_v4="127.0.0.1").prepare(sock, socket.AF_INET, stream=True)
        assert sock.getsockname() == ("127.0.0.1", 0)  # the port comes with connect
    assert Upstream(bind_v4="127.0.0.1").probe() == []
    ((option, value, exc),) = Upstream(bind_v4="192.0.2.77").probe()
    assert (option, value) == ("--bind-address", "192.0.2.77")
    assert isinstance(exc, OSError)


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK needs CAP_NET_ADMIN")
def test_fwmark_is_set() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        Upstream(fwmark=0x5197).prepare(sock, socket.AF_INET)
        assert sock.getsockopt(socket.SOL_SOCKET, SO_MARK) == 0x5197
    ((option, value, _),) = Upstream(interface="no-such-if0").probe()
    assert (option, value) == ("--bind-interface", "no-such-if0")
