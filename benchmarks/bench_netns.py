"""tunrelay against its peers, side by side, in throw-away network namespaces.

Run (root): ``sudo .venv/bin/python benchmarks/bench_netns.py [--quick] [--repeat N]
[--only a,b,d] [--measures up,down] [--seconds T] [--idle N] [--time-limit S]
[--json PATH] [--log-dir DIR] [--profile DIR] [--capture-in DIR]``

Configurations, each measured in a fresh ``relay.lab.topology.Topology`` (client ns
198.18.1.2 -> gateway ns -> server ns 198.18.2.2; nothing outside
198.18.0.0/15 and fd00::/8, no route to any real network):

    a  kernel forwarding in the gateway; the client talks straight to the server
    b  a trio port forwarder (benchmarks/forwarder.py) between two kernel sockets,
       listening in the gateway on 198.18.1.1; the client connects to it
    c  tunrelay with offloads (the default; ``--offload`` named; n/a if the CLI lacks it)
    d  tunrelay without offloads (``tunrelay run --no-offload --tun trb0 ...``) in the
       gateway; the client connects to the server's address and the relay intercepts
       (both with the default ``--workers``, one per CPU: CPU, RSS and fds are summed
       over the supervisor and its workers)
    e  tunrelay with offloads and ``--workers 1``: c/e on 4 streams is what the
       workers add (ideally about 2 on 2 cores)
    f  the TUN floor (benchmarks/tun_floor.py): e's TUN device and trio tasks with
       no TCP stack (in-order bytes, one writev and one ACK per pass, timestamps),
       which holds uploads and short request/response connections: up, connrate,
       connrate1 and latency run on it. e/f is what tunrelay adds to the path
       itself; f/b and f/k are what no trio-based relay on a TUN device escapes
    g  f without trio (``tun_floor.py --epoll``): one thread blocking in
       epoll_wait on the queue and the upstream sockets; f/g is trio's share
       (up and latency)
    l  f with one worker per CPU (``tun_floor.py --workers N``), each on its own
       queue as c's workers: connrate and connrate1 (l/b, c/l)
    h  c with ``--log-dir`` (Zeek-compatible logs: every flow is detected, and
       dissected while its protocol is one of ours; a conn.log row per flow):
       h/c is what the protocol logs cost
    i  c with a pass-through inline analyzer (``relay.lab.analyzers:PassThrough``,
       whose ``data`` returns each chunk unchanged): i/c is what the inline path costs
    j  c with ``--capture-dir`` (every flow's bytes and a synthetic pcap written to
       a directory on the benchmark's temporary file system, removed after each
       lab): j/c is what capture costs, j/i what its writing adds to the inline path
    k  b reading 256 KiB per receive_some (``forwarder.py --chunk 262144``): the
       faster Python ceiling for single-stream throughput (c/k, e/k); by default
       only the throughput measures run on it
    s  c with a passive stream analyzer that reads every byte of every flow
       (``relay.lab.analyzers:StreamReader``): s/c is what one costs; not in
       the default ``--only``

Measures, per configuration: iperf3 single-stream throughput up and down and
4 streams up, connections/s with 8 connections in flight and (connrate1) with
one, request/response latency (median and p99), the relay's CPU% during the
single-stream upload and download, its RSS before and with N idle connections
open, and (from its exit lines) how many full garbage collections it ran in the
round and the longest. Every measurement is repeated (``--repeat``, default 3;
rounds interleave the configurations, so a burst of load from elsewhere hits all
of them alike) and the median is printed,
with the ratios d/b, d/a, c/b, c/a, e/b, c/e, e/f, h/c, i/c, j/c, j/i, s/c, c/k, e/k, f/b,
g/b, f/k, l/b and c/l. Without ``--measures``, k runs only up, down and up4, and
connrate1 runs only on a, b, c, e and the floors (DEFAULT_SKIPS). See
benchmarks/README.md for what each number means.

Every child process has a hard time limit, every lab is torn down on every
exit path (signals are held while a lab is being built or torn down), and a
global alarm ends the run if something still hangs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeAlias

from relay.lab.topology import REPO_ROOT, Topology
from relay.service.stackbuild import stack_build

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "loadgen.py"
FORWARDER = HERE / "forwarder.py"
FLOOR = HERE / "tun_floor.py"
IPERF_PORT = 5201
ECHO_PORT = 7007
LATENCY_WARMUP = 100  # round trips loadgen's latency makes before it measures
TUN = "trb0"

CONFIGS: dict[str, str] = {
    "a": "kernel forwarding",
    "b": "trio forwarder",
    "c": "tunrelay --offload",
    "d": "tunrelay --no-offload",
    "e": "tunrelay --offload --workers 1",
    "f": "TUN latency floor (no TCP stack)",
    "g": "TUN latency floor without trio",
    "l": "TUN floor, one worker per CPU",
    "h": "tunrelay --offload --log-dir",
    "i": "tunrelay --offload, pass-through analyzer",
    "j": "tunrelay --offload --capture-dir",
    "k": "trio forwarder, 256 KiB reads",
    "s": "tunrelay --offload, a stream analyzer",
}
# The trio forwarders and the bytes they ask for per receive_some (forwarder.py --chunk).
FORWARDER_CHUNK = {"b": 65536, "k": 262144}
USES_RELAY = {"c", "d", "e", "h", "i", "j", "s"}  # tunrelay itself
# The floors (tun_floor.py) and what they can hold: f, in-order uploads and short
# request/response connections; g (a blocking connect per flow), uploads and one
# request/response connection.
FLOOR_MEASURES = {
    "f": ("up", "connrate", "connrate1", "latency"),
    "g": ("up", "latency"),
    "l": ("connrate", "connrate1"),
}
USES_TUN = USES_RELAY | set(FLOOR_MEASURES)
OFFLOADED = {"c", "e", "h", "i", "j", "s"}
# a userspace process whose CPU we measure
HAS_PROCESS = {"b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "s"}


@dataclass(frozen=True)
class Measure:
    key: str
    label: str
    fmt: Callable[[float], str]


def _g(v: float) -> str:
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _int(v: float) -> str:
    return f"{v:,.0f}"


def _one(v: float) -> str:
    return f"{v:.1f}"


def _two(v: float) -> str:
    return f"{v:.2f}"


MEASURES: list[Measure] = [
    Measure("up", "1 stream up, Gbit/s", _g),
    Measure("down", "1 stream down, Gbit/s", _g),
    Measure("up4", "4 streams up, Gbit/s", _g),
    Measure("cps1", "connections/s, 1 in flight", _int),
    Measure("cpu_conn1", "relay CPU per connection, 1 in flight, µs", _int),
    Measure("cps", "connections/s, {inflight} in flight", _int),
    Measure("cpu_conn", "relay CPU per connection, {inflight} in flight, µs", _int),
    Measure("rtt_p50", "req/resp median, µs", _int),
    Measure("rtt_p99", "req/resp p99, µs", _int),
    Measure("cpu_rt", "relay CPU per req/resp, µs", _int),
    # The same request/response connection while one bulk stream (iperf3, up or
    # down) runs through the same process (e: one worker; b: the forwarder).
    Measure("rtt_bulk_up_p50", "req/resp median beside 1 up, µs", _int),
    Measure("rtt_bulk_up_p99", "req/resp p99 beside 1 up, µs", _int),
    Measure("bulk_up_gbit", "the up stream meanwhile, Gbit/s", _g),
    Measure("rtt_bulk_down_p50", "req/resp median beside 1 down, µs", _int),
    Measure("rtt_bulk_down_p99", "req/resp p99 beside 1 down, µs", _int),
    Measure("bulk_down_gbit", "the down stream meanwhile, Gbit/s", _g),
    Measure("cpu_up", "relay CPU % (1 up)", _int),
    Measure("cpu_down", "relay CPU % (1 down)", _int),
    Measure("cpu_up4", "relay CPU % (4 up)", _int),
    # CPU % over the steady part divided by the run's rate: what a byte costs the
    # relay (all its processes), hence what one core's worth of workers can carry.
    Measure("cpu_gb_up", "relay CPU s per GB (1 up)", _two),
    Measure("cpu_gb_down", "relay CPU s per GB (1 down)", _two),
    Measure("cpu_gb_up4", "relay CPU s per GB (4 up)", _two),
    Measure("iperf_up4", "iperf3 CPU % (4 up)", _int),
    Measure("idle_up4", "machine idle % (4 up)", _int),
    Measure("rss_base", "relay RSS before idle, MiB", _one),
    Measure("rss_idle", "relay RSS + {idle} idle conns, MiB", _one),
    Measure("rss_per_conn", "relay RSS per idle conn, KiB", _one),
    Measure("pss_base", "relay PSS before idle, MiB", _one),
    Measure("pss_idle", "relay PSS + {idle} idle conns, MiB", _one),
    Measure("pss_per_conn", "relay PSS per idle conn, KiB", _one),
    # From the relay's exit lines (relay.service.gcstats), over all of a round's measures.
    Measure("gc_full", "relay full GCs per round", _int),
    Measure("gc_pause_max", "relay longest full GC, ms", _one),
]

Sample: TypeAlias = dict[str, float]


STEPS = ("up", "down", "up4", "connrate", "connrate1", "latency", "loaded", "idle")
# What the default run (no --measures) leaves out, to keep its time in bounds: k is
# there for throughput (a 256 KiB read is above glibc's mmap threshold, so each read
# of a small message costs an mmap, mremap and munmap: b is the forwarder for
# connections and latency), and one connection in flight is measured where its
# target is (c and e against b) and on a, the load generator's own ceiling.
# --measures runs the named measures on every configuration.
IDLE_SETTLE_SECONDS = 2.5  # before the idle measure's "before" figures

DEFAULT_SKIPS: dict[str, tuple[str, ...]] = {
    "k": ("connrate", "connrate1", "latency", "loaded", "idle"),
    **{cfg: ("connrate1",) for cfg in ("d", "h", "i", "j", "s")},
}


@dataclass(frozen=True)
class Params:
    seconds: float  # iperf3 -t and the connection-rate run
    repeat: int
    idle: int  # idle connections for the RSS measure
    idle_limit: float  # seconds allowed to open them
    concurrency: int = 8  # connections in flight in connrate (connrate1: one)
    latency_count: int = 2000
    offload_flag: bool = False  # the CLI has --offload (configuration c)
    profile_dir: Path | None = None  # c/d run as one worker under cProfile, dumped here
    capture_in: Path | None = None  # where j's capture directory goes (default: the run's tmp)
    relay_args: tuple[str, ...] = ()  # more `tunrelay run` options (--relay-arg)
    measures: tuple[str, ...] = STEPS
    skips: dict[str, tuple[str, ...]] = field(default_factory=dict)  # cfg -> measures left out


class MeasureError(Exception):
    """One measurement failed; the message says why (it is reported, the run goes on)."""


class _Stopped(BaseException):
    """SIGTERM or the global alarm: unwind (tearing labs down) and print what we have."""


@dataclass
class Report:
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # cfg -> key -> vals
    notes: list[str] = field(default_factory=list)
    relay_lines: list[str] = field(default_factory=list)

    def add(self, cfg: str, key: str, value: float) -> None:
        self.samples.setdefault(cfg, {}).setdefault(key, []).append(value)

    def median(self, cfg: str, key: str) -> float | None:
        vals = self.samples.get(cfg, {}).get(key)
        return statistics.median(vals) if vals else None

    def note(self, where: str, text: str) -> None:
        line = f"[{where}] {text}"
        self.notes.append(line)
        print(f"  ! {line}", flush=True)


# --- /proc and process helpers -----------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return data[data.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (`tunrelay run --workers N` is a supervisor and N
    workers). This kernel has no /proc/PID/task/TID/children, so scan /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                children.setdefault(int(_stat_fields(int(name))[1]), []).append(int(name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` and its descendants (all threads), in seconds."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = _stat_fields(p)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def idle_cpus() -> float:
    """Seconds all CPUs have spent idle since boot (``/proc/stat``: idle + iowait)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()  # "cpu  user nice system idle iowait ..."
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> float:
    """VmRSS of `pid` and its descendants, summed (shared pages counted in each)."""
    total: float | None = None
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total = (total or 0.0) + float(line.split()[1])
    if total is None:
        raise MeasureError(f"no VmRSS for pid {pid}")
    return total


