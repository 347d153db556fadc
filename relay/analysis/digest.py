"""``StreamDigest``: SHA-256 and byte count of each direction of every flow.

Theory of operation: ``data`` feeds each chunk into the flow's two running
SHA-256 states (keyed by the flow's uid, created on first use); ``flow_end``
pops that state and writes one JSON line (flushed), so the memory held is two
hash states per open flow whatever the traffic. The record's address fields
follow the flow log's (Zeek conn.log names), so the two logs join on ``uid``::

    {"uid": "C...", "proto": "tcp", "id.orig_h": "198.18.1.2", "id.orig_p": 40312,
     "id.resp_h": "198.18.2.2", "id.resp_p": 5001, "ended": "fin",
     "orig_bytes": 67108864, "resp_bytes": 0,
     "c2s": {"bytes": 67108864, "sha256": "..."}, "s2c": {"bytes": 0, "sha256": "e3b0..."}}

A direction with no data has the SHA-256 of the empty string. The hashes are
of the bytes the analyzers were shown, i.e. what the relay received from each
side, in order. Hashing costs about 1 ms per MiB, on the flow's own task.

Load it with ``--analyzer relay.analysis.digest:StreamDigest`` and set the output
path in ``TUNRELAY_DIGEST_LOG`` (the CLI instantiates classes without
arguments); in code, pass the path or an open text stream.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import IO, Any

from relay.analysis.hooks import Direction, FlowEnd, FlowInfo

__all__ = ["DIGEST_LOG_ENV", "StreamDigest", "digest_record"]

DIGEST_LOG_ENV = "TUNRELAY_DIGEST_LOG"


class _FlowDigest:
    __slots__ = ("c2s", "c2s_bytes", "s2c", "s2c_bytes")

    def __init__(self) -> None:
        self.c2s = hashlib.sha256()
        self.s2c = hashlib.sha256()
        self.c2s_bytes = 0
        self.s2c_bytes = 0


def digest_record(
    flow: FlowInfo, end: FlowEnd, c2s: tuple[int, str], s2c: tuple[int, str]
) -> dict[str, Any]:
    """The JSON record of one finished flow; ``c2s``/``s2c`` are (bytes hashed, hex SHA-256).

    ``orig_bytes``/``resp_bytes`` are the relay's own counts (``FlowEnd``): equal
    to the hashed counts unless bytes reached the relay without being shown to
    the analyzers.
    """
    return {
        "uid": flow.uid,
        "proto": flow.proto,
        "id.orig_h": flow.client_ip,
        "id.orig_p": flow.client_port,
        "id.resp_h": flow.server_ip,
        "id.resp_p": flow.server_port,
        "ended": str(end.how),
        "orig_bytes": end.bytes_c2s,
        "resp_bytes": end.bytes_s2c,
        "c2s": {"bytes": c2s[0], "sha256": c2s[1]},
        "s2c": {"bytes": s2c[0], "sha256": s2c[1]},
    }


class StreamDigest:
    """Writes one JSON line per finished flow with each direction's SHA-256.

    Args:
        target: a path (opened for append, owned and closed by ``close()``) or
            an open text stream (left open). Default: the path in the
            ``TUNRELAY_DIGEST_LOG`` environment variable.

    Raises:
        ValueError: no target given and ``TUNRELAY_DIGEST_LOG`` is unset or empty.
        OSError: the file cannot be opened.
    """

    def __init__(self, target: str | os.PathLike[str] | IO[str] | None = None) -> None:
        if target is None:
            target = os.environ.get(DIGEST_LOG_ENV) or None
            if target is None:
                raise ValueError(f"StreamDigest needs a path: set {DIGEST_LOG_ENV}")
        if isinstance(target, str | os.PathLike):
            self._stream: IO[str] = open(target, "a", encoding="utf-8")  # noqa: SIM115
            self._owned = True
        else:
            self._stream = target
            self._owned = False
        self._flows: dict[str, _FlowDigest] = {}

    @property
    def open_flows(self) -> int:
        """Flows with data seen and no ``flow_end`` yet."""
        return len(self._flows)

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
        state = self._flows.get(flow.uid)
        if state is None:
            state = self._flows[flow.uid] = _FlowDigest()
        if direction is Direction.CLIENT_TO_SERVER:
            state.c2s.update(data)
            state.c2s_bytes += len(data)
        else:
            state.s2c.update(data)
            state.s2c_bytes += len(data)

    async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
        state = self._flows.pop(flow.uid, None) or _FlowDigest()
        record = digest_record(
            flow,
            end,
            (state.c2s_bytes, state.c2s.hexdigest()),
            (state.s2c_bytes, state.s2c.hexdigest()),
        )
        self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._stream.flush()

    def close(self) -> None:
        """Close the file if ``StreamDigest`` opened it. Safe to call twice."""
        if self._owned and not self._stream.closed:
            self._stream.close()

    def __enter__(self) -> StreamDigest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
