"""``tunrelay run --metrics HOST:PORT``: Prometheus text exposition and /healthz.

Theory of operation: the supervisor serves it (a TCP listener in the namespace
the relay runs in, opened before the supervisor gives up its privileges), from
the last snapshot each worker sent over its control link
(``relay.service.worklink``). A scrape reads those dicts and nothing else: it
never reaches a worker, so it cannot stall a packet loop, and a stuck worker
shows as a stale snapshot rather than a hung scrape.

Every series has a ``worker`` label (the worker's index): per-worker numbers
show an imbalance or one stuck worker, and ``sum without (worker) (...)``
gives the relay's totals. A worker's counters are cumulative since it started
(a worker never restarts without the service). The HTTP server is minimal: one
request per connection, ``GET`` only, a bounded request head read under a
time limit, at most ``MAX_CLIENTS`` at once.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from relay.datapath.looptime import LOOP_BUCKETS
from relay.service.worklink import HEARTBEAT_TIMEOUT, WorkerView

__all__ = [
    "MAX_CLIENTS",
    "RelayCollector",
    "health",
    "open_listener",
    "parse_address",
    "registry_for",
    "serve",
]

log = logging.getLogger("tunrelay")

MAX_CLIENTS = 16  # scrapes served at once; more wait in the listen backlog
REQUEST_TIMEOUT = 5.0  # seconds for a client to send its request head
MAX_REQUEST = 8192  # bytes of request head


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) as (host, port).

    Raises:
        ValueError: the reason, for a message naming the option.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [ADDR]:PORT")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{port_text!r} is not a port (1..65535)")
    return host, int(port_text)


def open_listener(address: tuple[str, int]) -> socket.socket:
    """The listening socket (bound now, while the supervisor may bind any port).

    Raises:
        OSError: it cannot be bound.
    """
    host, port = address
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock


def health(views: Sequence[WorkerView], alive: Callable[[int], bool], now: float) -> str | None:
    """None when every worker is alive and its loop turns; else why not (one line)."""
    problems = []
    for v in views:
        age = v.age(now)
        if not alive(v.index):
            problems.append(f"worker {v.index} is not running")
        elif age is None:
            problems.append(f"worker {v.index} has not reported yet")
        elif age > HEARTBEAT_TIMEOUT:
            problems.append(f"worker {v.index}: no heartbeat for {age:.1f} s")
    return "; ".join(problems) or None


# Counters read from one field each: (metric suffix, help, snapshot section,
# label name or None, {label value: field}).
_IO = {"in": "packets_in", "out": "packets_out"}
_COUNTERS: tuple[tuple[str, str, str, str | None, dict[str, str]], ...] = (
    ("payload_bytes", "TCP payload bytes relayed", "relay", "direction",
     {"c2s": "bytes_c2s", "s2c": "bytes_s2c"}),
    ("datagrams", "UDP datagrams and echo messages relayed", "relay", "direction",
     {"c2s": "datagrams_c2s", "s2c": "datagrams_s2c"}),
    ("tun_packets", "packets through the TUN queue (in: from the clients)", "tun", "direction",
     _IO),
    ("tun_bytes", "bytes through the TUN queue (in: from the clients)", "tun", "direction",
     {"in": "bytes_in", "out": "bytes_out"}),
    ("tun_drops", "packets dropped at the TUN queue (queue full, empty frame)", "tun",
     "direction", {"in": "drops_in", "out": "drops_out"}),
    ("parse_errors", "malformed IP or TCP headers (dropped)", "stack", None,
     {"": "parse_errors"}),
    ("checksum_errors", "packets with a bad checksum (dropped)", "stack", None,
     {"": "checksum_errors"}),
    ("syn_dropped", "SYNs over the pending or flow limit", "stack", None, {"": "syn_dropped"}),
    ("memory_budget_reached",
     "TCP buffer reservations the memory budget cut short (initial sizes shrunk, growth refused)",
     "stack", None, {"": "memory_budget_reached"}),
    ("analyzer_errors", "exceptions raised by analyzers", "relay", None,
     {"": "analyzer_errors"}),
    ("policy_denials", "flows the egress policy denied", "relay", None, {"": "flows_denied"}),
    ("flows_blocked", "flows blocked by a record hook (--block-domain, --block-list)", "relay",
     None, {"": "flows_blocked"}),
    ("flows_rejected", "flows an analyzer rejected or reset", "relay", None,
     {"": "flows_rejected"}),
    ("connect_failures", "upstream connects that failed", "relay", None,
     {"": "connect_failed"}),
    ("receive_errors", "exceptions out of the stack's receive (a bug; packet dropped)",
     "relay", None, {"": "receive_errors"}),
    ("loop_iterations", "packet-loop passes", "relay", None, {"": "iterations"}),
    ("gc_full_collections", "full garbage collections", "gc", None,
     {"": "full_collections"}),
)  # fmt: skip


def _num(value: Any) -> float:
    """A counter's value from an untrusted snapshot: a number, else 0."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _section(snap: dict[str, Any], name: str) -> dict[str, Any]:
    section = snap.get(name)
    return section if isinstance(section, dict) else {}


