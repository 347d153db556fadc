"""AES for QUIC Initial packets, on cryptography's OpenSSL bindings.

``quic.py`` imports this module when it first decrypts an Initial packet,
not before, so that a worker that never sees QUIC does not load cryptography
(its Rust extension: about 1 MiB of heap and 5 MiB of file pages per
process). The import then costs about 6 ms, once.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["InvalidTag", "aes_ecb", "aes_gcm_open"]


def aes_ecb(key: bytes, block: bytes) -> bytes:
    """One block encrypted with AES-ECB: a header protection mask (RFC 9001 §5.4.3)."""
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(block)


def aes_gcm_open(key: bytes, nonce: bytes, data: bytes, aad: bytes) -> bytes:
    """``data`` decrypted and authenticated with AES-GCM (RFC 9001 §5.3).

    Raises:
        InvalidTag: ``key`` does not open it.
    """
    return AESGCM(key).decrypt(nonce, data, aad)
