"""Network set-up with an undo stack, and the policy routing the relay needs.

Theory of operation: `NetConfig` applies one change at a time through a
pyroute2 netlink socket (or a /proc/sys write) and pushes the matching undo
action. `close()` pops and runs them in reverse order. An undo that finds its
object already gone (the TUN device closed, the namespace torn down) is not an
error: the goal state "not there" is reached. Any other undo failure is logged
and the rest still run, so one stuck object never leaves the others behind.

A `journal` callback, if given, receives each rule, route and sysctl change as
a JSON-serializable entry *before* it is made: `tunrelay run` keeps them in
its state file, and `undo_recorded` undoes one from there after the process
that made it died (`relay.service.runstate`).

A NetConfig is bound to one network namespace, fixed when it is made: the
current thread's, or a named one. The netlink socket and the /proc/sys writes
both use that namespace even if the calling thread is elsewhere later. Use a
NetConfig from the thread that made it (pyroute2 raises RuntimeError
otherwise); its calls block, so use it at start-up and shut-down.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

from relay.host import netns as _netns
from relay.host.pyroute import NetlinkError

__all__ = [
    "FAIL_CLOSED_METRIC",
    "IFA_F_NODAD",
    "PING_GROUP_RANGE",
    "TUN_ROUTE_METRIC",
    "NetConfig",
    "enable_ping_sockets",
    "route_client_nets_into_tun",
]

log = logging.getLogger(__name__)

IFA_F_NODAD = 0x02
RT_TABLE_MAIN = 254
_IFF_UP = 0x1
# In the relay's table: the TUN route first; the fail-closed prohibit only when
# the TUN route is gone (explicit metrics: IPv6 would give the TUN route 1024).
TUN_ROUTE_METRIC = 1
FAIL_CLOSED_METRIC = 4096
# Errors that mean "already gone" when undoing.
_GONE = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL, errno.ENXIO})

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Journal = Callable[[dict[str, Any]], None]


def _family(net: Network | Interface) -> int:
    return socket.AF_INET if net.version == 4 else socket.AF_INET6


def _sysctl_path(path: str) -> str:
    if path.startswith("/"):
        full = os.path.normpath(path)
    elif "/" in path:
        full = os.path.normpath(os.path.join("/proc/sys", path))
    else:
        full = os.path.join("/proc/sys", path.replace(".", "/"))
    if not full.startswith("/proc/sys/"):
        raise ValueError(f"not a sysctl: {path!r}")
    return full


class NetConfig:
    """Apply network changes and undo them all on `close()`.

    Args:
        netns: name of the namespace to configure; None (the default) means
            the current thread's namespace at construction.
        journal: called with each rule, route and sysctl change before it is
            made (see `undo_recorded`).
    """

    def __init__(self, netns: str | None = None, journal: Journal | None = None) -> None:
        self.netns = netns
        self.journal = journal
        self.undo_failures = 0  # undo actions that failed (logged) in close()
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._closed = False
        if netns is None:
            self._ns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        else:
            self._ns_fd = _netns.open_fd(netns)
        try:
            with _netns.entered_fd(self._ns_fd, netns or ""):
                self.ipr: Any = _netns.ipr_here()
        except BaseException:
            os.close(self._ns_fd)
            raise

    def __enter__(self) -> NetConfig:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def pending_undo(self) -> list[str]:
        """Descriptions of the undo actions, most recent last."""
        return [what for what, _ in self._undo]

    def _push(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def index(self, ifname: str) -> int:
        """Return the ifindex of `ifname`.

        Raises:
            LookupError: no such link in this namespace.
        """
        found = self.ipr.link_lookup(ifname=ifname)
        if not found:
            raise LookupError(f"no link {ifname!r} in namespace {self.netns or '<current>'}")
        return int(found[0])

    def _link(self, ifname: str) -> Any:
        return self.ipr.link("get", index=self.index(ifname))[0]

    # --- addresses, routes, rules --------------------------------------------

    def add_address(self, ifname: str, cidr: str) -> None:
        """Add `cidr` (e.g. "198.18.1.1/24") to `ifname`; IPv6 skips DAD."""
        iface: Interface = ipaddress.ip_interface(cidr)
        spec: dict[str, Any] = {
            "index": self.index(ifname),
            "address": str(iface.ip),
            "prefixlen": iface.network.prefixlen,
            "family": _family(iface),
        }
        if iface.version == 6:
            spec["flags"] = IFA_F_NODAD  # usable at once, no 1-2 s DAD wait
        self.ipr.addr("add", **spec)
        spec.pop("flags", None)
        self._push(f"address {cidr} on {ifname}", lambda: self.ipr.addr("del", **spec))

    def add_route(
        self,
        dst_cidr: str,
        *,
        ifname: str | None = None,
        gateway: str | None = None,
        table: int | None = None,
        route_type: str = "unicast",
        metric: int | None = None,
    ) -> None:
        """Add a route to `dst_cidr` in `table` (default: main).

        Args:
            dst_cidr: destination network, e.g. "0.0.0.0/0" or "fd00:1::/64".
            ifname: output link; a unicast route needs it or `gateway`.
            gateway: next hop, same family as `dst_cidr`.
            table: routing table number.
            route_type: "unicast", or e.g. "throw" (end the lookup in this
                table and continue with the next rule) or "blackhole".
            metric: the route's priority (lower first); None: the kernel's
                default (0 for IPv4, 1024 for IPv6).
        """
        if route_type == "unicast" and ifname is None and gateway is None:
            raise ValueError("a unicast route needs ifname or gateway")
        net: Network = ipaddress.ip_network(dst_cidr)
        spec: dict[str, Any] = {
            "dst": str(net.network_address),
            "dst_len": net.prefixlen,
            "family": _family(net),
            "table": RT_TABLE_MAIN if table is None else table,
            "type": route_type,
        }
        if ifname is not None:
            spec["oif"] = self.index(ifname)
        if metric is not None:
            spec["priority"] = metric
        if gateway is not None:
            if ipaddress.ip_address(gateway).version != net.version:
                raise ValueError(f"gateway {gateway} is not in the family of {dst_cidr}")
            spec["gateway"] = gateway
        via = f" via {gateway}" if gateway else ""
        dev = f" dev {ifname}" if ifname else ""
        what = f"{route_type} route {net}{via}{dev} table {spec['table']}"
        if metric is not None:
            what += f" metric {metric}"
        recorded = {k: v for k, v in spec.items() if k != "oif"}
        self._record({"kind": "route", "what": what, "spec": recorded, "dev": ifname})
        self._apply(what, lambda: self.ipr.route("add", **spec))
        self._push(what, lambda: self.ipr.route("del", **spec))

    def add_rule(
        self,
        from_cidr: str,
        table: int | None,
        priority: int,
        *,
        iifname: str | None = None,
        unreachable: bool = False,
    ) -> None:
        """Add the policy rule `from <from_cidr> [iif <iifname>] lookup <table>`.

        With `unreachable=True` the rule's action is `unreachable` instead of a
        table lookup (`table` is then ignored).
        """
        net: Network = ipaddress.ip_network(from_cidr, strict=False)
        spec: dict[str, Any] = {
            "family": _family(net),
            "src": str(net.network_address),
            "src_len": net.prefixlen,
            "priority": priority,
        }
        if iifname is not None:
            spec["iifname"] = iifname
        if unreachable:
            spec["action"] = "FR_ACT_UNREACHABLE"
            action = "unreachable"
        else:
            spec["table"] = table
            action = f"lookup {table}"
        iif = f" iif {iifname}" if iifname else ""
        what = f"rule {priority}: from {net}{iif} {action}"
        self._record({"kind": "rule", "what": what, "spec": spec})
        self._apply(what, lambda: self.ipr.rule("add", **spec))
        self._push(what, lambda: self.ipr.rule("del", **spec))

    # --- links -----------------------------------------------------------------

    def link_up(self, ifname: str) -> None:
        """Set `ifname` up; undo sets it down again only if it was down."""
        index = self.index(ifname)
        if self._link(ifname)["flags"] & _IFF_UP:
            return
        self.ipr.link("set", index=index, state="up")
        self._push(f"link {ifname} up", lambda: self.ipr.link("set", index=index, state="down"))

    def set_mtu(self, ifname: str, mtu: int) -> None:
        """Set the MTU of `ifname`; undo restores the old one."""
        self._set_link_attr(ifname, "mtu", "IFLA_MTU", mtu)

    def set_txqueuelen(self, ifname: str, txqueuelen: int) -> None:
        """Set the txqueuelen of `ifname`; undo restores the old one."""
        self._set_link_attr(ifname, "txqlen", "IFLA_TXQLEN", txqueuelen)

    def _set_link_attr(self, ifname: str, key: str, nla: str, value: int) -> None:
        index = self.index(ifname)
        old = self._link(ifname).get_attr(nla)
        if old == value:
            return
        self.ipr.link("set", index=index, **{key: value})
        self._push(
            f"{key} {value} on {ifname} (was {old})",
            lambda: self.ipr.link("set", index=index, **{key: old}),
        )

    # --- sysctl --------------------------------------------------------------

    def read_sysctl(self, path: str) -> str:
        """Read a sysctl of this namespace ("net.ipv4.ip_forward" or a path)."""
        full = _sysctl_path(path)
        with _netns.entered_fd(self._ns_fd, self.netns or ""), open(full) as f:
            return f.read().strip()

    def _write_sysctl(self, full: str, value: str) -> None:
        # /proc/sys/net resolves to the namespace of the thread that opens it.
        with _netns.entered_fd(self._ns_fd, self.netns or ""), open(full, "w") as f:
            f.write(value)

    def set_sysctl(self, path: str, value: str | int) -> None:
        """Write a sysctl of this namespace; undo writes the old value back.

        Args:
            path: "net.ipv4.ip_forward", "net/ipv4/ip_forward" or
                "/proc/sys/net/ipv4/ip_forward" (use a path when an interface
                name contains a dot).
            value: the new value.
        """
        full = _sysctl_path(path)
        old = self.read_sysctl(full)
        new = str(value)
        if old == new:
            return
        what = f"sysctl {full}={new} (was {old})"
        self._record({"kind": "sysctl", "what": what, "path": full, "old": old, "new": new})
        self._write_sysctl(full, new)
        self._push(what, lambda: self._write_sysctl(full, old))

    # --- the journal -----------------------------------------------------------

    def _record(self, entry: dict[str, Any]) -> None:
        if self.journal is not None:
            self.journal(entry)

    @staticmethod
    def _apply(what: str, change: Callable[[], object]) -> None:
        try:
            change()
        except NetlinkError as exc:
            # One line that names the object: EEXIST is usually a leftover of a
            # run that could not clean up, or another program's identical rule.
            raise OSError(exc.code, f"cannot add {what}: {os.strerror(exc.code)}") from None

    def undo_recorded(self, entry: dict[str, Any]) -> str:
        """Undo one journal entry made by a process that is gone; say what happened.

        A rule or route that is gone is fine. A sysctl goes back to its old
        value only if it still has the value the relay set: one changed since
        is someone else's and is left alone (and reported).

        Raises:
            OSError: the undo failed (EPERM, ...).
        """
        kind, what = entry.get("kind"), str(entry.get("what"))
        try:
            if kind == "rule":
                self.ipr.rule("del", **entry["spec"])
            elif kind == "route":
                spec = dict(entry["spec"])
                if entry.get("dev"):
                    found = self.ipr.link_lookup(ifname=entry["dev"])
                    if not found:
                        return f"gone: {what}"  # the kernel removed it with its device
                    spec["oif"] = found[0]
                self.ipr.route("del", **spec)
            elif kind == "sysctl":
                full, old, new = _sysctl_path(entry["path"]), entry["old"], entry["new"]
                now = self.read_sysctl(full)
                if now.split() != new.split():  # the kernel may print tabs for our spaces
                    return f"left as is: {full}={now} (set to {new} and changed since; was {old})"
                self._write_sysctl(full, old)
                return f"restored: {full}={old}"
            else:
                raise ValueError(f"unknown state entry {entry!r}")
        except NetlinkError as exc:
            if exc.code in _GONE:
                return f"gone: {what}"
            raise OSError(exc.code, f"cannot undo {what}: {os.strerror(exc.code)}") from None
        except FileNotFoundError:
            return f"gone: {what}"
        return f"removed: {what}"

    # --- undo ------------------------------------------------------------------

    def close(self) -> None:
        """Undo every change in reverse order, then release the socket.

        Objects that are already gone are skipped silently; other failures are
        logged and do not stop the remaining undo actions. Safe to call twice.
        """
        while self._undo:
            what, undo = self._undo.pop()
            try:
                undo()
            except NetlinkError as exc:
                if exc.code not in _GONE:
                    log.warning("could not undo %s: %s", what, exc)
                    self.undo_failures += 1
            except FileNotFoundError:
                pass  # a per-interface sysctl of a link that is gone
            except OSError as exc:
                log.warning("could not undo %s: %s", what, exc)
                self.undo_failures += 1
        if not self._closed:
            self._closed = True
            self.ipr.close()
            os.close(self._ns_fd)


def route_client_nets_into_tun(
    cfg: NetConfig,
    tun_name: str,
    client_nets: list[str],
    table: int = 5197,
    priority: int = 5197,
    *,
    iifs: Sequence[str] = (),
    fail_closed: bool = False,
) -> None:
    """Send packets *from* the client networks into the TUN device.

    Installs `from <net> lookup <table>` for each client network and, in
    `table`, `default dev <tun>` for each family used, so forwarded client
    packets reach the relay while the relay's own upstream sockets (source =
    this host's upstream address) keep using the main table: no loop.
    Packets from one client to another go into the TUN as well, so the
    relay's egress policy decides about them (denied by default).

    Three more rules per client network, ahead of that one, keep out of the
    TUN what must not enter it: `from <net> iif <tun>` (main table), the
    relay's answers to clients (their source is the address the client asked
    for, another client's included), and `from <net> iif lo` (main table, then
    unreachable), this host's own packets. A VPN server usually has an address
    inside the client network (10.8.0.1 in 10.8.0.0/24): its packets to
    clients (replies from its DNS server, ICMP errors) and reverse-path lookups
    for them (rp_filter, which looks up with iif lo) must use the main table.

    Replies the relay writes into the TUN have source = the original
    destination, so rp_filter is turned off on the TUN (the kernel uses the
    larger of conf/all and conf/<tun>: strict mode in conf/all still passes,
    because the reverse lookup from a client address finds the TUN in
    `table`). Forwarding is enabled for the families used (note: IPv6
    forwarding makes the kernel ignore router advertisements on interfaces
    with accept_ra=1).

    `iifs`: only packets arriving on these interfaces (the VPN's) are sent
    into the TUN, one rule per interface. Without, a packet with a client
    source arriving from anywhere (spoofed on the uplink, where rp_filter is
    loose or off, and always for IPv6, which has no rp_filter) is relayed and
    the reply goes to the real client.

    `fail_closed`: `table` also gets `prohibit default`, with a larger metric
    (a lower precedence) than the TUN route. The kernel deletes the TUN route
    when the device goes (when the last process holding it dies, even by
    SIGKILL), and the lookup in `table` then ends at the prohibit: client
    packets are refused with ICMP "administratively prohibited" instead of
    falling through to the main table and being forwarded around the relay.
    The relay's answers (`iif <tun>`) and the host's own packets (`iif lo`)
    are looked up in the main table first, so they are not affected.

    All of it is undone by `cfg.close()`.
    """
    if not client_nets:
        raise ValueError("no client networks given")
    nets: list[Network] = [ipaddress.ip_network(n, strict=False) for n in client_nets]
    versions = sorted({net.version for net in nets})
    cfg.link_up(tun_name)
    for version in versions:
        default = "0.0.0.0/0" if version == 4 else "::/0"
        cfg.add_route(default, ifname=tun_name, table=table, metric=TUN_ROUTE_METRIC)
        if fail_closed:
            cfg.add_route(default, table=table, route_type="prohibit", metric=FAIL_CLOSED_METRIC)
    for net in nets:
        cfg.add_rule(str(net), 254, priority - 3, iifname=tun_name)
        # Locally generated packets with a source in a client network never go to
        # the TUN: with no route upstream, the kernel picks such a source (the
        # VPN server's own client-side address) and looks the route up again,
        # which would match the TUN rule and loop the relay's own SYNs and pings
        # back into itself (seen with IPv6). Main table first, else unreachable.
        cfg.add_rule(str(net), 254, priority - 2, iifname="lo")
        cfg.add_rule(str(net), None, priority - 1, iifname="lo", unreachable=True)
        only: list[str | None] = [*iifs] or [None]
        for iif in only:
            cfg.add_rule(str(net), table, priority, iifname=iif)
    if 4 in versions:
        cfg.set_sysctl("net.ipv4.ip_forward", 1)
        cfg.set_sysctl(f"/proc/sys/net/ipv4/conf/{tun_name}/rp_filter", 0)
    if 6 in versions:
        cfg.set_sysctl("net.ipv6.conf.all.forwarding", 1)


PING_GROUP_RANGE = "net.ipv4.ping_group_range"
# Its warning is about the echo flows (relay.datapath.echo), and keeps their logger's
# name; the function lives here so that the supervisor does not import the data path.
_echo_log = logging.getLogger("relay.datapath.echo")


def enable_ping_sockets(net: NetConfig, gid: int | None = None) -> bool:
    """Widen ``net.ipv4.ping_group_range`` in ``net``'s namespace to ``gid`` (default:
    this process's group), so it may open ICMP sockets; ``net.close()`` restores the old range.

    Returns:
        False (after logging a warning) when the range could not be read or set.
    """
    gid = os.getegid() if gid is None else gid
    try:
        lo, hi = (int(x) for x in net.read_sysctl(PING_GROUP_RANGE).split())
        if not lo <= gid <= hi:
            lo, hi = (gid, gid) if lo > hi else (min(lo, gid), max(hi, gid))
            net.set_sysctl(PING_GROUP_RANGE, f"{lo} {hi}")
    except (OSError, ValueError) as exc:
        _echo_log.warning(
            "cannot allow ICMP sockets (%s): %s; echo requests will be dropped",
            PING_GROUP_RANGE, exc,
        )  # fmt: skip
        return False
    return True
