"""QUIC Initial dissector: the TLS ClientHello and ServerHello inside QUIC v1
(RFC 9000) and v2 (RFC 9369) Initial packets.

Initial packets are encrypted, but with keys anyone can derive from the
client's first Destination Connection ID (RFC 9001 §5.2): this dissector
removes header protection (§5.4), decrypts with AES-128-GCM (§5.3), walks the
frames (RFC 9000 §19: PADDING, PING, ACK, CRYPTO, CONNECTION_CLOSE), and
reassembles the CRYPTO stream (in any order, across packets and datagrams)
into the handshake messages that ``tls.parse_client_hello`` reads, with
JA4's ``q`` transport. Short-header packets and the later packet number
spaces are opaque and skipped. Once both hellos are seen, or after
``MAX_INITIALS`` Initial packets in a direction, the dissector is ``done``.

The keys come from HMAC-SHA256 (``hashlib``); the AES is cryptography's,
imported with ``_quic_crypto`` when the first Initial packet is decrypted
(about 6 ms, once), not with this module: a process that never sees QUIC
does not carry it.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Final

from .base import DatagramDissector, Direction, Malformed
from .detect import QUIC_V1, QUIC_V2
from .tls import (
    MAX_HANDSHAKE,
    HandshakeBuffer,
    TlsClientHello,
    TlsServerHello,
    parse_client_hello,
    parse_server_hello,
)

__all__ = [
    "QUIC_V1",
    "QUIC_V2",
    "InitialKeys",
    "QuicClientHello",
    "QuicDissector",
    "QuicRecord",
    "QuicServerHello",
    "initial_keys",
]

MAX_INITIALS: Final = 32  # Initial packets looked at per direction
_MAX_CRYPTO = MAX_HANDSHAKE + 4  # CRYPTO stream bytes kept per direction
_MAX_GAPS = 64  # separate CRYPTO ranges waiting for the bytes between them

# RFC 9001 §5.2 and RFC 9369 §3.3.1 / §3.3.2.
_SALTS = {
    QUIC_V1: bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
    QUIC_V2: bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
}
_LABELS = {QUIC_V1: "quic", QUIC_V2: "quicv2"}
# RFC 9000 §17.2 and RFC 9369 §3.2: long-header packet types.
_INITIAL = {QUIC_V1: 0, QUIC_V2: 1}
_RETRY = {QUIC_V1: 3, QUIC_V2: 0}


def version_name(version: int) -> str:
    """As Zeek's quic.log writes it: ``1``, ``quicv2``, else hex."""
    return {QUIC_V1: "1", QUIC_V2: "quicv2"}.get(version, f"{version:#010x}")


def _hkdf_expand_label(secret: bytes, label: str, length: int) -> bytes:
    # RFC 8446 §7.1 HKDF-Expand-Label with an empty context; one block suffices.
    full = b"tls13 " + label.encode()
    info = length.to_bytes(2) + bytes([len(full)]) + full + b"\x00"
    return hmac.digest(secret, info + b"\x01", hashlib.sha256)[:length]


@dataclass(frozen=True, slots=True)
class InitialKeys:
    """The Initial packet protection keys of one direction (RFC 9001 §5.1)."""

    key: bytes  # AES-128-GCM key
    iv: bytes  # 12-byte nonce base
    hp: bytes  # AES-128 header protection key


def initial_keys(dcid: bytes, version: int, *, client: bool) -> InitialKeys:
    """The keys protecting one side's Initial packets (RFC 9001 §5.2).

    Raises:
        KeyError: ``version`` is neither QUIC v1 nor v2.
    """
    initial_secret = hmac.digest(_SALTS[version], dcid, hashlib.sha256)  # HKDF-Extract
    secret = _hkdf_expand_label(initial_secret, "client in" if client else "server in", 32)
    label = _LABELS[version]
    return InitialKeys(
        _hkdf_expand_label(secret, f"{label} key", 16),
        _hkdf_expand_label(secret, f"{label} iv", 12),
        _hkdf_expand_label(secret, f"{label} hp", 16),
    )


