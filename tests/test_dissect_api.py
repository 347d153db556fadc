"""The dissect package as a flow would use it: detect, pick, feed; no trio, no I/O."""

from __future__ import annotations

import subprocess
import sys

import dns.message
import pytest
from aioquic.quic.packet import QuicProtocolVersion

from relay.analysis.dissect import (
    DnsQuery,
    HttpRequest,
    Proto,
    QuicClientHello,
    StreamDetector,
    TlsClientHello,
    datagram_dissector,
    detect_datagram,
    stream_dissector,
)
from tests.dissect_helpers import C2S, quic_handshake, tls_conversation


def test_dissectors_import_no_trio() -> None:
    code = "import sys, relay.analysis.dissect; sys.exit('trio' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=".", check=False).returncode == 0


@pytest.mark.parametrize(
    ("first", "proto", "record"),
    [
        (tls_conversation().flights[0][1], Proto.TLS, TlsClientHello),
        (b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", Proto.HTTP, HttpRequest),
        (
            (lambda q: len(q).to_bytes(2) + q)(dns.message.make_query("a.test.", "A").to_wire()),
            Proto.DNS,
            DnsQuery,
        ),
    ],
)
def test_stream_flow(first: bytes, proto: Proto, record: type) -> None:
    det = StreamDetector()
    d = None
    out = []
    for i in range(0, len(first), 5):
        piece = first[i : i + 5]
        if d is not None:
            out += d.feed(C2S, piece, 1.0)
        elif det.feed(piece) is not None:
            assert det.result is proto
            d = stream_dissector(det.result)
            assert d is not None
            # The dissector sees the stream from its first byte.
            out += d.feed(C2S, det.take_backlog(), 1.0)
    assert [type(r) for r in out] == [record]
    assert stream_dissector(Proto.HTTP2) is None and stream_dissector(Proto.UNKNOWN) is None


def test_datagram_flow() -> None:
    c2s, _ = quic_handshake(["h3"], QuicProtocolVersion.VERSION_1)
    d = datagram_dissector(detect_datagram(c2s[0]))
    assert d is not None
    (ch,) = d.datagram(C2S, c2s[0], 1.0)
    assert isinstance(ch, QuicClientHello) and ch.hello.ja4.startswith("q13d")
    query = dns.message.make_query("a.test.", "A").to_wire()
    dns_d = datagram_dissector(detect_datagram(query))
    assert dns_d is not None and isinstance(dns_d.datagram(C2S, query, 1.0)[0], DnsQuery)
    assert datagram_dissector(Proto.UNKNOWN) is None
