"""Inline analyzers for the netns tests (``test_relay_inline.py``).

``tunrelay run`` loads them by ``inline_analyzers:...`` with this directory on
its PYTHONPATH (the tests arrange that).
"""

from __future__ import annotations

from relay.analysis.hooks import Direction, FlowInfo, Verdict

REWRITE_PORT = 8081  # the server's bytes: each b"b" becomes b"BBB"
RESET_PORT = 8082  # reset once the server sent more than RESET_AFTER bytes
RESET_AFTER = 8 << 20


class ResponseRewriter:
    """Rewrites the server's bytes on ``REWRITE_PORT`` to a different length."""

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> bytes | None:
        if flow.server_port != REWRITE_PORT or direction is not Direction.SERVER_TO_CLIENT:
            return None
        return data.replace(b"b", b"BBB")


class ResetMidDownload:
    """RESET a download on ``RESET_PORT`` in the middle."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> Verdict | None:
        if flow.server_port != RESET_PORT or direction is not Direction.SERVER_TO_CLIENT:
            return None
        seen = self._seen.get(flow.uid, 0) + len(data)
        self._seen[flow.uid] = seen
        if seen > RESET_AFTER:
            del self._seen[flow.uid]
            return Verdict.RESET
        return None