@dataclass(frozen=True, slots=True)
class QuicClientHello:
    """The client's Initial: its ClientHello, with the connection's identity.

    Attributes:
        ts: when the ClientHello was complete.
        version: the QUIC version of the client's Initial packets.
        dcid: the Destination Connection ID of the client's first Initial
            (the one the Initial keys come from).
        scid: the client's Source Connection ID.
        hello: the ClientHello (``transport == "q"``; ``hello.ja4`` starts with ``q``).
    """

    ts: float
    version: int
    dcid: bytes
    scid: bytes
    hello: TlsClientHello

    @property
    def version_name(self) -> str:
        return version_name(self.version)


@dataclass(frozen=True, slots=True)
class QuicServerHello:
    """The server's Initial: its ServerHello.

    Attributes:
        ts: when the ServerHello was complete.
        version: the QUIC version of the server's Initial packets.
        scid: the server's Source Connection ID.
        hello: the ServerHello (QUIC is always TLS 1.3: ``alpn`` is ``None``).
    """

    ts: float
    version: int
    scid: bytes
    hello: TlsServerHello

    @property
    def version_name(self) -> str:
        return version_name(self.version)


QuicRecord = QuicClientHello | QuicServerHello


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    # RFC 9000 §16: the two high bits of the first byte give the length.
    if pos >= len(data):
        raise Malformed("truncated QUIC varint")
    n = 1 << (data[pos] >> 6)
    if pos + n > len(data):
        raise Malformed("truncated QUIC varint")
    value = int.from_bytes(data[pos : pos + n]) & ((1 << (8 * n - 2)) - 1)
    return value, pos + n


@dataclass(slots=True)
class _LongHeader:
    first: int
    version: int
    dcid: bytes
    scid: bytes
    pn_offset: int  # where the (protected) packet number starts
    end: int  # where the packet ends


def _long_header(d: bytes, pos: int) -> _LongHeader | None:
    """The long header at ``pos`` (RFC 9000 §17.2), or None for anything else
    (a short header, a Version Negotiation, a Retry, an unknown version)."""
    if len(d) < pos + 7 or not d[pos] & 0x80:
        return None
    first = d[pos]
    version = int.from_bytes(d[pos + 1 : pos + 5])
    if version not in _SALTS:
        return None
    p = pos + 5
    dcid = d[p + 1 : p + 1 + d[p]]
    p += 1 + d[p]
    if len(dcid) > 20 or p >= len(d):
        raise Malformed("bad QUIC connection id")
    scid = d[p + 1 : p + 1 + d[p]]
    p += 1 + d[p]
    if len(scid) > 20 or p > len(d):
        raise Malformed("bad QUIC connection id")
    ptype = (first >> 4) & 0x03
    if ptype == _RETRY[version]:
        return _LongHeader(first, version, dcid, scid, -1, len(d))
    if ptype == _INITIAL[version]:
        token_len, p = _varint(d, p)
        p += token_len
    length, p = _varint(d, p)
    if p + length > len(d):
        raise Malformed("QUIC packet longer than its datagram")
    return _LongHeader(first, version, dcid, scid, p, p + length)


def _decode_pn(truncated: int, nbits: int, largest: int) -> int:
    # RFC 9000 Appendix A.3.
    expected = largest + 1
    win = 1 << nbits
    hwin, mask = win // 2, win - 1
    candidate = (expected & ~mask) | truncated
    if candidate <= expected - hwin and candidate < (1 << 62) - win:
        return candidate + win
    if candidate > expected + hwin and candidate >= win:
        return candidate - win
    return candidate


