"""``--log-format json``: one JSON object per log record."""

from __future__ import annotations

import json
import logging

import pytest

from relay.service.logsetup import JsonFormatter, configure


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            import sys

            info = sys.exc_info()
    return logging.LogRecord("tunrelay", logging.WARNING, __file__, 1, msg, args, info)


def test_a_json_line_has_the_fields_and_the_worker() -> None:
    line = JsonFormatter(worker=2).format(record("flows=%d on %s", 3, "tun0"))
    out = json.loads(line)
    assert out["msg"] == "flows=3 on tun0"
    assert (out["level"], out["logger"], out["worker"]) == ("warning", "tunrelay", 2)
    assert isinstance(out["ts"], float)
    assert "\n" not in line


def test_the_supervisor_has_no_worker_and_a_traceback_stays_on_one_line() -> None:
    line = JsonFormatter().format(record("failed: %s", "x\ny", exc=True))
    out = json.loads(line)
    assert "worker" not in out and out["msg"] == "failed: x\ny"
    assert "RuntimeError: boom" in out["exc"] and "\n" not in line


def test_configure_replaces_the_handlers(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure("info", "json", worker=1)
        logging.getLogger("tunrelay").info("hello %s", "there")
        logging.getLogger("tunrelay").debug("not shown")
        lines = capsys.readouterr().err.splitlines()
        assert [json.loads(x)["msg"] for x in lines] == ["hello there"]
        configure("debug", "text", worker=1)
        logging.getLogger("tunrelay").debug("plain")
        assert "DEBUG tunrelay[w1]: plain" in capsys.readouterr().err
    finally:
        root.handlers[:], _ = saved[0], None
        root.setLevel(saved[1])
