"""TLS client fingerprints: JA4 (FoxIO) and JA3 (Salesforce).

JA4, from the FoxIO specification (technical_details/JA4.md)::

    JA4_a: protocol (t TCP, q QUIC), 2-character TLS version (highest
           supported_versions entry, else the ClientHello version), d/i (SNI
           extension present or not), 2-digit cipher and extension counts
           (capped at 99), first and last character of the first ALPN value
    JA4_b: sha256 of the sorted cipher list, 12 hex characters
    JA4_c: sha256 of the sorted extension list without SNI (0000) and ALPN
           (0010), then "_" and the signature algorithms in their order

Every list is 4-digit lower-case hex, comma-separated, GREASE values removed
(RFC 8701). An empty cipher or extension list hashes to twelve zeros.
``ja4_r`` shows the lists instead of hashes; ``ja4_o`` and ``ja4_ro`` keep the
original order and the SNI and ALPN extensions.

JA3: ``SSLVersion,Ciphers,Extensions,EllipticCurves,EllipticCurvePointFormats``
in decimal, values joined by "-", GREASE removed; ``ja3_hash`` is its MD5.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

__all__ = ["ClientHelloFields", "is_grease", "ja3", "ja3_hash", "ja4", "ja4_o", "ja4_r", "ja4_ro"]

_SNI = 0x0000
_ALPN = 0x0010
_SUPPORTED_VERSIONS = 0x002B

_VERSIONS = {
    0x0304: "13",
    0x0303: "12",
    0x0302: "11",
    0x0301: "10",
    0x0300: "s3",
    0x0002: "s2",
    0xFEFF: "d1",
    0xFEFD: "d2",
    0xFEFC: "d3",
}
_EMPTY = "000000000000"


class ClientHelloFields(Protocol):
    """The ClientHello fields a fingerprint reads (``TlsClientHello`` has them)."""

    @property
    def transport(self) -> str: ...  # "t" (TLS over TCP) or "q" (QUIC)
    @property
    def legacy_version(self) -> int: ...
    @property
    def cipher_suites(self) -> Sequence[int]: ...
    @property
    def extensions(self) -> Sequence[int]: ...
    @property
    def supported_versions(self) -> Sequence[int]: ...
    @property
    def signature_algorithms(self) -> Sequence[int]: ...
    @property
    def alpn(self) -> Sequence[bytes]: ...
    @property
    def supported_groups(self) -> Sequence[int]: ...
    @property
    def ec_point_formats(self) -> Sequence[int]: ...


def is_grease(value: int) -> bool:
    """RFC 8701 §2: 0x0A0A, 0x1A1A, ... 0xFAFA."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


def _clean(values: Sequence[int]) -> list[int]:
    return [v for v in values if not is_grease(v)]


def _hex(values: Sequence[int]) -> str:
    return ",".join(f"{v:04x}" for v in values)


def _sha12(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _alnum(byte: int) -> bool:
    return 0x30 <= byte <= 0x39 or 0x41 <= byte <= 0x5A or 0x61 <= byte <= 0x7A


def _alpn_chars(alpn: Sequence[bytes]) -> str:
    if not alpn or not alpn[0]:
        return "00"
    first = alpn[0]
    if _alnum(first[0]) and _alnum(first[-1]):
        return chr(first[0]) + chr(first[-1])
    # Not alphanumeric: the first and last characters of the value's hex.
    h = first.hex()
    return h[0] + h[-1]


def _version(h: ClientHelloFields) -> str:
    version = h.legacy_version
    if _SUPPORTED_VERSIONS in h.extensions:
        offered = _clean(h.supported_versions)
        if offered:
            version = max(offered)
    return _VERSIONS.get(version, "00")


def _ja4_a(h: ClientHelloFields) -> str:
    sni = "d" if _SNI in h.extensions else "i"
    ciphers = min(len(_clean(h.cipher_suites)), 99)
    exts = min(len(_clean(h.extensions)), 99)
    return f"{h.transport}{_version(h)}{sni}{ciphers:02d}{exts:02d}{_alpn_chars(h.alpn)}"


def _parts(h: ClientHelloFields, original: bool) -> tuple[str, str, str]:
    ciphers = _clean(h.cipher_suites)
    exts = _clean(h.extensions)
    if not original:
        ciphers.sort()
        exts = sorted(e for e in exts if e not in (_SNI, _ALPN))
    return _hex(ciphers), _hex(exts), _hex(_clean(h.signature_algorithms))


def _fingerprint(h: ClientHelloFields, *, original: bool, raw: bool) -> str:
    ciphers, exts, sigs = _parts(h, original)
    c = f"{exts}_{sigs}" if sigs else exts
    if raw:
        return f"{_ja4_a(h)}_{ciphers}_{c}"
    return f"{_ja4_a(h)}_{_sha12(ciphers) if ciphers else _EMPTY}_{_sha12(c) if exts else _EMPTY}"


def ja4(h: ClientHelloFields) -> str:
    """The JA4 fingerprint, e.g. ``t13d1516h2_8daaf6152771_e5627efa2ab1``."""
    return _fingerprint(h, original=False, raw=False)


def ja4_r(h: ClientHelloFields) -> str:
    """JA4 with the sorted lists in place of their hashes."""
    return _fingerprint(h, original=False, raw=True)


def ja4_o(h: ClientHelloFields) -> str:
    """JA4 over the lists in their original order, SNI and ALPN included."""
    return _fingerprint(h, original=True, raw=False)


def ja4_ro(h: ClientHelloFields) -> str:
    """``ja4_o`` with the lists in place of their hashes."""
    return _fingerprint(h, original=True, raw=True)


def ja3(h: ClientHelloFields) -> str:
    """The JA3 string, e.g. ``771,4865-4866,0-23-65281,29-23,0``."""
    fields = (
        [h.legacy_version],
        _clean(h.cipher_suites),
        _clean(h.extensions),
        _clean(h.supported_groups),
        list(h.ec_point_formats),
    )
    return ",".join("-".join(str(v) for v in f) for f in fields)


def ja3_hash(h: ClientHelloFields) -> str:
    """MD5 of the JA3 string, in hex."""
    return hashlib.md5(ja3(h).encode(), usedforsecurity=False).hexdigest()
