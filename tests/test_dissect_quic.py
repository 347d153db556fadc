"""QUIC Initial dissector: RFC 9001 / RFC 9369 Appendix A vectors, a real
aioquic client and server (v1 and v2, a ClientHello over several datagrams,
any datagram order), bounds, fuzzing."""

from __future__ import annotations

import pytest
from aioquic.quic.packet import QuicProtocolVersion
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.analysis.dissect.base import Malformed
from relay.analysis.dissect.detect import Proto, detect_datagram
from relay.analysis.dissect.quic import (
    QUIC_V1,
    QUIC_V2,
    QuicClientHello,
    QuicDissector,
    QuicRecord,
    QuicServerHello,
    _CryptoStream,
    crypto_frames,
    initial_keys,
    unprotect,
)
from tests import dissect_vectors as rfc
from tests.dissect_helpers import C2S, S2C, check_structure, quic_handshake

VERSIONS = {
    QUIC_V1: (rfc.V1_CLIENT_KEYS, rfc.V1_SERVER_KEYS, rfc.V1_CLIENT_HEADER, rfc.V1_CLIENT_PACKET,
              rfc.V1_SERVER_PACKET),
    QUIC_V2: (rfc.V2_CLIENT_KEYS, rfc.V2_SERVER_KEYS, rfc.V2_CLIENT_HEADER, rfc.V2_CLIENT_PACKET,
              rfc.V2_SERVER_PACKET),
}  # fmt: skip


@pytest.mark.parametrize("version", [QUIC_V1, QUIC_V2])
def test_rfc_initial_keys(version: int) -> None:
    client, server = VERSIONS[version][:2]
    k = initial_keys(rfc.DCID, version, client=True)
    assert (k.key.hex(), k.iv.hex(), k.hp.hex()) == client
    k = initial_keys(rfc.DCID, version, client=False)
    assert (k.key.hex(), k.iv.hex(), k.hp.hex()) == server


@pytest.mark.parametrize("version", [QUIC_V1, QUIC_V2])
def test_rfc_client_initial_decrypts(version: int) -> None:
    _, _, header, packet, _ = VERSIONS[version]
    keys = initial_keys(rfc.DCID, version, client=True)
    plain_header, payload, pn = unprotect(packet, 18, keys)
    assert (plain_header, payload, pn) == (header, rfc.CLIENT_PAYLOAD, 2)
    ((offset, hello),) = crypto_frames(payload)
    assert offset == 0 and hello[0] == 1 and len(hello) == 241


@pytest.mark.parametrize("version", [QUIC_V1, QUIC_V2])
def test_rfc_handshake_through_the_dissector(version: int) -> None:
    packet, server_packet = VERSIONS[version][3], VERSIONS[version][4]
    assert detect_datagram(packet) is Proto.QUIC
    d = QuicDissector()
    (ch,) = d.datagram(C2S, packet, 1.0)
    assert isinstance(ch, QuicClientHello)
    assert (ch.version, ch.dcid, ch.scid) == (version, rfc.DCID, b"")
    assert ch.version_name == ("1" if version == QUIC_V1 else "quicv2")
    assert ch.hello.server_name == "example.com"
    assert ch.hello.alpn == (b"alpn",)
    assert ch.hello.transport == "q"
    assert ch.hello.ja4.startswith("q13d0")
    check_structure(ch.hello, "q")
    (sh,) = d.datagram(S2C, server_packet, 2.0)
    assert isinstance(sh, QuicServerHello)
    assert sh.scid == bytes.fromhex("f067a5502a4262b5")
    assert (sh.hello.version, sh.hello.cipher_suite, sh.hello.alpn) == (0x0304, 0x1301, None)
    assert d.done and d.failed is None


def records(c2s: list[bytes], s2c: list[bytes]) -> list[QuicRecord]:
    d = QuicDissector()
    out: list[QuicRecord] = []
    for dg in c2s:
        out += d.datagram(C2S, dg, 1.0)
    for dg in s2c:
        out += d.datagram(S2C, dg, 2.0)
    assert d.failed is None, d.failed
    return out


@pytest.mark.parametrize("version", [QuicProtocolVersion.VERSION_1, QuicProtocolVersion.VERSION_2])
def test_aioquic_client_and_server(version: int) -> None:
    c2s, s2c = quic_handshake(["h3", "h3-29"], version)
    ch, sh = records(c2s, s2c)
    assert isinstance(ch, QuicClientHello) and isinstance(sh, QuicServerHello)
    assert ch.version == version and sh.version == version
    assert ch.dcid == c2s[0][6 : 6 + c2s[0][5]]
    assert ch.hello.server_name == "example.test"
    assert ch.hello.alpn == (b"h3", b"h3-29")
    assert 0x39 in ch.hello.extensions  # quic_transport_parameters
    check_structure(ch.hello, "q")
    assert ch.hello.ja4[:4] == "q13d" and ch.hello.ja4[8:10] == "h3"
    assert sh.hello.cipher_suite in ch.hello.cipher_suites