class RelayCollector(Collector):
    """Prometheus metric families from the workers' last snapshots."""

    def __init__(self, views: Callable[[], Iterable[WorkerView]], now: Callable[[], float]):
        self._views = views
        self._now = now

    def collect(self) -> Iterator[Metric]:
        snaps = [
            (str(v.index), v.snapshot, v.age(self._now()))
            for v in self._views()
            if v.snapshot is not None
        ]
        yield from families(snaps)


def families(snaps: Sequence[tuple[str, dict[str, Any], float | None]]) -> Iterator[Metric]:
    """The metric families of (worker label, snapshot, snapshot age) triples."""
    for suffix, text, section, label, fields in _COUNTERS:
        family = CounterMetricFamily(
            f"tunrelay_{suffix}", text, labels=["worker"] if label is None else ["worker", label]
        )
        for worker, snap, _ in snaps:
            values = _section(snap, section)
            for value, fld in fields.items():
                labels = [worker] if label is None else [worker, value]
                family.add_metric(labels, _num(values.get(fld)))
        yield family

    opened = CounterMetricFamily(
        "tunrelay_flows_opened", "flows opened, by protocol", labels=["worker", "proto"]
    )
    ended = CounterMetricFamily(
        "tunrelay_flows_ended",
        "flows ended, by protocol and end reason (the flow log's ended)",
        labels=["worker", "proto", "reason"],
    )
    active = GaugeMetricFamily(
        "tunrelay_flows_active", "flows open now, by protocol", labels=["worker", "proto"]
    )
    detaches = CounterMetricFamily(
        "tunrelay_analyzer_detaches",
        "analyzers detached from a flow after an error (0 with --fail-closed: the flow fails)",
        labels=["worker"],
    )
    mem_used = GaugeMetricFamily(
        "tunrelay_tcp_memory_used_bytes", "TCP buffer bytes reserved", labels=["worker"]
    )
    mem_limit = GaugeMetricFamily(
        "tunrelay_tcp_memory_limit_bytes", "TCP buffer memory budget", labels=["worker"]
    )
    buffered = GaugeMetricFamily(
        "tunrelay_tcp_buffered_bytes",
        "bytes held in TCP send, receive and reassembly buffers",
        labels=["worker"],
    )
    timer_heap = GaugeMetricFamily(
        "tunrelay_timer_heap_entries",
        "entries in the stack's connection timer heap (stale ones included)",
        labels=["worker"],
    )
    timers = GaugeMetricFamily(
        "tunrelay_timers_live", "TCP connections with a deadline filed", labels=["worker"]
    )
    age = GaugeMetricFamily(
        "tunrelay_worker_snapshot_age_seconds",
        "seconds since the worker's last snapshot (its heartbeat)",
        labels=["worker"],
    )
    loop = HistogramMetricFamily(
        "tunrelay_loop_iteration_seconds",
        "duration of one packet-loop pass (drain, stack, timers, events, write)",
        labels=["worker"],
    )
    for worker, snap, snap_age in snaps:
        open_by: dict[str, float] = {}
        raw_opened = snap.get("opened")
        for proto, n in raw_opened.items() if isinstance(raw_opened, dict) else ():
            open_by[str(proto)] = _num(n)
            opened.add_metric([worker, str(proto)], _num(n))
        ended_by: dict[str, float] = {}
        raw_ended = snap.get("ended")
        for row in raw_ended if isinstance(raw_ended, list) else ():
            if isinstance(row, list) and len(row) == 3:
                proto, how, n = str(row[0]), str(row[1]), _num(row[2])
                ended.add_metric([worker, proto, how], n)
                ended_by[proto] = ended_by.get(proto, 0.0) + n
        for proto in sorted(open_by.keys() | ended_by.keys()):
            active.add_metric(
                [worker, proto], max(0.0, open_by.get(proto, 0.0) - ended_by.get(proto, 0.0))
            )
        errors = _num(_section(snap, "relay").get("analyzer_errors"))
        detaches.add_metric([worker], 0.0 if snap.get("fail_closed") is True else errors)
        memory = _section(snap, "memory")
        mem_used.add_metric([worker], _num(memory.get("used")))
        mem_limit.add_metric([worker], _num(memory.get("limit")))
        buffered.add_metric([worker], _num(memory.get("buffered")))
        heap = _section(snap, "timers")
        timer_heap.add_metric([worker], _num(heap.get("heap")))
        timers.add_metric([worker], _num(heap.get("live")))
        if snap_age is not None:
            age.add_metric([worker], snap_age)
        hist = _section(snap, "loop")
        counts = hist.get("counts")
        if isinstance(counts, list) and len(counts) == len(LOOP_BUCKETS) + 1:
            buckets, total = [], 0.0
            for bound, n in zip((*map(str, LOOP_BUCKETS), "+Inf"), counts, strict=True):
                total += _num(n)
                buckets.append((bound, total))
            loop.add_metric([worker], buckets, _num(hist.get("sum")))
    yield from (opened, ended, active, detaches, mem_used, mem_limit, buffered, timer_heap, timers)
    yield from (age, loop)


