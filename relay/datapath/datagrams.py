"""Dispatch of the stack's datagram events to the relay's UDP and echo flows.

``DatagramRelay`` turns the stack's datagram events (``DatagramFlowOpened``,
``DatagramReceived``, ``EchoRequest``, ``DatagramFlowClosed``) into calls on
one flow object per flow (``relay.datapath.udpflow``, ``relay.datapath.echo``),
started as a task in the relay's nursery; the packet loop registers its
``handlers()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from relay.datapath.datagram_flow import DatagramFlow
from relay.datapath.env import DatagramEnv
from stack import (
    DatagramFlowClosed,
    DatagramFlowOpened,
    DatagramReceived,
    EchoRequest,
    FlowId,
)

__all__ = ["DatagramRelay"]


class DatagramRelay:
    """Dispatches the stack's datagram events to one flow object per flow.

    Args:
        env: what the flows share.
        kinds: the flow class for each ``FlowId.proto`` ("udp", "icmp").
    """

    def __init__(self, env: DatagramEnv, kinds: dict[str, type[DatagramFlow]]) -> None:
        self.env = env
        self.nursery: trio.Nursery | None = None  # set while the relay runs
        self._kinds = kinds
        self._flows: dict[FlowId, DatagramFlow] = {}

    def __len__(self) -> int:
        return len(self._flows)

    def handlers(self) -> dict[type[Any], Callable[[Any], None]]:
        """Event type -> handler, for the packet loop's dispatch table."""
        return {
            DatagramFlowOpened: self._on_opened,
            DatagramReceived: self._on_datagram,
            EchoRequest: self._on_echo,
            DatagramFlowClosed: self._on_closed,
        }

    def _on_opened(self, event: DatagramFlowOpened) -> None:
        assert self.nursery is not None
        kind = self._kinds.get(event.flow.proto)
        if event.flow in self._flows:  # the stack promises DatagramFlowClosed first
            self.env.stats.stray_events += 1
            return
        if kind is None:
            self.env.stats.stray_events += 1
            self.env.stack.end_datagram_flow(event.flow)
            return
        flow = kind(self.env, event.flow)
        self._flows[event.flow] = flow
        self.nursery.start_soon(flow.run)

    def _on_datagram(self, event: DatagramReceived) -> None:
        flow = self._flows.get(event.flow)
        if flow is None:
            self.env.stats.stray_events += 1
        else:
            flow.on_datagram(event.data)

    def _on_echo(self, event: EchoRequest) -> None:
        flow = self._flows.get(event.flow)
        if flow is None:
            self.env.stats.stray_events += 1
        else:
            flow.on_echo(event.seq, event.data)

    def _on_closed(self, event: DatagramFlowClosed) -> None:
        flow = self._flows.pop(event.flow, None)
        if flow is None:
            self.env.stats.stray_events += 1
        else:
            flow.on_closed(event.reason)
