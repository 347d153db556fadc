"""tunrelay's sans-IO TCP/IP stack: bytes and ``now`` in; packets, events and deadlines out.

The names below are loaded on first use (PEP 562): ``import stack.config``
alone, as a process that only needs the configuration types does (the relay's
supervisor), does not load the whole stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stack.config import ClientQuotas, DatagramConfig, FragmentConfig, StackConfig, TcpConfig
    from stack.datagram import DatagramStats, unreachable_code
    from stack.errors import (
        BadHeaderError,
        BadLengthError,
        ChecksumError,
        LocalProtocolError,
        ParseError,
        StackError,
        TruncatedError,
    )
    from stack.events import (
        Closed,
        CloseReason,
        Connected,
        ConnectionRequest,
        ConnectionReset,
        DatagramFlowClosed,
        DatagramFlowOpened,
        DatagramReceived,
        DataReceived,
        EchoRequest,
        Event,
        FlowId,
        PeerFinished,
        Reject,
        SendSpace,
        Unreachable,
    )
    from stack.fragments import FragmentStats
    from stack.stack import PacketCounts, Stack, StackGauges, StackStats
    from stack.tcp.connection import State, TcpConnection
    from stack.tcp.segment import TcpSegment
    from stack.wire.tcp import TcpOptions

# name -> the module that defines it
_WHERE: dict[str, str] = {
    "BadHeaderError": "stack.errors",
    "BadLengthError": "stack.errors",
    "ChecksumError": "stack.errors",
    "ClientQuotas": "stack.config",
    "CloseReason": "stack.events",
    "Closed": "stack.events",
    "Connected": "stack.events",
    "ConnectionRequest": "stack.events",
    "ConnectionReset": "stack.events",
    "DataReceived": "stack.events",
    "DatagramConfig": "stack.config",
    "DatagramFlowClosed": "stack.events",
    "DatagramFlowOpened": "stack.events",
    "DatagramReceived": "stack.events",
    "DatagramStats": "stack.datagram",
    "EchoRequest": "stack.events",
    "Event": "stack.events",
    "FlowId": "stack.events",
    "FragmentConfig": "stack.config",
    "FragmentStats": "stack.fragments",
    "LocalProtocolError": "stack.errors",
    "PacketCounts": "stack.stack",
    "ParseError": "stack.errors",
    "PeerFinished": "stack.events",
    "Reject": "stack.events",
    "SendSpace": "stack.events",
    "Stack": "stack.stack",
    "StackConfig": "stack.config",
    "StackError": "stack.errors",
    "StackGauges": "stack.stack",
    "StackStats": "stack.stack",
    "State": "stack.tcp.connection",
    "TcpConfig": "stack.config",
    "TcpConnection": "stack.tcp.connection",
    "TcpOptions": "stack.wire.tcp",
    "TcpSegment": "stack.tcp.segment",
    "TruncatedError": "stack.errors",
    "Unreachable": "stack.events",
    "unreachable_code": "stack.datagram",
}

__all__ = [
    "BadHeaderError",
    "BadLengthError",
    "ChecksumError",
    "ClientQuotas",
    "CloseReason",
    "Closed",
    "Connected",
    "ConnectionRequest",
    "ConnectionReset",
    "DataReceived",
    "DatagramConfig",
    "DatagramFlowClosed",
    "DatagramFlowOpened",
    "DatagramReceived",
    "DatagramStats",
    "EchoRequest",
    "Event",
    "FlowId",
    "FragmentConfig",
    "FragmentStats",
    "LocalProtocolError",
    "PacketCounts",
    "ParseError",
    "PeerFinished",
    "Reject",
    "SendSpace",
    "Stack",
    "StackConfig",
    "StackError",
    "StackGauges",
    "StackStats",
    "State",
    "TcpConfig",
    "TcpConnection",
    "TcpOptions",
    "TcpSegment",
    "TruncatedError",
    "Unreachable",
    "unreachable_code",
]


def __getattr__(name: str) -> object:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'stack' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is an ordinary one
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
