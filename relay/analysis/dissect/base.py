"""What every dissector shares: failure handling and the two feed shapes.

A dissector is sans-IO: bytes in, records out, no clock (``now`` is an
argument), no I/O, no threads. Each public entry point runs the protocol code
under one ``try``: any exception marks the dissector ``failed`` with a reason
and the records produced before it are still returned. A failed or finished
(``done``) dissector ignores further input in O(1), so a flow can keep calling
it and pay nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Generic, TypeVar

from relay.analysis.direction import Direction

__all__ = [
    "DatagramDissector",
    "Direction",
    "Dissector",
    "Malformed",
    "StreamDissector",
]

R = TypeVar("R")


class Malformed(Exception):
    """The input is not (or no longer) the protocol, or it broke a size limit."""


class Dissector(Generic[R]):
    """Failure handling shared by stream and datagram dissectors.

    Attributes:
        failed: why the dissector gave up (``None`` while it has not). A reason
            starting with ``"internal error"`` is a bug in the dissector, not in
            the traffic.
        done: the dissector has seen everything it wants (a TLS handshake
            completed, an HTTP connection switched protocols); not a failure.
    """

    __slots__ = ("done", "failed")

    proto: ClassVar[str] = ""

    def __init__(self) -> None:
        self.failed: str | None = None
        self.done = False

    @property
    def active(self) -> bool:
        """Still consuming input: neither failed nor done."""
        return self.failed is None and not self.done

    def _run(self, step: Callable[[list[R]], None]) -> list[R]:
        out: list[R] = []
        try:
            step(out)
        except Malformed as e:
            self.failed = str(e) or type(e).__name__
        except Exception as e:  # never let a parser bug escape into the flow
            self.failed = f"internal error: {e!r}"
        return out

    def close(self, now: float) -> list[R]:
        """The flow is over: emit what is still pending (unanswered requests)."""
        if not self.active:
            return []
        return self._run(lambda out: self._close(now, out))

    def _close(self, now: float, out: list[R]) -> None:
        pass


class StreamDissector(Dissector[R]):
    """A dissector of a TCP connection: each direction is an ordered byte stream.

    The flow calls ``feed`` with each direction's bytes as they arrive (any
    split: the records do not depend on where the stream was cut), ``end``
    when a direction reached its end (FIN), and ``close`` once at the end of
    the flow.
    """

    __slots__ = ()

    def feed(self, direction: Direction, data: bytes, now: float) -> list[R]:
        """The next bytes of ``direction``; returns the records they completed."""
        if not data or not self.active:
            return []
        return self._run(lambda out: self._feed(direction, data, now, out))

    def end(self, direction: Direction, now: float) -> list[R]:
        """``direction`` is finished: no more bytes will come from that side."""
        if not self.active:
            return []
        return self._run(lambda out: self._end(direction, now, out))

    def _feed(self, direction: Direction, data: bytes, now: float, out: list[R]) -> None:
        raise NotImplementedError

    def _end(self, direction: Direction, now: float, out: list[R]) -> None:
        pass


class DatagramDissector(Dissector[R]):
    """A dissector of a UDP flow: each call is one whole datagram."""

    __slots__ = ()

    def datagram(self, direction: Direction, data: bytes, now: float) -> list[R]:
        """One datagram sent in ``direction``; returns the records it completed."""
        if not self.active:
            return []
        return self._run(lambda out: self._datagram(direction, data, now, out))

    def _datagram(self, direction: Direction, data: bytes, now: float, out: list[R]) -> None:
        raise NotImplementedError
