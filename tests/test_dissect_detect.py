"""Protocol detection by content: decisions, "need more bytes", the cap, fuzz."""

from __future__ import annotations

import dns.message
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.analysis.dissect import Proto, StreamDetector, detect_datagram, detect_stream
from relay.analysis.dissect.detect import STREAM_DETECT_LIMIT
from tests.dissect_helpers import tls_conversation

CLIENT_HELLO = tls_conversation().flights[0][1]
DNS_QUERY = dns.message.make_query("example.test.", "AAAA").to_wire()


@pytest.mark.parametrize(
    ("first", "proto"),
    [
        (CLIENT_HELLO, Proto.TLS),
        (b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n", Proto.HTTP),
        (b"M-SEARCH * HTTP/1.1\r\n", Proto.HTTP),
        (b"CONNECT example.test:443 HTTP/1.1\r\n", Proto.HTTP),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Proto.HTTP2),
        (len(DNS_QUERY).to_bytes(2) + DNS_QUERY, Proto.DNS),
        (b"SSH-2.0-OpenSSH_9.6\r\n", Proto.UNKNOWN),
        (b"\x16\x03\x01\x00\x05\x02", Proto.UNKNOWN),  # a ServerHello is not a client's
        (b"\x16\x02\x00", Proto.UNKNOWN),
        (b"GETX / HTTP/1.1\r\n", Proto.UNKNOWN),
        (b"get / HTTP/1.1\r\n", Proto.UNKNOWN),
        (bytes(40), Proto.UNKNOWN),
    ],
)
def test_stream_detection(first: bytes, proto: Proto) -> None:
    assert detect_stream(first) is proto
    # Fed byte by byte, the detector decides at some prefix and never changes its mind.
    det = StreamDetector()
    decisions = {det.feed(first[i : i + 1]) for i in range(len(first))}
    assert det.result is proto
    assert decisions - {None} == {proto}


@pytest.mark.parametrize(
    "prefix",
    [b"", b"\x16", b"\x16\x03\x01\x02", b"G", b"GE", b"GET", b"PRI * HT", b"OPTIONS", b"\x00"],
)
def test_need_more_bytes(prefix: bytes) -> None:
    assert detect_stream(prefix) is None


def test_detector_gives_up_at_the_cap() -> None:
    det = StreamDetector()
    # An HTTP-looking token that never ends stays undecided only up to the cap.
    assert det.feed(b"M") is None
    assert det.feed(b"KCALENDA") is None
    assert det.feed(b"X" * STREAM_DETECT_LIMIT) is Proto.UNKNOWN
    assert detect_stream(b"\x00\x20" + b"\x00" * 10) is None  # DNS length, header pending


def test_detector_keeps_only_a_bounded_copy() -> None:
    det = StreamDetector()
    assert det.feed(b"\x00\x11" + bytes(5)) is None
    det.feed(b"\x00" * 1_000_000)
    assert det.result is Proto.UNKNOWN
    assert len(det._earlier) == 0 and det.take_backlog() == b""


def test_backlog_is_the_stream_from_its_first_byte() -> None:
    det = StreamDetector()
    assert det.feed(b"\x16") is None
    assert det.feed(b"\x03\x01") is None
    assert det.feed(CLIENT_HELLO[3:]) is Proto.TLS
    assert det.take_backlog() == CLIENT_HELLO
    assert det.take_backlog() == b""
    assert det.feed(b"more") is Proto.TLS


def test_datagram_detection() -> None:
    assert detect_datagram(DNS_QUERY) is Proto.DNS
    response = dns.message.make_response(dns.message.from_wire(DNS_QUERY)).to_wire()
    assert detect_datagram(response) is Proto.UNKNOWN  # a flow starts with a query
    assert detect_datagram(DNS_QUERY[:-3]) is Proto.UNKNOWN  # the question is cut
    assert detect_datagram(b"") is Proto.UNKNOWN
    # A QUIC v1 Initial long header, padded to 1200 bytes (RFC 9000 §14.1).
    initial = bytes([0xC3]) + (1).to_bytes(4) + b"\x08" + bytes(8) + b"\x00" + bytes(1200)
    assert detect_datagram(initial) is Proto.QUIC
    assert detect_datagram(initial[:1199]) is Proto.UNKNOWN
    v2 = bytes([0xD3]) + (0x6B3343CF).to_bytes(4) + initial[5:]
    assert detect_datagram(v2) is Proto.QUIC
    assert detect_datagram(bytes([0xC3]) + (0x6B3343CF).to_bytes(4) + initial[5:]) is Proto.UNKNOWN
    assert detect_datagram(bytes([0x83]) + initial[1:]) is Proto.UNKNOWN  # fixed bit clear
    assert detect_datagram(bytes([0xC3]) + (2).to_bytes(4) + initial[5:]) is Proto.UNKNOWN


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_stream_detection_total_and_stable(data: bytes) -> None:
    result = detect_stream(data)
    if len(data) >= STREAM_DETECT_LIMIT:
        assert result is not None
    if result is not None:
        # A decision stands whatever follows.
        assert detect_stream(data + b"\x00\xff" * 8) is result


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1300))
def test_datagram_detection_total(data: bytes) -> None:
    assert detect_datagram(data) in Proto
