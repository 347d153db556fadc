"""TLS dissector and fingerprints: the JA4 specification's example, the JA3
README's examples, real clients (Python ssl, openssl s_client), any split of
the stream, ClientHellos across records, limits, and fuzzing."""

from __future__ import annotations

import shutil
import ssl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.analysis.dissect.base import Direction
from relay.analysis.dissect.tls import (
    TlsAlert,
    TlsClientHello,
    TlsDissector,
    TlsEstablished,
    TlsServerHello,
    parse_client_hello,
)
from tests.dissect_helpers import (
    C2S,
    S2C,
    bytewise,
    capture_client_bytes,
    check_structure,
    client_context,
    client_hello_message,
    ext,
    ext_alpn,
    ext_sni,
    ext_u16_list,
    feed_all,
    netns_available,
    server_context,
    tls_conversation,
    tls_records,
    two_pieces,
    vec,
)

# The FoxIO JA4 specification's example (technical_details/JA4.md, "Cipher
# hash", "Extension hash", "Example", "Raw Output"): ciphers and extensions in
# their original order, and the signature algorithms.
SPEC_CIPHERS = [0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9,
                0xCCA8, 0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035]  # fmt: skip
SPEC_EXTENSIONS = [0x001B, 0x0000, 0x0033, 0x0010, 0x4469, 0x0017, 0x002D, 0x000D,
                   0x0005, 0x0023, 0x0012, 0x002B, 0xFF01, 0x000B, 0x000A, 0x0015]  # fmt: skip
SPEC_SIGALGS = [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]
SPEC_JA4 = "t13d1516h2_8daaf6152771_e5627efa2ab1"
SPEC_JA4_R = (
    "t13d1516h2_002f,0035,009c,009d,1301,1302,1303,c013,c014,c02b,c02c,c02f,c030,cca8,cca9_"
    "0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_"
    "0403,0804,0401,0503,0805,0501,0806,0601"
)
SPEC_JA4_O = "t13d1516h2_acb858a92679_18f69afefd3d"
SPEC_JA4_RO = (
    "t13d1516h2_1301,1302,1303,c02b,c02f,c02c,c030,cca9,cca8,c013,c014,009c,009d,002f,0035_"
    "001b,0000,0033,0010,4469,0017,002d,000d,0005,0023,0012,002b,ff01,000b,000a,0015_"
    "0403,0804,0401,0503,0805,0501,0806,0601"
)
GREASE = 0x3A3A


def spec_hello(*, sigalgs: bool = True, grease: bool = True) -> TlsClientHello:
    """A ClientHello carrying exactly the spec example's lists (plus GREASE,
    which every fingerprint must ignore)."""
    contents = {
        0x0000: ext_sni("example.test")[1],
        0x0010: ext_alpn(b"h2", b"http/1.1")[1],
        0x002B: vec(bytes.fromhex("3a3a03040303"), 1),
        0x000D: vec(b"".join(s.to_bytes(2) for s in SPEC_SIGALGS) if sigalgs else b"", 2),
        0x000A: vec(bytes.fromhex("001d00170018"), 2),
        0x000B: b"\x01\x00",
    }
    exts = [(t, contents.get(t, b"")) for t in SPEC_EXTENSIONS]
    ciphers = SPEC_CIPHERS
    if grease:
        ciphers = [GREASE, *ciphers]
        exts = [ext(0x0A0A), *exts, ext(0xFAFA, b"\x00")]
    msg = client_hello_message(ciphers, exts)
    return parse_client_hello(msg[4:], ts=0.0)


def test_ja4_specification_example() -> None:
    hello = spec_hello()
    assert hello.ja4 == SPEC_JA4
    assert hello.ja4_r == SPEC_JA4_R
    assert hello.ja4_o == SPEC_JA4_O
    assert hello.ja4_ro == SPEC_JA4_RO
    assert spec_hello(grease=False).ja4 == SPEC_JA4