def rollup_kib(pid: int) -> dict[int, tuple[float, float]]:
    """pid -> (Rss, Pss) in KiB from ``/proc/PID/smaps_rollup``, for `pid` and its
    descendants. PSS shares each shared page among the processes that map it, so
    the sum over a process tree counts the interpreter and the libraries once."""
    found: dict[int, tuple[float, float]] = {}
    for p in process_tree(pid):
        rss = pss = None
        with contextlib.suppress(OSError), open(f"/proc/{p}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = float(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = float(line.split()[1])
        if rss is not None and pss is not None:
            found[p] = (rss, pss)
    if not found:
        raise MeasureError(f"no smaps_rollup for pid {pid}")
    return found


def _per_process(pid: int, sizes: dict[int, tuple[float, float]]) -> str:
    """Each process: "top R/P, pid N R/P", RSS/PSS in MiB (the supervisor first)."""
    names = {pid: "top"}
    return ", ".join(
        f"{names.get(p, f'pid {p}')} {r / 1024:.1f}/{q / 1024:.1f}"
        for p, (r, q) in sorted(sizes.items(), key=lambda kv: kv[0] != pid)
    )


def fd_count(pid: int) -> int:
    """Open fds of `pid` and its descendants."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{p}/fd"))
    return total


def nofile_limit(pid: int) -> str:
    """The soft RLIMIT_NOFILE of process `pid`, as /proc shows it."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return line.split()[3]
    return "?"


def listening(pid: int, port: int) -> bool:
    """True if the network namespace of `pid` has a TCP socket listening on `port`."""
    want = f":{port:04X}"
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/net/{name}") as f:
            next(f, None)
            for line in f:
                parts = line.split()
                if len(parts) > 3 and parts[1].endswith(want) and parts[3] == "0A":
                    return True
    return False


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise MeasureError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(0.01)


def read_line(proc: subprocess.Popen[bytes], timeout: float, what: str) -> str:
    """One line from the child's stdout, or MeasureError after `timeout`."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise MeasureError(f"{what}: no output after {timeout:.0f} s")
    line = proc.stdout.readline().decode(errors="replace").strip()
    if not line:
        proc.poll()
        raise MeasureError(f"{what}: exited ({proc.returncode}) without output")
    return line


def finish(proc: subprocess.Popen[bytes], timeout: float, what: str) -> tuple[str, str]:
    """Wait for a child with a hard limit; its stdout and stderr."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise MeasureError(f"{what}: killed after the {timeout:.0f} s limit") from None
    return out.decode(errors="replace"), err.decode(errors="replace")


def stop(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int:
    """SIGTERM, then SIGKILL; the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


# --- one configuration in one fresh lab ----------------------------------------------------


SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGALRM}


@contextlib.contextmanager
def fresh_lab() -> Iterator[Topology]:
    """``with Topology.build() as topo``, with signals held while it is built and torn down."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        with Topology.build() as topo:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)  # a pending signal raises here
            try:
                yield topo
            finally:
                signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Lab:
    """One configuration running in `topo`: where the client connects, which pid to watch."""

    def __init__(
        self, cfg: str, topo: Topology, params: Params, report: Report, where: str, tmp: Path
    ) -> None:
        self.cfg, self.topo, self.params, self.report, self.where = cfg, topo, params, report, where
        self.host = topo.srv_v4  # the client's destination
        self.proc: subprocess.Popen[bytes] | None = None  # relay or forwarder
        self.server: subprocess.Popen[bytes] | None = None  # the echo server
        self.log_path = tmp / f"{where.replace(' ', '-')}.log"
        # Configuration j's capture directory (created by the relay; removed by close).
        self.capture_dir = (params.capture_in or tmp) / f"capture-{where.replace(' ', '-')}"

    # set-up

    def start(self) -> None:
        topo = self.topo
        # Load-generator hygiene, the same in every configuration: many
        # short connections leave TIME_WAIT sockets in the client ns (and, for
        # b/c/d, in the gateway, whose upstream sockets close first).
        for ns in ("cli", "gw"):
            cfg = topo.netconfig(ns)
            cfg.set_sysctl("net.ipv4.ip_local_port_range", "1024 65535")
            cfg.set_sysctl("net.ipv4.tcp_tw_reuse", 1)
        if self.cfg == "a":
            topo.enable_forwarding()
        elif self.cfg in FORWARDER_CHUNK:
            self.host = topo.gw_cli_v4
            argv = [
                sys.executable, str(FORWARDER), "--listen", topo.gw_cli_v4,
                "--forward", f"{IPERF_PORT}={topo.srv_v4}:{IPERF_PORT}",
                "--forward", f"{ECHO_PORT}={topo.srv_v4}:{ECHO_PORT}",
                "--chunk", str(FORWARDER_CHUNK[self.cfg]), "--max-seconds", "600",
            ]  # fmt: skip
            self.proc = topo.spawn("gw", argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            line = read_line(self.proc, 20, "forwarder")
            if line != "ready":
                raise MeasureError(f"forwarder said {line!r}")
        elif self.cfg in FLOOR_MEASURES:
            argv = [sys.executable, str(FLOOR), "--tun", TUN, "--client-net", topo.client_net_v4]
            argv += ["--epoll"] if self.cfg == "g" else []
            argv += ["--workers", str(os.cpu_count() or 1)] if self.cfg == "l" else []
            self.proc = topo.spawn("gw", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            line = read_line(self.proc, 20, "the TUN floor")
            if not line.startswith("relaying TCP"):
                raise MeasureError(f"the TUN floor said {line!r}")
        else:
            argv = [
                sys.executable, "-m", "relay.cli", "run", "--tun", TUN,
                "--client-net", topo.client_net_v4, "--client-net", topo.client_net_v6,
                "--iif", topo.gw_cli_if, "--state-dir", str(self.log_path.parent),
                *topo.relay_allow,
            ]  # fmt: skip
            # Offloads are the default; d is the plain path, asked for by name.
            argv.append("--offload" if self.cfg in OFFLOADED else "--no-offload")
            argv += self.params.relay_args
            if cli_has_quotas():
                argv += QUOTAS_OFF
            if b"--client-tcp-flows" in run_help():  # idle holds 10,000 from one client
                argv += ["--client-tcp-flows", str(1 << 20)]
            if self.cfg == "h":
                logs = self.log_path.parent / f"zeek-{self.where.replace(' ', '-')}"
                logs.mkdir(exist_ok=True)
                argv += ["--log-dir", str(logs)]
            if self.cfg == "i":
                argv += ["--analyzer", "relay.lab.analyzers:PassThrough"]
            if self.cfg == "j":
                # Created by the relay for its workers; removed with the lab (close).
                argv += ["--capture-dir", str(self.capture_dir)]
            if self.cfg == "s":
                argv += ["--analyzer", "relay.lab.analyzers:StreamReader"]
            if self.cfg == "e":
                argv += ["--workers", "1"]
            elif self.params.profile_dir is not None:
                prof = self.params.profile_dir / f"{self.where.replace(' ', '-')}.prof"
                argv += ["--workers", "1", "--profile", str(prof)]
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            with open(self.log_path, "wb") as out:
                self.proc = topo.spawn(
                    "gw", argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                    reachable_by="nobody",  # the workers' user
                )  # fmt: skip
            proc = self.proc

            def ready() -> bool:
                if proc.poll() is not None:
                    raise MeasureError(f"tunrelay exited with status {proc.returncode}")
                return "relaying TCP" in self.log_path.read_text(errors="replace")

            wait_for(ready, 20, "tunrelay")
        self.server = topo.spawn(
            "srv",
            [sys.executable, str(LOADGEN), "server", "--port", str(ECHO_PORT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        if read_line(self.server, 10, "echo server") != "listening":
            raise MeasureError("echo server did not start")

    def tun_dropped(self) -> int | None:
        """Packets the kernel dropped because the relay's TUN queue was full."""
        if self.cfg not in USES_TUN:
            return None
        try:
            return self.topo.tx_dropped("gw", TUN)
        except Exception:  # the device is gone with the relay; not worth failing for
            return None

    def proc_cpu(self) -> float | None:
        """CPU seconds of the relay (or forwarder, or floor) and its workers so far."""
        return None if self.proc is None else cpu_seconds(self.proc.pid)

    def alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise MeasureError(f"the {CONFIGS[self.cfg]} process exited ({self.proc.returncode})")

    # measures

    def _iperf_server(self) -> subprocess.Popen[bytes]:
        """A one-test iperf3 server (``-1``) in the server namespace, listening; the
        caller stops it."""
        server = self.topo.spawn(
            "srv",
            ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(lambda: listening(server.pid, IPERF_PORT), 10, "iperf3 server")
        except BaseException:
            stop(server, 2.0)
            raise
        return server

    def iperf(self, mode: str) -> str:
        p = self.params
        server = self._iperf_server()
        try:
            argv = ["iperf3", "-c", self.host, "-p", str(IPERF_PORT), "-t", f"{p.seconds:g}"]
            argv += ["-J", "--connect-timeout", "5000"]
            argv += {"up": [], "down": ["-R"], "up4": ["-P", "4"]}[mode]
            client = self.topo.spawn("cli", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            cpu: float | None = None
            load: tuple[float, float] | None = None  # iperf3's CPU %, the machine's idle %
            # Steady state only: skip connection set-up and the final exchange.
            time.sleep(0.5)
            r0 = self.proc_cpu()
            i0, m0, t0 = (
                cpu_seconds(server.pid) + cpu_seconds(client.pid),
                idle_cpus(),
                time.monotonic(),
            )
            time.sleep(max(0.2, p.seconds - 0.75))
            if client.poll() is None:
                r1 = self.proc_cpu()
                i1, m1, t1 = (
                    cpu_seconds(server.pid) + cpu_seconds(client.pid),
                    idle_cpus(),
                    time.monotonic(),
                )
                if r0 is not None and r1 is not None:
                    cpu = 100.0 * (r1 - r0) / (t1 - t0)
                load = (100.0 * (i1 - i0) / (t1 - t0), 100.0 * (m1 - m0) / (t1 - t0))
            out, err = finish(client, p.seconds + 20, f"iperf3 {mode}")
            try:
                result = json.loads(out)
            except json.JSONDecodeError:
                raise MeasureError(
                    f"iperf3 {mode}: exit {client.returncode}, no JSON: {err.strip()[:200]}"
                ) from None
            if "error" in result:
                raise MeasureError(f"iperf3 {mode}: {result['error']}")
            bps = float(result["end"]["sum_received"]["bits_per_second"])
            self.report.add(self.cfg, mode, bps / 1e9)
            summary = f"{bps / 1e9:.2f} Gbit/s"
            if cpu is not None:
                self.report.add(self.cfg, f"cpu_{mode}", cpu)
                summary += f", process CPU {cpu:.0f}%"
                if bps > 0:
                    per_gb = (cpu / 100.0) / (bps / 8e9)
                    self.report.add(self.cfg, f"cpu_gb_{mode}", per_gb)
                    summary += f" ({per_gb:.2f} CPU s per GB)"
            if load is not None:
                # What else ran: with 2 cores, 200 % minus the relay's share is all a
                # second worker could ever get (the c/e target needs 160 % or more).
                self.report.add(self.cfg, f"iperf_{mode}", load[0])
                self.report.add(self.cfg, f"idle_{mode}", load[1])
                summary += f", iperf3 CPU {load[0]:.0f}%, machine idle {load[1]:.0f}%"
            retransmits = result["end"].get("sum_sent", {}).get("retransmits")
            if retransmits is not None:
                summary += f", {retransmits} retransmits (sender)"
            if bps == 0:
                self.report.note(self.where, f"iperf3 {mode}: 0 bit/s received")
            return summary
        finally:
            stop(server, 2.0)

    def connrate(self, concurrency: int) -> str:
        """Connections per second with `concurrency` in flight: rows cps and cpu_conn
        (connrate: the parameters' concurrency, 8) or cps1 and cpu_conn1 (connrate1: one)."""
        p = self.params
        name, suffix = ("connrate1", "1") if concurrency == 1 else ("connrate", "")
        argv = [
            sys.executable, str(LOADGEN), "connrate", "--host", self.host,
            "--port", str(ECHO_PORT), "--seconds", f"{p.seconds:g}",
            "--concurrency", str(concurrency), "--size", "64",
        ]  # fmt: skip
        c0 = self.proc_cpu()
        proc = self.topo.spawn("cli", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = finish(proc, p.seconds + 20, name)
        c1 = self.proc_cpu()
        try:
            result = json.loads(out)
        except json.JSONDecodeError:
            raise MeasureError(f"{name}: no result: {err.strip()[-300:]}") from None
        self.report.add(self.cfg, f"cps{suffix}", float(result["per_second"]))
        if result["errors"]:
            self.report.note(
                self.where,
                f"{name}: {result['completed']} completed, {result['errors']} failed "
                f"({result['error_kinds']}); a stall = no response within 3 s",
            )
        summary = f"{result['per_second']:,.0f}/s, {result['errors']} failed"
        if c0 is not None and c1 is not None and result["completed"]:
            # As for latency: the process's own cost, less noisy than the rate.
            per_conn = 1e6 * (c1 - c0) / result["completed"]
            self.report.add(self.cfg, f"cpu_conn{suffix}", per_conn)
            summary += f", process CPU {per_conn:.0f} µs per connection"
        return summary

    def latency(self) -> str:
        p = self.params
        argv = [
            sys.executable, str(LOADGEN), "latency", "--host", self.host,
            "--port", str(ECHO_PORT), "--count", str(p.latency_count), "--size", "64",
            "--timeout", "30",
        ]  # fmt: skip
        c0 = self.proc_cpu()
        proc = self.topo.spawn("cli", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = finish(proc, 40, "latency")
        c1 = self.proc_cpu()
        try:
            result = json.loads(out)
        except json.JSONDecodeError:
            raise MeasureError(f"latency: no result: {err.strip()[-300:]}") from None
        if result.get("count", 0) < p.latency_count:
            raise MeasureError(f"latency: only {result.get('count', 0)} round trips in 30 s")
        self.report.add(self.cfg, "rtt_p50", float(result["p50_us"]))
        self.report.add(self.cfg, "rtt_p99", float(result["p99_us"]))
        summary = f"median {result['p50_us']:.0f} µs, p99 {result['p99_us']:.0f} µs"
        if c0 is not None and c1 is not None:
            # CPU time per exchange (warm-up included): the process's own cost,
            # which the wall-clock latency shows only through this machine's noise.
            per_rt = 1e6 * (c1 - c0) / (p.latency_count + LATENCY_WARMUP)
            self.report.add(self.cfg, "cpu_rt", per_rt)
            summary += f", process CPU {per_rt:.0f} µs per round trip"
        return summary

    def loaded(self) -> str:
        """Request/response latency beside one bulk stream, up then down: what an
        interactive flow pays for sharing the process with a bulk one."""
        parts = []
        for mode in ("up", "down"):
            parts.append(f"{mode}: {self._loaded(mode)}")
        return "; ".join(parts)

    def _loaded(self, mode: str) -> str:
        p = self.params
        server = self._iperf_server()
        client: subprocess.Popen[bytes] | None = None
        try:
            # Long enough to outlast the latency run (bounded by its own timeout).
            # Text, one line a second (an interrupted -J run prints no totals).
            argv = ["iperf3", "-c", self.host, "-p", str(IPERF_PORT), "-t", "40", "-i", "1"]
            argv += ["-f", "g", "--forceflush", "--connect-timeout", "5000"]
            argv += ["-R"] if mode == "down" else []
            client = self.topo.spawn("cli", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            time.sleep(1.0)  # past slow start
            if client.poll() is not None:
                raise MeasureError(f"loaded {mode}: iperf3 exited ({client.returncode})")
            lat = [
                sys.executable, str(LOADGEN), "latency", "--host", self.host,
                "--port", str(ECHO_PORT), "--count", str(p.latency_count), "--size", "64",
                "--timeout", "30",
            ]  # fmt: skip
            proc = self.topo.spawn("cli", lat, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = finish(proc, 40, f"latency beside {mode}")
            try:
                result = json.loads(out)
            except json.JSONDecodeError:
                raise MeasureError(f"loaded {mode}: no result: {err.strip()[-300:]}") from None
            if result.get("count", 0) < p.latency_count:
                raise MeasureError(f"loaded {mode}: only {result.get('count', 0)} round trips")
            client.send_signal(signal.SIGINT)
            out, _ = finish(client, 15, f"iperf3 {mode} beside latency")
            # The median of the one-second intervals (the first is slow start).
            rates = [
                float(m[1])
                for m in re.finditer(
                    r"sec\s+\S+ \w?Bytes\s+([\d.]+) Gbits/sec(?!.*(?:sender|receiver))", out
                )
            ]
            bps = statistics.median(rates[1:] or rates) * 1e9 if rates else 0.0
            self.report.add(self.cfg, f"rtt_bulk_{mode}_p50", float(result["p50_us"]))
            self.report.add(self.cfg, f"rtt_bulk_{mode}_p99", float(result["p99_us"]))
            if bps:
                self.report.add(self.cfg, f"bulk_{mode}_gbit", bps / 1e9)
            return (
                f"median {result['p50_us']:.0f} µs, p99 {result['p99_us']:.0f} µs "
                f"beside {bps / 1e9:.2f} Gbit/s"
            )
        finally:
            if client is not None and client.poll() is None:
                stop(client, 2.0)
            stop(server, 2.0)

    def idle(self) -> str:
        p = self.params
        assert self.proc is not None and self.server is not None
        pid, server_pid = self.proc.pid, self.server.pid
        # At rest first: the previous measure's traffic ended a moment ago, and a
        # tunrelay worker gives its free heap back a second or two after bulk
        # traffic ends (relay/service/run.py, BulkEnd).
        time.sleep(IDLE_SETTLE_SECONDS)
        base, base_fds, server_fds = rss_kib(pid), fd_count(pid), fd_count(server_pid)
        base_rollup = rollup_kib(pid)
        argv = [
            sys.executable, str(LOADGEN), "idle", "--host", self.host,
            "--port", str(ECHO_PORT), "--count", str(p.idle),
            "--limit-seconds", f"{p.idle_limit:g}", "--hold-seconds", "120",
        ]  # fmt: skip
        proc = self.topo.spawn(
            "cli", argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            result = json.loads(read_line(proc, p.idle_limit + 15, "idle connections"))
            opened = int(result["open"])
            # The client's connect() may return before the far side has caught up
            # (the forwarder accepts and connects upstream after the kernel's
            # handshake): wait until the server holds them all, or nothing has
            # moved for 1.5 s (a process at its fd limit stops accepting).
            deadline = time.monotonic() + 30.0
            seen, still_since = (-1, -1), time.monotonic()
            while time.monotonic() < deadline:
                now = (fd_count(server_pid), fd_count(pid))
                if now != seen:
                    seen, still_since = now, time.monotonic()
                elif now[0] - server_fds >= opened or time.monotonic() - still_since > 1.5:
                    break
                time.sleep(0.1)
            self.alive()
            held, held_fds = rss_kib(pid), fd_count(pid)
            held_rollup = rollup_kib(pid)
            at_server = fd_count(server_pid) - server_fds
            if opened < p.idle or at_server < opened:
                limit = nofile_limit(pid)
                self.report.note(
                    self.where,
                    f"idle: {opened}/{p.idle} connections opened in "
                    f"{result['seconds']:.1f} s, {at_server} reached the server (errors "
                    f"{result['errors']} {result['error_kinds']}, timeouts {result['timeouts']}, "
                    f"not started {result['not_started']}); the process has {held_fds} fds "
                    f"open, RLIMIT_NOFILE {limit}",
                )
            self.report.add(self.cfg, "rss_base", base / 1024)
            pss_base = sum(q for _, q in base_rollup.values())
            pss_held = sum(q for _, q in held_rollup.values())
            self.report.add(self.cfg, "pss_base", pss_base / 1024)
            if opened:
                self.report.add(self.cfg, "rss_idle", held / 1024)
                self.report.add(self.cfg, "pss_idle", pss_held / 1024)
                # Per connection that reached the server, i.e. that the process holds.
                self.report.add(self.cfg, "rss_per_conn", (held - base) / max(1, at_server))
                self.report.add(self.cfg, "pss_per_conn", (pss_held - pss_base) / max(1, at_server))
            summary = (
                f"{opened:,} open in {result['seconds']:.1f} s ({at_server:,} at the server); "
                f"RSS {base / 1024:.1f} -> {held / 1024:.1f} MiB, PSS {pss_base / 1024:.1f} "
                f"-> {pss_held / 1024:.1f} MiB; per process RSS/PSS MiB before: "
                f"{_per_process(pid, base_rollup)}; with them: {_per_process(pid, held_rollup)}; "
                f"fds {base_fds} -> {held_fds}"
            )
        finally:
            # communicate() closes the client's stdin: it closes its connections and exits.
            with contextlib.suppress(MeasureError):
                finish(proc, 15, "idle close")
        # Every upstream socket should be closed once the client's connections are.
        t0 = time.monotonic()
        while (now_fds := fd_count(pid)) > base_fds and time.monotonic() < t0 + 15.0:
            time.sleep(0.1)
        if now_fds > base_fds:
            self.report.note(
                self.where,
                f"idle: {now_fds - base_fds} more fds than before the idle connections, "
                "15 s after they were closed",
            )
        return summary + f"; closed all in {time.monotonic() - t0:.1f} s"

    # tear-down

    def close(self) -> None:
        """Stop the relay ourselves (to see how it exits) and collect its log."""
        if self.cfg not in USES_RELAY or self.proc is None:
            return
        rc = stop(self.proc, 10.0)
        if rc not in (0, -signal.SIGTERM):
            self.report.note(self.where, f"tunrelay exited with status {rc} on SIGTERM")
        if self.capture_dir.exists():
            files = list(self.capture_dir.iterdir())
            size = sum(f.stat().st_size for f in files)
            self.report.note(self.where, f"captured {len(files)} files, {size / 1e6:,.0f} MB")
            shutil.rmtree(self.capture_dir, ignore_errors=True)
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        bad = [ln for ln in text.splitlines() if re.search(r"WARNING|ERROR|CRITICAL|Traceback", ln)]
        for ln in bad[:5]:
            self.report.note(self.where, f"tunrelay log: {ln[:300]}")
        if len(bad) > 5:
            self.report.note(self.where, f"tunrelay log: … {len(bad) - 5} more such lines")
        full, longest, seen = 0, 0.0, False
        for ln in text.splitlines():
            if "stopped: stack" in ln:
                self.report.relay_lines.append(f"[{self.where}] {ln.split(': ', 1)[-1]}")
                count = re.search(r"\bfull_collections=(\d+)", ln)
                pause = re.search(r"\bfull_pause_max_ms=([\d.]+)", ln)
                if count and pause:  # one line per worker
                    seen = True
                    full += int(count[1])
                    longest = max(longest, float(pause[1]))
        if seen:
            self.report.add(self.cfg, "gc_full", full)
            self.report.add(self.cfg, "gc_pause_max", longest)


def run_config(cfg: str, params: Params, report: Report, where: str, tmp: Path) -> None:
    print(f"  {where}: {CONFIGS[cfg]}", flush=True)
    t0 = time.monotonic()
    with fresh_lab() as topo:
        lab = Lab(cfg, topo, params, report, where, tmp)
        try:
            lab.start()
        except MeasureError as exc:
            report.note(where, f"set-up failed: {exc}")
            lab.close()
            return
        steps: list[tuple[str, Callable[[], str]]] = [
            ("up", lambda: lab.iperf("up")),
            ("down", lambda: lab.iperf("down")),
            ("up4", lambda: lab.iperf("up4")),
            ("connrate", lambda: lab.connrate(params.concurrency)),
            ("connrate1", lambda: lab.connrate(1)),
            ("latency", lab.latency),
            ("loaded", lab.loaded),
        ]
        if cfg in HAS_PROCESS and cfg not in FLOOR_MEASURES:
            steps.append(("idle", lab.idle))
        skips = params.skips.get(cfg, ())
        steps = [(n, step) for n, step in steps if n in params.measures and n not in skips]
        if cfg in FLOOR_MEASURES:
            steps = [(name, step) for name, step in steps if name in FLOOR_MEASURES[cfg]]
        for name, step in steps:
            t_step = time.monotonic()
            try:
                lab.alive()
                dropped = lab.tun_dropped()
                summary = step()
                after = lab.tun_dropped()
                if dropped is not None and after is not None and after > dropped:
                    summary += f"; TUN queue dropped {after - dropped:,} packets"
                    report.note(
                        where,
                        f"{name}: the kernel dropped {after - dropped:,} packets "
                        "at the full TUN queue (the relay fell behind)",
                    )
                print(f"    {name:9} {summary} [{time.monotonic() - t_step:.1f} s]", flush=True)
            except MeasureError as exc:
                report.note(where, f"{name}: {exc}")
            except (OSError, ValueError, KeyError) as exc:
                report.note(where, f"{name}: {type(exc).__name__}: {exc}")
        lab.close()
    print(f"    ({time.monotonic() - t0:.1f} s)", flush=True)


# --- output ----------------------------------------------------------------------------


def ratio(x: float | None, y: float | None) -> str:
    if x is None or y is None or y == 0:
        return "n/a"
    r = x / y
    return f"{r:.3f}" if r < 0.1 else f"{r:.2f}"


def print_table(report: Report, params: Params, configs: Sequence[str]) -> None:
    cols = list(CONFIGS)
    pairs = [("d", "b"), ("d", "a")]
    if params.offload_flag:
        pairs += [("c", "b"), ("c", "a"), ("e", "b"), ("c", "e"), ("e", "f"), ("h", "c")]
        pairs += [("i", "c"), ("j", "c"), ("j", "i")]
        pairs += [("s", "c")]
        pairs += [("c", "k"), ("e", "k")]
    pairs += [("f", "b"), ("g", "b"), ("f", "k"), ("l", "b"), ("c", "l")]
    pairs = [(x, y) for x, y in pairs if x in configs and y in configs]
    short = {
        "c": "tunrelay offload",
        "e": "offload, 1 worker",
        "f": "TUN floor",
        "g": "floor, no trio",
        "l": "floor, 1 worker/CPU",
        "h": "offload, --log-dir",
        "i": "offload, pass-through",
        "j": "offload, --capture-dir",
        "k": "forwarder, 256 KiB",
        "s": "offload, stream analyzer",
    }
    heads = [f"{c}: {short.get(c, CONFIGS[c])}" for c in cols]
    heads += [f"{x}/{y}" for x, y in pairs]
    rows: list[list[str]] = []
    for m in MEASURES:
        row = [m.label.format(idle=f"{params.idle:,}", inflight=params.concurrency)]
        meds = {c: report.median(c, m.key) for c in cols}
        for c in cols:
            v = meds[c]
            row.append("n/a" if v is None else m.fmt(v))
        row += [ratio(meds[x], meds[y]) for x, y in pairs]
        rows.append(row)
    width0 = max(len(r[0]) for r in rows)
    widths = [max(len(h), max(len(r[i + 1]) for r in rows)) for i, h in enumerate(heads)]
    print()
    build = stack_build().describe()  # what the tunrelay columns ran
    print(f"median of {params.repeat} run(s); T = {params.seconds:g} s; tunrelay's stack: {build}")
    print("  ".join([" " * width0, *(h.rjust(w) for h, w in zip(heads, widths, strict=True))]))
    for r in rows:
        cells = (v.rjust(w) for v, w in zip(r[1:], widths, strict=True))
        print("  ".join([r[0].ljust(width0), *cells]))


def print_samples(report: Report) -> None:
    print("\nall samples (config: measure = values):")
    for cfg, by_key in report.samples.items():
        parts = []
        for m in MEASURES:
            vals = by_key.get(m.key)
            if vals:
                parts.append(f"{m.key}=" + "/".join(m.fmt(v) for v in vals))
        print(f"  {cfg}: " + "  ".join(parts))


# --- main ------------------------------------------------------------------------------


def cli_has_offload() -> bool:
    """Does ``tunrelay run`` accept ``--offload`` yet (configuration c)?"""
    return b"--offload" in run_help()


# A benchmark measures capacity, not policy: from one client address, connrate
# opens thousands of connections a second, far past the per-client default.
QUOTAS_OFF = [
    "--client-connect-rate", "1000000", "--client-connect-burst", "1000000",
    "--connect-rate", "1000000", "--connect-burst", "1000000",
]  # fmt: skip


def cli_has_quotas() -> bool:
    """Does ``tunrelay run`` have per-client connection quotas (to lift)?"""
    return b"--client-connect-rate" in run_help()


@functools.cache
def run_help() -> bytes:
    """``tunrelay run --help`` of the tree under test."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "relay.cli", "run", "--help"],
            capture_output=True,
            timeout=30,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return b""
    return out.stdout


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="tunrelay vs kernel forwarding vs a trio forwarder, in network namespaces"
    )
    parser.add_argument("--quick", action="store_true", help="1 repeat, T=2 s, 1,000 idle conns")
    parser.add_argument("--repeat", type=int, help="runs of each measure (default 3; quick 1)")
    parser.add_argument(
        "--only", default="a,b,c,d,e,f,g,h,i,j,k,l", help="configurations, e.g. a,b,d"
    )
    parser.add_argument("--seconds", type=float, help="T per throughput/conn-rate run (5; quick 2)")
    parser.add_argument("--idle", type=int, help="idle connections (10000; quick 1000)")
    parser.add_argument(
        "--time-limit", type=float, help="abort the run after this many seconds (1500; quick 240)"
    )
    parser.add_argument("--json", type=Path, help="also write all samples and notes here")
    parser.add_argument("--log-dir", type=Path, help="keep tunrelay's logs here (default: discard)")
    parser.add_argument(
        "--capture-in",
        type=Path,
        metavar="DIR",
        help="put configuration j's capture directory in DIR (e.g. /dev/shm, to leave the "
        "disk out); default: the run's temporary directory",
    )
    parser.add_argument(
        "--measures",
        help=f"which measures to run, on every configuration (default: all of "
        f"{','.join(STEPS)}, but k runs only up,down,up4 and connrate1 runs only on a,b,c,e)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run c/d as one worker under cProfile; one .prof per run in DIR "
        "(read with python -m pstats); slows them, so not for the table",
    )
    parser.add_argument(
        "--relay-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more `tunrelay run` argument for c/d/e/h (repeatable; --relay-arg=--rcv-buf "
        "--relay-arg=262144)",
    )
    args = parser.parse_args(argv)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    bad = [c for c in only if c not in CONFIGS]
    if bad or not only:
        parser.error(f"--only: unknown configuration(s) {bad}; choose from {','.join(CONFIGS)}")
    args.only = [c for c in CONFIGS if c in only]
    args.skips = DEFAULT_SKIPS if args.measures is None else {}
    measures = [m.strip() for m in (args.measures or ",".join(STEPS)).split(",") if m.strip()]
    if not measures or any(m not in STEPS for m in measures):
        parser.error(f"--measures: choose from {','.join(STEPS)}")
    args.measures = tuple(m for m in STEPS if m in measures)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_netns: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    repeat = args.repeat or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    idle = args.idle or (1000 if args.quick else 10000)
    if not (1 <= repeat <= 20 and 0.5 <= seconds <= 60 and 1 <= idle <= 30000):
        print("bench_netns: --repeat 1..20, --seconds 0.5..60, --idle 1..30000", file=sys.stderr)
        return 2
    params = Params(
        seconds=seconds,
        repeat=repeat,
        idle=idle,
        idle_limit=max(15.0, idle / 250),
        offload_flag=cli_has_offload(),
        profile_dir=args.profile,
        capture_in=args.capture_in,
        relay_args=tuple(args.relay_arg),
        measures=args.measures,
        skips=args.skips,
    )
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    configs = [c for c in args.only if c not in OFFLOADED or params.offload_flag]
    if OFFLOADED & set(args.only) and not params.offload_flag:
        print("c (tunrelay with offloads): n/a — `tunrelay run` has no --offload option yet")
    # A default run (3 rounds of a..k, T=5 s, 10,000 idle) adds up to about 15 minutes
    # (about 35 s per full lab: 4 runs of T, loaded, idle).
    time_limit = args.time_limit or (240.0 if args.quick else 1500.0)
    report = Report()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise _Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(int(time_limit))
    start = time.monotonic()
    status = 0
    print(
        f"bench_netns: configs {','.join(configs)}; {repeat} round(s); T={seconds:g} s; "
        f"{idle:,} idle conns; time limit {time_limit:.0f} s",
        flush=True,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="bench-netns-") as tmpdir:
            logs = args.log_dir or Path(tmpdir)
            logs.mkdir(parents=True, exist_ok=True)
            for r in range(repeat):
                for cfg in configs:
                    run_config(cfg, params, report, f"round {r + 1} {cfg}", logs)
    except (_Stopped, KeyboardInterrupt) as exc:
        print(f"\nbench_netns: stopped ({exc or 'SIGINT'}); partial results:", file=sys.stderr)
        status = 1
    finally:
        signal.alarm(0)
    wall = time.monotonic() - start
    print_table(report, params, configs)
    if repeat > 1:
        print_samples(report)
    if report.relay_lines:
        print("\ntunrelay counters at exit:")
        for ln in report.relay_lines:
            print(f"  {ln}")
    if report.notes:
        print("\nnotes:")
        for ln in report.notes:
            print(f"  {ln}")
    print(f"\nwall time {wall:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "params": params.__dict__,
                    "configs": configs,
                    "samples": report.samples,
                    "notes": report.notes,
                    "relay_counters": report.relay_lines,
                    "wall_seconds": wall,
                },
                indent=1,
                default=str,  # the Path parameters (--profile, --capture-in)
            )
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
