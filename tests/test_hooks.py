"""The analyzer chain: registration, verdicts, isolation of failing analyzers."""

from __future__ import annotations

import logging
import re

import pytest
import trio
import trio.testing

from relay.analysis.hooks import (
    RECORD_HOOKS,
    AnalyzerChain,
    Detach,
    Direction,
    EndReason,
    FlowEnd,
    FlowInfo,
    Halt,
    Verdict,
    new_uid,
)
from stack import FlowId

C2S = Direction.CLIENT_TO_SERVER
S2C = Direction.SERVER_TO_CLIENT
FLOW = FlowId(4, "198.18.0.2", 40000, "198.19.0.80", 443)
END = FlowEnd(EndReason.FIN, 3, 4, 0.5)


def info() -> FlowInfo:
    return FlowInfo.from_flow(FLOW)


class Recorder:
    """Records every call."""

    def __init__(self, verdict: Verdict | None = None) -> None:
        self.verdict = verdict
        self.calls: list[tuple[str, object]] = []

    async def flow_start(self, flow: FlowInfo) -> Verdict | None:
        self.calls.append(("start", flow.uid))
        return self.verdict

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
        self.calls.append(("data", (direction, data)))

    async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
        self.calls.append(("end", end.how))


class Raiser(Recorder):
    """Raises in the hooks named in ``fail``."""

    def __init__(self, *fail: str) -> None:
        super().__init__()
        self.fail = set(fail)

    async def flow_start(self, flow: FlowInfo) -> Verdict | None:
        await super().flow_start(flow)
        if "start" in self.fail:
            raise RuntimeError("boom in start")
        return None

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
        await super().data(flow, direction, data)
        if "data" in self.fail:
            raise ValueError("boom in data")

    async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
        await super().flow_end(flow, end)
        if "end" in self.fail:
            raise KeyError("boom in end")


def test_uid_and_flow_info() -> None:
    assert re.fullmatch(r"C[0-9A-Za-z]{17}", new_uid())
    assert len({new_uid() for _ in range(1000)}) == 1000
    i = info()
    assert (i.proto, i.client_ip, i.client_port, i.server_ip, i.server_port, i.version) == (
        "tcp", "198.18.0.2", 40000, "198.19.0.80", 443, 4,
    )  # fmt: skip
    assert i.uid in i.describe() and "198.19.0.80" in i.describe()
    assert EndReason("fin") is EndReason.FIN and f"{EndReason.FIN}" == "fin"


async def test_partial_analyzers_are_fine() -> None:
    class OnlyEnd:
        def __init__(self) -> None:
            self.ends: list[FlowEnd] = []

        async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
            self.ends.append(end)

    only_end = OnlyEnd()
    chain = AnalyzerChain([only_end, object()])
    hooks = chain.open(info())
    assert not hooks.has_data_hooks
    assert await hooks.start() is Verdict.ALLOW
    assert await hooks.data(C2S, b"x") == b"x"
    await hooks.end(END)
    assert only_end.ends == [END]


def test_hooks_are_looked_up_once_and_must_be_async() -> None:
    class Counting:
        lookups = 0

        def __getattr__(self, name: str) -> object:
            type(self).lookups += 1
            raise AttributeError(name)

    AnalyzerChain([Counting()])
    # flow_start, data, flow_end, data_finished and the record hooks: at registration only
    assert Counting.lookups == 4 + len(RECORD_HOOKS)

    class SyncHook:
        def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
            pass

    with pytest.raises(TypeError, match="async"):
        AnalyzerChain([SyncHook()])


async def test_any_reject_rejects_and_everyone_is_asked() -> None:
    a, b, c = Recorder(), Recorder(Verdict.REJECT), Recorder(Verdict.ALLOW)
    hooks = AnalyzerChain([a, b, c]).open(info())
    assert await hooks.start() is Verdict.REJECT
    assert [x.calls[0][0] for x in (a, b, c)] == ["start"] * 3