def test_ja4_specification_without_signature_algorithms() -> None:
    # The spec: "If there are no signature algorithms in the hello packet, then
    # the string ends without an underscore and is hashed":
    # 0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01 = 6d807ffa2a79
    hello = spec_hello(sigalgs=False)
    assert hello.signature_algorithms == ()
    assert hello.ja4 == "t13d1516h2_8daaf6152771_6d807ffa2a79"


@pytest.mark.parametrize(
    ("alpn", "chars"),
    [
        # The spec's "ALPN Extension Value" examples.
        (b"h2", "h2"),
        (b"http/1.1", "h1"),
        (b"\xab", "ab"),
        (b"\x20", "20"),
        (b"\xab\xcd", "ad"),
        (b"\x20\x61", "21"),
        (b"\x30\xab", "3b"),
        (b"\x61\x20", "60"),
        (b"\x30\x31\xab\xcd", "3d"),
        (b"\x30\xab\xcd\x31", "01"),
        (b"x", "xx"),
        (None, "00"),
        (b"", "00"),
    ],
)
def test_ja4_alpn_characters(alpn: bytes | None, chars: str) -> None:
    exts = [ext_alpn(alpn)] if alpn is not None else []
    msg = client_hello_message([0x1301], exts)
    assert parse_client_hello(msg[4:], ts=0.0).ja4[8:10] == chars


def test_ja4_empty_lists_and_versions() -> None:
    hello = parse_client_hello(client_hello_message([], None, version=0x0301)[4:], ts=0.0)
    assert hello.ja4 == "t10i000000_000000000000_000000000000"
    ssl3 = parse_client_hello(client_hello_message([0x0A0A], [], version=0x0300)[4:], ts=0.0)
    assert ssl3.ja4.startswith("ts3i0000")
    odd = parse_client_hello(client_hello_message([1], [], version=0x7F17)[4:], ts=0.0)
    assert odd.ja4.startswith("t00i0100")


def test_ja3_readme_examples() -> None:
    # salesforce/ja3 README: the JA3 strings and MD5s of two ClientHellos.
    full = client_hello_message(
        [47, 53, 5, 10, 49161, 49162, 49171, 49172, 50, 56, 19, 4],
        [ext_sni("example.test"), ext_u16_list(10, [23, 24, 25]), (11, b"\x01\x00")],
        version=769,
    )
    hello = parse_client_hello(full[4:], ts=0.0)
    assert hello.ja3 == "769,47-53-5-10-49161-49162-49171-49172-50-56-19-4,0-10-11,23-24-25,0"
    assert hello.ja3_hash == "ada70206e40642a3e4461f35503241d5"
    bare = client_hello_message([4, 5, 10, 9, 100, 98, 3, 6, 19, 18, 99], None, version=769)
    hello = parse_client_hello(bare[4:], ts=0.0)
    assert hello.ja3 == "769,4-5-10-9-100-98-3-6-19-18-99,,,"
    assert hello.ja3_hash == "de350869b8c85de67a350c8d186f11e6"
    # GREASE goes, in every list.
    greased = client_hello_message(
        [0x1A1A, 4865], [ext(0x2A2A), ext_u16_list(10, [0x3A3A, 29]), (11, b"\x01\x00")]
    )
    assert parse_client_hello(greased[4:], ts=0.0).ja3 == "771,4865,10-11,29,0"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_python_ssl_handshake(version: ssl.TLSVersion) -> None:
    conv = tls_conversation(
        alpn=["h2", "http/1.1"], server_alpn=["http/1.1"], max_version=version, app_data=b"hi"
    )
    records = feed_all(TlsDissector, conv.flights)
    hello, server_hello, established = records
    assert isinstance(hello, TlsClientHello)
    assert hello.server_name == "example.test"
    assert hello.alpn == (b"h2", b"http/1.1")
    check_structure(hello)
    assert hello.ja4[:4] == ("t12d" if version == ssl.TLSVersion.TLSv1_2 else "t13d")
    assert hello.ja4[8:10] == "h2"
    assert isinstance(server_hello, TlsServerHello)
    assert server_hello.cipher_suite in hello.cipher_suites
    assert isinstance(established, TlsEstablished)
    assert not established.resumed
    if version == ssl.TLSVersion.TLSv1_2:
        assert server_hello.version == 0x0303 and server_hello.version_name == "TLSv12"
        assert server_hello.alpn == b"http/1.1"  # visible in a TLS 1.2 ServerHello
    else:
        assert server_hello.version == 0x0304 and server_hello.legacy_version == 0x0303
        assert server_hello.alpn is None  # encrypted in TLS 1.3
        assert server_hello.key_share_group in hello.supported_groups
    assert established.version == server_hello.version


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_resumed_handshake(version: ssl.TLSVersion) -> None:
    cc, sc = client_context(max_version=version), server_context()
    first = tls_conversation(client_ctx=cc, server_ctx=sc, app_data=b"x")
    again = tls_conversation(client_ctx=cc, server_ctx=sc, session=first.session, app_data=b"x")
    established = feed_all(TlsDissector, again.flights)[-1]
    assert isinstance(established, TlsEstablished)
    assert established.resumed


