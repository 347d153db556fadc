"""``Relay.reconfigure`` (a SIGHUP reload in a worker): new flows get the new egress
policy and analyzers; a flow already open keeps relaying with what it started with."""

from __future__ import annotations

import trio
import trio.testing
from test_engine import Client, harness, pattern, recv_exactly, send_all, until

from relay.analysis.flowcounts import FlowCounts
from relay.datapath.egress import EgressPolicy


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
