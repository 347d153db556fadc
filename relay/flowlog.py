"""Built-in analyzer: one JSON object per finished flow (JSON lines).

Field names follow Zeek's conn.log where one exists (``ts``, ``uid``,
``id.orig_h``, ``id.orig_p``, ``id.resp_h``, ``id.resp_p``, ``proto``,
``duration``, ``orig_bytes``, ``resp_bytes``); ``ended`` is ours (the
``EndReason`` set documented in ``relay.hooks``). ``id.resp_h``/``id.resp_p``
are the original destination the client addressed.

Each line is written and flushed in ``flow_end``. The write is synchronous: a
line is a few hundred bytes into a buffered file, cheaper than a thread hop.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any

from relay.hooks import FlowEnd, FlowInfo

__all__ = ["FlowLog", "flow_record"]


def flow_record(flow: FlowInfo, end: FlowEnd) -> dict[str, Any]:
    """The flow-log record of one finished flow."""
    return {
        "ts": round(flow.start, 6),
        "uid": flow.uid,
        "proto": flow.proto,
        "id.orig_h": flow.client_ip,
        "id.orig_p": flow.client_port,
        "id.resp_h": flow.server_ip,
        "id.resp_p": flow.server_port,
        "duration": round(end.duration, 6),
        "orig_bytes": end.bytes_c2s,
        "resp_bytes": end.bytes_s2c,
        "ended": str(end.how),
    }


class FlowLog:
    """Writes one JSON line per finished flow.

    Args:
        target: a path (opened for append, owned and closed by ``close()``) or
            an open text stream (left open).
    """

    def __init__(self, target: str | os.PathLike[str] | IO[str]) -> None:
        if isinstance(target, str | os.PathLike):
            self._stream: IO[str] = open(target, "a", encoding="utf-8")  # noqa: SIM115
            self._owned = True
        else:
            self._stream = target
            self._owned = False

    async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
        line = json.dumps(flow_record(flow, end), separators=(",", ":"))
        self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        """Close the file if ``FlowLog`` opened it. Safe to call twice."""
        if self._owned and not self._stream.closed:
            self._stream.close()

    def __enter__(self) -> FlowLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
