"""The TCP segment as the connection sees it: header fields and payload, no addresses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from stack.wire.tcp import ACK, FIN, NO_OPTIONS, PSH, RST, SYN, TcpOptions

# Received payload as the connection may hold it until it is surfaced: bytes, or a
# view of the packet it came in (a super-segment's, not copied; Stack.receive).
Payload: TypeAlias = bytes | memoryview
# Bytes taken out of a larger buffer (a received super-segment's payload, a
# segment's share of a send-buffer chunk) are a view of it from this length on
# and a copy below: a full 1500-byte packet's payload is copied, a memoryview
# costing more than copying that little.
VIEW_MIN = 2048

_FLAG_NAMES = ((SYN, "S"), (FIN, "F"), (RST, "R"), (PSH, "P"), (ACK, "."))


@dataclass(slots=True)
class TcpSegment:
    """One segment; never changed once built (``dataclasses.replace`` makes another).

    Not ``frozen``: a frozen dataclass sets each field through
    ``object.__setattr__``, which made building one 4x slower (960 ns against
    230), and the connection builds one per segment it sends.
    """

    src_port: int
    dst_port: int
    seq: int
    ack: int
    flags: int
    window: int
    payload: Payload = b""
    options: TcpOptions = NO_OPTIONS
    gso: int = 0  # > 0: the payload is several wire segments of this size (TSO-style)

    @property
    def seg_len(self) -> int:
        """Sequence space the segment occupies (RFC 9293 3.4: payload + SYN + FIN)."""
        return len(self.payload) + (1 if self.flags & SYN else 0) + (1 if self.flags & FIN else 0)

    def __repr__(self) -> str:
        flags = "".join(name for bit, name in _FLAG_NAMES if self.flags & bit)
        return (
            f"<TCP {self.src_port}>{self.dst_port} [{flags}] seq={self.seq} ack={self.ack} "
            f"win={self.window} len={len(self.payload)}>"
        )
