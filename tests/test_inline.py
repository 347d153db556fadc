"""Inline analyzers: ``data()`` rewrites, drops and resets, for TCP (the engine's
in-process harness) and in the chain itself."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from test_engine import (
    C2S,
    OPEN,
    S2C,
    Client,
    connected,
    harness,
    pattern,
    recv_exactly,
    recv_to_eof,
    send_all,
    until,
)

from relay.analysis.hooks import AnalyzerChain, Direction, FlowInfo, Verdict
from relay.datapath.config import RelayConfig
from relay.datapath.tcpflow import TcpFlow
from stack import FlowId, Stack, StackConfig, TcpConfig


class Rewrite:
    """Replaces ``old`` by ``new`` in one direction, chunk by chunk."""

    def __init__(self, direction: Direction, old: bytes, new: bytes) -> None:
        self.direction, self.old, self.new = direction, old, new
        self.seen = bytearray()

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> bytes | None:
        if direction is not self.direction:
            return None
        self.seen += data
        return data.replace(self.old, self.new)


class Scale:
    """Each byte ``factor`` times (0 drops everything) in one direction."""

    def __init__(self, direction: Direction, factor: int) -> None:
        self.direction, self.factor = direction, factor

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> bytes | None:
        if direction is not self.direction:
            return None
        return bytes(b for b in data for _ in range(self.factor))


def scaled(data: bytes, factor: int) -> bytes:
    return bytes(b for b in data for _ in range(factor))


@pytest.mark.parametrize(("old", "new"), [(b"cat", b"tiger"), (b"cat", b"c"), (b"cat", b"")])
async def test_client_bytes_rewritten_longer_shorter_or_dropped(
    old: bytes, new: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    up = b"a cat, another cat; " * 50
    async with harness(analyzers=[Rewrite(C2S, old, new)]) as h:
        c, server = await connected(h)
        await c.send(up)
        c.finish()
        want = up.replace(old, new)
        assert await recv_to_eof(server) == want
        server.close()
        end = await h.tap.end_of(40000)
        assert (end.how, end.bytes_c2s, end.forwarded_c2s) == ("fin", len(up), len(want))
        assert bytes(h.tap.streams[(40000, C2S)]) == want  # the next analyzer saw the rewrite
        (line,) = h.log_lines()
        assert (line["orig_bytes"], line["orig_bytes_forwarded"]) == (len(up), len(want))


@pytest.mark.parametrize("factor", [3, 0])
async def test_server_bytes_rewritten_beyond_the_send_space(
    factor: int, autojump_clock: trio.testing.MockClock
) -> None:
    # Three times 300 kB is more than the stack's send space: the remainder of each
    # rewrite waits for room instead of being dropped.
    down = pattern(300_000, 5)
    async with harness(analyzers=[Scale(S2C, factor)]) as h:
        c, server = await connected(h)
        await send_all(server, down)
        server.shutdown(trio.socket.SHUT_WR)
        await until(lambda: c.fin)
        assert bytes(c.received) == scaled(down, factor)
        c.finish()
        end = await h.tap.end_of(40000)
        assert end.how == "fin"
        assert (end.bytes_s2c, end.forwarded_s2c) == (len(down), factor * len(down))
        (line,) = h.log_lines()
        assert (line["resp_bytes"], line["resp_bytes_forwarded"]) == (
            len(down),
            factor * len(down),
        )


class Chunks:
    """Records the size of each chunk one direction's data() gets."""

    def __init__(self, direction: Direction) -> None:
        self.direction = direction
        self.sizes: list[int] = []

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
        if direction is self.direction:
            self.sizes.append(len(data))


@pytest.mark.parametrize(("read", "tso"), [(4096, 1), (65536, 1), (65536, 44), (1000, 44)])
async def test_one_read_from_the_server_is_at_most_recv_size_in_whole_bursts(
    read: int, tso: int, autojump_clock: trio.testing.MockClock
) -> None:
    # --flow-read-bytes: the server's 300 kB, sent at once, come up in reads of at
    # most recv_size, each one step of the flow task (what a flow beside it waits
    # for); cut to whole bursts of the sender (MSS x tso_segments) when larger, so
    # that no step ends in a short segment. A smaller read is taken as it is.
    down = pattern(300_000, 3)
    chunks = Chunks(S2C)
    stack = Stack(StackConfig(tcp=TcpConfig(tso_segments=tso)))
    async with harness(
        RelayConfig(egress=OPEN, recv_size=read), analyzers=[chunks], stack=stack
    ) as h:
        c, server = await connected(h)
        burst = stack.send_burst(c.flow)
        assert burst == 1460 * tso  # the test client's MSS, no timestamps
        await send_all(server, down)
        server.shutdown(trio.socket.SHUT_WR)
        await until(lambda: c.fin)
        assert bytes(c.received) == down
    assert sum(chunks.sizes) == len(down)
    bound = read - read % burst if read > burst else read
    assert max(chunks.sizes) == bound  # the bound, and reached
    assert len(chunks.sizes) >= len(down) // bound


