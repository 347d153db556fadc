"""Sans-IO protocol dissectors: bytes in, typed records out.

Detection (``detect``) picks a dissector by content: ``detect_stream`` on the
client's first bytes of a TCP connection (a ``StreamDetector`` keeps a copy
until it decides), ``detect_datagram`` on a UDP flow's first datagram. Then:

* a ``StreamDissector`` (TLS, HTTP/1.x, DNS over TCP) is driven with
  ``feed(direction, data, now)`` for each direction's bytes in order,
  ``end(direction, now)`` when a direction finished, and ``close(now)`` at
  the end of the flow;
* a ``DatagramDissector`` (DNS, QUIC) with ``datagram(direction, data, now)``
  per datagram and ``close(now)``.

Each call returns the records it completed (frozen dataclasses; ``Record``
is their union) and never raises: a dissector that meets input it cannot
parse, or that would need more than its fixed budget of buffered bytes, sets
``failed`` and ignores everything after. ``active`` is False once it failed
or is ``done`` (it saw all it wants), so a flow can stop calling it. Nothing
here does I/O or reads a clock: ``now`` is the caller's timestamp.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from .base import DatagramDissector, Dissector, StreamDissector
from .detect import Proto, StreamDetector, detect_datagram, detect_stream
from .dns import DnsQuery, DnsRecord, DnsTcpDissector, DnsTransaction, DnsUdpDissector
from .http import HttpDissector, HttpRecord, HttpRequest, HttpResponse, HttpTransaction
from .quic import QuicClientHello, QuicDissector, QuicRecord, QuicServerHello
from .tls import TlsAlert, TlsClientHello, TlsDissector, TlsEstablished, TlsRecord, TlsServerHello

__all__ = [
    "RECORD_HOOKS",
    "SERVICES",
    "DatagramDissector",
    "Dissector",
    "DnsQuery",
    "DnsTcpDissector",
    "DnsTransaction",
    "DnsUdpDissector",
    "HttpDissector",
    "HttpRequest",
    "HttpResponse",
    "HttpTransaction",
    "Proto",
    "QuicClientHello",
    "QuicDissector",
    "QuicServerHello",
    "Record",
    "StreamDetector",
    "StreamDissector",
    "TlsAlert",
    "TlsClientHello",
    "TlsDissector",
    "TlsEstablished",
    "TlsServerHello",
    "datagram_dissector",
    "detect_datagram",
    "detect_stream",
    "stream_dissector",
]

Record = TlsRecord | HttpRecord | DnsRecord | QuicRecord

# Each record's analyzer hook (relay.analysis.hooks.RECORD_HOOKS names the same set).
RECORD_HOOKS: Final[Mapping[type, str]] = {
    TlsClientHello: "tls_clienthello",
    TlsServerHello: "tls_serverhello",
    TlsEstablished: "tls_established",
    TlsAlert: "tls_alert",
    HttpRequest: "http_request",
    HttpResponse: "http_response",
    HttpTransaction: "http_transaction",
    DnsQuery: "dns_query",
    DnsTransaction: "dns_answer",
    QuicClientHello: "quic_clienthello",
    QuicServerHello: "quic_serverhello",
}

# A dissector's ``proto`` as Zeek's conn.log ``service`` names it.
SERVICES: Final[Mapping[str, str]] = {"tls": "ssl", "http": "http", "dns": "dns", "quic": "quic"}


def stream_dissector(proto: Proto) -> StreamDissector[Record] | None:
    """A new dissector for a TCP connection detected as ``proto``, if there is one
    (prior-knowledge HTTP/2 is detected but not dissected)."""
    d: StreamDissector[TlsRecord] | StreamDissector[HttpRecord] | StreamDissector[DnsRecord]
    if proto is Proto.TLS:
        d = TlsDissector()
    elif proto is Proto.HTTP:
        d = HttpDissector()
    elif proto is Proto.DNS:
        d = DnsTcpDissector()
    else:
        return None
    return d  # type: ignore[return-value]


def datagram_dissector(proto: Proto) -> DatagramDissector[Record] | None:
    """A new dissector for a UDP flow detected as ``proto``, if there is one."""
    d: DatagramDissector[DnsRecord] | DatagramDissector[QuicRecord]
    if proto is Proto.DNS:
        d = DnsUdpDissector()
    elif proto is Proto.QUIC:
        d = QuicDissector()
    else:
        return None
    return d  # type: ignore[return-value]