def unprotect(
    packet: bytes, pn_offset: int, keys: InitialKeys, largest_pn: int = -1
) -> tuple[bytes, bytes, int]:
    """Remove header protection and decrypt one long-header packet.

    Returns:
        (the unprotected header, the payload, the packet number).

    Raises:
        Malformed: too short to sample.
        cryptography.exceptions.InvalidTag: these keys do not open it.
    """
    sample_at = pn_offset + 4  # RFC 9001 §5.4.2: as if the packet number had 4 bytes
    if len(packet) < sample_at + 16:
        raise Malformed("QUIC packet too short for a header protection sample")
    from ._quic_crypto import aes_ecb, aes_gcm_open  # cryptography: on the first packet

    mask = aes_ecb(keys.hp, packet[sample_at : sample_at + 16])
    first = packet[0] ^ (mask[0] & 0x0F)  # long header: the low four bits
    pn_len = (first & 0x03) + 1
    pn_bytes = bytes(
        b ^ m for b, m in zip(packet[pn_offset : pn_offset + pn_len], mask[1:], strict=False)
    )
    header = bytes([first]) + packet[1:pn_offset] + pn_bytes
    pn = _decode_pn(int.from_bytes(pn_bytes), 8 * pn_len, largest_pn)
    nonce = (int.from_bytes(keys.iv) ^ pn).to_bytes(12)  # RFC 9001 §5.3
    payload = aes_gcm_open(keys.key, nonce, packet[pn_offset + pn_len :], header)
    return header, payload, pn


def crypto_frames(payload: bytes) -> list[tuple[int, bytes]]:
    """The (offset, data) of each CRYPTO frame in an Initial packet's payload.

    Stops at CONNECTION_CLOSE or at a frame type an Initial packet may not
    carry (RFC 9000 §12.4, Table 3).
    """
    out = []
    pos, n = 0, len(payload)
    while pos < n:
        ftype = payload[pos]
        pos += 1
        if ftype in (0x00, 0x01):  # PADDING, PING
            continue
        if ftype in (0x02, 0x03):  # ACK (§19.3)
            _, pos = _varint(payload, pos)  # largest acknowledged
            _, pos = _varint(payload, pos)  # ack delay
            ranges, pos = _varint(payload, pos)
            _, pos = _varint(payload, pos)  # first range
            for _ in range(2 * ranges + (3 if ftype == 0x03 else 0)):
                _, pos = _varint(payload, pos)
        elif ftype == 0x06:  # CRYPTO (§19.6)
            offset, pos = _varint(payload, pos)
            length, pos = _varint(payload, pos)
            if pos + length > n:
                raise Malformed("CRYPTO frame past the packet's end")
            out.append((offset, payload[pos : pos + length]))
            pos += length
        else:
            break
    return out


class _CryptoStream:
    """A CRYPTO stream reassembled from frames in any order, within a cap."""

    __slots__ = ("buf", "delivered", "ranges")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ranges: list[tuple[int, int]] = []  # received [start, end), merged, sorted
        self.delivered = 0  # bytes handed out as contiguous

    def add(self, offset: int, data: bytes) -> bytes:
        """Store one frame; returns the newly contiguous bytes."""
        end = offset + len(data)
        if end > _MAX_CRYPTO:
            raise Malformed("QUIC CRYPTO stream beyond the ClientHello limit")
        if not data or end <= self.delivered:
            return b""
        if len(self.buf) < end:
            self.buf += bytes(end - len(self.buf))
        self.buf[offset:end] = data
        merged: list[tuple[int, int]] = []
        for s, e in sorted([*self.ranges, (offset, end)]):
            if merged and s <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], e))
            else:
                merged.append((s, e))
        if len(merged) > _MAX_GAPS:
            raise Malformed("QUIC CRYPTO stream too fragmented")
        self.ranges = merged
        if merged[0][0] != 0 or merged[0][1] <= self.delivered:
            return b""
        start, self.delivered = self.delivered, merged[0][1]
        return bytes(self.buf[start : self.delivered])


class _Side:
    __slots__ = ("crypto", "done", "hs", "initials", "largest_pn")

    def __init__(self) -> None:
        self.crypto = _CryptoStream()
        self.hs = HandshakeBuffer()
        self.largest_pn = -1
        self.initials = 0
        self.done = False


