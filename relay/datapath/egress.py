"""Egress policy: which original destinations the relay may open sockets to.

Theory of operation: the relay re-originates every client flow from the
host's own sockets, so without a policy a client reaches whatever the host
reaches -- its loopback services, the other clients, the cloud metadata
address, the LAN behind it. Every flow is judged once, before any upstream
socket exists (``EgressPolicy.denied_by``); a denied flow gets ICMP
administratively prohibited, as from a firewall's REJECT.

1. Normalise. An IPv6 destination that carries an IPv4 address is judged as
   that address: IPv4-mapped ``::ffff:a.b.c.d`` (an IPv6 socket without
   ``IPV6_V6ONLY`` would make an IPv4 connection to it *from the host*),
   IPv4-compatible ``::a.b.c.d`` (deprecated) and NAT64's well-known prefix
   ``64:ff9b::a.b.c.d`` (a NAT64 gateway would translate it). The relay does
   not translate between families, and its IPv6 sockets are ``IPV6_V6ONLY``,
   so a mapped or compatible destination the IPv4 rules allow is denied all
   the same (``default:ipv4-mapped``, ``default:ipv4-compatible``); a NAT64
   destination the IPv4 rules allow is then judged as the IPv6 address it is.
   The unspecified addresses (0.0.0.0, ::) are denied before any rule
   (``default:unspecified``): the kernel would connect them to loopback.
2. The rules, user rules first, in order; the first that matches the
   address (and the port, if it names ports) decides. A ``deny`` always
   decides. An ``allow`` decides only for an address that no default denies
   *more specifically* than the allow's own network: ``--allow 10.0.0.0/8``
   opens the 10/8 LAN, but not the relay host's own 10.x addresses or a
   client network inside 10/8, and ``--allow 0.0.0.0/0`` opens nothing the
   defaults deny. (Two networks that hold the same address are nested, so
   "more specifically" is a prefix-length compare.)
3. The defaults, all ``deny``: see ``DEFAULT_RANGES``; plus every address the
   host's local routing table holds (``default:host``: its addresses, AnyIP
   ranges, subnet anycast), its IPv4 broadcast routes (``default:broadcast``),
   and the client networks (``default:client-net``, unless client-to-client
   traffic is allowed). Nothing matched: allowed.

Cost: once per new flow, never per packet; integers compared against
precompiled ranges, a set lookup for the host's own addresses.

``Upstream`` holds the socket options every upstream socket gets:
``IPV6_V6ONLY`` always, and ``SO_MARK``, ``SO_BINDTODEVICE`` and a source
address when configured.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the supervisor parses the policy; only workers meet flows
    from stack import FlowId

__all__ = [
    "DEFAULT_RANGES",
    "EgressPolicy",
    "Embedded",
    "HostRoutes",
    "Rule",
    "RuleError",
    "Upstream",
    "host_routes",
    "normalise",
    "parse_rule",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Denied unless a user rule allows them (see the module docstring for how).
DEFAULT_RANGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loopback", ("127.0.0.0/8", "::1/128")),
    ("link-local", ("169.254.0.0/16", "fe80::/10")),
    ("multicast", ("224.0.0.0/4", "ff00::/8")),
    ("broadcast", ("255.255.255.255/32",)),
    ("private", (
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",  # RFC 1918, 6598
        "fc00::/7", "fec0::/10",  # unique local; site-local (deprecated, still met)
    )),
    # IANA special-purpose ranges that are not globally reachable (RFC 6890):
    # "this network", IETF protocol assignments, documentation, benchmarking,
    # the future-use block; IPv6 discard-only, benchmarking, documentation.
    ("reserved", (
        "0.0.0.0/8", "192.0.0.0/24", "192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24",
        "203.0.113.0/24", "240.0.0.0/4", "100::/64", "2001:2::/48", "2001:db8::/32",
    )),
)  # fmt: skip

_M32 = 0xFFFFFFFF
_MAPPED_HIGH = 0xFFFF  # ::ffff:0:0/96, shifted right by 32
_NAT64_HIGH = 0x0064FF9B << 64  # 64:ff9b::/96 (RFC 6052 well-known prefix), shifted by 32
_NO_PORT = -1  # echo flows: rules that name ports never match them
_DENY_UNSPECIFIED = "default:unspecified"

# <linux/socket.h>, <linux/in.h>; not all of them are in Python's socket module.
SO_MARK = 36
SO_BINDTODEVICE = 25
IP_BIND_ADDRESS_NO_PORT = 24


class RuleError(ValueError):
    """A rule that cannot be parsed; the message says why (the caller names the option)."""


class Embedded(enum.Enum):
    """How an IPv6 destination carries the IPv4 address it is judged as."""

    NONE = "none"
    MAPPED = "ipv4-mapped"  # ::ffff:a.b.c.d
    COMPATIBLE = "ipv4-compatible"  # ::a.b.c.d (not :: or ::1)
    NAT64 = "nat64"  # 64:ff9b::a.b.c.d


def _split(address: str) -> tuple[int, int, Embedded, int]:
    """(version judged as, integer address, embedding, the IPv6 integer if any)."""
    if ":" not in address:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address)), Embedded.NONE, 0
    n = int.from_bytes(socket.inet_pton(socket.AF_INET6, address))
    high = n >> 32
    if high == _MAPPED_HIGH:
        return 4, n & _M32, Embedded.MAPPED, n
    if high == 0 and n > 1:
        return 4, n & _M32, Embedded.COMPATIBLE, n
    if high == _NAT64_HIGH:
        return 4, n & _M32, Embedded.NAT64, n
    return 6, n, Embedded.NONE, n


def normalise(address: str) -> tuple[Address, Embedded]:
    """The address a destination is judged as, and how IPv6 embedded it.

    ``"::ffff:127.0.0.1"`` and ``"::ffff:7f00:1"`` are ``127.0.0.1`` (MAPPED);
    ``"::"`` and ``"::1"`` stay IPv6.

    Raises:
        ValueError: not an IP address.
    """
    try:
        version, n, how, _ = _split(address)
    except OSError:
        raise ValueError(f"{address!r} is not an IP address") from None
    ip: Address = ipaddress.IPv4Address(n) if version == 4 else ipaddress.IPv6Address(n)
    return ip, how


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``--allow`` or ``--deny``: a network and, optionally, ports."""

    allow: bool
    network: Network
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges; empty: every port and ping

    @property
    def name(self) -> str:
        """How the flow log names it: ``deny 198.18.3.0/24:443``, ``allow [fd00::/8]``."""
        net = str(self.network) if self.network.version == 4 else f"[{self.network}]"
        if self.ports:
            net += ":" + ",".join(str(a) if a == b else f"{a}-{b}" for a, b in self.ports)
        return f"{'allow' if self.allow else 'deny'} {net}"


