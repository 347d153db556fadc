"""TLS handshake dissector: the ClientHello, the ServerHello, and whether the
handshake completed.

Only the unencrypted start of a connection is readable: the ClientHello and
the ServerHello (RFC 8446 §4.1), plaintext alerts, and ChangeCipherSpec
records. In TLS 1.3 everything after the ServerHello is encrypted, including
EncryptedExtensions and so the server's ALPN choice (``TlsServerHello.alpn``
is ``None`` there). The dissector parses record headers (§5.1) on both
directions, reassembles handshake messages across records and across any feed
boundaries, and skips record bodies it does not need without buffering them.
A ClientHello larger than ``MAX_HANDSHAKE`` fails the dissector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from . import ja4 as _fp
from .base import Direction, Malformed, StreamDissector

__all__ = [
    "MAX_HANDSHAKE",
    "HandshakeBuffer",
    "TlsAlert",
    "TlsClientHello",
    "TlsDissector",
    "TlsEstablished",
    "TlsRecord",
    "TlsServerHello",
    "cipher_name",
    "group_name",
    "parse_client_hello",
    "parse_server_hello",
    "version_name",
]

_T = TypeVar("_T")

MAX_HANDSHAKE: Final = 65536  # bytes of one handshake message body we will buffer

_CHANGE_CIPHER_SPEC, _ALERT, _HANDSHAKE, _APPLICATION_DATA, _HEARTBEAT = 20, 21, 22, 23, 24
_CLIENT_HELLO, _SERVER_HELLO = 1, 2
_MAX_RECORD = 2**14 + 2048  # RFC 8446 §5.2: the largest TLSCiphertext.length
_TLS13 = 0x0304

# Extension types (IANA TLS ExtensionType Values).
_EXT_SERVER_NAME = 0
_EXT_SUPPORTED_GROUPS = 10
_EXT_EC_POINT_FORMATS = 11
_EXT_SIGNATURE_ALGORITHMS = 13
_EXT_ALPN = 16
_EXT_PRE_SHARED_KEY = 41
_EXT_SUPPORTED_VERSIONS = 43
_EXT_KEY_SHARE = 51

# RFC 8446 §4.1.3: a HelloRetryRequest is a ServerHello with this random.
_HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")

_VERSION_NAMES = {
    0x0002: "SSLv2",
    0x0300: "SSLv3",
    0x0301: "TLSv10",
    0x0302: "TLSv11",
    0x0303: "TLSv12",
    0x0304: "TLSv13",
    0xFEFF: "DTLSv10",
    0xFEFD: "DTLSv12",
    0xFEFC: "DTLSv13",
}


def version_name(version: int) -> str:
    """A protocol version as Zeek's ssl.log writes it: ``TLSv12``, ``TLSv13``."""
    return _VERSION_NAMES.get(version, f"unknown-{version}")


# IANA TLS Cipher Suites names (as Zeek's ssl.log writes them) of the suites a
# server commonly chooses: every TLS 1.3 suite, and the ECDHE, DHE and RSA
# AES-GCM, ChaCha20-Poly1305 and CBC ones.
_CIPHER_NAMES = {
    0x1301: "TLS_AES_128_GCM_SHA256",
    0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256",
    0x1304: "TLS_AES_128_CCM_SHA256",
    0x1305: "TLS_AES_128_CCM_8_SHA256",
    0xC02B: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    0xC02C: "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    0xC02F: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    0xC030: "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    0xCCA8: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCA9: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    0xCCAA: "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    0xC009: "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
    0xC00A: "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
    0xC013: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA",
    0xC014: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA",
    0xC023: "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256",
    0xC024: "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384",
    0xC027: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256",
    0xC028: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA384",
    0x009E: "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
    0x009F: "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
    0x0033: "TLS_DHE_RSA_WITH_AES_128_CBC_SHA",
    0x0039: "TLS_DHE_RSA_WITH_AES_256_CBC_SHA",
    0x0067: "TLS_DHE_RSA_WITH_AES_128_CBC_SHA256",
    0x006B: "TLS_DHE_RSA_WITH_AES_256_CBC_SHA256",
    0x009C: "TLS_RSA_WITH_AES_128_GCM_SHA256",
    0x009D: "TLS_RSA_WITH_AES_256_GCM_SHA384",
    0x002F: "TLS_RSA_WITH_AES_128_CBC_SHA",
    0x0035: "TLS_RSA_WITH_AES_256_CBC_SHA",
    0x003C: "TLS_RSA_WITH_AES_128_CBC_SHA256",
    0x003D: "TLS_RSA_WITH_AES_256_CBC_SHA256",
    0x000A: "TLS_RSA_WITH_3DES_EDE_CBC_SHA",
}

