"""The JSON flow log: one flushed line per finished flow, Zeek conn.log names."""

from __future__ import annotations

import io
import json
from pathlib import Path

from relay.analysis.flowlog import FlowLog
from relay.analysis.hooks import EndReason, FlowEnd, FlowInfo
from stack import FlowId

V4 = FlowInfo("CAbCdEfGhIjKlMnOpQ", "tcp", "198.18.0.2", 40000, "198.19.0.80", 443, 1.7e9, 4)
V6 = FlowInfo("CzYxWvUtSrQpOnMlKj", "tcp", "fd00::2", 40001, "fd00:1::80", 80, 1.7e9 + 1, 6)


async def test_one_line_per_flow_with_zeek_fields() -> None:
    out = io.StringIO()
    log = FlowLog(out)
    await log.flow_end(
        V4, FlowEnd(EndReason.FIN, 120, 4567, 0.25, forwarded_c2s=100, forwarded_s2c=4567)
    )
    await log.flow_end(V6, FlowEnd(EndReason.REFUSED, 0, 0, 0.001))
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first == {
        "ts": 1.7e9,
        "uid": "CAbCdEfGhIjKlMnOpQ",
        "proto": "tcp",
        "id.orig_h": "198.18.0.2",
        "id.orig_p": 40000,
        "id.resp_h": "198.19.0.80",
        "id.resp_p": 443,
        "duration": 0.25,
        "orig_bytes": 120,
        "resp_bytes": 4567,
        "orig_bytes_forwarded": 100,
        "resp_bytes_forwarded": 4567,
        "ended": "fin",
    }
    assert (second["id.orig_h"], second["id.resp_h"], second["ended"]) == (
        "fd00::2",
        "fd00:1::80",
        "refused",
    )
    log.close()
    assert not out.closed  # a stream we were given stays open


async def test_path_is_appended_and_flushed_per_line(tmp_path: Path) -> None:
    path = tmp_path / "flows.jsonl"
    path.write_text('{"earlier": true}\n')
    with FlowLog(path) as log:
        await log.flow_end(V4, FlowEnd(EndReason.RST, 1, 2, 3.0))
        # Flushed: visible before close.
        lines = path.read_text().splitlines()
        assert len(lines) == 2 and json.loads(lines[1])["ended"] == "rst"
        await log.flow_end(FlowInfo.from_flow(FlowId(4, "198.18.0.3", 1, "198.19.0.1", 2)),
                           FlowEnd(EndReason.SHUTDOWN, 0, 0, 1.0))  # fmt: skip
    lines = path.read_text().splitlines()
    assert [json.loads(line).get("ended") for line in lines] == [None, "rst", "shutdown"]
    log.close()  # twice is fine


async def test_worker_field_and_whole_lines_from_several_writers(tmp_path: Path) -> None:
    # Two workers of `tunrelay run --workers 2` append to one file: O_APPEND, one
    # write(2) per line, so the lines never interleave.
    path = tmp_path / "flows.jsonl"
    logs = [FlowLog(path, worker=w) for w in (0, 1)]
    for i in range(200):
        await logs[i % 2].flow_end(V4, FlowEnd(EndReason.FIN, i, 2 * i, 0.5))
    for log in logs:
        log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["worker"], r["orig_bytes"]) for r in records] == [(i % 2, i) for i in range(200)]
    out = io.StringIO()
    await FlowLog(out).flow_end(V6, FlowEnd(EndReason.FIN, 1, 1, 0.1))
    assert "worker" not in json.loads(out.getvalue())  # only when given
