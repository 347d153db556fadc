"""Events the stack reports to its caller.

Each is a frozen, slotted dataclass named for what happened. The caller pulls
them with ``next_event()`` (h11/aioquic style); per flow they come in the
order things happened.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from stack.wire.tcp import TcpOptions


@dataclass(frozen=True, slots=True)
class FlowId:
    """A TCP, UDP or ICMP echo flow as the client addressed it.

    ``server_ip``/``server_port`` are the *original destination*: the stack is
    a transparent endpoint and answers for whatever address the client used.
    For an echo flow (``proto == "icmp"``) ``client_port`` is the client's echo
    identifier and ``server_port`` is 0.
    """

    version: int  # 4 or 6
    client_ip: str
    client_port: int
    server_ip: str
    server_port: int
    proto: str = "tcp"  # "tcp", "udp" or "icmp" (ICMP or ICMPv6 echo)
    # The hash, computed once: the relay and the Stack look a flow up by its
    # FlowId several times per request (Stack.send, send_space, consumed, the
    # relay's own table), and the generated __hash__ builds a 6-tuple each time.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        h = hash((self.version, self.client_ip, self.client_port, self.server_ip,
                  self.server_port, self.proto))  # fmt: skip
        object.__setattr__(self, "_hash", h)

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[FlowId], tuple[int, str, int, str, int, str]]:
        # Rebuilt, not copied: a string's hash differs between processes.
        return (FlowId, (self.version, self.client_ip, self.client_port, self.server_ip,
                         self.server_port, self.proto))  # fmt: skip


class CloseReason(enum.Enum):
    """How a connection ended (the flow log's ``ended`` field)."""

    FINISHED = "fin"  # orderly: FIN both ways, all data acknowledged
    RESET = "rst"  # the peer sent an acceptable RST
    ABORTED = "abort"  # the caller called abort() (an RST was sent)
    TIMED_OUT = "timeout"  # retransmissions exhausted
    REJECTED = "rejected"  # the caller rejected the connection request
    IDLE = "idle"  # an idle or lingering-state timeout expired
    LIMIT = "limit"  # a configured resource limit forced the close


class Reject(enum.Enum):
    """How to refuse a connection request."""

    RST = "rst"  # like a closed port: ECONNREFUSED at the client
    ICMP = "icmp"  # ICMP/ICMPv6 destination unreachable with a given code
    SILENT = "silent"  # drop: the client's SYN retries run out


class Unreachable(enum.Enum):
    """What an ICMP/ICMPv6 destination-unreachable reject says; mapped per IP version."""

    NET = "net"  # v4 code 0, v6 code 0 (no route)
    HOST = "host"  # v4 code 1, v6 code 3 (address unreachable)
    PORT = "port"  # v4 code 3, v6 code 4
    ADMIN = "admin"  # v4 code 13, v6 code 1 (administratively prohibited)


@dataclass(frozen=True, slots=True)
class ConnectionRequest:
    """A client SYN for a new flow; answer with ``accept()`` or ``reject()``."""

    flow: FlowId
    options: TcpOptions  # the client's SYN options (MSS, window scale, ...)


@dataclass(frozen=True, slots=True)
class Connected:
    """The three-way handshake completed."""

    flow: FlowId


@dataclass(frozen=True, slots=True)
class DataReceived:
    """In-order bytes from the client. Report them with ``consumed()`` once written on."""

    flow: FlowId
    data: bytes


@dataclass(frozen=True, slots=True)
class PeerFinished:
    """The client sent FIN: no more data will arrive (half-close)."""

    flow: FlowId


@dataclass(frozen=True, slots=True)
class ConnectionReset:
    """The client reset the connection."""

    flow: FlowId


@dataclass(frozen=True, slots=True)
class SendSpace:
    """The send buffer has room again after a ``send()`` that accepted less than offered."""

    flow: FlowId


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection is gone from the flow table; nothing more will happen on it."""

    flow: FlowId
    reason: CloseReason


@dataclass(frozen=True, slots=True)
class DatagramFlowOpened:
    """A client's first datagram (UDP) or echo request (ICMP) of a new flow.

    Its ``DatagramReceived``/``EchoRequest`` follows. The flow lives until it has
    been idle for its timeout, then ``DatagramFlowClosed`` reports it gone.
    """

    flow: FlowId


@dataclass(frozen=True, slots=True)
class DatagramReceived:
    """One UDP datagram's payload from the client (reassembled if it was fragmented)."""

    flow: FlowId
    data: bytes


@dataclass(frozen=True, slots=True)
class EchoRequest:
    """An ICMP/ICMPv6 echo request from the client; answer with ``send_echo_reply``."""

    flow: FlowId  # client_port is the client's echo identifier
    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class DatagramFlowClosed:
    """A UDP or echo flow left the table (``IDLE``, or ``ABORTED`` by the caller)."""

    flow: FlowId
    reason: CloseReason


Event = (
    ConnectionRequest
    | Connected
    | DataReceived
    | PeerFinished
    | ConnectionReset
    | SendSpace
    | Closed
    | DatagramFlowOpened
    | DatagramReceived
    | EchoRequest
    | DatagramFlowClosed
)