def parse_rule(text: str, *, allow: bool) -> Rule:
    """Parse ``CIDR[:PORTS]``; an IPv6 network takes brackets to have ports.

    ``198.18.3.0/24``, ``198.18.3.7:53``, ``10.0.0.0/8:80,443,8000-8100``,
    ``[fd00::/8]:443``, ``[fd00::1]``, ``fd00::/8``. PORTS: a port, a range
    ``a-b`` or a comma-separated list of them (1-65535). An address without a
    prefix length is one host. An IPv6 network of IPv4-mapped or -compatible
    addresses is refused: such destinations are judged as IPv4, so write the
    IPv4 network.

    Raises:
        RuleError: why ``text`` is not a rule.
    """
    spec = text.strip()
    ports_text: str | None = None
    if spec.startswith("["):
        addr, sep, rest = spec[1:].partition("]")
        if not sep:
            raise RuleError(f"{text!r}: no closing ']'")
        if rest:
            if not rest.startswith(":"):
                raise RuleError(f"{text!r}: expected ':PORTS' after ']'")
            ports_text = rest[1:]
        if ":" not in addr:
            raise RuleError(f"{text!r}: brackets are for IPv6 networks")
    elif spec.count(":") == 1:
        addr, _, ports_text = spec.partition(":")
    else:
        addr = spec  # IPv4 without ports, or IPv6 without brackets (and so without ports)
    try:
        network = ipaddress.ip_network(addr, strict=True)
    except ValueError as exc:
        raise RuleError(f"{text!r} is not a network: {exc}") from None
    if network.version == 6:
        for embedded, prefix in (("IPv4-mapped", "::ffff:0:0/96"), ("IPv4-compatible", "::/96")):
            if network.prefixlen >= 96 and network.subnet_of(ipaddress.IPv6Network(prefix)):
                if network.prefixlen == 128 and int(network.network_address) <= 1:
                    break  # :: and ::1 are IPv6's own
                raise RuleError(
                    f"{text!r} is {embedded}: such destinations are judged as IPv4 "
                    "addresses; write the IPv4 network"
                )
    ports = _parse_ports(text, ports_text) if ports_text is not None else ()
    return Rule(allow, network, ports)


def _parse_ports(text: str, spec: str) -> tuple[tuple[int, int], ...]:
    ranges = []
    for part in spec.split(","):
        lo_text, dash, hi_text = part.strip().partition("-")
        try:
            lo = int(lo_text, 10)
            hi = int(hi_text, 10) if dash else lo
        except ValueError:
            raise RuleError(f"{text!r}: {part!r} is not a port or a range a-b") from None
        if not 1 <= lo <= hi <= 65535:
            raise RuleError(f"{text!r}: {part!r} is not a port range within 1-65535")
        ranges.append((lo, hi))
    return tuple(sorted(set(ranges)))


