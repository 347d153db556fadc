"""Protocol detection by content, never by port.

``detect_stream`` looks at the first bytes the client sent on a TCP
connection, ``detect_datagram`` at the first datagram of a UDP flow. Both only
read the bytes they are given: the flow keeps forwarding while a
``StreamDetector`` holds a copy of at most ``STREAM_DETECT_LIMIT`` bytes, so
detection never delays traffic.
"""

from __future__ import annotations

import enum

__all__ = [
    "STREAM_DETECT_LIMIT",
    "Proto",
    "StreamDetector",
    "detect_datagram",
    "detect_stream",
]


class Proto(enum.StrEnum):
    TLS = "tls"
    HTTP = "http"
    HTTP2 = "http2"  # prior-knowledge h2 (RFC 9113 §3.3): marked, not parsed
    DNS = "dns"
    QUIC = "quic"
    UNKNOWN = "unknown"


# Every rule below decides within 16 bytes; past this the stream is unknown.
STREAM_DETECT_LIMIT = 32

# The request methods llhttp (and so the HTTP dissector) accepts.
_METHODS = tuple(
    m.encode() + b" "
    for m in (  # noqa: SIM905
        "GET HEAD POST PUT DELETE CONNECT OPTIONS TRACE PATCH PURGE "
        "COPY LOCK MKCOL MOVE PROPFIND PROPPATCH SEARCH UNLOCK BIND REBIND UNBIND ACL "
        "REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE "
        "MKCALENDAR LINK UNLINK SOURCE QUERY"
    ).split()
)
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_H2_DECIDE = len(b"PRI * HTTP/2")

QUIC_V1 = 0x00000001
QUIC_V2 = 0x6B3343CF
# RFC 9000 §17.2.2 / RFC 9369 §3.2: the long-header packet type of an Initial.
_QUIC_INITIAL_TYPE = {QUIC_V1: 0, QUIC_V2: 1}
# RFC 9000 §14.1: a client pads every datagram carrying an Initial to 1200 bytes.
_QUIC_MIN_INITIAL_DATAGRAM = 1200


def _detect_tls(b: bytes) -> Proto | None:
    # RFC 8446 §5.1: a handshake record (22) with legacy_record_version 0x03xx
    # and a plausible length, then the handshake header (§4) of a client_hello (1).
    if len(b) >= 2 and b[1] != 0x03:
        return Proto.UNKNOWN
    if len(b) >= 3 and b[2] > 0x04:
        return Proto.UNKNOWN
    if len(b) >= 5 and int.from_bytes(b[3:5]) < 4:
        return Proto.UNKNOWN
    if len(b) < 6:
        return None
    return Proto.TLS if b[5] == 0x01 else Proto.UNKNOWN


def _detect_http(b: bytes) -> Proto | None:
    if b.startswith(_H2_PREFACE[:_H2_DECIDE]):
        return Proto.HTTP2
    if _H2_PREFACE.startswith(b[:_H2_DECIDE]):
        return None
    for m in _METHODS:
        if b.startswith(m):
            return Proto.HTTP
    if any(m.startswith(b) for m in _METHODS):
        return None
    return Proto.UNKNOWN


def dns_header_plausible(b: bytes, offset: int = 0) -> bool:
    """A DNS query header at ``offset`` (RFC 1035 §4.1.1): QR=0, opcode QUERY,
    one to four questions, no answers or authority, at most two additional
    records (OPT, TSIG)."""
    if len(b) < offset + 12:
        return False
    flags = int.from_bytes(b[offset + 2 : offset + 4])
    qd, an, ns, ar = (int.from_bytes(b[offset + i : offset + i + 2]) for i in (4, 6, 8, 10))
    qr, opcode = flags >> 15, (flags >> 11) & 0xF
    return qr == 0 and opcode == 0 and 1 <= qd <= 4 and an == 0 and ns == 0 and ar <= 2


