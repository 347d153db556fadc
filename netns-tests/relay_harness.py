"""`tunrelay run` in the lab's gateway namespace, for end-to-end relay tests.

Tests ported to the installed pytest plugin request its ``tunrelay_lab``
(`relay.lab.pytest_plugin`; ``conftest.py`` gives it this suite's defaults in
``tunrelay_lab_options``) and look at its relay through ``RelayProcess.of(lab)``,
which adds the checks below to the lab's tear-down. The others use the
fixtures defined in ``conftest.py`` on top of ``RelayProcess`` and
``gateway_snapshot`` below; any test here requests them by name, and a test
module imports from this module only the helpers it calls:

``relay``        a ``RelayProcess`` running with the default test set-up:
                 ``StreamDigest`` (``relay.analysis.digest``), ``StateDump`` (no
                 hooks; SIGUSR1 dumps the stack's state, see ``state_dump``)
                 and the flow log.
``start_relay``  a factory for other set-ups (more analyzers, environment,
                 extra ``tunrelay run`` options, a command to start it with).
``relay_files``  a directory the relay's workers (``nobody``) can write to:
                 the flow, digest and state-dump logs are there, and so should
                 any file a test's analyzer writes.

Theory of operation: the relay is spawned with ``Topology.spawn`` (nsexec
execs, so ``proc.pid`` is the supervisor's own PID; ``worker_pids()`` are its
workers, and /proc/PID/status of the one worker is the relay's memory), its
output goes to a file, and it is ready when it logs "relaying TCP". Its
workers run as ``nobody``, so the interpreter's installation is made reachable
for that user in the relay's own mount namespace (``relay.lab.reachable``). Every
relay the test started is checked at tear-down:

1. it is still running, and its log has no traceback (except the ones a test
   declared expected, e.g. ``InjectedFailure`` from ``Failing``);
2. SIGTERM makes it exit with status 0 within ``STOP_TIMEOUT``;
3. the gateway namespace, which still exists, no longer has its TUN device,
   policy rules, routes in its table, or forwarding turned on, and its links,
   rules, routes and sysctls are exactly what they were before the relay
   started; its state file is gone; and every flow in the flow log came from
   the lab's client (a flow from anywhere else means the relay's own upstream
   packets looped back into its TUN);
4. then the fixture closes the topology itself (``topology``'s own close is
   then a no-op) and asserts the three namespaces are gone.

Also here: helpers the relay tests share. Test data is a deterministic
pattern, cheap to make at hundreds of MB/s: one random 1 MiB block, with the
stream id and the byte offset stamped into every 4 KiB, so bytes that arrive
reordered, duplicated, or from another stream change the SHA-256. Each side
hashes incrementally; nothing holds a whole stream.

Bounds (every wait is bounded): relay ready 20 s, relay stop 10 s, flow and
digest records 10 s (a flow is logged when the stack forgets it, up to its
2 s TIME-WAIT after the close), one socket operation ``IO_TIMEOUT`` 20 s.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import itertools
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.host import netns
from relay.lab.lab import Lab, read_jsonl
from relay.lab.topology import Topology

__all__ = [
    "IO_TIMEOUT",
    "MIB",
    "Received",
    "RelayProcess",
    "Sent",
    "addrs",
    "diagnose",
    "expected_digest",
    "listener",
    "pattern_chunks",
    "recv_stream",
    "run_parallel",
    "send_pattern",
]

TUN = "trtun0"
TABLE = 5197
PRIORITY = 5197
RT_TABLE_MAIN = 254
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
RECORD_TIMEOUT = 10.0
IO_TIMEOUT = 20.0
MIB = 1 << 20
STAMP = 4096  # bytes between stamps in the pattern
CHUNK = 256 * 1024  # send/recv size of the helpers
# StateDump has no hooks: SIGUSR1 makes it write the stack's state (``state_dump``).
DEFAULT_ANALYZERS = ("relay.analysis.digest:StreamDigest", "relay.lab.analyzers:StateDump")
# The relay logs this once it routes client packets into the TUN.
READY_MARK = "relaying TCP"
WORKER_USER = "nobody"  # the relay's default when started as root
# Sysctls a relay changes while it runs (and must restore).
SYSCTLS = ("ipv4/ip_forward", "ipv6/conf/all/forwarding", "ipv4/ping_group_range")
# This suite's defaults for the plugin's labs (``tunrelay_lab_options`` in conftest.py).
LAB_OPTIONS: dict[str, Any] = {
    "analyzers": list(DEFAULT_ANALYZERS),
    "env": {
        "TUNRELAY_DIGEST_LOG": "{files}/digests.jsonl",
        "TUNRELAY_STATE_DUMP": "{files}/state.txt",
    },
    # The tests count the flow log's records: no probe flow in it. "relaying TCP"
    # means ready here, as for ``start_relay``.
    "probe": False,
    "setup": lambda lab: lab.notes.update(gateway_before=gateway_snapshot(lab.topology)),
}


# --- the relay process ---------------------------------------------------------------


@dataclass
class RelayProcess:
    """One `tunrelay run` in the gateway namespace of ``topo``."""

    topo: Topology
    proc: subprocess.Popen[Any]
    log_path: Path
    flow_log: Path
    digest_log: Path
    state_file: Path  # StateDump's output
    run_state: Path  # `tunrelay run`'s state file (relay.service.runstate)
    started: float
    expected_tracebacks: tuple[str, ...] = ()
    gateway_before: set[str] | None = None  # gateway_snapshot() before it started
    stopped: bool = False
    spoofed_nets: tuple[str, ...] = ()  # client addresses a test sends from besides the lab's
    exit_status: int | None = None
    _ready_seconds: float = field(default=0.0)

    @classmethod
    def of(cls, lab: Lab) -> RelayProcess:
        """The relay of a ``tunrelay_lab`` (built with ``LAB_OPTIONS``); at the lab's
        tear-down it is checked like ``start_relay``'s (running, no traceback, exit
        status 0 on SIGTERM, nothing left in the gateway)."""
        if "relay_process" in lab.notes:
            found: RelayProcess = lab.notes["relay_process"]
            return found
        assert lab.relay_proc is not None, "the lab has no relay (relay=False)"
        relay = cls(
            lab.topology, lab.relay_proc, lab.log_path, lab.flow_log,
            lab.files / "digests.jsonl", lab.files / "state.txt",
            lab.state_dir / "run" / f"{TUN}.json", time.monotonic(),
            gateway_before=lab.notes.get("gateway_before"),
        )  # fmt: skip
        lab.notes["relay_process"] = relay

        def check() -> None:
            try:
                if not relay.stopped:
                    relay.check_running()
            finally:
                relay.stop()  # the lab's own stop then finds it gone
                lab.exit_status = relay.exit_status

        lab.at_teardown(check)
        return relay

    @property
    def pid(self) -> int:
        """The supervisor's PID."""
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        """The supervisor's children: its workers."""
        return children(self.pid)

    @property
    def worker_pid(self) -> int:
        """The one worker's PID (``--workers 1``, the default here)."""
        pids = self.worker_pids()
        assert len(pids) == 1, f"workers of {self.pid}: {pids}"
        return pids[0]

    # --- looking at it ---

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        """VmRSS of the relay's one worker (the packet loop), KiB."""
        return int(proc_status(self.worker_pid)["VmRSS"].split()[0])

    def cpu_seconds(self) -> float:
        """User + system CPU time the supervisor and its workers have used so far."""
        total = 0.0
        for pid in (self.pid, *self.worker_pids()):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def state_dump(self, client_port: int | None = None, timeout: float = 3.0) -> str:
        """The relay's internal state (StateDump, on SIGUSR1): the stack's and relay's
        counters, and each connection's and flow's fields (only ``client_port``'s if given)."""
        if not self.alive():
            return "(the relay is not running)"
        before = self.state_file.read_text().count("=== end ===") if self.state_file.exists() else 0
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.state_file.read_text() if self.state_file.exists() else ""
            if text.count("=== end ===") > before:
                break
            time.sleep(0.02)
        else:
            return f"(no state dump within {timeout} s)"
        last = text.split("=== state dump")[-1]
        lines = last.splitlines()
        if client_port is not None:
            mark = f"client_port={client_port},"
            lines = [ln for ln in lines if not ln.startswith(("conn ", "flow ")) or mark in ln]
        return "=== state dump" + "\n".join(lines)

    def exit_line(self) -> str | None:
        """The relay's "stopped: stack ...; relay ...; tun ..." line (its counters)."""
        for line in reversed(self.log_text().splitlines()):
            if "stopped: stack" in line:
                return line
        return None

    def exit_lines(self) -> list[str]:
        """Every "stopped: stack ..." line: one per worker with ``--workers N``."""
        return [line for line in self.log_text().splitlines() if "stopped: stack" in line]

    def counter(self, name: str) -> int:
        """Counter ``name`` (its first occurrence per line) summed over every exit line."""
        found = [re.search(rf"\b{name}=(\d+)", line) for line in self.exit_lines()]
        assert any(found), f"no {name} in {self.exit_lines()!r}"
        return sum(int(m.group(1)) for m in found if m)

    def unexpected_tracebacks(self) -> list[str]:
        """Tracebacks in the log whose final exception is not an expected one."""
        lines = self.log_text().splitlines()
        found = []
        for i, line in enumerate(lines):
            if not line.startswith("Traceback (most recent call last):"):
                continue
            # The exception line is the first unindented line after the frames.
            last = next((ln for ln in lines[i + 1 :] if ln and not ln[0].isspace()), "<log ends>")
            if not any(last.startswith(name) for name in self.expected_tracebacks):
                found.append("\n".join(lines[max(0, i - 1) : i + 30]))
        return found

    def problems(self) -> list[str]:
        """Lines at WARNING and above (shown in failure messages)."""
        return [ln for ln in self.log_text().splitlines() if re.search(r" (WARNING|ERROR) ", ln)]

    # --- its logs ---

    def flow_records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.flow_log)

    def digest_records(self) -> list[dict[str, Any]]:
        return read_jsonl(self.digest_log)

    def wait_records(
        self,
        which: str,
        match: Callable[[dict[str, Any]], bool],
        count: int = 1,
        timeout: float = RECORD_TIMEOUT,
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` records of the "flow" or "digest" log match; return them."""
        read = self.flow_records if which == "flow" else self.digest_records
        deadline = time.monotonic() + timeout
        while True:
            records = [r for r in read() if match(r)]
            if len(records) >= count or time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        if len(records) < count:
            raise AssertionError(
                f"{which} log: {len(records)} of {count} records after {timeout} s; "
                f"all: {read()}\n{self.state_dump()}\nrelay log tail:\n{self.log_tail()}"
            )
        return records

    def flow_of(self, client_port: int, **kw: Any) -> dict[str, Any]:
        """The flow-log record of the connection from ``client_port``."""
        (rec,) = self.wait_records("flow", lambda r: r.get("id.orig_p") == client_port, **kw)
        return rec

    def digest_of(self, client_port: int, **kw: Any) -> dict[str, Any]:
        """The StreamDigest record of the connection from ``client_port``."""
        (rec,) = self.wait_records("digest", lambda r: r.get("id.orig_p") == client_port, **kw)
        return rec

    def foreign_flows(self) -> list[dict[str, Any]]:
        """Flow-log records whose client is not the lab's client (there should be none),
        nor in ``spoofed_nets`` (a test that sends from other client addresses)."""
        clients = (self.topo.cli_v4, self.topo.cli_v6)
        nets = [ipaddress.ip_network(n) for n in self.spoofed_nets]
        return [
            r
            for r in self.flow_records()
            if r.get("id.orig_h") not in clients
            and not any(ipaddress.ip_address(r["id.orig_h"]) in n for n in nets)
        ]

    def describe(self) -> str:
        """For assertion messages: pid, state, exit line, warnings, log tail."""
        state = "running" if self.alive() else f"exited {self.proc.returncode}"
        problems = "\n".join(self.problems()[-20:]) or "(none)"
        return (
            f"relay pid {self.pid} ({state}); exit line: {self.exit_line()}\n"
            f"warnings/errors:\n{problems}\nlog tail:\n{self.log_tail()}"
        )

    # --- checks and stopping ---

    def check_running(self) -> None:
        """The relay is alive and its log holds no unexpected traceback."""
        assert self.alive(), f"the relay died: {self.describe()}"
        tracebacks = self.unexpected_tracebacks()
        assert not tracebacks, "traceback in the relay log:\n" + "\n---\n".join(tracebacks)

    def stop(self) -> None:
        """SIGTERM; assert exit status 0 and that everything it installed is gone."""
        if self.stopped:
            return
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_status = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
            raise AssertionError(
                f"the relay did not exit within {STOP_TIMEOUT} s of SIGTERM: {self.describe()}"
            ) from None
        print(f"\n[relay] {self.exit_line()}")
        assert self.exit_status == 0, f"exit status {self.exit_status}: {self.describe()}"
        leftovers = gateway_leftovers(self.topo, self.gateway_before)
        assert leftovers == [], f"`tunrelay run` left behind in {self.topo.gw}: {leftovers}"
        assert not self.run_state.exists(), f"state file left: {self.run_state.read_text()}"
        strangers = self.foreign_flows()
        assert not strangers, (
            f"{len(strangers)} flows did not come from the client (a routing loop: the "
            f"relay's own upstream packets came back through its TUN?); first: {strangers[:3]}"
        )
        tracebacks = self.unexpected_tracebacks()
        assert not tracebacks, "traceback in the relay log:\n" + "\n---\n".join(tracebacks)


def children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (this kernel has no /proc/PID/task/TID/children)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                found.append(int(name))
    return sorted(found)


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (``Uid``, ``CapEff``, ``NoNewPrivs``, ``VmRSS``...)."""
    with open(f"/proc/{pid}/status") as f:
        return dict((k, v.strip()) for k, _, v in (line.partition(":") for line in f))


def run_in(topo: Topology, ns: str, argv: Sequence[str], timeout: float = 5.0) -> str:
    """Run a tool inside a lab namespace (bounded); its output, or why it failed."""
    cmd = [sys.executable, "-m", "relay.lab.nsexec", topo.ns(ns), "--", *argv]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{argv[0]}: {exc!r}"
    return (done.stdout + done.stderr).strip()


# The client kernel's view of a transfer's loss recovery (``/proc/net/netstat`` and
# ``/proc/net/snmp`` are per network namespace).
SENDER_COUNTERS = (
    "RetransSegs",
    "TCPTimeouts",
    "TCPLossProbes",
    "TCPSackRecovery",
    "TCPLostRetransmit",
    "TCPSpuriousRTOs",
    "TCPDSACKRecv",
    "TCPSACKReorder",
)


def tcp_counters(topo: Topology, ns: str) -> dict[str, int]:
    """The kernel's TCP counters in namespace ``ns`` (Tcp: and TcpExt: rows)."""
    text = run_in(topo, ns, ["cat", "/proc/net/snmp", "/proc/net/netstat"])
    found: dict[str, int] = {}
    lines = text.splitlines()
    for head, values in itertools.pairwise(lines):
        names, nums = head.split(), values.split()
        if names[0] in ("Tcp:", "TcpExt:") and nums[0] == names[0] and len(names) == len(nums):
            found.update((k, int(v)) for k, v in zip(names[1:], nums[1:], strict=True))
    return found


def counters_delta(before: dict[str, int], after: dict[str, int]) -> str:
    """``SENDER_COUNTERS`` that moved, as ``name=+n``."""
    moved = [(k, after.get(k, 0) - before.get(k, 0)) for k in SENDER_COUNTERS]
    return " ".join(f"{k}=+{n}" for k, n in moved if n) or "no retransmissions"


def diagnose(topo: Topology, client_port: int, upstream_port: int | None = None) -> str:
    """Kernel socket state of one relayed connection, from all three namespaces, and a
    short packet capture on the client side of the gateway: for failure messages."""
    parts = [f"ss, client side (port {client_port}):"]
    parts.append(run_in(topo, "cli", ["ss", "-tinmoe", f"sport = :{client_port}"]))
    if upstream_port is not None:
        for ns, side in (("gw", "sport"), ("srv", "dport")):
            parts.append(f"ss in {ns} (relay's upstream port {upstream_port}):")
            parts.append(run_in(topo, ns, ["ss", "-tinmoe", f"{side} = :{upstream_port}"]))
    for ns in ("cli", "gw"):
        counters = run_in(topo, ns, ["nstat", "-asz"])
        wanted = [ln for ln in counters.splitlines() if re.search(r"Csum|Err|Drop|Fail", ln)]
        parts.append(f"nstat in {ns} (errors, drops):")
        parts.append("\n".join(ln for ln in wanted if not re.search(r"\s0\s", ln)) or "(none)")
    parts.append(f"links in gw:\n{run_in(topo, 'gw', ['ip', '-s', 'link', 'show', TUN])}")
    parts.append(f"tcpdump on {topo.gw_cli_if} for 2 s (port {client_port}):")
    parts.append(
        run_in(
            topo, "gw",
            ["timeout", "2", "tcpdump", "-nn", "-c", "40", "-i", topo.gw_cli_if,
             "tcp", "port", str(client_port)],
            timeout=5.0,
        )
    )  # fmt: skip
    return "\n".join(parts)


def relay_installed(topo: Topology) -> dict[str, Any]:
    """What of the relay's set-up exists in the gateway namespace now: its TUN, its
    policy rules (to its table or in its priority band), routes in its table, and
    the forwarding sysctls."""
    ipr = netns.ipr(topo.gw)
    try:
        links = [link.get("ifname") for link in ipr.get_links()]
        rules = [  # pointing at its table, or in its priority band (the "iif lo" guards)
            (family, r.get_attr("FRA_SRC"), r.get("src_len"))
            for family in (socket.AF_INET, socket.AF_INET6)
            for r in ipr.get_rules(family=family)
            if r.get_attr("FRA_TABLE") == TABLE
            or PRIORITY - 10 <= (r.get_attr("FRA_PRIORITY") or 0) <= PRIORITY
        ]
        routes = [
            (family, r.get_attr("RTA_DST"), r.get("dst_len"), r.get("type"))
            for family in (socket.AF_INET, socket.AF_INET6)
            for r in ipr.get_routes(family=family, table=TABLE)
        ]
    finally:
        ipr.close()
    with netns.entered(topo.gw):
        forwarding = {
            key: Path("/proc/sys/net", key).read_text().strip()
            for key in ("ipv4/ip_forward", "ipv6/conf/all/forwarding")
        }
    return {"tun": TUN in links, "rules": rules, "routes": routes, "forwarding": forwarding}


def gateway_snapshot(topo: Topology) -> set[str]:
    """Every link, policy rule, route (main table and the relay's) and forwarding sysctl
    of the gateway namespace, one string each: compared before and after a relay run."""
    ipr = netns.ipr(topo.gw)
    items: set[str] = set()
    try:
        items |= {f"link {link.get('ifname')}" for link in ipr.get_links()}
        for family in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_rules(family=family):
                attrs = sorted((k, str(v)) for k, v in r["attrs"] if k != "FRA_PROTOCOL")
                items.add(f"rule {family} action={r['action']} {attrs}")
            for table in (RT_TABLE_MAIN, TABLE):
                for r in ipr.get_routes(family=family, table=table):
                    attrs = sorted(
                        (k, str(v)) for k, v in r["attrs"] if k not in ("RTA_CACHEINFO",)
                    )
                    items.add(f"route {family} type={r['type']} /{r['dst_len']} {attrs}")
    finally:
        ipr.close()
    with netns.entered(topo.gw):
        for key in SYSCTLS:
            items.add(f"sysctl {key}={Path('/proc/sys/net', key).read_text().strip()}")
    return items


def gateway_leftovers(topo: Topology, before: set[str] | None = None) -> list[str]:
    """What `tunrelay run` left in the (still existing) gateway namespace: the
    differences from ``before`` (a ``gateway_snapshot`` taken before it started),
    and anything of its TUN, table or forwarding in any case."""
    assert netns.exists(topo.gw), f"{topo.gw} is gone: cannot check it"
    now = relay_installed(topo)
    left = []
    if now["tun"]:
        left.append(f"TUN device {TUN}")
    left += [f"rule {r}" for r in now["rules"]]
    left += [f"route {r}" for r in now["routes"]]
    left += [f"sysctl {k}={v}" for k, v in now["forwarding"].items() if v != "0"]
    if before is not None:
        after = gateway_snapshot(topo)
        left += [f"added: {x}" for x in sorted(after - before)]
        left += [f"removed: {x}" for x in sorted(before - after)]
    return left


# --- sockets and data ----------------------------------------------------------------


def addrs(topo: Topology, family: int) -> tuple[str, str]:
    """(client address, server address) for ``family``."""
    if family == socket.AF_INET:
        return topo.cli_v4, topo.srv_v4
    return topo.cli_v6, topo.srv_v6


def listener(topo: Topology, family: int, backlog: int = 16) -> tuple[socket.socket, int]:
    """A listening socket in the server namespace (closed at tear-down) and its port."""
    srv = topo.socket("srv", family)
    srv.bind((addrs(topo, family)[1], 0))
    srv.listen(backlog)
    srv.settimeout(IO_TIMEOUT)
    return srv, srv.getsockname()[1]


def connect(topo: Topology, family: int, port: int, timeout: float = IO_TIMEOUT) -> socket.socket:
    """A client socket (client namespace) connected to the server's ``port``."""
    sock = topo.socket("cli", family)
    sock.settimeout(timeout)
    sock.connect((addrs(topo, family)[1], port))
    return sock


def accept(srv: socket.socket) -> socket.socket:
    conn, _ = srv.accept()
    conn.settimeout(IO_TIMEOUT)
    return conn


@functools.cache
def _base_block() -> bytes:
    return random.Random(0x7E57).randbytes(MIB)


def pattern_chunks(stream: int, size: int, chunk: int = MIB) -> Iterator[bytes]:
    """The ``size`` bytes of test stream ``stream``, in pieces of at most ``chunk`` (<= 1 MiB).

    Every 4 KiB of the base block gets (stream, absolute offset) stamped into
    its first 12 bytes, so every stream and every position is distinct.
    """
    assert 0 < chunk <= MIB and MIB % chunk == 0
    base = _base_block()
    pack = struct.Struct("<IQ").pack_into
    for mib_start in range(0, size, MIB):
        block = bytearray(base[: min(MIB, size - mib_start)])
        for off in range(0, len(block) - 11, STAMP):
            pack(block, off, stream, mib_start + off)
        for off in range(0, len(block), chunk):
            yield bytes(block[off : off + chunk])


@functools.cache
def expected_digest(stream: int, size: int) -> str:
    """SHA-256 (hex) of ``size`` bytes of test stream ``stream``."""
    h = hashlib.sha256()
    for piece in pattern_chunks(stream, size):
        h.update(piece)
    return h.hexdigest()


@dataclass
class Sent:
    count: int
    sha256: str
    seconds: float


@dataclass
class Received:
    count: int
    sha256: str
    seconds: float  # from the call until EOF (or the limit)
    eof: bool

    def mbps(self) -> float:
        return self.count / max(self.seconds, 1e-9) / 1e6


def send_pattern(
    sock: socket.socket,
    stream: int,
    size: int,
    *,
    shut: bool = True,
    chunk: int = CHUNK,
    stop: threading.Event | None = None,
) -> Sent:
    """Send ``size`` bytes of ``stream`` (blocking, per-call socket timeout), hashing
    as it goes; then ``shutdown(SHUT_WR)`` if ``shut``. Stops early when ``stop`` is set."""
    h = hashlib.sha256()
    count = 0
    t0 = time.perf_counter()
    for piece in pattern_chunks(stream, size, chunk):
        if stop is not None and stop.is_set():
            break
        sock.sendall(piece)
        h.update(piece)
        count += len(piece)
    if shut:
        sock.shutdown(socket.SHUT_WR)
    return Sent(count, h.hexdigest(), time.perf_counter() - t0)


def recv_stream(
    sock: socket.socket,
    limit: int | None = None,
    *,
    progress: Callable[[int], None] | None = None,
) -> Received:
    """Read until EOF (or ``limit`` bytes), hashing as it goes.

    ``progress(total)`` is called after every read.
    """
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    count = 0
    eof = False
    t0 = time.perf_counter()
    while limit is None or count < limit:
        want = CHUNK if limit is None else min(CHUNK, limit - count)
        n = sock.recv_into(view[:want])
        if n == 0:
            eof = True
            break
        h.update(view[:n])
        count += n
        if progress is not None:
            progress(count)
    return Received(count, h.hexdigest(), time.perf_counter() - t0, eof)


def run_threads(
    *fns: Callable[[], Any], timeout: float
) -> tuple[list[Any], list[BaseException | None], list[str]]:
    """Run each function in its own thread for at most ``timeout`` seconds.

    Returns:
        Their results and exceptions, in order, and the names of the ones still
        running at the end (their sockets are closed at tear-down, which ends them).
    """
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException | None] = [None] * len(fns)

    def wrap(i: int, fn: Callable[[], Any]) -> None:
        try:
            results[i] = fn()
        except BaseException as exc:
            errors[i] = exc

    threads = [
        threading.Thread(target=wrap, args=(i, fn), daemon=True, name=getattr(fn, "__name__", ""))
        for i, fn in enumerate(fns)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return results, errors, [t.name for t in threads if t.is_alive()]


def run_parallel(*fns: Callable[[], Any], timeout: float) -> list[Any]:
    """Run each function in its own thread; their results, in order.

    Raises the first exception a function raised (after all finished or the
    time ran out), or AssertionError naming the ones still running after
    ``timeout`` seconds.
    """
    results, errors, stuck = run_threads(*fns, timeout=timeout)
    for exc in errors:
        if exc is not None:
            raise exc
    assert not stuck, f"still running after {timeout} s: {stuck}"
    return results