@dataclass(frozen=True, slots=True)
class HostRoutes:
    """What the host's local routing table held at start: its own addresses and
    ranges (local and anycast routes) and its IPv4 broadcast addresses."""

    local: tuple[str, ...] = ()  # CIDRs
    broadcast: tuple[str, ...] = ()  # addresses


# Local routing table route types (<linux/rtnetlink.h>): RTN_LOCAL, RTN_BROADCAST, RTN_ANYCAST.
_RTN_LOCAL, _RTN_BROADCAST, _RTN_ANYCAST = 2, 3, 4
_RT_TABLE_LOCAL = 255


def host_routes(ipr: Any) -> HostRoutes:
    """The local table of ``ipr``'s namespace (a pyroute2 ``IPRoute``, which the
    caller brings: worker processes never import pyroute2)."""
    local: list[str] = []
    broadcast: list[str] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.get_routes(family=family, table=_RT_TABLE_LOCAL):
            dst = route.get_attr("RTA_DST")
            if dst is None:
                continue
            kind = route["type"]
            if kind in (_RTN_LOCAL, _RTN_ANYCAST):
                local.append(f"{dst}/{route['dst_len']}")
            elif kind == _RTN_BROADCAST:
                broadcast.append(dst)
    return HostRoutes(tuple(sorted(set(local))), tuple(sorted(set(broadcast))))


def _loopback(cidr: str) -> bool:
    return ipaddress.ip_network(cidr, strict=False).is_loopback  # inside 127/8 or ::1


# A compiled range: (first, last, prefix length, ports, allow, name).
_Compiled = tuple[int, int, int, tuple[tuple[int, int], ...], bool, str]