def test_client_hello_over_several_initials_in_any_order() -> None:
    # Sixty long ALPN names make a ClientHello of several kilobytes.
    alpn = [f"protocol-{i:02d}-" + "x" * 40 for i in range(60)]
    c2s, s2c = quic_handshake(alpn, QuicProtocolVersion.VERSION_1)
    assert len(c2s) >= 3
    whole = records(c2s, s2c)
    ch = whole[0]
    assert isinstance(ch, QuicClientHello) and ch.hello.alpn == tuple(a.encode() for a in alpn)
    assert ch.hello.ja4[8:10] == "px"
    assert records(c2s[::-1], s2c) == whole
    assert records(c2s[1:] + c2s[:1] + c2s, s2c) == whole  # duplicates change nothing
    assert records(c2s[:-1], []) == []  # the ClientHello's end is missing


def test_crypto_stream_reassembly_and_bounds() -> None:
    s = _CryptoStream()
    assert s.add(5, b"fghij") == b""
    assert s.add(0, b"abc") == b"abc"
    assert s.add(2, b"cde") == b"defghij"
    assert s.add(0, b"abcdefg") == b""
    with pytest.raises(Malformed):
        s.add(70000, b"x")
    t = _CryptoStream()
    with pytest.raises(Malformed):
        for i in range(1, 200):
            t.add(i * 10, b"x")


def test_not_quic_is_skipped() -> None:
    d = QuicDissector()
    assert d.datagram(C2S, bytes(1200), 1.0) == []  # a short header: opaque
    assert d.failed is None
    # Wrong keys (a corrupted tag) leave the packet unread, not the dissector failed.
    bad = bytearray(rfc.V1_CLIENT_PACKET)
    bad[-1] ^= 1
    assert d.datagram(C2S, bytes(bad), 1.0) == []
    assert d.failed is None
    assert len(d.datagram(C2S, rfc.V1_CLIENT_PACKET, 2.0)) == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_datagrams(data: st.DataObject) -> None:
    packets = [rfc.V1_CLIENT_PACKET, rfc.V2_CLIENT_PACKET, rfc.V1_SERVER_PACKET]
    d = QuicDissector()
    for _ in range(data.draw(st.integers(1, 4))):
        buf = bytearray(data.draw(st.sampled_from(packets)))
        # Mostly in the header, where the parsing is.
        for _ in range(data.draw(st.integers(1, 4))):
            buf[data.draw(st.integers(0, 40))] = data.draw(st.integers(0, 255))
        direction = data.draw(st.sampled_from([C2S, S2C]))
        d.datagram(direction, bytes(buf[: data.draw(st.integers(0, len(buf)))]), 1.0)
    assert d.failed is None or not d.failed.startswith("internal"), d.failed


def protect(header: bytes, payload: bytes, pn: int, version: int) -> bytes:
    """Encrypt a client Initial as RFC 9001 §5.3-5.4 says (the inverse of ``unprotect``)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    keys = initial_keys(rfc.DCID, version, client=True)
    nonce = (int.from_bytes(keys.iv) ^ pn).to_bytes(12)
    body = AESGCM(keys.key).encrypt(nonce, payload, header)
    pn_offset = len(header) - 4
    sample = body[:16]  # pn_offset + 4: with a 4-byte packet number, where the body starts
    mask = Cipher(algorithms.AES(keys.hp), modes.ECB()).encryptor().update(sample)
    first = bytes([header[0] ^ (mask[0] & 0x0F)])
    pn_bytes = bytes(a ^ b for a, b in zip(header[pn_offset:], mask[1:5], strict=True))
    return first + header[1:pn_offset] + pn_bytes + body


def test_protect_matches_the_rfc() -> None:
    assert protect(rfc.V1_CLIENT_HEADER, rfc.CLIENT_PAYLOAD, 2, QUIC_V1) == rfc.V1_CLIENT_PACKET
    assert protect(rfc.V2_CLIENT_HEADER, rfc.CLIENT_PAYLOAD, 2, QUIC_V2) == rfc.V2_CLIENT_PACKET


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_decrypted_frames(data: st.DataObject) -> None:
    # Mutate the plaintext and encrypt it properly: the frame and ClientHello
    # parsers behind the decryption see the damage.
    payload = bytearray(rfc.CLIENT_PAYLOAD)
    for _ in range(data.draw(st.integers(1, 6))):
        payload[data.draw(st.integers(0, 260))] = data.draw(st.integers(0, 255))
    d = QuicDissector()
    d.datagram(C2S, protect(rfc.V1_CLIENT_HEADER, bytes(payload), 2, QUIC_V1), 1.0)
    assert d.failed is None or not d.failed.startswith("internal"), d.failed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=1300), max_size=4))
def test_fuzz_random_datagrams(datagrams: list[bytes]) -> None:
    d = QuicDissector()
    for dg in datagrams:
        d.datagram(C2S, b"\xc3\x00\x00\x00\x01" + dg, 1.0)
    assert d.failed is None or not d.failed.startswith("internal"), d.failed