def test_no_server_name() -> None:
    hello = feed_all(TlsDissector, tls_conversation(server_name=None).flights)[0]
    assert isinstance(hello, TlsClientHello)
    assert hello.server_name is None
    assert hello.ja4[3] == "i"


def test_hello_retry_request() -> None:
    # The client's key share is X25519; a server that takes only P-384 asks again.
    sc = server_context()
    sc.set_ecdh_curve("secp384r1")
    conv = tls_conversation(server_ctx=sc, app_data=b"x")
    records = feed_all(TlsDissector, conv.flights)
    kinds = [type(r).__name__ for r in records]
    assert kinds == ["TlsClientHello", "TlsServerHello", "TlsClientHello", "TlsServerHello",
                     "TlsEstablished"]  # fmt: skip
    first, hrr, second, sh, _ = records
    assert isinstance(hrr, TlsServerHello) and hrr.hello_retry_request
    assert hrr.key_share_group == 24  # secp384r1, the group the server asks for
    assert isinstance(second, TlsClientHello) and second.retry
    assert isinstance(first, TlsClientHello) and not first.retry
    assert isinstance(sh, TlsServerHello) and not sh.hello_retry_request


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")
@pytest.mark.skipif(not netns_available(), reason="needs root, unshare and ip")
def test_openssl_s_client() -> None:
    first = capture_client_bytes(
        ["openssl", "s_client", "-connect", "127.0.0.1:{port}", "-servername", "example.test",
         "-alpn", "h2,http/1.1"]
    )  # fmt: skip
    d = TlsDissector()
    (hello,) = d.feed(C2S, first, 1.0)
    assert d.failed is None
    assert isinstance(hello, TlsClientHello)
    assert hello.server_name == "example.test"
    assert hello.alpn == (b"h2", b"http/1.1")
    assert hello.version == 0x0304
    check_structure(hello)
    assert hello.ja4.startswith("t13d") and hello.ja4[8:10] == "h2"


def test_client_hello_across_records() -> None:
    msg = tls_conversation(alpn=["h2"]).flights[0][1][5:]  # the handshake message
    whole = feed_all(TlsDissector, [(C2S, tls_records(msg))])
    for size in (1, 7, 100, 250):
        assert feed_all(TlsDissector, [(C2S, tls_records(msg, size))]) == whole
    # A record that ends the ClientHello and starts the next message is fine too.
    assert feed_all(TlsDissector, [(C2S, tls_records(msg + b"\x10\x00\x00\x00", 60))]) == whole