def registry_for(collector: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


async def serve(
    listener: socket.socket,
    registry: CollectorRegistry,
    healthz: Callable[[], str | None],
) -> None:
    """Answer ``GET /metrics`` and ``GET /healthz`` until cancelled."""
    sock = trio.socket.from_stdlib_socket(listener)
    limit = trio.Semaphore(MAX_CLIENTS)
    async with trio.open_nursery() as nursery:
        while True:
            await limit.acquire()
            try:
                conn, _ = await sock.accept()
            except OSError as exc:
                limit.release()
                log.warning("--metrics: accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(_answer, conn, registry, healthz, limit)


async def _answer(
    conn: trio.socket.SocketType,
    registry: CollectorRegistry,
    healthz: Callable[[], str | None],
    limit: trio.Semaphore,
) -> None:
    with conn:
        try:
            head = b""
            with trio.move_on_after(REQUEST_TIMEOUT):
                while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) < MAX_REQUEST:
                    chunk = await conn.recv(MAX_REQUEST - len(head))
                    if not chunk:
                        break
                    head += chunk
            status, ctype, body = _route(head, registry, healthz)
            reply = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode() + body
            with trio.move_on_after(REQUEST_TIMEOUT):
                view = memoryview(reply)
                while view:
                    view = view[await conn.send(view) :]
        except OSError:
            pass
        finally:
            limit.release()
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


def _route(
    head: bytes, registry: CollectorRegistry, healthz: Callable[[], str | None]
) -> tuple[str, str, bytes]:
    line = head.split(b"\n", 1)[0].decode("latin-1").split()
    if len(line) != 3 or not line[2].startswith("HTTP/"):
        return "400 Bad Request", "text/plain", b"bad request\n"
    method, target = line[0], line[1].split("?", 1)[0]
    if method != "GET":
        return "405 Method Not Allowed", "text/plain", b"GET only\n"
    if target == "/metrics":
        return "200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)
    if target == "/healthz":
        problem = healthz()
        if problem is None:
            return "200 OK", "text/plain", b"ok\n"
        return "503 Service Unavailable", "text/plain", f"{problem}\n".encode()
    return "404 Not Found", "text/plain", b"/metrics or /healthz\n"
