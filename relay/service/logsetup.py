"""The service's own log (stderr): text, or JSON lines with ``--log-format json``.

A JSON line has ``ts`` (seconds since the epoch), ``level``, ``logger``,
``msg`` (the formatted message), ``worker`` (the worker's index; absent in the
supervisor) and ``exc`` (a traceback) when there is one: one object per line
whatever the message holds, so a log shipper needs no multi-line rules.
"""

from __future__ import annotations

import json
import logging
import sys

__all__ = ["LOG_FORMATS", "JsonFormatter", "configure"]

LOG_FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self._worker is not None:
            out["worker"] = self._worker
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level: str, fmt: str = "text", worker: int | None = None) -> None:
    """Set the root logger up (replacing what was there): ``level`` is a name
    (``info``), ``fmt`` one of ``LOG_FORMATS``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        where = "" if worker is None else f"[w{worker}]"
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{where}: %(message)s")
        )
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
