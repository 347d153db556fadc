"""Sans-IO protocol dissectors: bytes in, typed records out.

Detection (``detect``) picks a dissector by content: ``detect_stream`` on the
client's first bytes of a TCP connection (a ``StreamDetector`` keeps a copy
until it decides), ``detect_datagram`` on a UDP flow's first datagram.
"""

from __future__ import annotations

from .base import DatagramDissector, Dissector, StreamDissector
from .detect import Proto, StreamDetector, detect_datagram, detect_stream

__all__ = [
    "DatagramDissector",
    "Dissector",
    "Proto",
    "StreamDetector",
    "StreamDissector",
    "detect_datagram",
    "detect_stream",
]
