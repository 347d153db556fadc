"""tunrelay's sans-IO TCP/IP stack: bytes and ``now`` in; packets, events and deadlines out."""

from stack.config import StackConfig, TcpConfig
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
    DataReceived,
    Event,
    FlowId,
    PeerFinished,
    Reject,
    SendSpace,
    Unreachable,
)
from stack.stack import Stack, StackStats
from stack.tcp.connection import State, TcpConnection
from stack.tcp.segment import TcpSegment
from stack.wire.tcp import TcpOptions

__all__ = [
    "BadHeaderError",
    "BadLengthError",
    "ChecksumError",
    "CloseReason",
    "Closed",
    "Connected",
    "ConnectionRequest",
    "ConnectionReset",
    "DataReceived",
    "Event",
    "FlowId",
    "LocalProtocolError",
    "ParseError",
    "PeerFinished",
    "Reject",
    "SendSpace",
    "Stack",
    "StackConfig",
    "StackError",
    "StackStats",
    "State",
    "TcpConfig",
    "TcpConnection",
    "TcpOptions",
    "TcpSegment",
    "TruncatedError",
    "Unreachable",
]
