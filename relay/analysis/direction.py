"""``Direction``: which side of a flow bytes or a record came from.

Its own module so that the dissectors (``relay.analysis.dissect``) and the
analyzer API (``relay.analysis.hooks``, which names the dissectors' records in
its signatures) can both use it without importing each other.
"""

from __future__ import annotations

import enum

__all__ = ["Direction"]


class Direction(enum.Enum):
    CLIENT_TO_SERVER = "c2s"
    SERVER_TO_CLIENT = "s2c"
