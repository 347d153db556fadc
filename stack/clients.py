"""Per-client accounting: who holds what of the Stack's shared limits.

Theory of operation: every limit of the Stack (TCP flows, pending connection
requests, the new-connection rate, UDP and echo flows, fragment bytes, buffer
memory) is a pool shared by all clients, so without more one client can take
it all and every other is refused. ``ClientTable`` keeps, per client, what it
holds, and the Stack asks it before it takes anything from a pool; each quota
(``ClientQuotas``) is a fraction of the pool. It lives in the sans-IO stack
because the stack decides on SYNs and on new datagram flows: the relay only
hears of the flows that were let in.

A client is an IPv4 address or an IPv6 prefix (``client_key``): one IPv6
subscriber has a /64 and may use any address in it. Entries exist only while
the client holds something, so the table is as large as the flows, never
larger. The refusals are counted per reason (``ClientStats``) and per client
in a bounded "space-saving" table (Metwally et al. 2005): at most ``top``
clients, a newcomer replacing the one with the fewest refusals and inheriting
its count, so a client that keeps being refused stays in the table whatever
the number of spoofed addresses around it.

Rates are token buckets (``TokenBucket``): a steady rate with a burst, filled
lazily from the ``now`` the caller passes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from stack.config import ClientQuotas
from stack.tcp.buffers import MemoryBudget

__all__ = [
    "ClientBudget",
    "ClientState",
    "ClientStats",
    "ClientTable",
    "TokenBucket",
    "client_key",
    "describe_client",
]

# Refusal reasons, the keys of ClientStats.refused and of each client's counts.
TCP_FLOWS = "tcp_flows"  # the client's TCP connections: SYN answered with RST
PENDING = "pending"  # the client's pending requests: its oldest one reset
CONNECT_RATE = "connect_rate"  # the client's new-connection bucket: SYN dropped
CONNECT_RATE_ALL = "connect_rate_all"  # the Stack's new-connection bucket: SYN dropped
DESTINATION = "destination_pending"  # pending requests toward one address: SYN dropped
UDP_FLOWS = "udp_flows"  # a new UDP flow: dropped (the stack's ICMP would be spoofable)
ECHO_FLOWS = "echo_flows"  # a new echo flow: dropped
FRAGMENTS = "fragments"  # the client's fragment bytes: fragment dropped
REASONS = (
    TCP_FLOWS, PENDING, CONNECT_RATE, CONNECT_RATE_ALL, DESTINATION, UDP_FLOWS, ECHO_FLOWS,
    FRAGMENTS,
)  # fmt: skip


def client_key(addr: bytes, prefix_v6: int = 64) -> bytes:
    """The client a raw source address belongs to: the IPv4 address itself, or
    the IPv6 address's first ``prefix_v6`` bits (never 4 bytes long, so the two
    families never collide)."""
    if len(addr) == 4:
        return addr
    if prefix_v6 == 64:
        return addr[:8]
    full, rest = divmod(prefix_v6, 8)
    if not rest:
        return addr[:full] + b"/"  # the suffix keeps a /32 apart from an IPv4 key
    return addr[:full] + bytes([addr[full] & (0xFF << (8 - rest)) & 0xFF]) + b"/"


def describe_client(key: bytes, prefix_v6: int = 64) -> str:
    """``198.18.0.5`` or ``fd00:1::/64`` for a ``client_key``."""
    if len(key) == 4:
        return str(ipaddress.IPv4Address(key))
    raw = key[:-1] if key.endswith(b"/") and prefix_v6 != 64 else key
    return f"{ipaddress.IPv6Address(raw.ljust(16, bytes(1)))}/{prefix_v6}"


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; starts full."""

    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: int, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.at = now

    def ready(self, now: float) -> bool:
        """Refill up to ``now``; whether a token is there (not taken)."""
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
        return self.tokens >= 1.0

    def take(self, now: float) -> bool:
        """Take a token if there is one."""
        if self.ready(now):
            self.tokens -= 1.0
            return True
        return False


class ClientBudget(MemoryBudget):
    """A client's share of the Stack's buffer budget: a reservation must fit both."""

    __slots__ = ("parent",)

    def __init__(self, limit: int, parent: MemoryBudget) -> None:
        super().__init__(limit)
        self.parent = parent

    def reserve(self, want: int) -> int:
        grant = self.parent.reserve(min(want, self.limit - self.used))
        self.used += grant
        return grant

    def force(self, n: int) -> None:
        self.used += n
        self.parent.force(n)

    def release(self, n: int) -> None:
        self.used -= n
        self.parent.release(n)

    @property
    def over(self) -> bool:
        return self.used > self.limit or self.parent.over


