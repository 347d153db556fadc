"""A three-namespace test network: client -> gateway -> server.

Theory of operation: `Topology.build()` creates three fresh network
namespaces and joins them with two veth pairs, each created inside the
gateway namespace with its peer placed straight into the client or server
namespace (IFLA_NET_NS_FD on the peer), so nothing is ever created in the
host's namespace. Everything is done from this thread with setns(2) and
netlink sockets opened inside each namespace (relay.host.netns): no helper
processes are forked, and set-up plus tear-down take a few tens of ms.

    cli ns                     gw ns                          srv ns
    cli-gw 198.18.1.2/24  ---  gw-cli 198.18.1.1/24
           fd00:1::2/64               fd00:1::1/64
                               gw-srv 198.18.2.1/24  ---  srv-gw 198.18.2.2/24
                                      fd00:2::1/64               fd00:2::2/64

The client's default routes and the server's routes back to the client
network point at the gateway, so with forwarding on in the gateway plain
kernel forwarding connects them (the baseline); with the relay's policy rule
the gateway hands the client's packets to a TUN device instead. Loopback and
these veths are the only links: there is no route to any real network.

`close()` kills spawned processes, runs deferred clean-ups (sockets, TUN
devices, NetConfigs) in reverse order, deletes the veths and removes the
namespaces. It is safe to call twice and never raises for things already
gone.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from relay.host import netns
from relay.host.netconfig import IFA_F_NODAD, NetConfig

# The directory that holds the ``relay`` package (a checkout's root; for an
# installed package, its site-packages): the PYTHONPATH entry ``spawn`` adds.
REPO_ROOT = Path(__file__).resolve().parents[2]
NAME_PREFIX = "tr-"
_counter = itertools.count(1)


class Topology:
    """Names and addresses of one client/gateway/server test network."""

    # Interface names (each lives in its own namespace).
    cli_if = "cli-gw"
    gw_cli_if = "gw-cli"
    gw_srv_if = "gw-srv"
    srv_if = "srv-gw"

    cli_v4 = "198.18.1.2"
    gw_cli_v4 = "198.18.1.1"
    gw_srv_v4 = "198.18.2.1"
    srv_v4 = "198.18.2.2"
    cli_v6 = "fd00:1::2"
    gw_cli_v6 = "fd00:1::1"
    gw_srv_v6 = "fd00:2::1"
    srv_v6 = "fd00:2::2"
    client_net_v4 = "198.18.1.0/24"
    client_net_v6 = "fd00:1::/64"
    server_net_v4 = "198.18.2.0/24"
    server_net_v6 = "fd00:2::/64"
    # `tunrelay run` denies these ranges by default (198.18.0.0/15 is reserved for
    # benchmarking, fd00::/8 is private); in the lab it opens them, except what the
    # defaults deny more specifically: the client networks, the gateway's addresses.
    relay_allow = ("--allow", "198.18.0.0/15", "--allow", "[fd00::/8]")

    def __init__(self, base: str) -> None:
        self.base = base
        self.cli = f"{base}-cli"
        self.gw = f"{base}-gw"
        self.srv = f"{base}-srv"
        self.setup_seconds = 0.0
        self.teardown_seconds = 0.0
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._cleanups: list[Callable[[], object]] = []
        self._closed = False

    # --- build ---------------------------------------------------------------

    @classmethod
    def build(cls, base: str | None = None) -> Topology:
        """Create the namespaces, links, addresses and routes.

        Args:
            base: name prefix; default `tr-<pid>-<n>`, unique in this process.
        """
        start = time.perf_counter()
        topo = cls(base or f"{NAME_PREFIX}{os.getpid()}-{next(_counter)}")
        try:
            topo._build()
        except BaseException:
            topo.close()
            raise
        topo.setup_seconds = time.perf_counter() - start
        return topo

    def _build(self) -> None:
        for name in (self.cli, self.gw, self.srv):
            netns.create(name)
            self._created.append(name)
            # Link-local addresses would otherwise sit in DAD for ~1 s; the
            # global ones get IFA_F_NODAD. Set before the links exist.
            with netns.entered(name), open("/proc/sys/net/ipv6/conf/default/accept_dad", "w") as f:
                f.write("0")
        iprs: dict[str, Any] = {}
        try:
            for name in (self.cli, self.gw, self.srv):
                iprs[name] = netns.ipr(name)
            gw = iprs[self.gw]
            for local, peer, peer_ns in (
                (self.gw_cli_if, self.cli_if, self.cli),
                (self.gw_srv_if, self.srv_if, self.srv),
            ):
                fd = netns.open_fd(peer_ns)
                try:
                    gw.link(
                        "add", ifname=local, kind="veth", peer={"ifname": peer, "net_ns_fd": fd}
                    )
                finally:
                    os.close(fd)
            plan = {
                self.cli: [(self.cli_if, f"{self.cli_v4}/24"), (self.cli_if, f"{self.cli_v6}/64")],
                self.gw: [
                    (self.gw_cli_if, f"{self.gw_cli_v4}/24"),
                    (self.gw_cli_if, f"{self.gw_cli_v6}/64"),
                    (self.gw_srv_if, f"{self.gw_srv_v4}/24"),
                    (self.gw_srv_if, f"{self.gw_srv_v6}/64"),
                ],
                self.srv: [(self.srv_if, f"{self.srv_v4}/24"), (self.srv_if, f"{self.srv_v6}/64")],
            }
            for name, addrs in plan.items():
                ipr = iprs[name]
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                for ifname, cidr in addrs:
                    index = ipr.link_lookup(ifname=ifname)[0]
                    add_address(ipr, index, cidr)
                    ipr.link("set", index=index, state="up")
            for name, addrs in plan.items():
                for ifname in dict(addrs):
                    ipr = iprs[name]
                    wait_link_local(ipr, ipr.link_lookup(ifname=ifname)[0])
            cli, srv = iprs[self.cli], iprs[self.srv]
            cli.route("add", dst="0.0.0.0", dst_len=0, gateway=self.gw_cli_v4)
            cli.route("add", dst="::", dst_len=0, gateway=self.gw_cli_v6, family=socket.AF_INET6)
            srv.route("add", dst="198.18.1.0", dst_len=24, gateway=self.gw_srv_v4)
            srv.route(
                "add", dst="fd00:1::", dst_len=64, gateway=self.gw_srv_v6, family=socket.AF_INET6
            )
        finally:
            for ipr in iprs.values():
                ipr.close()

    # --- helpers for tests -----------------------------------------------------

    def ns(self, role_or_name: str) -> str:
        """Map "cli", "gw" or "srv" to the namespace name; pass names through."""
        return {"cli": self.cli, "gw": self.gw, "srv": self.srv}.get(role_or_name, role_or_name)

    def defer(self, cleanup: Callable[[], object]) -> None:
        """Run `cleanup` at tear-down (last deferred runs first)."""
        self._cleanups.append(cleanup)

    def socket(
        self, ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """Create a socket inside namespace `ns`; it is closed at tear-down."""
        with netns.entered(self.ns(ns)):
            sock = socket.socket(family, type)
        self.defer(sock.close)
        return sock

    def tx_dropped(self, ns: str, ifname: str) -> int:
        """``tx_dropped`` of link `ifname` in namespace `ns`: for a TUN device, the
        packets the kernel dropped because its reader's queue was full."""
        ipr = netns.ipr(self.ns(ns))
        try:
            (link,) = ipr.link("get", ifname=ifname)
            return int(link.get_attr("IFLA_STATS64")["tx_dropped"])
        finally:
            ipr.close()

    def netconfig(self, ns: str) -> NetConfig:
        """A NetConfig for namespace `ns`, closed (undone) at tear-down."""
        cfg = NetConfig(self.ns(ns))
        self.defer(cfg.close)
        return cfg

    def enable_forwarding(self) -> NetConfig:
        """Turn on IPv4 and IPv6 forwarding in the gateway (plain kernel router)."""
        cfg = self.netconfig("gw")
        cfg.set_sysctl("net.ipv4.ip_forward", 1)
        cfg.set_sysctl("net.ipv6.conf.all.forwarding", 1)
        return cfg

    def spawn(self, ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` inside namespace `ns` via `python -m relay.lab.nsexec`.

        The process gets its own session (unless `start_new_session=False`),
        and it and its process group are killed and reaped at tear-down.
        `reachable_by`: a user that must be able to read this interpreter's
        installation (a relay whose workers run as that user; relay.lab.reachable).
        """
        reachable_by = popen_kwargs.pop("reachable_by", None)
        env = dict(popen_kwargs.pop("env", None) or os.environ)
        # relay must be importable by the child even without an installed package.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        popen_kwargs.setdefault("start_new_session", True)
        popen_kwargs.setdefault("stdin", subprocess.DEVNULL)
        cmd = [sys.executable, "-m", "relay.lab.nsexec", self.ns(ns)]
        if reachable_by is not None:
            cmd += ["--reachable-by", str(reachable_by)]
        cmd += ["--", *argv]
        proc: subprocess.Popen[Any] = subprocess.Popen(cmd, env=env, **popen_kwargs)
        self._procs.append(proc)
        return proc

    # --- tear-down -------------------------------------------------------------

    def _stop_processes(self, grace: float = 2.0) -> None:
        procs, self._procs = self._procs, []
        # Signal the group only while its leader is unreaped: until then the
        # PID (= PGID) cannot have been reused by an unrelated process.
        for proc in procs:
            if proc.returncode is None:
                _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

    def close(self) -> None:
        """Tear everything down; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        start = time.perf_counter()
        self._stop_processes()
        while self._cleanups:
            with contextlib.suppress(Exception):
                self._cleanups.pop()()
        if self.gw in self._created:
            # Deleting one end of a veth deletes both. Explicitly, so the
            # links go now even if a leaked socket keeps a namespace alive.
            with contextlib.suppress(Exception):
                ipr = netns.ipr(self.gw)
                try:
                    for ifname in (self.gw_cli_if, self.gw_srv_if):
                        for index in ipr.link_lookup(ifname=ifname):
                            ipr.link("del", index=index)
                finally:
                    ipr.close()
        for name in reversed(self._created):
            netns.remove(name, missing_ok=True)
        self._created.clear()
        self.teardown_seconds = time.perf_counter() - start

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def add_address(ipr: Any, index: int, cidr: str) -> None:
    """Add ``cidr`` ("198.18.1.2/24" or "fd00:1::2/64") to link ``index``.

    IPv6 addresses skip duplicate address detection (IFA_F_NODAD), so they are
    usable at once in a fresh namespace.
    """
    address, prefixlen = cidr.split("/")
    v6 = ":" in address
    ipr.addr(
        "add",
        index=index,
        address=address,
        prefixlen=int(prefixlen),
        family=socket.AF_INET6 if v6 else socket.AF_INET,
        flags=IFA_F_NODAD if v6 else 0,
    )


def wait_link_local(ipr: Any, index: int, timeout: float = 5.0) -> None:
    """Wait until link ``index`` has its ``fe80::/64`` route.

    The kernel adds it when the link's carrier comes on, which a veth learns
    through the deferred link-watch work, up to a second after both ends are up.
    Waiting here keeps it from appearing later, inside whatever a test does
    next (a relay's before-and-after check of the gateway's routes saw it).
    """
    deadline = time.monotonic() + timeout
    while True:
        for route in ipr.get_routes(family=socket.AF_INET6, table=254):
            if route.get_attr("RTA_DST") == "fe80::" and route.get_attr("RTA_OIF") == index:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"link {index}: no fe80::/64 route after {timeout} s")
        time.sleep(0.01)


def stop_process(proc: subprocess.Popen[Any]) -> int:
    """SIGTERM a child and wait for it; its exit status (-9 if it had to be killed)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)
    return proc.returncode


def _signal(proc: subprocess.Popen[Any], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, sig)  # its own session: pgid == pid
        except ProcessLookupError:
            proc.send_signal(sig)


def remove_stale_namespaces() -> list[str]:
    """Remove `tr-<pid>-*` namespaces left by test processes that no longer run."""
    removed = []
    for name in sorted(
        os.listdir(netns.NETNS_RUN_DIR) if os.path.isdir(netns.NETNS_RUN_DIR) else []
    ):
        parts = name.split("-")
        if len(parts) != 4 or parts[0] + "-" != NAME_PREFIX or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or _alive(pid):
            continue
        netns.remove(name, missing_ok=True)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
