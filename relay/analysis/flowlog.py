"""Built-in analyzer: one JSON object per finished flow (JSON lines).

Field names follow Zeek's conn.log where one exists (``ts``, ``uid``,
``id.orig_h``, ``id.orig_p``, ``id.resp_h``, ``id.resp_p``, ``proto``,
``duration``, ``orig_bytes``, ``resp_bytes``: what the client and the server
sent); ours are ``orig_bytes_forwarded`` and ``resp_bytes_forwarded`` (what
the relay sent on, to the server and to the client, after the analyzers'
rewrites and drops, a relay's own answer included), ``ended`` (the
``EndReason`` set documented in ``relay.analysis.hooks``), and ``rule``: the
egress rule that denied a flow (``"ended": "denied"``) or the rule that
blocked it (``"blocked"``, e.g. ``"block-domain *.example.com"``). ``id.resp_h``/``id.resp_p``
are the original destination the client addressed.

Each line is written in ``flow_end``, synchronously: a few hundred bytes,
cheaper than a thread hop. To a path, the file is opened ``O_APPEND`` and each
line is one ``write(2)``, so the worker processes of ``tunrelay run --workers
N`` can share one log without their lines ever interleaving; each line then
says which ``worker`` served the flow.

Size cap (``max_bytes``, ``tunrelay run --flow-log-max-bytes``): before each
line the file's size is checked (one ``fstat``). Past the cap, by default,
lines are dropped and counted (``dropped``) until the file shrinks: rotated
by logrotate and reopened (``reopen``), or truncated (``copytruncate``). With
``rotate``, the file is renamed to ``FILE.1`` (replacing it) and a new one
started, so the log takes at most twice the cap. Several workers share the
file: one that finds the path no longer names its file (another rotated it)
reopens instead of rotating again.
"""

from __future__ import annotations

import json
import logging
import os
from typing import IO, Any

from relay.analysis.hooks import FlowEnd, FlowInfo
from relay.analysis.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)
_warnings = RateLimitedLog(log)

__all__ = ["FlowLog", "flow_record"]

# json.dumps(..., separators=...) builds an encoder per call; this is the same one, once.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def flow_record(flow: FlowInfo, end: FlowEnd, worker: int | None = None) -> dict[str, Any]:
    """The flow-log record of one finished flow (with ``worker`` when given)."""
    record = {
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
        "orig_bytes_forwarded": end.forwarded_c2s,
        "resp_bytes_forwarded": end.forwarded_s2c,
        "ended": str(end.how),
    }
    if end.rule is not None:
        record["rule"] = end.rule
    if worker is not None:
        record["worker"] = worker
    return record


class FlowLog:
    """Writes one JSON line per finished flow.

    Args:
        target: a path (opened ``O_APPEND``, owned and closed by ``close()``)
            or an open text stream (left open; written and flushed per line).
        worker: the worker index to record in every line, if any.
        max_bytes: the file's size cap (0: none); see the module docstring.
        rotate: past the cap, rename to ``FILE.1`` and start anew (default: stop).

    Raises:
        OSError: the path cannot be opened.
    """

    def __init__(
        self,
        target: str | os.PathLike[str] | IO[str],
        *,
        worker: int | None = None,
        max_bytes: int = 0,
        rotate: bool = False,
    ) -> None:
        self._worker = worker
        self._fd: int | None = None
        self._stream: IO[str] | None = None
        self._path: str | None = None
        self.max_bytes = max_bytes
        self.rotate = rotate
        self.dropped = 0  # lines not written: over max_bytes (stop mode)
        self.rotations = 0
        if isinstance(target, str | os.PathLike):
            self._path = os.fspath(target)
            self._fd = os.open(self._path, _FLAGS, 0o644)
        else:
            self._stream = target

    def _room(self, fd: int, n: int) -> bool:
        """Whether ``n`` more bytes fit under ``max_bytes`` (rotating if asked)."""
        if os.fstat(fd).st_size + n <= self.max_bytes:
            return True
        if not self.rotate:
            self.dropped += 1
            _warnings.warning(
                "full", "flow log %s reached %d bytes: lines are dropped (%d so far)",
                self._path, self.max_bytes, self.dropped,
            )  # fmt: skip
            return False
        assert self._path is not None
        try:
            mine = os.fstat(fd)
            there = os.stat(self._path)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                os.replace(self._path, self._path + ".1")
                self.rotations += 1
            self.reopen()  # a new file, or the one another worker started
        except OSError as exc:
            self.dropped += 1
            _warnings.warning("rotate", "flow log %s: cannot rotate: %s", self._path, exc)
            return False
        return True

    async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
        line = _encode(flow_record(flow, end, self._worker)) + "\n"
        if self._fd is not None:
            data = line.encode()
            if self.max_bytes and not self._room(self._fd, len(data)):
                return
            # One write(2) per line: O_APPEND keeps other processes' lines whole.
            os.write(self._fd, data)  # (after a rotation: the new file, same descriptor)
        elif self._stream is not None:
            self._stream.write(line)
            self._stream.flush()

    def reopen(self) -> None:
        """Open the path again (after a rotation renamed the file); the new file takes
        the old descriptor (``dup2``). A stream is left alone.

        Raises:
            OSError: the path cannot be opened (lines still go to the old file).
        """
        if self._fd is None or self._path is None:
            return
        new = os.open(self._path, _FLAGS, 0o644)
        try:
            os.dup2(new, self._fd, inheritable=False)
        finally:
            os.close(new)

    def close(self) -> None:
        """Close the file if ``FlowLog`` opened it. Safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> FlowLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