async def test_big_client_rewrite_keeps_the_window_accounting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 200 kB doubled: more than one window, so the client can send everything only
    # if every byte the rewrite replaced was reported consumed.
    up = pattern(200_000, 9)
    async with harness(analyzers=[Scale(C2S, 2)]) as h:
        c, server = await connected(h)
        async with trio.open_nursery() as n:
            n.start_soon(c.send, up)
            assert await recv_exactly(server, 2 * len(up)) == scaled(up, 2)


async def test_chained_analyzers_see_the_previous_output(
    autojump_clock: trio.testing.MockClock,
) -> None:
    first = Rewrite(C2S, b"cat", b"dog")
    second = Rewrite(C2S, b"dog", b"wolf")
    async with harness(analyzers=[first, second]) as h:
        c, server = await connected(h)
        await c.send(b"my cat")
        assert await recv_exactly(server, 7) == b"my wolf"
        assert (bytes(first.seen), bytes(second.seen)) == (b"my cat", b"my dog")
        assert bytes(h.tap.streams[(40000, C2S)]) == b"my wolf"


class ResetOn:
    """RESET when ``marker`` shows up in one direction; counts calls after that."""

    def __init__(self, direction: Direction, marker: bytes) -> None:
        self.direction, self.marker = direction, marker

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> Verdict | None:
        if direction is self.direction and self.marker in data:
            return Verdict.RESET
        return None


@pytest.mark.parametrize("direction", [C2S, S2C])
async def test_reset_mid_stream_resets_both_sides(
    direction: Direction, autojump_clock: trio.testing.MockClock
) -> None:
    async with harness(analyzers=[ResetOn(direction, b"EVIL")]) as h:
        c, server = await connected(h)
        await c.send(b"fine ")
        assert await recv_exactly(server, 5) == b"fine "
        await send_all(server, b"fine too ")
        await until(lambda: c.received == b"fine too ")
        if direction is C2S:
            await c.send(b"EVIL")
        else:
            await send_all(server, b"EVIL")
        await until(lambda: c.rst)
        end = await h.tap.end_of(40000)
        assert end.how == "rejected"
        assert h.connector.closed_with_rst(c.flow)  # upstream: SO_LINGER 0
        assert bytes(c.received) == b"fine too "  # the judged bytes never reached the client
        assert h.tap.streams[(40000, direction)].count(b"EVIL") == 0  # nor the next analyzer
        assert (end.forwarded_c2s, end.forwarded_s2c) == (5, 9)
        assert h.relay.stats.flows_reset == 1
        await until(lambda: h.relay.active_flows == 0)


