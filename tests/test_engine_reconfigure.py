"""``Relay.reconfigure`` (a SIGHUP reload in a worker): new flows get the new egress
policy and analyzers; a flow already open keeps relaying with what it started with.
And a worker's snapshot of a real relay, through JSON, rendered as metrics."""

from __future__ import annotations

import json
import socket

import trio
import trio.testing
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_engine import Client, harness, pattern, recv_exactly, send_all, until

from relay.analysis.flowcounts import FlowCounts
from relay.datapath.egress import EgressPolicy
from relay.service.gcstats import GcStats
from relay.service.metrics import RelayCollector, registry_for
from relay.service.worklink import WorkerView, snapshot


async def test_new_flows_get_the_new_policy_and_analyzers_open_ones_keep_theirs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:  # everything allowed
        first = Client(h)
        await first.connect()
        server = await h.connector.server(first.flow)
        counts = FlowCounts()
        # The default policy denies the lab's reserved test range; a new chain counts.
        h.relay.reconfigure(egress=EgressPolicy(), analyzers=[h.tap, counts])
        second = Client(h, port=40001)
        second.syn()
        assert (await h.tap.end_of(40001)).rule == "default:reserved"
        assert counts.ended == {("tcp", "denied"): 1} and counts.opened == {"tcp": 1}
        # The open flow still relays both ways, byte-exact.
        up, down = pattern(100_000, 1), pattern(150_000, 2)
        async with trio.open_nursery() as n:
            n.start_soon(first.send, up)
            n.start_soon(send_all, server, down)
            assert await recv_exactly(server, len(up)) == up
            await until(lambda: len(first.received) >= len(down))
        assert first.received == down
        assert h.relay.stats.flows_denied == 1 and h.relay.active_flows == 1
        # Its end goes to the chain it started with (the old one's flow log), not `counts`.
        first.reset()
        await until(lambda: h.relay.active_flows == 0)
        await until(lambda: len(h.log_lines()) == 1)
        assert h.log_lines()[0]["id.orig_p"] == 40000
        assert ("tcp", "rst") not in counts.ended


async def test_a_workers_snapshot_renders_as_the_traffic_it_carried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    counts = FlowCounts()
    async with harness(analyzers=[counts]) as h:
        c = Client(h)
        await c.connect()
        server = await h.connector.server(c.flow)
        up = pattern(50_000, 3)
        await c.send(up)
        assert await recv_exactly(server, len(up)) == up
        c.reset()
        await until(lambda: h.relay.active_flows == 0 and counts.ended)
        snap = snapshot(0, h.relay, h.stack, h.source.stats, GcStats(), counts, fail_closed=False)
    text = json.dumps(snap)  # what the link carries
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(
            generate_latest(
                registry_for(RelayCollector(lambda: [_view(text)], lambda: 1.0))
            ).decode()
        )
        for s in family.samples
    }
    w = ("worker", "0")
    assert got["tunrelay_flows_opened_total", (("proto", "tcp"), w)] == 1
    assert got["tunrelay_flows_ended_total", (("proto", "tcp"), ("reason", "rst"), w)] == 1
    assert got["tunrelay_payload_bytes_total", (("direction", "c2s"), w)] == len(up)
    assert got["tunrelay_tun_packets_total", (("direction", "in"), w)] == h.source.stats.packets_in
    assert got["tunrelay_loop_iteration_seconds_count", (w,)] == h.relay.stats.iterations > 0
    # The flow is gone: nothing buffered, reserved or timed is left of it.
    assert got["tunrelay_tcp_buffered_bytes", (w,)] == 0
    assert got["tunrelay_tcp_memory_used_bytes", (w,)] == 0
    assert got["tunrelay_timers_live", (w,)] == 0
    assert got["tunrelay_memory_budget_reached_total", (w,)] == 0


def _view(text: str) -> WorkerView:
    a, b = socket.socketpair()
    b.close()
    v = WorkerView(0, a)
    v.snapshot, v.received_at = json.loads(text), 0.5
    return v
