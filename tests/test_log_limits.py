"""Logs a client cannot grow without bound: the rate-limited logger, the flow log cap."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trio

from relay.analysis.flowlog import FlowLog
from relay.analysis.hooks import AnalyzerChain, EndReason, FlowEnd, FlowInfo
from relay.analysis.ratelimit import RateLimitedLog
from stack import FlowId

LOG = logging.getLogger("test.ratelimit")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG.name]


def test_one_line_per_key_per_interval_then_the_count_suppressed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    limited = RateLimitedLog(LOG, 10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        for i in range(1000):
            clock.now = i * 0.001
            limited.warning("a", "boom %d", i)
        limited.warning("b", "other %d", 1)  # another key is not held back
        clock.now = 10.0
        limited.warning("a", "boom %d", 1000)
    assert messages(caplog) == [
        "boom 0",
        "other 1",
        "boom 1000 (999 more like this suppressed in the last 10 s)",
    ]
    assert limited.suppressed == 999


def test_exceptions_keep_their_traceback(caplog: pytest.LogCaptureFixture) -> None:
    limited = RateLimitedLog(LOG, 10.0, clock=Clock())
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        for _ in range(3):
            try:
                raise ValueError("x")
            except ValueError:
                limited.exception(("k", ValueError), "failed")
    [record] = [r for r in caplog.records if r.name == LOG.name]
    assert record.exc_info is not None and record.exc_info[0] is ValueError


def test_the_keys_are_bounded() -> None:
    limited = RateLimitedLog(LOG, 10.0, clock=Clock(), max_keys=8)
    for i in range(100):
        limited.warning(i, "key %d", i)
    assert len(limited._keys) == 8  # white-box


def test_an_interval_of_zero_logs_everything(caplog: pytest.LogCaptureFixture) -> None:
    limited = RateLimitedLog(LOG, 0.0, clock=Clock())
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        for i in range(5):
            limited.warning("a", "line %d", i)
    assert len(messages(caplog)) == 5


class Raiser:
    async def data(self, flow: FlowInfo, direction: object, chunk: bytes) -> None:
        raise RuntimeError("analyzer bug")


async def test_an_analyzer_raising_on_every_flow_logs_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from relay.analysis.hooks import Direction

    chain = AnalyzerChain([Raiser()])
    with caplog.at_level(logging.ERROR, logger="relay.analysis.hooks"):
        for port in range(50):
            hooks = chain.open(FlowInfo.from_flow(FlowId(4, "198.18.1.2", port, "198.18.2.2", 80)))
            await hooks.data(Direction.CLIENT_TO_SERVER, b"x")
    records = [r for r in caplog.records if r.name == "relay.analysis.hooks"]
    assert len(records) == 1 and "raised in data" in records[0].getMessage()
    assert chain.errors.suppressed == 49


END = FlowEnd(EndReason.FIN, 1, 2, 0.5)


async def write(log: FlowLog, n: int) -> None:
    for port in range(n):
        await log.flow_end(FlowInfo.from_flow(FlowId(4, "198.18.1.2", port, "198.18.2.2", 80)), END)


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_the_flow_log_stops_at_its_cap_until_the_file_shrinks(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    with FlowLog(path, max_bytes=2000) as log:
        await write(log, 100)
        kept = lines(path)
        assert 0 < len(kept) < 100 and path.stat().st_size <= 2000
        assert log.dropped == 100 - len(kept)
        path.write_text("")  # logrotate's copytruncate
        await write(log, 1)
        assert len(lines(path)) == 1


async def test_the_flow_log_rotates_to_file_1(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    with FlowLog(path, max_bytes=2000, rotate=True) as log:
        await write(log, 100)
        old, new = lines(Path(f"{path}.1")), lines(path)
        assert log.dropped == 0 and log.rotations >= 2
        assert path.stat().st_size <= 2000 and Path(f"{path}.1").stat().st_size <= 2000
        assert new[-1]["id.orig_p"] == 99 and old[-1]["id.orig_p"] == new[0]["id.orig_p"] - 1


async def test_two_writers_rotate_once(tmp_path: Path) -> None:
    # Two workers share the file: the second finds it rotated and only reopens.
    path = tmp_path / "flows.jsonl"
    with (
        FlowLog(path, max_bytes=1000, rotate=True) as a,
        FlowLog(path, max_bytes=1000, rotate=True) as b,
    ):
        await write(a, 6)  # 6 lines are over 1000 bytes, not 2000: a rotated once
        assert a.rotations == 1
        size_rotated = Path(f"{path}.1").stat().st_size
        after_rotation = len(lines(path))
        await write(b, 1)  # b's file is FILE.1 now: it reopens, it does not rotate again
        assert b.rotations == 0
        assert Path(f"{path}.1").stat().st_size == size_rotated
        assert len(lines(path)) == after_rotation + 1


def test_reopen_is_the_one_open(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    with FlowLog(path) as log:
        path.rename(tmp_path / "old.jsonl")
        log.reopen()
        trio.run(write, log, 1)
        assert len(lines(path)) == 1
