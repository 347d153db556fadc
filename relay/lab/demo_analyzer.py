"""The demo analyzer: prints each flow, the first bytes of each direction, and its end.

It is also the smallest useful example of the analyzer API (``relay.analysis.hooks``):
three optional async methods, per-flow state in a dict keyed by the flow's
uid and removed at ``flow_end``. Load it with::

    tunrelay run --tun tunrelay0 --client-net 10.8.0.0/24 \\
        --analyzer relay.lab.demo_analyzer:DemoAnalyzer

Output, one line per event (flushed at once, so it interleaves correctly with
the relay's log)::

    → tcp 198.18.1.2:34318 → 198.18.2.2:80
      c2s first bytes: b'GET / HTTP/1.1\\r\\nHost: 198.18.2.2:80\\r\\nUser-Agent: tunrelay-de'...
      s2c first bytes: b'HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: 4'...
    ■ tcp 198.18.1.2:34318 → 198.18.2.2:80: fin, 85 B up, 131 B down, 0.004 s
"""

from __future__ import annotations

from relay.analysis.hooks import Direction, FlowEnd, FlowInfo

__all__ = ["DemoAnalyzer"]


def endpoint(ip: str, port: int) -> str:
    """``198.18.2.2:80`` or ``[fd00:2::2]:80``."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def describe(flow: FlowInfo) -> str:
    """``tcp 198.18.1.2:40312 → 198.18.2.2:80``."""
    client = endpoint(flow.client_ip, flow.client_port)
    return f"{flow.proto} {client} → {endpoint(flow.server_ip, flow.server_port)}"


class DemoAnalyzer:
    """A passive analyzer printing a flow's destination and first bytes.

    Args:
        preview: how many leading bytes of each direction to print.
    """

    def __init__(self, preview: int = 60) -> None:
        self.preview = preview
        # uid -> directions already previewed; one small entry per open flow.
        self._previewed: dict[str, set[Direction]] = {}

    async def flow_start(self, flow: FlowInfo) -> None:
        self._previewed[flow.uid] = set()
        print(f"→ {describe(flow)}", flush=True)
        # Returning None allows the flow (``Verdict.REJECT`` would refuse it).

    async def data(self, flow: FlowInfo, direction: Direction, data: bytes) -> None:
        seen = self._previewed.get(flow.uid)
        if seen is None or direction in seen:
            return
        seen.add(direction)
        more = "..." if len(data) > self.preview else ""
        print(
            f"  {direction.value} first bytes: {data[: self.preview]!r}{more}",
            flush=True,
        )

    async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
        self._previewed.pop(flow.uid, None)
        print(
            f"■ {describe(flow)}: {end.how}, {end.bytes_c2s} B up, {end.bytes_s2c} B down,"
            f" {end.duration:.3f} s",
            flush=True,
        )