def _compile(
    network: Network, ports: tuple[tuple[int, int], ...], allow: bool, name: str
) -> _Compiled:
    return (
        int(network.network_address), int(network.broadcast_address), network.prefixlen,
        ports, allow, name,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class EgressPolicy:
    """The rules every new flow is judged by (see the module docstring).

    Args:
        rules: the user's rules, in order.
        defaults: apply the default denials (off: only ``rules``, and the
            unspecified and embedded-IPv4 checks, which always apply).
        client_nets: the client networks (denied unless ``client_to_client``).
        client_to_client: let clients reach the client networks.
        host: the host's local routes (``host_routes``), denied.
    """

    rules: tuple[Rule, ...] = ()
    defaults: bool = True
    client_nets: tuple[str, ...] = ()
    client_to_client: bool = False
    host: HostRoutes = HostRoutes()
    _user: dict[int, tuple[_Compiled, ...]] = field(init=False, repr=False, compare=False)
    _default: dict[int, tuple[_Compiled, ...]] = field(init=False, repr=False, compare=False)
    _exact: dict[int, dict[int, str]] = field(init=False, repr=False, compare=False)

    @classmethod
    def open(cls) -> EgressPolicy:
        """No rules and no defaults: only unspecified and embedded-IPv4
        destinations are denied (for tests and embedders with their own firewall)."""
        return cls(defaults=False)

    def __post_init__(self) -> None:
        user: dict[int, list[_Compiled]] = {4: [], 6: []}
        for rule in self.rules:
            user[rule.network.version].append(
                _compile(rule.network, rule.ports, rule.allow, rule.name)
            )
        default: dict[int, list[_Compiled]] = {4: [], 6: []}
        exact: dict[int, dict[int, str]] = {4: {}, 6: {}}

        def deny(cidrs: Iterable[str], name: str) -> None:
            for cidr in cidrs:
                net = ipaddress.ip_network(cidr, strict=False)
                if net.prefixlen == net.max_prefixlen:
                    exact[net.version].setdefault(int(net.network_address), name)
                else:
                    default[net.version].append(_compile(net, (), False, name))

        if self.defaults:
            # On equal ranges the first named wins (a stable sort below).
            for name, cidrs in DEFAULT_RANGES:
                deny(cidrs, f"default:{name}")
            # 127.0.0.1 is in the local table too, but named (and opened) as loopback.
            deny([c for c in self.host.local if not _loopback(c)], "default:host")
            deny(self.host.broadcast, "default:broadcast")
            if not self.client_to_client:
                deny(self.client_nets, "default:client-net")
            for cidr in self.client_nets:  # directed broadcast: even between clients
                net = ipaddress.ip_network(cidr, strict=False)
                if net.version == 4 and net.prefixlen <= 30:
                    deny([str(net.broadcast_address)], "default:broadcast")
        for ranges in default.values():
            ranges.sort(key=lambda r: -r[2])  # most specific first (a stable sort)
        object.__setattr__(self, "_user", {v: tuple(r) for v, r in user.items()})
        object.__setattr__(self, "_default", {v: tuple(r) for v, r in default.items()})
        object.__setattr__(self, "_exact", exact)

    def __getstate__(self) -> tuple[object, ...]:
        # Pickled into worker processes: the inputs only; the ranges are rebuilt.
        return self.rules, self.defaults, self.client_nets, self.client_to_client, self.host

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for name, value in zip(
            ("rules", "defaults", "client_nets", "client_to_client", "host"), state, strict=True
        ):
            object.__setattr__(self, name, value)
        self.__post_init__()

    def with_host(self, host: HostRoutes) -> EgressPolicy:
        """This policy, denying ``host``'s addresses as well."""
        return EgressPolicy(
            self.rules, self.defaults, self.client_nets, self.client_to_client, host
        )

    def denied_by(self, flow: FlowId) -> str | None:
        """The name of the rule that denies ``flow``; None when it may go out."""
        try:
            version, n, how, n6 = _split(flow.server_ip)
        except (OSError, TypeError):  # not an address: the stack never makes one
            return _DENY_UNSPECIFIED
        if n == 0:
            return _DENY_UNSPECIFIED  # 0.0.0.0, ::, ::ffff:0.0.0.0: the kernel's loopback
        port = _NO_PORT if flow.proto == "icmp" else flow.server_port
        name = self._judge(version, n, port)
        if name is not None or how is Embedded.NONE:
            return name
        if how is Embedded.NAT64:
            return self._judge(6, n6, port)
        return f"default:{how.value}"

    def _judge(self, version: int, n: int, port: int) -> str | None:
        # The most specific default that denies n, if any.
        deny_len, deny_name = -1, None
        exact = self._exact[version].get(n)
        if exact is not None:
            deny_len, deny_name = (32 if version == 4 else 128), exact
        else:
            for lo, hi, plen, _, _, name in self._default[version]:
                if lo <= n <= hi:
                    deny_len, deny_name = plen, name
                    break
        for lo, hi, plen, ports, allow, name in self._user[version]:
            if lo <= n <= hi and (not ports or any(a <= port <= b for a, b in ports)):
                if not allow:
                    return name
                if plen >= deny_len:
                    return None
        return deny_name

    def describe(self) -> str:
        """One line for the start-up log."""
        user = ", ".join(r.name for r in self.rules) or "none"
        if not self.defaults:
            return f"rules: {user}; no defaults"
        hosts = len(self.host.local) + len(self.host.broadcast)
        c2c = "allowed" if self.client_to_client else "denied"
        return f"rules: {user}; then the defaults ({hosts} host routes; client-to-client {c2c})"


@dataclass(frozen=True, slots=True)
class Upstream:
    """Socket options of every upstream socket (TCP, UDP, ICMP echo)."""

    fwmark: int | None = None  # SO_MARK (needs CAP_NET_ADMIN, or CAP_NET_RAW on Linux >= 5.17)
    bind_v4: str | None = None  # source address of IPv4 sockets
    bind_v6: str | None = None  # source address of IPv6 sockets
    interface: str | None = None  # SO_BINDTODEVICE (needs CAP_NET_RAW)

    def prepare(self, sock: socket.socket, family: int, *, stream: bool = False) -> None:
        """Set the options on a new, unconnected socket.

        Raises:
            OSError: an option was refused (permissions, no such device or address).
        """
        if family == socket.AF_INET6:
            # Never an IPv4 connection from an IPv6 socket (::ffff:a.b.c.d).
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if self.fwmark is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.fwmark)
        if self.interface is not None:
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, self.interface.encode())
        source = self.bind_v4 if family == socket.AF_INET else self.bind_v6
        if source is not None:
            if stream:
                # The port is picked at connect, per destination: bind() alone would
                # reserve it for every destination and cap the flows per address.
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))

    def probe(self) -> list[tuple[str, str, OSError]]:
        """Try each configured option on a throw-away UDP socket, so that a bad one
        is reported at start, by name: (option, value, error) for each one refused."""
        checks: list[tuple[str, str, int, Upstream]] = []
        if self.fwmark is not None:
            checks.append(("--fwmark", str(self.fwmark), socket.AF_INET, Upstream(self.fwmark)))
        if self.interface is not None:
            only = Upstream(interface=self.interface)
            checks.append(("--bind-interface", self.interface, socket.AF_INET, only))
        if self.bind_v4 is not None:
            only = Upstream(bind_v4=self.bind_v4)
            checks.append(("--bind-address", self.bind_v4, socket.AF_INET, only))
        if self.bind_v6 is not None:
            only = Upstream(bind_v6=self.bind_v6)
            checks.append(("--bind-address", self.bind_v6, socket.AF_INET6, only))
        failures: list[tuple[str, str, OSError]] = []
        for option, value, family, only in checks:
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as sock:
                    only.prepare(sock, family)
            except OSError as exc:
                failures.append((option, value, exc))
        return failures
