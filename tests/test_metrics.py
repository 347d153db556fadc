"""``--metrics``: the collector over workers' snapshot dicts (parsed back with
prometheus-client's own parser), /healthz, the HTTP answers, the address
option, and the snapshot a worker builds from its counters."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay.analysis.flowcounts import FlowCounts
from relay.analysis.hooks import EndReason, FlowEnd, FlowInfo
from relay.datapath.looptime import LOOP_BUCKETS, LoopLatency
from relay.service import metrics
from relay.service.metrics import RelayCollector, families, health, parse_address, registry_for
from relay.service.run import ConfigError, validate
from relay.service.worklink import HEARTBEAT_TIMEOUT, WorkerView, read_frame, write_frame

Labels = frozenset[tuple[str, str]]


def snap(worker: int, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "snapshot",
        "worker": worker,
        "relay": {"bytes_c2s": 100, "bytes_s2c": 2000, "flows_denied": 2, "flows_blocked": 1,
                  "analyzer_errors": 3, "datagrams_c2s": 4, "iterations": 9},
        "stack": {"parse_errors": 5, "checksum_errors": 6, "memory_budget_reached": 8},
        "tun": {"packets_in": 10, "drops_in": 7, "drops_out": 1},
        "gc": {"full_collections": 0},
        "opened": {"tcp": 4, "udp": 2},
        "ended": [["tcp", "fin", 3], ["udp", "denied", 2]],
        "memory": {"used": 4096, "limit": 1 << 20, "buffered": 1500},
        "timers": {"heap": 7, "live": 3},
        "loop": {"counts": [1] * (len(LOOP_BUCKETS) + 1), "sum": 0.5},
        "fail_closed": False,
    }  # fmt: skip
    base.update(over)
    return base


def parse(text: str) -> dict[tuple[str, Labels], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def render(
    snaps: list[tuple[str, dict[str, Any], float | None]],
) -> dict[tuple[str, Labels], float]:
    class Fixed(RelayCollector):
        def collect(self):  # type: ignore[no-untyped-def]
            yield from families(snaps)

    return parse(generate_latest(registry_for(Fixed(list, float))).decode())


def L(**labels: str) -> Labels:
    return frozenset(labels.items())


def test_the_collector_exposes_every_worker_with_its_label() -> None:
    got = render([("0", snap(0), 0.5), ("1", snap(1, opened={"tcp": 10}), 1.5)])
    assert got["tunrelay_flows_opened_total", L(worker="0", proto="tcp")] == 4
    assert got["tunrelay_flows_opened_total", L(worker="1", proto="tcp")] == 10
    assert got["tunrelay_flows_ended_total", L(worker="0", proto="tcp", reason="fin")] == 3
    assert got["tunrelay_flows_ended_total", L(worker="0", proto="udp", reason="denied")] == 2
    assert got["tunrelay_flows_active", L(worker="0", proto="tcp")] == 1
    assert got["tunrelay_flows_active", L(worker="1", proto="tcp")] == 7
    assert got["tunrelay_flows_active", L(worker="0", proto="udp")] == 0
    assert got["tunrelay_payload_bytes_total", L(worker="0", direction="c2s")] == 100
    assert got["tunrelay_payload_bytes_total", L(worker="0", direction="s2c")] == 2000
    assert got["tunrelay_tun_drops_total", L(worker="0", direction="in")] == 7
    assert got["tunrelay_tun_drops_total", L(worker="0", direction="out")] == 1
    assert got["tunrelay_parse_errors_total", L(worker="0")] == 5
    assert got["tunrelay_checksum_errors_total", L(worker="0")] == 6
    assert got["tunrelay_policy_denials_total", L(worker="0")] == 2
    assert got["tunrelay_flows_blocked_total", L(worker="0")] == 1
    assert got["tunrelay_analyzer_errors_total", L(worker="0")] == 3
    assert got["tunrelay_analyzer_detaches_total", L(worker="0")] == 3
    assert got["tunrelay_tcp_memory_used_bytes", L(worker="0")] == 4096
    assert got["tunrelay_tcp_memory_limit_bytes", L(worker="0")] == 1 << 20
    assert got["tunrelay_tcp_buffered_bytes", L(worker="0")] == 1500
    assert got["tunrelay_memory_budget_reached_total", L(worker="0")] == 8
    assert got["tunrelay_timer_heap_entries", L(worker="0")] == 7
    assert got["tunrelay_timers_live", L(worker="0")] == 3
    assert got["tunrelay_worker_snapshot_age_seconds", L(worker="1")] == 1.5
    # The histogram: cumulative buckets, +Inf equal to the count.
    n = len(LOOP_BUCKETS) + 1
    assert got["tunrelay_loop_iteration_seconds_bucket", L(worker="0", le="1e-05")] == 1
    assert got["tunrelay_loop_iteration_seconds_bucket", L(worker="0", le="+Inf")] == n
    assert got["tunrelay_loop_iteration_seconds_count", L(worker="0")] == n
    assert got["tunrelay_loop_iteration_seconds_sum", L(worker="0")] == 0.5


def test_with_fail_closed_errors_fail_flows_instead_of_detaching() -> None:
    got = render([("0", snap(0, fail_closed=True), 0.1)])
    assert got["tunrelay_analyzer_detaches_total", L(worker="0")] == 0


def test_a_malformed_snapshot_is_read_as_zeros_not_an_error() -> None:
    bad = {"relay": "x", "stack": None, "opened": [1], "ended": [["tcp"], 5, ["t", "f", "n"]],
           "memory": {"used": True}, "loop": {"counts": [1, 2]}}  # fmt: skip
    got = render([("0", bad, None)])
    assert got["tunrelay_payload_bytes_total", L(worker="0", direction="c2s")] == 0
    assert got["tunrelay_flows_ended_total", L(worker="0", proto="t", reason="f")] == 0
    assert got["tunrelay_tcp_memory_used_bytes", L(worker="0")] == 0
    assert got["tunrelay_tcp_buffered_bytes", L(worker="0")] == 0
    assert got["tunrelay_timer_heap_entries", L(worker="0")] == 0
    assert not any(name.startswith("tunrelay_loop_iteration_seconds") for name, _ in got)


def view(index: int, age: float | None) -> WorkerView:
    a, b = socket.socketpair()
    b.close()
    v = WorkerView(index, a)
    if age is not None:
        v.snapshot, v.received_at = snap(index), 100.0 - age
    return v


def test_health_names_each_problem() -> None:
    views = [view(0, 0.5), view(1, HEARTBEAT_TIMEOUT + 1), view(2, None), view(3, 0.1)]
    problem = health(views, lambda i: i != 3, now=100.0)
    assert problem == (
        "worker 1: no heartbeat for 4.0 s; worker 2 has not reported yet; worker 3 is not running"
    )
    assert health(views[:1], lambda i: True, now=100.0) is None


def test_http_routes() -> None:
    registry = registry_for(RelayCollector(list, float))
    ok = metrics._route(b"GET /metrics HTTP/1.1\r\n\r\n", registry, lambda: None)
    assert ok[0] == "200 OK" and ok[1].startswith("text/plain; version=")
    assert metrics._route(b"GET /healthz HTTP/1.0\r\n\r\n", registry, lambda: None)[2] == b"ok\n"
    sick = metrics._route(b"GET /healthz HTTP/1.1\r\n\r\n", registry, lambda: "worker 0: x")
    assert sick == ("503 Service Unavailable", "text/plain", b"worker 0: x\n")
    assert metrics._route(b"POST /metrics HTTP/1.1\r\n\r\n", registry, lambda: None)[0].startswith(
        "405"
    )
    assert metrics._route(b"GET /x HTTP/1.1\r\n\r\n", registry, lambda: None)[0].startswith("404")
    assert metrics._route(b"\x00garbage", registry, lambda: None)[0].startswith("400")


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:80", ("::1", 80)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
    ],
)
def test_metrics_address(text: str, address: tuple[str, int]) -> None:
    assert parse_address(text) == address
    assert validate(tun="t0", client_nets=["10.0.0.0/24"], metrics=text).metrics == address


@pytest.mark.parametrize(
    "text", ["9464", ":9464", "host:9464", "127.0.0.1:0", "127.0.0.1:x", "::1:80"]
)
def test_a_bad_metrics_address_names_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--metrics: "):
        validate(tun="t0", client_nets=["10.0.0.0/24"], metrics=text)


def test_metrics_are_off_by_default() -> None:
    assert validate(tun="t0", client_nets=["10.0.0.0/24"]).metrics is None


async def test_frames_round_trip_and_an_oversized_one_is_refused() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        await write_frame(a, b"hello")
        assert await read_frame(b, 16) == b"hello"
        await write_frame(a, b"x" * 17)
        with pytest.raises(Exception, match="17 bytes"):
            await read_frame(b, 16)


async def test_a_worker_view_keeps_the_last_snapshot_and_ends_on_garbage() -> None:
    ours, theirs = socket.socketpair()
    v = WorkerView(0, ours)
    peer = trio.socket.from_stdlib_socket(theirs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(v.run)
        await write_frame(peer, b'{"type": "snapshot", "worker": 0, "n": 1}')
        await write_frame(peer, b'{"type": "snapshot", "worker": 0, "n": 2}')
        await trio.testing.wait_all_tasks_blocked()
        assert v.snapshot == {"type": "snapshot", "worker": 0, "n": 2} and v.snapshots == 2
        await write_frame(peer, b"[1, 2]")  # not an object: the link is closed
    assert v.closed and v.snapshots == 2
    peer.close()


async def test_flow_counts_count_denied_flows_as_opened() -> None:
    counts = FlowCounts()
    info = FlowInfo("u", "tcp", "198.18.0.2", 1, "198.19.0.2", 80, 0.0, 4)
    await counts.flow_start(info)
    await counts.flow_end(info, FlowEnd(EndReason.FIN, 1, 2, 0.1))
    udp = FlowInfo("v", "udp", "198.18.0.2", 1, "198.19.0.2", 53, 0.0, 4)
    await counts.flow_end(udp, FlowEnd(EndReason.DENIED, 0, 0, 0.0))
    assert counts.opened == {"tcp": 1, "udp": 1}
    assert counts.ended == {("tcp", "fin"): 1, ("udp", "denied"): 1}


def test_loop_latency_buckets() -> None:
    lat = LoopLatency()
    for seconds in (5e-6, 1e-5, 2e-5, 0.5, 3.0):
        lat.observe(seconds)
    assert lat.counts[0] == 2 and lat.counts[1] == 1  # le is inclusive
    assert lat.counts[-2] == 1 and lat.counts[-1] == 1  # 0.5 <= 1 s; 3 s in +Inf
    assert lat.total == pytest.approx(3.500035)
