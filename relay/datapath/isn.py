"""Initial sequence numbers, RFC 6528.

ISN = M + F(localip, localport, remoteip, remoteport, secretkey), where M is a
clock ticking every 4 microseconds and F a keyed hash. The clock keeps ISNs of
successive incarnations of one 4-tuple moving forward (RFC 9293 3.4.1); the
hash makes them unguessable for anyone who does not know the key (off-path
injection, RFC 6528 3). The stack is sans-IO, so the relay computes the ISN and
passes it to ``Stack.accept(flow, isn=...)``.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable

from stack import FlowId

__all__ = ["IsnGenerator"]

_MASK = (1 << 32) - 1


class IsnGenerator:
    """Callable ``(flow) -> isn`` following RFC 6528.

    Args:
        key: the secret (16..32 bytes); a fresh random one per process when
            omitted (RFC 6528 3: at least 128 bits).
        clock_ns: a monotonic nanosecond clock, for tests.
    """

    __slots__ = ("_clock_ns", "_key")

    def __init__(
        self, key: bytes | None = None, *, clock_ns: Callable[[], int] = time.monotonic_ns
    ) -> None:
        if key is None:
            key = secrets.token_bytes(32)
        if not 16 <= len(key) <= 32:  # BLAKE2s keys are at most 32 bytes
            raise ValueError("ISN key must be 16..32 bytes")
        self._key = key
        self._clock_ns = clock_ns

    def __call__(self, flow: FlowId) -> int:
        # Local = the address the relay answers for (the original destination).
        tup = f"{flow.server_ip}|{flow.server_port}|{flow.client_ip}|{flow.client_port}"
        # BLAKE2s in keyed mode is a MAC: the RFC's suggested MD5 with a stronger hash.
        f = hashlib.blake2s(tup.encode(), key=self._key, digest_size=4, salt=b"tcp-isn")
        m = self._clock_ns() // 4000  # RFC 6528 3: a 4 microsecond timer
        return (m + int.from_bytes(f.digest(), "big")) & _MASK