class QuicDissector(DatagramDissector[QuicRecord]):
    """QUIC over UDP: ``QuicClientHello`` and ``QuicServerHello``."""

    __slots__ = ("_c", "_dcid", "_keys", "_retry_scid", "_s", "_scid", "client_version")

    proto = "quic"

    def __init__(self) -> None:
        super().__init__()
        self._c = _Side()
        self._s = _Side()
        self._dcid: bytes | None = None  # the client's first Destination Connection ID
        self._scid = b""
        self._retry_scid: bytes | None = None
        self._keys: dict[tuple[bytes, int, bool], InitialKeys] = {}
        self.client_version: int | None = None

    def _keys_for(self, dcid: bytes, version: int, client: bool) -> InitialKeys:
        k = (dcid, version, client)
        if k not in self._keys:
            if len(self._keys) >= 8:
                self._keys.clear()
            self._keys[k] = initial_keys(dcid, version, client=client)
        return self._keys[k]

    def _datagram(
        self, direction: Direction, data: bytes, now: float, out: list[QuicRecord]
    ) -> None:
        client = direction is Direction.CLIENT_TO_SERVER
        side = self._c if client else self._s
        pos = 0
        while pos < len(data) and not side.done:
            h = _long_header(data, pos)
            if h is None:
                return  # a short header, or nothing we can read: the rest is opaque
            start, pos = pos, h.end
            if h.pn_offset < 0:  # Retry (RFC 9000 §17.2.5): new keys from its SCID
                if not client:
                    self._retry_scid = h.scid
                return
            if (h.first >> 4) & 0x03 != _INITIAL[h.version]:
                continue
            if client and self._dcid is None:
                self._dcid, self._scid, self.client_version = h.dcid, h.scid, h.version
            if self._dcid is None:
                continue  # a server Initial before any client Initial: no keys
            side.initials += 1
            if side.initials > MAX_INITIALS:
                side.done = True
                break
            self._initial(client, side, h, data[start : h.end], h.pn_offset - start, now, out)
        if self._c.done and self._s.done:
            self.done = True

    def _initial(
        self, client: bool, side: _Side, h: _LongHeader, packet: bytes, pn_offset: int,
        now: float, out: list[QuicRecord],
    ) -> None:  # fmt: skip
        assert self._dcid is not None
        from ._quic_crypto import InvalidTag

        # The keys come from the client's first DCID, or a Retry's SCID once the
        # server sent one (RFC 9001 §5.2); try the packet's own DCID last.
        candidates = [self._dcid]
        if self._retry_scid is not None:
            candidates.insert(0, self._retry_scid)
        if client and h.dcid not in candidates:
            candidates.append(h.dcid)
        for dcid in candidates:
            keys = self._keys_for(dcid, h.version, client)
            try:
                _, payload, pn = unprotect(packet, pn_offset, keys, side.largest_pn)
            except InvalidTag:
                continue
            side.largest_pn = max(side.largest_pn, pn)
            break
        else:
            return  # not ours to read (corrupt, or keys we cannot know)
        for offset, chunk in crypto_frames(payload):
            fresh = side.crypto.add(offset, chunk)
            if not fresh:
                continue
            for msg_type, body in side.hs.push(fresh):
                self._message(client, side, h, msg_type, body, now, out)
                if side.done:
                    return

    def _message(
        self, client: bool, side: _Side, h: _LongHeader, msg_type: int, body: bytes,
        now: float, out: list[QuicRecord],
    ) -> None:  # fmt: skip
        if client:
            if msg_type != 1:
                raise Malformed("the client's first QUIC handshake message is not a ClientHello")
            assert self._dcid is not None and self.client_version is not None
            hello = parse_client_hello(body, ts=now, transport="q")
            out.append(QuicClientHello(now, self.client_version, self._dcid, self._scid, hello))
        else:
            if msg_type != 2:
                raise Malformed("the server's first QUIC handshake message is not a ServerHello")
            out.append(QuicServerHello(now, h.version, h.scid, parse_server_hello(
                body, ts=now, transport="q")))  # fmt: skip
        side.done = True