async def test_raising_analyzer_is_detached_for_that_flow_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    errors: list[None] = []
    bad, good = Raiser("data"), Recorder()
    chain = AnalyzerChain([bad, good], on_error=lambda: errors.append(None))
    hooks = chain.open(info())
    with caplog.at_level(logging.ERROR, logger="relay.analysis.hooks"):
        assert await hooks.start() is Verdict.ALLOW
        assert await hooks.data(C2S, b"one") == b"one"  # bad raises: detached, flow goes on
        assert await hooks.data(S2C, b"two") == b"two"
        await hooks.end(END)
    assert bad.calls == [("start", hooks.info.uid), ("data", (C2S, b"one"))]  # no more calls
    assert good.calls[1:] == [("data", (C2S, b"one")), ("data", (S2C, b"two")), ("end", "fin")]
    assert len(errors) == 1
    [record] = caplog.records
    assert hooks.info.uid in record.getMessage() and "198.18.0.2" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is ValueError

    # Another flow still gets the analyzer.
    other = chain.open(info())
    assert await other.data(C2S, b"three") == b"three"
    assert bad.calls[-1] == ("data", (C2S, b"three"))


async def test_detached_in_flow_start_and_flow_end_errors_are_contained() -> None:
    bad_start, bad_end, good = Raiser("start"), Raiser("end"), Recorder()
    hooks = AnalyzerChain([bad_start, bad_end, good]).open(info())
    assert await hooks.start() is Verdict.ALLOW
    assert not any(c[0] == "data" for c in bad_start.calls)
    await hooks.data(C2S, b"x")
    await hooks.end(END)  # bad_end raises: logged only
    assert [c[0] for c in bad_start.calls] == ["start"]
    assert [c[0] for c in bad_end.calls] == ["start", "data", "end"]
    assert good.calls[-1] == ("end", "fin")


async def test_bad_verdict_type_is_an_analyzer_error() -> None:
    class Weird:
        async def flow_start(self, flow: FlowInfo) -> object:
            return "reject"

    errors: list[None] = []
    hooks = AnalyzerChain([Weird()], on_error=lambda: errors.append(None)).open(info())
    assert await hooks.start() is Verdict.ALLOW
    assert len(errors) == 1


async def test_fail_closed_reports_failure() -> None:
    good = Recorder()
    chain = AnalyzerChain([Raiser("data"), good], fail_closed=True)
    hooks = chain.open(info())
    assert await hooks.start() is Verdict.ALLOW
    assert await hooks.data(C2S, b"x") is Halt.FAILED
    rejecting = AnalyzerChain([Raiser("start")], fail_closed=True).open(info())
    assert await rejecting.start() is Verdict.REJECT


async def test_cancellation_is_not_an_analyzer_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Slow:
        async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
            await trio.sleep_forever()

    errors: list[None] = []
    hooks = AnalyzerChain([Slow()], on_error=lambda: errors.append(None)).open(info())
    with trio.move_on_after(1):
        await hooks.data(C2S, b"x")
    assert errors == [] and hooks.has_data_hooks


@pytest.mark.parametrize("fail_closed", [False, True])
async def test_detach_leaves_the_flow_quietly(
    fail_closed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    class FirstChunkOnly:
        def __init__(self) -> None:
            self.seen: list[bytes] = []

        async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
            if self.seen:
                raise Detach
            self.seen.append(data)

        async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
            self.seen.append(b"end")

    errors: list[int] = []
    first, rec = FirstChunkOnly(), Recorder()
    chain = AnalyzerChain([first], fail_closed=fail_closed, on_error=lambda: errors.append(1))
    hooks = chain.open(info())
    with caplog.at_level(logging.DEBUG, "relay.analysis.hooks"):
        assert await hooks.data(C2S, b"a") == b"a"
        assert hooks.has_data_hooks
        assert await hooks.data(C2S, b"b") == b"b"  # not Halt.FAILED, even fail-closed
        assert not hooks.has_data_hooks  # the flow may take its direct path again
        await hooks.end(END)
    assert first.seen == [b"a"] and errors == [] and not caplog.records
    chain = AnalyzerChain([first, rec])
    hooks = chain.open(info())
    assert await hooks.data(S2C, b"c") == b"c"
    assert hooks.has_data_hooks and rec.calls == [("data", (S2C, b"c"))]