# Supported groups (IANA TLS Supported Groups) as Zeek's ssl.log ``curve`` names them.
_GROUP_NAMES = {
    23: "secp256r1",
    24: "secp384r1",
    25: "secp521r1",
    29: "x25519",
    30: "x448",
    256: "ffdhe2048",
    257: "ffdhe3072",
    0x11EC: "X25519MLKEM768",
}


def cipher_name(suite: int) -> str:
    """A cipher suite by its IANA name (``TLS_AES_128_GCM_SHA256``); one not in
    the table as hex (``0x00ff``)."""
    return _CIPHER_NAMES.get(suite, f"0x{suite:04x}")


def group_name(group: int) -> str:
    """A key exchange group by its IANA name (``x25519``); else hex."""
    return _GROUP_NAMES.get(group, f"0x{group:04x}")


@dataclass(frozen=True, slots=True)
class TlsClientHello:
    """A parsed ClientHello (RFC 8446 §4.1.2). Lists keep their wire order and
    their GREASE values (RFC 8701); the fingerprints drop GREASE.

    Attributes:
        ts: when the message was complete.
        transport: ``"t"`` for TLS over TCP, ``"q"`` for QUIC (JA4's first character).
        legacy_version: the ``client_version`` field (0x0303 for TLS 1.2 and 1.3).
        session_id: the legacy session id.
        cipher_suites, compression_methods, extensions: as offered.
        server_name: the first host_name of the server_name extension.
        alpn: the offered ALPN protocol names, raw bytes (RFC 7301).
        supported_versions: the supported_versions extension (RFC 8446 §4.2.1).
        signature_algorithms, supported_groups, ec_point_formats: those extensions.
        retry: the second ClientHello, sent after a HelloRetryRequest.
    """

    ts: float
    transport: str
    legacy_version: int
    session_id: bytes
    cipher_suites: tuple[int, ...]
    compression_methods: tuple[int, ...]
    extensions: tuple[int, ...]
    server_name: str | None
    alpn: tuple[bytes, ...]
    supported_versions: tuple[int, ...]
    signature_algorithms: tuple[int, ...]
    supported_groups: tuple[int, ...]
    ec_point_formats: tuple[int, ...]
    retry: bool = False

    @property
    def version(self) -> int:
        """The highest version offered (supported_versions, else ``legacy_version``)."""
        offered = [v for v in self.supported_versions if not _fp.is_grease(v)]
        return max(offered) if offered else self.legacy_version

    @property
    def ja4(self) -> str:
        return _fp.ja4(self)

    @property
    def ja4_r(self) -> str:
        return _fp.ja4_r(self)

    @property
    def ja4_o(self) -> str:
        return _fp.ja4_o(self)

    @property
    def ja4_ro(self) -> str:
        return _fp.ja4_ro(self)

    @property
    def ja3(self) -> str:
        return _fp.ja3(self)

    @property
    def ja3_hash(self) -> str:
        return _fp.ja3_hash(self)


@dataclass(frozen=True, slots=True)
class TlsServerHello:
    """A parsed ServerHello (RFC 8446 §4.1.3), or a HelloRetryRequest.

    Attributes:
        ts: when the message was complete.
        transport: ``"t"`` or ``"q"`` as for the ClientHello.
        legacy_version: the ``server_version`` field.
        version: the negotiated version: the supported_versions extension
            (TLS 1.3), else ``legacy_version``.
        session_id: the legacy session id echoed or assigned.
        cipher_suite: the chosen cipher suite.
        compression_method: the chosen compression method.
        extensions: the extension types, in wire order.
        alpn: the chosen ALPN protocol in TLS 1.2 and earlier; ``None`` when
            none was chosen and always in TLS 1.3, where the choice travels
            encrypted in EncryptedExtensions (RFC 8446 §4.3.1).
        key_share_group: the key exchange group (TLS 1.3 key_share), if any.
        psk: the server accepted a pre-shared key (TLS 1.3 resumption).
        hello_retry_request: this is a HelloRetryRequest; another ServerHello follows.
    """

    ts: float
    transport: str
    legacy_version: int
    version: int
    session_id: bytes
    cipher_suite: int
    compression_method: int
    extensions: tuple[int, ...]
    alpn: bytes | None
    key_share_group: int | None
    psk: bool
    hello_retry_request: bool

    @property
    def version_name(self) -> str:
        return version_name(self.version)