async def test_an_analyzer_that_changes_nothing_keeps_the_bytes_and_the_direct_path(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    # Without data hooks the packet loop writes straight upstream, as before.
    direct: list[int] = []
    send_now = TcpFlow._send_now

    def counted(flow: TcpFlow, data: bytes) -> int:
        sent = send_now(flow, data)
        direct.append(sent)
        return sent

    monkeypatch.setattr(TcpFlow, "_send_now", counted)
    async with harness(data_hooks=False) as h:
        c, server = await connected(h)
        await c.send(b"straight")
        assert await recv_exactly(server, 8) == b"straight"
        assert sum(direct) == 8

    # Analyzers returning None or the same bytes: the very object goes on (no copy).
    class Same:
        async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> bytes:
            return data

    class Quiet:
        async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
            return None

    hooks = AnalyzerChain([Same(), Quiet()]).open(
        FlowInfo.from_flow(FlowId(4, "198.18.0.2", 1, "198.19.0.1", 2))
    )
    chunk = pattern(1000, 1)
    assert await hooks.data(C2S, chunk) is chunk


async def test_after_a_drop_the_next_analyzers_see_nothing() -> None:
    seen: list[bytes] = []

    class Drop:
        async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> bytes:
            return b""

    class Reset:
        async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> Verdict:
            return Verdict.RESET

    class Watch:
        async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
            seen.append(data)

    info = FlowInfo.from_flow(FlowId(4, "198.18.0.2", 1, "198.19.0.1", 2))
    assert await AnalyzerChain([Drop(), Watch()]).open(info).data(C2S, b"x") == b""
    assert await AnalyzerChain([Reset(), Watch()]).open(info).data(C2S, b"x") is Verdict.RESET
    assert seen == []


async def test_a_bad_return_value_is_an_analyzer_error() -> None:
    class Bad:
        async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> object:
            return "text"

    errors: list[None] = []
    info = FlowInfo.from_flow(FlowId(4, "198.18.0.2", 1, "198.19.0.1", 2))
    hooks = AnalyzerChain([Bad()], on_error=lambda: errors.append(None)).open(info)
    assert await hooks.data(C2S, b"x") == b"x"  # detached; the bytes go on
    assert len(errors) == 1 and not hooks.has_data_hooks


async def test_udp_datagrams_rewritten_dropped_and_reset(
    autojump_clock: trio.testing.MockClock,
) -> None:
    import contextlib
    import socket

    from test_protocol_logs import relay_with, udp_from_client

    class Udp:
        async def data(
            self, flow: FlowInfo, direction: Direction, data: bytes
        ) -> bytes | Verdict | None:
            if data == b"EVIL":
                return Verdict.RESET
            if data == b"drop":
                return b""
            return data.upper() if direction is C2S else data + b"!"

    ends: dict[int, object] = {}

    class Ends:
        async def flow_end(self, flow: FlowInfo, end: object) -> None:
            ends[flow.client_port] = end

    servers: dict[int, socket.socket] = {}
    async with relay_with([Udp(), Ends()], udp_servers=servers) as h:
        icmp = Client(h, port=40100).icmp  # takes the ICMP errors to that port
        for payload in (b"hello", b"drop", b"world"):
            h.source.inject(udp_from_client(40100, 9999, payload))
        await until(lambda: 40100 in servers)
        server = servers[40100]
        server.setblocking(False)
        got: list[bytes] = []

        def read() -> bool:
            with contextlib.suppress(BlockingIOError):
                got.append(server.recv(2048))
            return len(got) >= 2

        await until(read)
        assert got == [b"HELLO", b"WORLD"]
        server.send(b"reply")
        await until(lambda: h.udp.get(40100) == [b"reply!"])
        h.source.inject(udp_from_client(40100, 9999, b"EVIL"))
        await until(lambda: h.relay.stats.flows_reset == 1)
        h.source.inject(udp_from_client(40100, 9999, b"after"))  # refused: never sent
        await trio.sleep(1)
        with pytest.raises(BlockingIOError):
            server.recv(2048)
        assert (3, 3) in icmp  # port unreachable, as from a closed port
        await until(lambda: 40100 in ends, 300)
    end = ends[40100]
    assert end.how == "rejected"
    assert (end.bytes_c2s, end.forwarded_c2s) == (18, 10)
    assert (end.bytes_s2c, end.forwarded_s2c) == (5, 6)


async def test_the_readme_rewrite_example(autojump_clock: trio.testing.MockClock) -> None:
    from pathlib import Path
    from typing import Any

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    _, found, rest = readme.partition("<!-- example: rewrite -->\n```python\n")
    assert found, "the README's example is gone"
    namespace: dict[str, Any] = {}
    exec(compile(rest.split("```", 1)[0], "README.md", "exec"), namespace)
    async with harness(analyzers=[namespace["Rewriter"]()]) as h:
        c = Client(h, sport=80)
        await c.connect()
        server = await h.connector.server(c.flow)
        await c.send(b"GET / HTTP/1.1\r\n\r\n")
        assert await recv_exactly(server, 18) == b"GET / HTTP/1.1\r\n\r\n"
        await send_all(server, b"colour colour")
        await until(lambda: bytes(c.received) == b"color color")
        await c.send(b"FORBIDDEN-TOKEN")
        await until(lambda: c.rst)
        assert (await h.tap.end_of(40000)).how == "rejected"


async def test_record_verdicts_every_analyzer_sees_the_record_and_the_first_verdict_decides() -> (
    None
):
    from relay.analysis.hooks import Block

    seen: list[str] = []

    class Say:
        def __init__(self, name: str, verdict: object) -> None:
            self.name, self.verdict = name, verdict

        async def http_request(self, flow: FlowInfo, req: object) -> object:
            seen.append(self.name)
            return self.verdict

        async def http_response(self, flow: FlowInfo, resp: object) -> object:
            seen.append(self.name + "-response")
            return Verdict.RESET  # not a verdict hook: ignored

    info = FlowInfo.from_flow(FlowId(4, "198.18.0.2", 1, "198.19.0.1", 2))
    block = Block("rule-a", b"no")
    chain = AnalyzerChain([Say("a", None), Say("b", block), Say("c", Verdict.RESET)])
    hooks = chain.open(info)
    assert await hooks.records([("http_response", object())]) is None
    assert await hooks.records([("http_request", object()), ("http_request", object())]) is block
    assert seen == ["a-response", "b-response", "c-response", "a", "b", "c"]  # then stopped
