"""Built-in analyzers.

``StreamDigest`` (``relay.analyzers:StreamDigest``) records, per finished flow,
the SHA-256 and byte count of each direction as one JSON line: a cheap way for
an operator (or a test) to prove what the relay carried without storing it.
The analyzers in ``relay.analyzers.testing`` misbehave on purpose and exist for
the isolation tests.
"""

from __future__ import annotations

from relay.analyzers.digest import DIGEST_LOG_ENV, StreamDigest, digest_record

__all__ = ["DIGEST_LOG_ENV", "StreamDigest", "digest_record"]