def _question_plausible(b: bytes, offset: int) -> bool:
    # A question name of uncompressed labels (a query has nothing to point at),
    # at most 255 bytes, then QTYPE and QCLASS (RFC 1035 §4.1.2).
    start = offset
    while offset < len(b):
        n = b[offset]
        if n == 0:
            return offset + 1 - start <= 255 and offset + 5 <= len(b)
        if n > 63:
            return False
        offset += 1 + n
    return False


def _detect_dns_tcp(b: bytes) -> Proto | None:
    # RFC 1035 §4.2.2 / RFC 7766: a two-byte length before each message. A
    # query is small; 4096 also keeps this disjoint from TLS (0x16..) and
    # HTTP (ASCII letters) in the first byte.
    if len(b) < 2:
        return None if b[0] < 0x10 else Proto.UNKNOWN
    n = int.from_bytes(b[:2])
    if not 17 <= n <= 4096:
        return Proto.UNKNOWN
    if len(b) < 15:
        return None
    if not dns_header_plausible(b, 2) or not 1 <= b[14] <= 63:
        return Proto.UNKNOWN
    return Proto.DNS


def detect_stream(prefix: bytes) -> Proto | None:
    """The protocol of a TCP connection from the client's first bytes.

    Returns:
        ``None`` when ``prefix`` is too short to decide (ask again with more,
        up to ``STREAM_DETECT_LIMIT`` bytes), else the protocol or
        ``Proto.UNKNOWN``.
    """
    if not prefix:
        return None
    first = prefix[0]
    if first == 0x16:
        result = _detect_tls(prefix)
    elif 0x41 <= first <= 0x5A:
        result = _detect_http(prefix)
    else:
        result = _detect_dns_tcp(prefix)
    if result is None and len(prefix) >= STREAM_DETECT_LIMIT:
        return Proto.UNKNOWN
    return result


def _detect_quic(d: bytes) -> bool:
    # RFC 9000 §17.2: long header form and fixed bit, a version we can decrypt,
    # an Initial packet type, connection IDs of at most 20 bytes.
    if len(d) < _QUIC_MIN_INITIAL_DATAGRAM or d[0] & 0xC0 != 0xC0:
        return False
    version = int.from_bytes(d[1:5])
    if _QUIC_INITIAL_TYPE.get(version) != (d[0] >> 4) & 0x03:
        return False
    dcid_len = d[5]
    if dcid_len > 20 or len(d) < 7 + dcid_len:
        return False
    return d[6 + dcid_len] <= 20


def detect_datagram(datagram: bytes) -> Proto:
    """The protocol of a UDP flow from its first client datagram."""
    if _detect_quic(datagram):
        return Proto.QUIC
    if dns_header_plausible(datagram) and _question_plausible(datagram, 12):
        return Proto.DNS
    return Proto.UNKNOWN


class StreamDetector:
    """Watches the client's first bytes until ``detect_stream`` decides.

    The bytes are forwarded meanwhile; the detector keeps the earlier chunks
    (fewer than ``STREAM_DETECT_LIMIT`` bytes while undecided) so that the
    dissector chosen at the deciding chunk can still see the stream from its
    first byte: ``take_backlog()`` returns them and the deciding chunk.

    Attributes:
        result: the decision, ``None`` while undecided.
    """

    __slots__ = ("_backlog", "_earlier", "result")

    def __init__(self) -> None:
        self._earlier = b""
        self._backlog = b""
        self.result: Proto | None = None

    def feed(self, data: bytes) -> Proto | None:
        """More client bytes; returns the decision once there is one."""
        if self.result is None:
            prefix = (self._earlier + data[:STREAM_DETECT_LIMIT])[:STREAM_DETECT_LIMIT]
            self.result = detect_stream(prefix)
            if self.result is None:
                self._earlier += data  # undecided: fewer than the limit in all
            else:
                if self.result is not Proto.UNKNOWN:
                    self._backlog = self._earlier + data
                self._earlier = b""
        return self.result

    def take_backlog(self) -> bytes:
        """Once decided: every client byte up to the end of the deciding chunk
        (for the dissector's first ``feed``); empty after the first call."""
        backlog, self._backlog = self._backlog, b""
        return backlog