@dataclass(frozen=True, slots=True)
class TlsEstablished:
    """The handshake completed as far as a passive observer can tell.

    TLS 1.2 and earlier: a ServerHello and a ChangeCipherSpec from each side.
    TLS 1.3: a ServerHello, then an encrypted record from the client (its
    Finished comes only after it accepted the server's flight).

    Attributes:
        ts: when the deciding record arrived.
        version: the negotiated version.
        resumed: an abbreviated handshake: TLS 1.3 with a pre-shared key; TLS
            1.2 and earlier when the server sent its ChangeCipherSpec first
            (RFC 5246 §7.3, the abbreviated handshake's order).
    """

    ts: float
    version: int
    resumed: bool

    @property
    def version_name(self) -> str:
        return version_name(self.version)


@dataclass(frozen=True, slots=True)
class TlsAlert:
    """A plaintext alert record (RFC 8446 §6): level 1 warning, 2 fatal."""

    ts: float
    direction: Direction
    level: int
    description: int


TlsRecord = TlsClientHello | TlsServerHello | TlsEstablished | TlsAlert


class _Reader:
    """Bounds-checked reads; running past the end is ``Malformed``."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise Malformed("truncated handshake message")
        b = self.data[self.pos : end]
        self.pos = end
        return b

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size))

    def vector(self, length_size: int) -> bytes:
        return self.take(self.uint(length_size))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _u16_list(data: bytes) -> tuple[int, ...]:
    if len(data) % 2:
        raise Malformed("odd-length list of 16-bit values")
    return tuple(int.from_bytes(data[i : i + 2]) for i in range(0, len(data), 2))


def _extensions(r: _Reader) -> list[tuple[int, bytes]]:
    if r.left == 0:  # SSL 3.0 / early TLS: the extensions block is optional
        return []
    block = _Reader(r.vector(2))
    exts = []
    while block.left:
        exts.append((block.uint(2), block.vector(2)))
    if r.left:
        raise Malformed("bytes after the extensions")
    return exts


def _server_name(data: bytes) -> str | None:
    # RFC 6066 §3: ServerNameList of (name_type, HostName); host_name is type 0.
    names = _Reader(_Reader(data).vector(2))
    while names.left:
        kind = names.uint(1)
        name = names.vector(2)
        if kind == 0:
            return name.decode("ascii", "backslashreplace")
    return None


def _alpn_list(data: bytes) -> tuple[bytes, ...]:
    # RFC 7301 §3.1: ProtocolNameList of 8-bit-length names.
    names = _Reader(_Reader(data).vector(2))
    out = []
    while names.left:
        out.append(names.vector(1))
    return tuple(out)


def parse_client_hello(
    body: bytes, *, ts: float, transport: str = "t", retry: bool = False
) -> TlsClientHello:
    """A ClientHello from its handshake message body (after the 4-byte header).

    Raises:
        Malformed: the body is not a well-formed ClientHello.
    """
    r = _Reader(body)
    legacy_version = r.uint(2)
    r.take(32)  # random
    session_id = r.vector(1)
    ciphers = _u16_list(r.vector(2))
    compression = tuple(r.vector(1))
    exts = _extensions(r)
    values = dict(exts)

    def field(ext_type: int, parse: Callable[[bytes], _T], default: _T) -> _T:
        # A malformed extension body loses that field, not the whole hello:
        # the fingerprints only need the extension types.
        if ext_type not in values:
            return default
        try:
            return parse(values[ext_type])
        except Malformed:
            return default

    server_name = field(_EXT_SERVER_NAME, _server_name, None)
    none: tuple[int, ...] = ()
    alpn = field(_EXT_ALPN, _alpn_list, tuple[bytes, ...]())
    versions = field(_EXT_SUPPORTED_VERSIONS, lambda b: _u16_list(_Reader(b).vector(1)), none)
    sigs = field(_EXT_SIGNATURE_ALGORITHMS, lambda b: _u16_list(_Reader(b).vector(2)), none)
    groups = field(_EXT_SUPPORTED_GROUPS, lambda b: _u16_list(_Reader(b).vector(2)), none)
    formats = field(_EXT_EC_POINT_FORMATS, lambda b: tuple(_Reader(b).vector(1)), none)
    return TlsClientHello(
        ts, transport, legacy_version, session_id, ciphers, compression,
        tuple(t for t, _ in exts), server_name, alpn, versions, sigs, groups, formats, retry,
    )  # fmt: skip


def parse_server_hello(body: bytes, *, ts: float, transport: str = "t") -> TlsServerHello:
    """A ServerHello (or HelloRetryRequest) from its handshake message body.

    Raises:
        Malformed: the body is not a well-formed ServerHello.
    """
    r = _Reader(body)
    legacy_version = r.uint(2)
    random = r.take(32)
    session_id = r.vector(1)
    cipher = r.uint(2)
    compression = r.uint(1)
    exts = _extensions(r)
    values = dict(exts)
    version = legacy_version
    if _EXT_SUPPORTED_VERSIONS in values:
        version = _Reader(values[_EXT_SUPPORTED_VERSIONS]).uint(2)
    alpn = None
    if _EXT_ALPN in values and version < _TLS13:
        names = _alpn_list(values[_EXT_ALPN])
        alpn = names[0] if names else None
    group = None
    if _EXT_KEY_SHARE in values:
        # RFC 8446 §4.2.8: KeyShareEntry.group first, or HRR's selected_group alone.
        group = _Reader(values[_EXT_KEY_SHARE]).uint(2)
    return TlsServerHello(
        ts, transport, legacy_version, version, session_id, cipher, compression,
        tuple(t for t, _ in exts), alpn, group, _EXT_PRE_SHARED_KEY in values,
        random == _HRR_RANDOM,
    )  # fmt: skip


class HandshakeBuffer:
    """Cuts handshake messages (RFC 8446 §4: type, 24-bit length, body) out of a
    byte stream that may be split anywhere, refusing bodies over ``limit``."""

    __slots__ = ("_buf", "limit")

    def __init__(self, limit: int = MAX_HANDSHAKE) -> None:
        self._buf = bytearray()
        self.limit = limit

    def push(self, data: bytes) -> list[tuple[int, bytes]]:
        """More stream bytes; returns the (type, body) messages now complete."""
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            n = int.from_bytes(self._buf[1:4])
            if n > self.limit:
                raise Malformed(f"handshake message of {n} bytes (limit {self.limit})")
            if len(self._buf) < 4 + n:
                break
            out.append((self._buf[0], bytes(self._buf[4 : 4 + n])))
            del self._buf[: 4 + n]
        return out

    def clear(self) -> None:
        self._buf.clear()

    def __len__(self) -> int:
        return len(self._buf)


class _Side:
    """One direction's record-layer state."""

    __slots__ = ("alert", "ccs", "header", "hs", "parse_hs", "remaining", "rtype")

    def __init__(self) -> None:
        self.header = b""  # a partial 5-byte record header
        self.rtype: int | None = None  # the content type of the record being read
        self.remaining = 0  # body bytes of that record still to come
        self.hs = HandshakeBuffer()
        self.parse_hs = True  # handshake records are still plaintext we want
        self.ccs = False
        self.alert = b""


