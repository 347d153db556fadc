"""SIGUSR2/SIGHUP log rotation: ``FlowLog.reopen`` and ``ZeekLogs.reopen`` open the
files by name again, so after a rename new lines go to new files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from relay.analysis.flowlog import FlowLog
from relay.analysis.hooks import EndReason, FlowEnd, FlowInfo
from relay.analysis.zeeklog import ZeekLogs

FLOW = FlowInfo("CAbCdEfGhIjKlMnOpQ", "tcp", "198.18.0.2", 40000, "198.19.0.80", 443, 1.7e9, 4)
END = FlowEnd(EndReason.FIN, 10, 20, 1.0)


async def test_the_flow_log_reopens_by_name(tmp_path: Path) -> None:
    path = tmp_path / "flows.json"
    with FlowLog(path) as log:
        await log.flow_end(FLOW, END)
        path.rename(tmp_path / "flows.json.1")
        log.reopen()
        await log.flow_end(FLOW, FlowEnd(EndReason.RST, 1, 2, 3.0))
    assert [json.loads(x)["ended"] for x in (tmp_path / "flows.json.1").open()] == ["fin"]
    assert [json.loads(x)["ended"] for x in path.open()] == ["rst"]


async def test_a_failed_reopen_keeps_writing_to_the_old_file(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    with FlowLog(d / "flows.json") as log:
        (d / "flows.json").rename(tmp_path / "moved.json")
        d.rmdir()
        with pytest.raises(FileNotFoundError):
            log.reopen()
        await log.flow_end(FLOW, END)
    assert len((tmp_path / "moved.json").read_text().splitlines()) == 1


async def test_a_stream_flow_log_is_left_alone() -> None:
    stream = io.StringIO()
    log = FlowLog(stream)
    log.reopen()  # nothing to open by name
    await log.flow_end(FLOW, END)
    assert json.loads(stream.getvalue())["ended"] == "fin"


async def test_the_zeek_logs_reopen_by_name(tmp_path: Path) -> None:
    logs = ZeekLogs(tmp_path)
    try:
        await logs.flow_end(FLOW, END)
        await logs.flush()
        (tmp_path / "conn.log").rename(tmp_path / "conn.log.1")
        logs.reopen()
        await logs.flow_end(FLOW, FlowEnd(EndReason.RST, 1, 2, 3.0))
        await logs.flush()
    finally:
        logs.close()
    old = (tmp_path / "conn.log.1").read_text().splitlines()
    new = (tmp_path / "conn.log").read_text().splitlines()
    assert len(old) == 1 and len(new) == 1
    assert json.loads(old[0])["uid"] == json.loads(new[0])["uid"] == FLOW.uid
    assert (tmp_path / "dns.log").exists()  # every file is reopened
