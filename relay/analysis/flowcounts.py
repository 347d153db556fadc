"""Built-in analyzer: flows opened per protocol and ended per protocol and end reason.

The service's metrics (``tunrelay run --metrics``) read these counters. Only
``flow_start`` and ``flow_end`` hooks, so no flow loses its direct path. A flow
the egress policy denied gets only ``flow_end`` (the policy decides before the
analyzers are asked): it is counted as opened there, so ``opened`` is never
less than ``ended``.
"""

from __future__ import annotations

from collections import Counter

from relay.analysis.hooks import EndReason, FlowEnd, FlowInfo

__all__ = ["FlowCounts"]


class FlowCounts:
    """``opened[proto]`` and ``ended[(proto, how)]`` since the start."""

    def __init__(self) -> None:
        self.opened: Counter[str] = Counter()
        self.ended: Counter[tuple[str, str]] = Counter()

    async def flow_start(self, flow: FlowInfo) -> None:
        self.opened[flow.proto] += 1

    async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
        if end.how is EndReason.DENIED:
            self.opened[flow.proto] += 1
        self.ended[flow.proto, str(end.how)] += 1
