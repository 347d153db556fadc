"""Protocol detection and dissection wired into the flows.

Theory of operation: the engine creates these only when some analyzer has a
record hook (``AnalyzerChain.record_protocols``: ``--log-dir`` has them all);
otherwise this module and the dissectors are not even imported, and a flow
pays one ``is None`` test per chunk.

* TCP (``StreamDissection``, one per ``TcpFlow``): the client's bytes go to a
  ``StreamDetector`` as they arrive; they are forwarded meanwhile, so
  detection never holds a byte back. Once it decides, the chosen dissector
  (if its protocol is wanted) gets the detector's backlog and from then on
  both directions' bytes. Bytes from the server before the detector decided
  mean a server-first protocol, none of ours: dissection ends there.
* UDP (``DatagramDissection``, one per ``UdpFlow``): ``detect_datagram`` on
  the first client datagram, then the datagram dissector.

Either is ``active`` until detection gave up (unknown, or a protocol nobody
wants) or its dissector failed or finished (TLS after the handshake, QUIC
after both Initials); the flow then drops it, and a bulk transfer pays nothing
after its first bytes. ``service`` is the protocol once its dissector produced
a record (Zeek's conn.log ``service``: ``ssl``, ``http``, ``dns``, ``quic``).

Each call returns the records it completed that some analyzer has a hook
for, paired with the hook's name (``Named``), ready for ``FlowHooks.records``;
the others (a TLS alert nobody asked for) are dropped here.

The dissectors never raise; these wrappers also catch anything detection
might raise, so malformed traffic ends dissection and never the flow.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Collection

from relay.analysis.dissect import (
    RECORD_HOOKS,
    SERVICES,
    DatagramDissector,
    Proto,
    Record,
    StreamDetector,
    StreamDissector,
    datagram_dissector,
    detect_datagram,
    stream_dissector,
)
from relay.analysis.hooks import Direction
from relay.analysis.ratelimit import RateLimitedLog

__all__ = [
    "DATAGRAM_PROTOCOLS",
    "STREAM_PROTOCOLS",
    "DatagramDissection",
    "Named",
    "StreamDissection",
]

log = logging.getLogger(__name__)
_errors = RateLimitedLog(log)  # lines a client can provoke: one per kind per interval

_C2S = Direction.CLIENT_TO_SERVER

Named = tuple[str, Record]  # (hook name, record)
_NONE: list[Named] = []  # returned when nothing was produced (never mutated)


def _named(records: list[Record], hooks: Collection[str]) -> list[Named]:
    out = []
    for record in records:
        name = RECORD_HOOKS.get(type(record))
        if name is not None and name in hooks:
            out.append((name, record))
    return out


STREAM_PROTOCOLS = frozenset({"tls", "http", "dns"})  # with a StreamDissector
DATAGRAM_PROTOCOLS = frozenset({"dns", "quic"})  # with a DatagramDissector


class StreamDissection:
    """Detection, then dissection, of one TCP flow.

    Args:
        protocols: the protocols worth dissecting ("tls", "http", "dns"); a
            flow detected as another is left alone.
        hooks: the record hooks some analyzer has (``RECORD_HOOKS`` names).
    """

    __slots__ = ("_detector", "_dissector", "_hooks", "_protocols", "service")

    def __init__(self, protocols: frozenset[str], hooks: Collection[str]) -> None:
        self._protocols = protocols
        self._hooks = hooks
        self._detector: StreamDetector | None = StreamDetector()
        self._dissector: StreamDissector[Record] | None = None
        self.service: str | None = None

    @property
    def active(self) -> bool:
        """Still detecting or dissecting; once False, never True again."""
        return self._detector is not None or self._dissector is not None

    def feed(self, direction: Direction, data: bytes, now: float) -> list[Named]:
        """The next bytes of ``direction``; the records they completed."""
        try:
            detector = self._detector
            if detector is not None:
                if direction is not _C2S:
                    self._detector = None  # the server spoke first
                    return _NONE
                proto = detector.feed(data)
                if proto is None:
                    return _NONE
                self._detector = None
                if proto.value not in self._protocols:
                    return _NONE
                self._dissector = stream_dissector(proto)
                data = detector.take_backlog()
            dissector = self._dissector
            if dissector is None:
                return _NONE
            return self._took(dissector, dissector.feed(direction, data, now))
        except Exception:  # a bug in detection: this flow goes undissected, not down
            _errors.exception(
                ("stream", sys.exc_info()[0]),
                "stream dissection failed; the flow goes on without it",
            )
            self._detector = self._dissector = None
            return _NONE

    def end(self, direction: Direction, now: float) -> list[Named]:
        """``direction`` finished (FIN, or the server's EOF)."""
        dissector = self._dissector
        if dissector is None:
            self._detector = None  # no more bytes from the client to decide on
            return _NONE
        return self._took(dissector, dissector.end(direction, now))

    def close(self, now: float) -> list[Named]:
        """The flow is over: what the dissector still had pending."""
        dissector, self._dissector, self._detector = self._dissector, None, None
        if dissector is None:
            return _NONE
        return self._confirm(dissector, dissector.close(now))

    def _took(self, dissector: StreamDissector[Record], records: list[Record]) -> list[Named]:
        if not dissector.active:
            self._dissector = None
        return self._confirm(dissector, records)

    def _confirm(self, dissector: StreamDissector[Record], records: list[Record]) -> list[Named]:
        if not records:
            return _NONE
        if self.service is None:
            self.service = SERVICES.get(dissector.proto)
        return _named(records, self._hooks)


class DatagramDissection:
    """Detection, then dissection, of one UDP flow (see ``StreamDissection``)."""

    __slots__ = ("_dissector", "_hooks", "_protocols", "_undecided", "service")

    def __init__(self, protocols: frozenset[str], hooks: Collection[str]) -> None:
        self._protocols = protocols
        self._hooks = hooks
        self._undecided = True
        self._dissector: DatagramDissector[Record] | None = None
        self.service: str | None = None

    @property
    def active(self) -> bool:
        return self._undecided or self._dissector is not None

    def datagram(self, direction: Direction, data: bytes, now: float) -> list[Named]:
        """One datagram of ``direction``; the records it completed."""
        try:
            if self._undecided:
                self._undecided = False
                if direction is not _C2S:
                    return _NONE  # the server spoke first
                proto = detect_datagram(data)
                if proto is Proto.UNKNOWN or proto.value not in self._protocols:
                    return _NONE
                self._dissector = datagram_dissector(proto)
            dissector = self._dissector
            if dissector is None:
                return _NONE
            records = dissector.datagram(direction, data, now)
            if not dissector.active:
                self._dissector = None
            return self._confirm(dissector, records)
        except Exception:  # a bug in detection: this flow goes undissected, not down
            _errors.exception(
                ("datagram", sys.exc_info()[0]),
                "datagram dissection failed; the flow goes on without it",
            )
            self._undecided, self._dissector = False, None
            return _NONE

    def close(self, now: float) -> list[Named]:
        dissector, self._dissector, self._undecided = self._dissector, None, False
        if dissector is None:
            return _NONE
        return self._confirm(dissector, dissector.close(now))

    def _confirm(self, dissector: DatagramDissector[Record], records: list[Record]) -> list[Named]:
        if not records:
            return _NONE
        if self.service is None:
            self.service = SERVICES.get(dissector.proto)
        return _named(records, self._hooks)
