"""Stream analyzers (``relay.analysis.streams``): the adapter driven through an
``AnalyzerChain`` with trio directly, then inside the relay (the engine's
in-process harness)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from test_engine import (
    C2S,
    S2C,
    Client,
    connected,
    harness,
    pattern,
    recv_exactly,
    send_all,
    until,
)

from relay.analysis.hooks import (
    AnalyzerChain,
    Direction,
    EndReason,
    FlowEnd,
    FlowHooks,
    FlowInfo,
    Halt,
)
from relay.analysis.streams import StreamAdapter, adapt_stream_analyzers
from relay.datapath.tcpflow import TcpFlow
from relay.service.run import ConfigError, load_analyzer

FIN_END = FlowEnd(EndReason.FIN, 0, 0, 1.0)
RST_END = FlowEnd(EndReason.RST, 0, 0, 1.0)


def info(port: int = 40000, proto: str = "tcp") -> FlowInfo:
    return FlowInfo(f"C{port}", proto, "198.18.0.2", port, "198.19.0.80", 80, 0.0, 4)


class Reader:
    """Reads both directions to their end; records the bytes and how each ended."""

    def __init__(self) -> None:
        self.got: dict[tuple[int, Direction], bytearray] = {}
        self.ended: dict[tuple[int, Direction], str] = {}

    async def stream(
        self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
    ) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.read, flow, C2S, c2s)
            nursery.start_soon(self.read, flow, S2C, s2c)

    async def read(self, flow: FlowInfo, d: Direction, side: trio.abc.ReceiveStream) -> None:
        buf = self.got.setdefault((flow.client_port, d), bytearray())
        try:
            async for chunk in side:
                buf += chunk
        except trio.BrokenResourceError:
            self.ended[(flow.client_port, d)] = "cut"
            raise
        self.ended[(flow.client_port, d)] = "eof"


class Sleeper:
    """Never reads; records that its task was cancelled."""

    stream_buffer = 1000

    def __init__(self) -> None:
        self.cancelled: list[int] = []

    async def stream(
        self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
    ) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled.append(flow.client_port)


class Watcher:
    """A hook-style analyzer: what the chain forwards it."""

    def __init__(self) -> None:
        self.seen = bytearray()

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
        self.seen += data


@asynccontextmanager
async def chain_of(
    *analyzers: object, fail_closed: bool = False
) -> AsyncIterator[tuple[AnalyzerChain, list[StreamAdapter], list[int]]]:
    errors: list[int] = []
    on_error: Callable[[], None] = lambda: errors.append(1)  # noqa: E731
    wrapped, adapters = adapt_stream_analyzers(
        analyzers, fail_closed=fail_closed, on_error=on_error
    )
    chain = AnalyzerChain(wrapped, fail_closed=fail_closed, on_error=on_error)
    async with trio.open_nursery() as nursery:
        for adapter in adapters:
            adapter.nursery = nursery
        yield chain, adapters, errors
        nursery.cancel_scope.cancel()


async def opened(chain: AnalyzerChain, port: int = 40000) -> FlowHooks:
    hooks = chain.open(info(port))
    await hooks.start()
    return hooks


async def test_each_direction_in_order_and_its_own_end_of_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reader = Reader()
    async with chain_of(reader) as (chain, (adapter,), errors):
        hooks = await opened(chain)
        for chunk in (b"GET / ", b"HTTP/1.1\r\n", b"\r\n"):
            assert await hooks.data(C2S, chunk) == chunk  # passive: forwarded as it is
        assert await hooks.data(S2C, b"HTTP/1.1 200 OK\r\n") == b"HTTP/1.1 200 OK\r\n"
        hooks.finished(C2S)  # the client's FIN: only c2s ends
        await until(lambda: (40000, C2S) in reader.ended)
        assert reader.ended == {(40000, C2S): "eof"}
        await hooks.data(S2C, b"\r\nbody")
        hooks.finished(S2C)
        await until(lambda: (40000, S2C) in reader.ended)
        await hooks.end(FIN_END)
        assert adapter.active_flows == 0
    assert reader.got[(40000, C2S)] == b"GET / HTTP/1.1\r\n\r\n"
    assert reader.got[(40000, S2C)] == b"HTTP/1.1 200 OK\r\n\r\nbody"
    assert reader.ended[(40000, S2C)] == "eof" and errors == []


async def test_receive_some_max_bytes_cuts_chunks_and_keeps_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    got: list[bytes] = []

    class Fixed:
        async def stream(
            self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
        ) -> None:
            while piece := await c2s.receive_some(4):
                got.append(piece)
            got.append(await c2s.receive_some())  # b"" again: the end stays the end

    async with chain_of(Fixed()) as (chain, _, _):
        hooks = await opened(chain)
        await hooks.data(C2S, b"0123456789")
        await hooks.data(C2S, b"ab")
        hooks.finished(C2S)
        await until(lambda: got and got[-1] == b"")
        await hooks.end(FIN_END)
    assert got == [b"0123", b"4567", b"89", b"ab", b""]


async def test_a_passive_analyzer_that_falls_behind_is_detached_and_logged(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    sleeper, reader, watcher = Sleeper(), Reader(), Watcher()
    async with chain_of(sleeper, reader, watcher) as (chain, (adapter, _), errors):
        a, b = await opened(chain, 40000), await opened(chain, 40001)
        t0 = trio.current_time()
        await a.data(C2S, b"x" * 600)
        await a.data(C2S, b"x" * 600)  # the latest chunk does not count
        await b.data(C2S, b"y" * 600)
        with caplog.at_level(logging.WARNING, "relay.analysis.streams"):
            await a.data(S2C, b"z" * 600)  # each direction has its own buffer
            await a.data(C2S, b"x" * 600)  # 600 waiting besides the latest: fine
            assert not caplog.records
            await a.data(C2S, b"x" * 600)  # 1,200 besides the latest: over 1,000
        assert trio.current_time() == t0  # passive: never waited
        (record,) = caplog.records
        assert info(40000).describe() in record.getMessage()
        assert "fell behind" in record.getMessage() and "detached" in record.getMessage()
        await until(lambda: sleeper.cancelled == [40000])  # its task is gone
        assert adapter.active_flows == 1  # flow 40001 still has it
        await a.data(C2S, b"more")  # the others go on, whole
        a.finished(C2S)
        await until(lambda: (40000, C2S) in reader.ended)
        assert reader.got[(40000, C2S)] == b"x" * 2400 + b"more"
        assert watcher.seen == b"x" * 1200 + b"y" * 600 + b"z" * 600 + b"x" * 1200 + b"more"
        await a.end(FIN_END)
        await b.end(FIN_END)
        assert sleeper.cancelled == [40000, 40001] and adapter.active_flows == 0
    assert errors == []  # falling behind is not an error


async def test_once_detached_the_flow_has_no_data_hooks_left(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with chain_of(Sleeper()) as (chain, _, _):
        hooks = await opened(chain)
        for chunk in (b"x" * 1001, b"y"):
            await hooks.data(C2S, chunk)
            assert hooks.has_data_hooks
        await hooks.data(C2S, b"z")  # 1,001 bytes besides the latest: over 1,000
        assert not hooks.has_data_hooks  # the flows' direct paths again


async def test_a_reader_that_keeps_up_is_never_detached_whatever_the_chunk_size(
    autojump_clock: trio.testing.MockClock,
) -> None:
    Limited = type("Limited", (Reader,), {"stream_buffer": 1000})
    reader = Limited()
    chunk = bytes(range(256)) * 20  # 5,120 bytes: five times stream_buffer
    async with chain_of(reader) as (chain, (adapter,), _):
        hooks = await opened(chain)
        await trio.sleep(1)  # the relay connects upstream before the first bytes
        for _ in range(200):
            await hooks.data(C2S, chunk)
            await trio.lowlevel.checkpoint()  # as the pump's socket send does
        assert hooks.has_data_hooks and adapter.active_flows == 1
        hooks.finished(C2S)
        await hooks.end(FIN_END)
    assert reader.got[(40000, C2S)] == chunk * 200


async def test_inline_data_waits_until_the_analyzer_read_the_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    taken: list[tuple[float, bytes]] = []

    class SlowInline:
        inline = True

        async def stream(
            self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
        ) -> None:
            while True:
                await trio.sleep(10)
                chunk = await c2s.receive_some()
                if not chunk:
                    return
                taken.append((trio.current_time(), chunk))

    async with chain_of(SlowInline()) as (chain, _, _):
        hooks = await opened(chain)
        t0 = trio.current_time()
        assert await hooks.data(C2S, b"one") == b"one"
        assert trio.current_time() - t0 == pytest.approx(10)  # held until read
        assert taken == [(trio.current_time(), b"one")]
        await hooks.data(C2S, b"two")
        assert trio.current_time() - t0 == pytest.approx(20)
        # Never buffered beyond what it read, whatever stream_buffer says.
        hooks.finished(C2S)
        await hooks.end(FIN_END)
    assert [c for _, c in taken] == [b"one", b"two"]


async def test_an_exception_in_stream_is_logged_and_contained(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        async def stream(
            self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
        ) -> None:
            await c2s.receive_some()
            raise ValueError("parser bug")

    watcher = Watcher()
    async with chain_of(Broken(), watcher) as (chain, (adapter,), errors):
        hooks = await opened(chain)
        with caplog.at_level(logging.ERROR):
            await hooks.data(C2S, b"first")
            await until(lambda: errors)
        (record,) = caplog.records
        assert "raised on flow" in record.getMessage()
        assert info().describe() in record.getMessage()
        assert record.exc_info is not None and "parser bug" in str(record.exc_info[1])
        assert await hooks.data(C2S, b"second") == b"second"  # the flow goes on
        assert adapter.active_flows == 0
        await hooks.end(FIN_END)
    assert errors == [1] and watcher.seen == b"firstsecond"


async def test_fail_closed_fails_the_flow_at_its_next_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Broken:
        async def stream(
            self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
        ) -> None:
            raise ValueError("parser bug")

    async with chain_of(Broken(), fail_closed=True) as (chain, _, errors):
        hooks = await opened(chain)
        await until(lambda: errors)
        assert await hooks.data(S2C, b"next") is Halt.FAILED


async def test_a_cut_flow_raises_broken_after_the_buffered_bytes_and_is_no_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reader = Reader()
    async with chain_of(reader) as (chain, (adapter,), errors):
        hooks = await opened(chain)
        await hooks.data(C2S, b"partial req")
        hooks.finished(S2C)  # the server finished; the client then reset
        await hooks.end(RST_END)
        assert adapter.active_flows == 0
    assert reader.got[(40000, C2S)] == b"partial req"
    assert reader.ended == {(40000, C2S): "cut", (40000, S2C): "eof"}
    assert errors == []


async def test_flow_end_cancels_a_stream_that_does_not_return(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sleeper = Sleeper()
    async with chain_of(sleeper) as (chain, (adapter,), _):
        hooks = await opened(chain)
        hooks.finished(C2S)
        hooks.finished(S2C)
        t0 = trio.current_time()
        await hooks.end(FIN_END)
        assert trio.current_time() - t0 == pytest.approx(adapter.end_timeout)
        assert sleeper.cancelled == [40000]


async def test_a_stream_that_returned_leaves_the_flow_and_its_own_hooks_still_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[str] = []

    class FirstChunk:
        async def flow_start(self, flow: FlowInfo) -> None:
            calls.append("start")

        async def stream(
            self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
        ) -> None:
            calls.append(bytes(await c2s.receive_some()).decode())

        async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
            calls.append(f"end {end.how}")

    async with chain_of(FirstChunk()) as (chain, (adapter,), _):
        hooks = await opened(chain)
        await hooks.data(C2S, b"hello")
        await until(lambda: len(calls) == 2)
        await trio.sleep(0)
        await hooks.data(C2S, b"ignored")  # stream() is over: the adapter leaves
        assert not hooks.has_data_hooks and adapter.active_flows == 0
        await hooks.end(FIN_END)
    assert calls == ["start", "hello"]  # detached: no flow_end either

    calls.clear()
    async with chain_of(FirstChunk()) as (chain, _, _):
        hooks = await opened(chain)
        await hooks.end(RST_END)
    assert calls == ["start", "end rst"]


async def test_udp_and_echo_flows_are_not_shown_to_stream_analyzers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reader = Reader()
    async with chain_of(reader) as (chain, (adapter,), errors):
        for proto in ("udp", "icmp"):
            hooks = chain.open(info(53, proto))
            await hooks.start()
            assert not hooks.has_data_hooks  # the datagram flows' direct path
        assert adapter.active_flows == 0 and errors == []


class StreamAndData:
    async def stream(
        self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
    ) -> None:
        pass

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
        pass


class StreamOnly:
    async def stream(
        self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
    ) -> None:
        pass


def test_a_class_with_stream_and_data_is_refused() -> None:
    with pytest.raises(TypeError, match="has stream and data"):
        adapt_stream_analyzers([StreamAndData()])
    with pytest.raises(
        ConfigError, match=r"'test_stream_analyzers:StreamAndData'.*stream and data"
    ):
        load_analyzer("test_stream_analyzers:StreamAndData")
    assert isinstance(load_analyzer("test_stream_analyzers:StreamOnly"), StreamOnly)

    class BadBuffer(StreamOnly):
        stream_buffer = "1M"

    with pytest.raises(TypeError, match="stream_buffer must be a positive int"):
        adapt_stream_analyzers([BadBuffer()])


# --- inside the relay -------------------------------------------------------------


async def test_through_the_relay_byte_exact_with_both_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    reader = Reader()
    up, down = pattern(300_000, 1), pattern(500_000, 2)
    async with harness(analyzers=[reader]) as h:
        c, server = await connected(h)
        async with trio.open_nursery() as n:
            n.start_soon(c.send, up)
            n.start_soon(send_all, server, down)
            assert await recv_exactly(server, len(up)) == up
            await until(lambda: len(c.received) >= len(down))
        c.finish()
        server.shutdown(trio.socket.SHUT_WR)
        await until(lambda: c.fin)
        assert (await h.tap.end_of(40000)).how == "fin"
    assert reader.got[(40000, C2S)] == up and reader.got[(40000, S2C)] == down
    assert reader.ended == {(40000, C2S): "eof", (40000, S2C): "eof"}


async def test_in_the_relay_a_detached_analyzer_gives_the_direct_path_back(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    direct: list[int] = []
    send_now = TcpFlow._send_now

    def counted(flow: TcpFlow, data: bytes) -> int:
        direct.append(len(data))
        return send_now(flow, data)

    monkeypatch.setattr(TcpFlow, "_send_now", counted)
    sleeper = Sleeper()
    async with harness(analyzers=[sleeper], data_hooks=False) as h:
        c, server = await connected(h)
        await c.send(b"a" * 900)
        assert await recv_exactly(server, 900) == b"a" * 900
        assert direct == []  # a stream analyzer is watching
        for _ in range(3):  # at the third, 1,100 bytes wait besides the latest: detached
            await c.send(b"b" * 200)
            assert await recv_exactly(server, 200) == b"b" * 200
        await until(lambda: sleeper.cancelled == [40000])
        await c.send(b"c" * 100)
        assert await recv_exactly(server, 100) == b"c" * 100
        assert direct == [100]  # straight from the packet loop again


async def test_an_inline_stream_analyzer_holds_the_client_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()
    read = bytearray()

    class Gated:
        inline = True

        async def stream(
            self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
        ) -> None:
            await gate.wait()
            async for chunk in c2s:
                read.extend(chunk)

    up = pattern(400_000, 3)  # more than the client's window
    async with harness(analyzers=[Gated()]) as h:
        c, server = await connected(h)
        async with trio.open_nursery() as n:
            n.start_soon(c.send, up)
            await trio.sleep(30)
            # Nothing read by the analyzer: nothing upstream, and the client stalled.
            assert h.relay.stats.bytes_c2s < len(up) and not read
            with trio.move_on_after(1) as scope:
                await server.recv(1)
            assert scope.cancelled_caught
            gate.set()
            assert await recv_exactly(server, len(up)) == up
        assert read == up


async def test_shutdown_cancels_the_stream_tasks(autojump_clock: trio.testing.MockClock) -> None:
    sleeper = Sleeper()
    sleeper.stream_buffer = 1 << 20
    async with harness(analyzers=[sleeper]) as h:
        await connected(h)
    assert sleeper.cancelled == [40000]


@pytest.mark.parametrize(
    ("example", "name"), [("stream", "FirstLines"), ("hooks", "FirstLinesHooks")]
)
async def test_the_readme_examples_print_the_first_lines(
    example: str,
    name: str,
    capsys: pytest.CaptureFixture[str],
    autojump_clock: trio.testing.MockClock,
) -> None:
    from pathlib import Path
    from typing import Any

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    _, found, rest = readme.partition(f"<!-- example: {example} -->\n```python\n")
    assert found, "the README's example is gone"
    namespace: dict[str, Any] = {}
    exec(compile(rest.split("```", 1)[0], "README.md", "exec"), namespace)
    async with harness(analyzers=[namespace[name]()]) as h:
        c, server = await connected(h)
        for piece in (b"GET /index.html HT", b"TP/1.1\r\nHost: x\r\n\r\n"):
            await c.send(piece)
            await trio.sleep(1)  # two chunks: the line is split across them
        request = b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n"
        with trio.fail_after(60):
            assert await recv_exactly(server, len(request)) == request
        await send_all(server, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await until(lambda: bytes(c.received).endswith(b"ok"))
        c.finish()
        server.shutdown(trio.socket.SHUT_WR)
        await until(lambda: c.fin)
        uid = h.tap.starts[40000].uid
        await h.tap.end_of(40000)
    assert capsys.readouterr().out == f"{uid} GET /index.html HTTP/1.1 -> HTTP/1.1 200 OK\n"


async def test_a_reload_wraps_new_stream_analyzers_and_open_flows_keep_theirs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    before, after = Reader(), Reader()
    async with harness(analyzers=[before]) as h:
        first, server = await connected(h)
        h.relay.reconfigure(analyzers=[after, h.tap])
        second = Client(h, port=40001)
        await second.connect()
        server2 = await h.connector.server(second.flow)
        await first.send(b"to the first")
        await second.send(b"to the second")
        assert await recv_exactly(server, 12) == b"to the first"
        assert await recv_exactly(server2, 13) == b"to the second"
        await until(lambda: (40001, C2S) in after.got and len(after.got[(40001, C2S)]) == 13)
        await until(lambda: len(before.got.get((40000, C2S), b"")) == 12)
    assert bytes(before.got[(40000, C2S)]) == b"to the first"
    assert bytes(after.got[(40001, C2S)]) == b"to the second"
    assert (40001, C2S) not in before.got and (40000, C2S) not in after.got