class TlsDissector(StreamDissector[TlsRecord]):
    """TLS over TCP: ``TlsClientHello``, ``TlsServerHello`` (one per
    HelloRetryRequest too), plaintext ``TlsAlert``s, then ``TlsEstablished``,
    after which the dissector is ``done``.

    Attributes:
        client_hello, server_hello: the records once seen (the last of each).
    """

    __slots__ = ("_c", "_s", "_server_ccs_first", "client_hello", "server_hello")

    proto = "tls"

    def __init__(self) -> None:
        super().__init__()
        self._c = _Side()
        self._s = _Side()
        self._server_ccs_first: bool | None = None
        self.client_hello: TlsClientHello | None = None
        self.server_hello: TlsServerHello | None = None

    def _feed(self, direction: Direction, data: bytes, now: float, out: list[TlsRecord]) -> None:
        client = direction is Direction.CLIENT_TO_SERVER
        side = self._c if client else self._s
        pos, size = 0, len(data)
        while pos < size and not self.done:
            if side.rtype is None:
                take = 5 - len(side.header)
                side.header += data[pos : pos + take]
                pos += take
                if len(side.header) < 5:
                    return
                h, side.header = side.header, b""
                if h[0] not in (_CHANGE_CIPHER_SPEC, _ALERT, _HANDSHAKE, _APPLICATION_DATA,
                                _HEARTBEAT) or h[1] != 3:  # fmt: skip
                    raise Malformed("not a TLS record header")
                side.rtype, side.remaining = h[0], int.from_bytes(h[3:5])
                if side.remaining > _MAX_RECORD:
                    raise Malformed(f"record of {side.remaining} bytes")
                self._record_start(client, side, now, out)
            else:
                n = min(side.remaining, size - pos)
                self._record_body(client, side, data[pos : pos + n], now, out)
                pos += n
                side.remaining -= n
            if side.rtype is not None and side.remaining == 0:
                self._record_end(client, side, now, out)
                side.rtype = None

    @property
    def _tls13(self) -> bool:
        sh = self.server_hello
        return sh is not None and sh.version >= _TLS13 and not sh.hello_retry_request

    def _record_start(self, client: bool, side: _Side, now: float, out: list[TlsRecord]) -> None:
        rtype = side.rtype
        if client and self.client_hello is None and rtype != _HANDSHAKE:
            raise Malformed("the client's first record is not a handshake")
        if not client and self.server_hello is None and rtype not in (_HANDSHAKE, _ALERT):
            raise Malformed("the server's first record is neither a handshake nor an alert")
        if client and rtype == _APPLICATION_DATA and self._tls13:
            # The client's Finished, encrypted: it accepted the server's flight.
            sh = self.server_hello
            assert sh is not None
            self._established(now, sh.psk, out)

    def _record_body(
        self, client: bool, side: _Side, piece: bytes, now: float, out: list[TlsRecord]
    ) -> None:
        if side.rtype == _HANDSHAKE and side.parse_hs:
            for msg_type, body in side.hs.push(piece):
                if client:
                    self._client_message(msg_type, body, now, out)
                else:
                    self._server_message(msg_type, body, now, out)
                if not side.parse_hs:
                    side.hs.clear()
                    break
        elif side.rtype == _ALERT and len(side.alert) < 2:
            side.alert += piece[: 2 - len(side.alert)]

    def _record_end(self, client: bool, side: _Side, now: float, out: list[TlsRecord]) -> None:
        if side.rtype == _CHANGE_CIPHER_SPEC:
            side.ccs = True
            if self._server_ccs_first is None:
                self._server_ccs_first = not client
            sh = self.server_hello
            if (
                self._c.ccs and self._s.ccs and sh is not None
                and not sh.hello_retry_request and sh.version < _TLS13
            ):  # fmt: skip
                self._established(now, bool(self._server_ccs_first), out)
        elif side.rtype == _ALERT:
            alert, side.alert = side.alert, b""
            # After a TLS 1.2 ChangeCipherSpec, alerts are encrypted; in TLS 1.3
            # encrypted alerts travel as application_data, never as type 21.
            if len(alert) == 2 and (not side.ccs or self._tls13):
                direction = Direction.CLIENT_TO_SERVER if client else Direction.SERVER_TO_CLIENT
                out.append(TlsAlert(now, direction, alert[0], alert[1]))

    def _client_message(self, msg_type: int, body: bytes, now: float, out: list[TlsRecord]) -> None:
        if msg_type != _CLIENT_HELLO:
            if self.client_hello is None:
                raise Malformed("the client's first handshake message is not a ClientHello")
            self._c.parse_hs = False  # a second flight we do not parse
            return
        retry = self.client_hello is not None
        self.client_hello = parse_client_hello(body, ts=now, retry=retry)
        out.append(self.client_hello)
        self._c.parse_hs = False

    def _server_message(self, msg_type: int, body: bytes, now: float, out: list[TlsRecord]) -> None:
        if msg_type != _SERVER_HELLO:
            if self.server_hello is None:
                raise Malformed("the server's first handshake message is not a ServerHello")
            self._s.parse_hs = False
            return
        self.server_hello = sh = parse_server_hello(body, ts=now)
        out.append(sh)
        if sh.hello_retry_request:
            # RFC 8446 §4.1.4: the client answers with a second, plaintext ClientHello.
            self._c.parse_hs = True
            self._c.hs.clear()
        else:
            self._s.parse_hs = False

    def _established(self, now: float, resumed: bool, out: list[TlsRecord]) -> None:
        sh = self.server_hello
        assert sh is not None
        out.append(TlsEstablished(now, sh.version, resumed))
        self.done = True