def test_every_split_gives_the_same_records() -> None:
    conv = tls_conversation(alpn=["h2"], app_data=b"hello")
    whole = feed_all(TlsDissector, conv.flights)
    assert len(whole) == 3
    assert feed_all(TlsDissector, conv.flights, bytewise) == whole
    for i, (_, flight) in enumerate(conv.flights[:4]):
        for at in range(len(flight) + 1):
            cut = [(d, f) for d, f in conv.flights[:i]]
            cut += [(conv.flights[i][0], flight[:at]), (conv.flights[i][0], flight[at:])]
            cut += conv.flights[i + 1 :]
            assert feed_all(TlsDissector, cut) == whole, (i, at)
    assert feed_all(TlsDissector, conv.flights, two_pieces(3)) == whole


def test_plaintext_alert() -> None:
    hello = tls_conversation().flights[0][1]
    d = TlsDissector()
    d.feed(C2S, hello, 1.0)
    (alert,) = d.feed(S2C, b"\x15\x03\x03\x00\x02\x02\x28", 2.0)
    assert alert == TlsAlert(2.0, Direction.SERVER_TO_CLIENT, 2, 40)  # fatal handshake_failure
    assert d.active


@pytest.mark.parametrize(
    "first",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"\x17\x03\x03\x00\x05hello",  # application data before any handshake
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",  # a ServerHello from the client
        b"\x16\x03\x01\x50\x00",  # a record longer than TLS allows
        b"\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00",  # a truncated ClientHello
    ],
)
def test_not_tls_fails(first: bytes) -> None:
    d = TlsDissector()
    assert d.feed(C2S, first, 1.0) == []
    assert d.failed is not None and not d.failed.startswith("internal")
    assert d.feed(C2S, tls_conversation().flights[0][1], 1.0) == []  # ignored from now on


def test_oversized_client_hello_fails_without_buffering() -> None:
    d = TlsDissector()
    # A handshake header announcing a 1 MiB ClientHello fails at once.
    d.feed(C2S, b"\x16\x03\x01\x40\x00\x01\x10\x00\x00", 1.0)
    assert d.failed is not None and "limit" in d.failed
    # One just under the limit, sent in full records, is buffered up to the limit only.
    d = TlsDissector()
    body = b"\x03\x03" + bytes(32) + b"\x00" + vec(b"\x13\x01" * 32000, 2) + b"\x01\x00"
    msg = b"\x01" + vec(body, 3)
    assert len(body) <= 65536
    out = d.feed(C2S, tls_records(msg), 1.0)
    assert d.failed is None and len(out) == 1
    assert len(d._c.hs) == 0


def record_streams() -> list[list[tuple[Direction, bytes]]]:
    return [
        tls_conversation(alpn=["h2"], app_data=b"x").flights,
        tls_conversation(max_version=ssl.TLSVersion.TLSv1_2, app_data=b"x").flights,
    ]


STREAMS = record_streams()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_handshakes(data: st.DataObject) -> None:
    flights = list(data.draw(st.sampled_from(STREAMS)))
    i = data.draw(st.integers(0, len(flights) - 1))
    direction, flight = flights[i]
    buf = bytearray(flight)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    flights[i] = (direction, bytes(buf[: data.draw(st.integers(0, len(buf)))]))
    d = TlsDissector()
    for direction, flight in flights:
        d.feed(direction, flight, 1.0)
        assert len(d._c.hs) + len(d._s.hs) <= 65536 + 4 + 2**14 + 2048
    d.close(2.0)
    assert d.failed is None or not d.failed.startswith("internal"), d.failed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=300)), max_size=8))
def test_fuzz_random_bytes(chunks: list[tuple[bool, bytes]]) -> None:
    d = TlsDissector()
    for client, chunk in chunks:
        d.feed(C2S if client else S2C, b"\x16\x03\x01" + chunk if client else chunk, 1.0)
    assert d.failed is None or not d.failed.startswith("internal"), d.failed
