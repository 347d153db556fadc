"""tunrelay's sans-IO TCP/IP stack: bytes and ``now`` in; packets, events and deadlines out."""

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