class ClientState:
    """What one client holds now."""

    __slots__ = ("bucket", "budget", "echo", "fragment_bytes", "key", "pending", "tcp", "udp")

    def __init__(
        self, key: bytes, quotas: ClientQuotas, parent: MemoryBudget, now: float,
        bucket: TokenBucket | None = None,
    ) -> None:  # fmt: skip
        self.key = key
        self.tcp = 0  # TCP connections in the Stack's table, any state
        # Connections awaiting the caller's accept/reject, oldest first (an
        # insertion-ordered dict as an ordered set; the values are unused).
        self.pending: dict[object, None] = {}
        self.udp = 0
        self.echo = 0
        self.fragment_bytes = 0
        self.bucket = bucket or TokenBucket(quotas.connects_per_second, quotas.connect_burst, now)
        self.budget = ClientBudget(quotas.memory, parent)

    @property
    def idle(self) -> bool:
        """Holds nothing (its bucket full again is not required: see ``ClientTable``)."""
        return not (self.tcp or self.pending or self.udp or self.echo or self.fragment_bytes)


@dataclass(slots=True)
class ClientStats:
    """Refusals per reason (every one also counted for its client in ``top``)."""

    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    clients: int = 0  # clients holding something now


class ClientTable:
    """Per-client state and refusal counts; see the module docstring.

    A client's entry goes when it holds nothing; its token bucket, if not full,
    is kept in a bounded table of recent buckets (``RECENT``, oldest dropped) and
    given back when the client returns. Otherwise a client whose requests are
    refused at once upstream (so it holds nothing between two SYNs) would start
    every SYN with a full bucket.
    """

    RECENT = 4096

    def __init__(self, quotas: ClientQuotas, budget: MemoryBudget) -> None:
        self.quotas = quotas
        self.stats = ClientStats()
        self._budget = budget
        self._clients: dict[bytes, ClientState] = {}
        self._top: dict[bytes, int] = {}  # space-saving: client key -> refusals (over-estimate)
        self._recent: dict[bytes, TokenBucket] = {}  # buckets of clients gone idle, oldest first

    def __len__(self) -> int:
        return len(self._clients)

    def key(self, addr: bytes) -> bytes:
        return client_key(addr, self.quotas.prefix_v6)

    def get(self, addr: bytes, now: float) -> ClientState:
        """The client ``addr`` belongs to, created if it holds nothing yet."""
        key = client_key(addr, self.quotas.prefix_v6)
        c = self._clients.get(key)
        if c is None:
            bucket = self._recent.pop(key, None)
            c = self._clients[key] = ClientState(key, self.quotas, self._budget, now, bucket)
            self.stats.clients = len(self._clients)
        return c

    def peek(self, addr: bytes) -> ClientState | None:
        return self._clients.get(client_key(addr, self.quotas.prefix_v6))

    def done(self, c: ClientState) -> None:
        """Forget ``c`` if it holds nothing any more."""
        if c.idle and self._clients.get(c.key) is c:
            del self._clients[c.key]
            self.stats.clients = len(self._clients)
            bucket = c.bucket
            if bucket.tokens < bucket.burst:  # (a full one is what a newcomer gets)
                recent = self._recent
                if len(recent) >= self.RECENT:
                    del recent[next(iter(recent))]
                recent[c.key] = bucket

    def refuse(self, c: ClientState | bytes, reason: str) -> None:
        """Count one refusal of ``reason`` for the client (a state or a key)."""
        key = c if isinstance(c, bytes) else c.key
        self.stats.refused[reason] += 1
        top = self._top
        n = top.get(key)
        if n is not None:
            top[key] = n + 1
        elif len(top) < self.quotas.top:
            top[key] = 1
        else:
            low = min(top, key=top.__getitem__)
            top[key] = top.pop(low) + 1

    def top_refused(self, n: int = 5) -> list[tuple[str, int]]:
        """The ``n`` clients refused most (counts are upper bounds once the table
        has been full), for the stats line."""
        best = sorted(self._top.items(), key=lambda kv: -kv[1])[:n]
        return [(describe_client(k, self.quotas.prefix_v6), v) for k, v in best]
