"""Analyzer API (v1) and the chain that runs analyzers with isolation.

Theory of operation: an analyzer is any object with some of the async methods
of ``Analyzer``. ``AnalyzerChain`` looks the methods up once, at registration,
and keeps a list of bound methods per hook: ``flow_start``, ``data``,
``flow_end``, and one per record of the protocol dissectors
(``RECORD_HOOKS``: ``tls_clienthello``, ``http_request``, ``dns_query``...,
run by the data path with each record as soon as it is complete, see
``relay.datapath.dissection``). Each flow gets a ``FlowHooks`` from
``AnalyzerChain.open()``, which remembers the analyzers detached *for that
flow*. The hooks run inside the flow's own tasks (the pumps), so a slow
analyzer delays only its own flow: the bytes are reported ``consumed`` to the
stack only after the analyzers and the upstream write, which closes that
flow's TCP window and no other.

Inline control: ``data`` may return replacement bytes (or ``b""``) or
``Verdict.RESET``, and the record hooks of ``VERDICT_HOOKS`` may return
``Verdict.RESET`` or a ``Block`` (the relay answers in the server's place);
``FlowHooks.data`` chains the rewrites and returns the very object it was
given when nothing changed, so the flows can keep their unchanged path.

An analyzer exception never leaves ``FlowHooks``: it is logged with the flow
and a traceback, and the analyzer gets no more calls for that flow (not even
``flow_end``). With ``fail_closed`` the methods report the failure to the flow
instead, which aborts (or rejects) the connection. Cancellation
(``trio.Cancelled`` is a ``BaseException``) passes through untouched. A hook
that raises ``Detach`` is detached the same way, quietly: no log, no error,
never fail-closed (the stream adapter of ``relay.analysis.streams`` leaves a
flow so).

End of a direction: an analyzer may have a *sync* ``data_finished(flow,
direction)``, called once that direction's sender finished (TCP: its FIN, after
the last ``data`` call of that direction). It runs in the packet loop or the
flow's task, so it must only note the fact; ``relay.analysis.streams`` uses it
for its end of stream.
"""

from __future__ import annotations

import enum
import inspect
import logging
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from relay.analysis.direction import Direction
from relay.analysis.ratelimit import RateLimitedLog
from stack import FlowId

if TYPE_CHECKING:
    from relay.analysis.dissect import (
        DnsQuery,
        DnsTransaction,
        HttpRequest,
        HttpResponse,
        HttpTransaction,
        QuicClientHello,
        QuicServerHello,
        TlsAlert,
        TlsClientHello,
        TlsEstablished,
        TlsServerHello,
    )

__all__ = [
    "RECORD_HOOKS",
    "VERDICT_HOOKS",
    "Analyzer",
    "AnalyzerChain",
    "Block",
    "Detach",
    "Direction",
    "EndReason",
    "FlowEnd",
    "FlowHooks",
    "FlowInfo",
    "Halt",
    "Stop",
    "Verdict",
    "new_uid",
]

log = logging.getLogger(__name__)

_UID_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def new_uid() -> str:
    """A Zeek-style connection uid: "C" and 17 random base-62 characters (~101 bits)."""
    n = int.from_bytes(secrets.token_bytes(16))  # one random draw, not 17
    chars = []
    for _ in range(17):
        n, r = divmod(n, 62)
        chars.append(_UID_ALPHABET[r])
    return "C" + "".join(chars)


class Verdict(enum.Enum):
    """What an analyzer decides; returning ``None`` means ``ALLOW``.

    ``flow_start`` may return ``REJECT``; ``data`` and the record hooks of
    ``VERDICT_HOOKS`` may return ``RESET``.
    """

    ALLOW = "allow"
    # As from a closed port: TCP gets an RST; UDP gets ICMP port unreachable for each
    # datagram until the flow idles out; echo gets ICMP administratively prohibited.
    REJECT = "reject"
    # Mid-flow: TCP resets both sides (RST to the client, the upstream socket closed
    # with SO_LINGER 0); UDP drops the datagram and refuses the flow (ICMP port
    # unreachable) until it idles out. The bytes or datagram judged are not forwarded.
    RESET = "reset"


@dataclass(frozen=True, slots=True)
class Block:
    """A record hook's verdict (``VERDICT_HOOKS``): the relay answers in the
    server's place. The bytes or datagram that completed the record never go
    upstream.

    TCP: a non-empty ``reply`` is sent to the client, then the relay closes the
    connection (FIN to the client, the upstream socket closed without having
    sent anything more); an empty ``reply`` resets both sides instead. UDP:
    ``reply``, if any, is sent to the client as one datagram; then the flow is
    refused silently until it idles out, or with ``keep_open`` goes on (the
    next datagrams are judged again). Either way the flow ends ``blocked``
    with ``rule`` in ``FlowEnd.rule``.
    """

    rule: str  # logged as the flow's "rule", e.g. "block-domain *.example.com"
    reply: bytes = b""
    keep_open: bool = False


class Detach(Exception):
    """Raised by a hook: leave this analyzer out of this flow from now on (no
    more calls, ``flow_end`` included), quietly and whatever ``fail_closed`` says."""


class Halt(enum.Enum):
    """``FlowHooks``' answer when an analyzer failed and the chain is fail-closed."""

    FAILED = "failed"


class EndReason(enum.StrEnum):
    """How a flow ended (``FlowEnd.how``, the flow log's ``ended``).

    From the stack's ``CloseReason``: ``fin``, ``rst``, ``timeout``, ``idle``,
    ``limit``, ``aborted``. From the relay: ``denied`` (the egress policy, see
    ``relay.datapath.egress``; ``FlowEnd.rule`` names the rule), ``rejected`` (an analyzer's
    verdict), ``refused`` (upstream RST: ECONNREFUSED), ``unreachable``
    (EHOSTUNREACH, ENETUNREACH, EACCES, EPERM: relayed as ICMP),
    ``connect_timeout`` (relayed as silence), ``error`` (any other upstream
    socket error), ``shutdown`` (the relay stopped while the flow was open),
    ``blocked`` (a record hook's ``Block``, e.g. ``--block-domain``;
    ``FlowEnd.rule`` names the rule). ``rejected`` also covers a ``RESET``
    verdict mid-flow.
    ``rst`` covers a reset from either side: the client's, or the server's
    relayed to the client.
    """

    FIN = "fin"
    RST = "rst"
    TIMEOUT = "timeout"
    IDLE = "idle"
    LIMIT = "limit"
    ABORTED = "aborted"
    DENIED = "denied"
    REJECTED = "rejected"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    CONNECT_TIMEOUT = "connect_timeout"
    ERROR = "error"
    SHUTDOWN = "shutdown"
    BLOCKED = "blocked"


@dataclass(frozen=True, slots=True)
class FlowInfo:
    """What an analyzer knows about a flow; the same object for every call."""

    uid: str  # Zeek-style short random id, unique per flow
    proto: str  # "tcp", "udp" or "icmp" (echo: client_port is the echo identifier)
    client_ip: str
    client_port: int
    server_ip: str  # the original destination the client addressed
    server_port: int
    start: float  # wall clock, time.time()
    version: int  # 4 or 6

    @classmethod
    def from_flow(cls, flow: FlowId, *, proto: str = "tcp") -> FlowInfo:
        return cls(
            new_uid(), proto, flow.client_ip, flow.client_port,
            flow.server_ip, flow.server_port, time.time(), flow.version,
        )  # fmt: skip

    def describe(self) -> str:
        """``uid proto [client]:port -> [server]:port``, for log lines."""
        return (
            f"{self.uid} {self.proto} [{self.client_ip}]:{self.client_port}"
            f" -> [{self.server_ip}]:{self.server_port}"
        )


@dataclass(frozen=True, slots=True)
class FlowEnd:
    """How a flow ended and how much it carried.

    ``history`` is Zeek's conn.log history of the flow, built from what the relay
    saw of each side (``relay.analysis.zeeklog`` documents the letters): e.g.
    ``"ShADdFf"`` for a TCP connection with data both ways and FINs both ways.
    ``services`` are the protocols the dissectors confirmed (Zeek's names:
    ``ssl``, ``http``, ``dns``, ``quic``); empty unless some analyzer has a
    record hook (dissection is off otherwise).
    """

    how: EndReason
    bytes_c2s: int  # payload bytes the client sent (and the relay received)
    bytes_s2c: int  # payload bytes the server sent (and the relay received)
    duration: float  # seconds from the client's SYN to the end
    rule: str | None = (
        None  # "denied": the egress rule, e.g. "default:loopback"; "blocked": the Block's
    )
    packets_c2s: int = 0  # packets from the client (TCP: on its connection; UDP: datagrams)
    packets_s2c: int = 0  # packets to the client (the same)
    history: str = ""
    services: tuple[str, ...] = ()
    # Payload bytes sent on, after the analyzers' rewrites and drops: to the server,
    # and to the client (a relay's own answer, e.g. a Block's reply, included).
    forwarded_c2s: int = 0
    forwarded_s2c: int = 0


class Analyzer(Protocol):
    """The analyzer API. Every method is optional: implement the ones you need.

    (A ``Protocol`` cannot mark methods optional; this one documents the
    signatures, and ``AnalyzerChain`` accepts any object.)
    """

    async def flow_start(self, flow: FlowInfo) -> Verdict | None:
        """A client asked for a connection (or sent a UDP flow's or echo flow's first
        datagram); any ``REJECT`` refuses it (see ``Verdict``)."""
        ...

    async def data(
        self, flow: FlowInfo, direction: Direction, data: bytes
    ) -> bytes | Verdict | None:
        """The next bytes of one direction, in order (UDP: one datagram).

        Returns ``None`` to forward them as they are, ``bytes`` to forward these
        instead (longer, shorter, or ``b""`` to drop them), or ``Verdict.RESET``.
        The next analyzer sees what this one returned. Taking long backpressures
        this flow only."""
        ...

    async def flow_end(self, flow: FlowInfo, end: FlowEnd) -> None:
        """The flow is over (also for rejected flows). Called shielded, with a time limit.

        A flow the egress policy denied gets only this call (``end.how`` "denied"):
        the policy decides before the analyzers are asked."""
        ...

    def data_finished(self, flow: FlowInfo, direction: Direction) -> None:
        """Sync: that direction's sender finished (TCP: its FIN), after its last
        ``data``. It runs in the packet loop or the flow's task: note it, never wait."""
        ...

    # Records of the protocol dissectors (relay.analysis.dissect). The protocol is
    # detected by content, never by port; each hook runs as soon as its record is
    # complete, in the flow's task. A record the client's bytes completed is seen
    # before those bytes go upstream. Having any of these hooks turns dissection
    # on (only for the protocols whose hooks exist); without them no flow pays
    # for it.

    async def tls_clienthello(
        self, flow: FlowInfo, hello: TlsClientHello
    ) -> Verdict | Block | None:
        """A TLS ClientHello over TCP: ``hello.server_name`` (SNI), ``hello.alpn``
        (offered), ``hello.ja4``, ``hello.ja3``/``ja3_hash``, the offered suites and
        versions. Again with ``hello.retry`` after a HelloRetryRequest."""
        ...

    async def tls_serverhello(self, flow: FlowInfo, hello: TlsServerHello) -> None:
        """The server's answer: ``hello.version`` (``version_name``: ``TLSv13``),
        ``hello.cipher_suite``, ``hello.alpn`` (TLS 1.2 and earlier; encrypted in
        1.3, so ``None``). Also for a HelloRetryRequest (``hello_retry_request``)."""
        ...

    async def tls_established(self, flow: FlowInfo, established: TlsEstablished) -> None:
        """The handshake completed (``established.resumed`` for an abbreviated
        one); nothing more is parsed on this connection."""
        ...

    async def tls_alert(self, flow: FlowInfo, alert: TlsAlert) -> None:
        """A plaintext alert (``level`` 2 is fatal, ``description`` the reason)."""
        ...

    async def http_request(self, flow: FlowInfo, req: HttpRequest) -> Verdict | Block | None:
        """An HTTP/1.x request whose header block is complete (before its body):
        ``method``, ``host``, ``uri``, ``user_agent``, ``headers``, ``trans_depth``."""
        ...

    async def http_response(self, flow: FlowInfo, resp: HttpResponse) -> None:
        """A final response's status line and headers (before its body)."""
        ...

    async def http_transaction(self, flow: FlowInfo, tx: HttpTransaction) -> None:
        """A request and its response, once the response ended (or the flow did):
        with both body lengths; a row of Zeek's http.log."""
        ...

    async def dns_query(self, flow: FlowInfo, q: DnsQuery) -> Verdict | Block | None:
        """A DNS query (UDP or TCP): ``query`` (the name), ``qtype_name``, ``trans_id``."""
        ...

    async def dns_answer(self, flow: FlowInfo, a: DnsTransaction) -> None:
        """A query's outcome, a row of Zeek's dns.log: ``answers``, ``ttls``,
        ``rcode_name``, ``rtt``. Also for a query that got no answer by the end
        of the flow (``a.saw_reply`` False) and a reply without a query seen."""
        ...

    async def quic_clienthello(
        self, flow: FlowInfo, hello: QuicClientHello
    ) -> Verdict | Block | None:
        """The ClientHello of a QUIC connection, decrypted from its Initial packets:
        ``hello.hello`` is the ``TlsClientHello`` (SNI, ALPN, a ``q`` JA4)."""
        ...

    async def quic_serverhello(self, flow: FlowInfo, hello: QuicServerHello) -> None:
        """The server's ServerHello from its Initial packets."""
        ...


# The record hooks, in Analyzer's order; the protocol of each is its name up to
# the first "_" (the dissectors' records map to them: relay.analysis.dissect.RECORD_HOOKS).
RECORD_HOOKS: Final = (
    "tls_clienthello",
    "tls_serverhello",
    "tls_established",
    "tls_alert",
    "http_request",
    "http_response",
    "http_transaction",
    "dns_query",
    "dns_answer",
    "quic_clienthello",
    "quic_serverhello",
)

# The record hooks whose return value counts: ``None``, ``Verdict.RESET`` or a
# ``Block``. Their records are completed by client bytes the relay still holds.
VERDICT_HOOKS: Final = frozenset(
    {"tls_clienthello", "http_request", "dns_query", "quic_clienthello"}
)

# What FlowHooks.records returns when the flow must not go on as it was.
Stop = Verdict | Block | Halt


_Hook = Callable[..., Awaitable[Any]]


def _lookup(analyzer: object, name: str) -> _Hook | None:
    fn = getattr(analyzer, name, None)
    if fn is None:
        return None
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"{analyzer!r}.{name} must be an async method")
    hook: _Hook = fn
    return hook


def _lookup_sync(analyzer: object, name: str) -> Callable[..., object] | None:
    fn = getattr(analyzer, name, None)
    if fn is None:
        return None
    if inspect.iscoroutinefunction(fn) or not callable(fn):
        raise TypeError(f"{analyzer!r}.{name} must be a plain (not async) method")
    sync: Callable[..., object] = fn
    return sync


class AnalyzerChain:
    """The registered analyzers, with their hook methods looked up once.

    Args:
        analyzers: objects implementing some of ``Analyzer``'s methods; called
            in this order.
        fail_closed: an analyzer error fails its flow instead of detaching the
            analyzer.
        on_error: called once per analyzer error (for counters).

    Raises:
        TypeError: an analyzer has a hook attribute that is not an async method.
    """

    __slots__ = (
        "_ends",
        "_finishes",
        "_starts",
        "data_hooks",
        "errors",
        "fail_closed",
        "on_error",
        "record_hooks",
        "record_protocols",
    )

    def __init__(
        self,
        analyzers: Sequence[object] = (),
        *,
        fail_closed: bool = False,
        on_error: Callable[[], None] | None = None,
    ) -> None:
        self._starts: list[tuple[int, _Hook]] = []
        self.data_hooks: list[tuple[int, _Hook]] = []
        self._ends: list[tuple[int, _Hook]] = []
        self._finishes: list[tuple[int, Callable[..., object]]] = []
        for i, analyzer in enumerate(analyzers):
            for name, hooks in (
                ("flow_start", self._starts),
                ("data", self.data_hooks),
                ("flow_end", self._ends),
            ):
                fn = _lookup(analyzer, name)
                if fn is not None:
                    hooks.append((i, fn))
            finished = _lookup_sync(analyzer, "data_finished")
            if finished is not None:
                self._finishes.append((i, finished))
        # Only the record hooks some analyzer has: a name absent here is never called.
        self.record_hooks: dict[str, list[tuple[int, _Hook]]] = {}
        for name in RECORD_HOOKS:
            for i, analyzer in enumerate(analyzers):
                fn = _lookup(analyzer, name)
                if fn is not None:
                    self.record_hooks.setdefault(name, []).append((i, fn))
        # "tls", "http", "dns", "quic": the protocols worth dissecting.
        self.record_protocols = frozenset(name.split("_")[0] for name in self.record_hooks)
        self.fail_closed = fail_closed
        self.on_error = on_error
        # Analyzer failures: one line (and traceback) per analyzer, hook and
        # exception type per interval; a client can make one raise on every flow.
        self.errors = RateLimitedLog(log)

    def open(self, info: FlowInfo) -> FlowHooks:
        """Per-flow hook state for a new flow."""
        return FlowHooks(self, info)


_NONE_DETACHED: frozenset[int] = frozenset()


class FlowHooks:
    """Runs the chain for one flow; the analyzers that failed on it stay detached.

    Attributes:
        info: the flow.
        has_data_hooks: False when no attached analyzer wants ``data`` (skip the call).
    """

    __slots__ = ("_chain", "_detached", "has_data_hooks", "info")

    def __init__(self, chain: AnalyzerChain, info: FlowInfo) -> None:
        self._chain = chain
        self.info = info
        # Failed analyzers' indexes; a shared empty frozenset until one fails (an
        # empty set is 216 bytes, times every idle flow).
        self._detached: frozenset[int] | set[int] = _NONE_DETACHED
        self.has_data_hooks = bool(chain.data_hooks)

    def _detach(self, index: int) -> None:
        if not isinstance(self._detached, set):
            self._detached = set()
        self._detached.add(index)  # from every hook of this flow, records' included
        self.has_data_hooks = any(i not in self._detached for i, _ in self._chain.data_hooks)

    def _failed(self, index: int, fn: Callable[..., object], what: str) -> None:
        # Called from inside ``except``: log.exception attaches the traceback.
        self._detach(index)
        action = "failing the flow" if self._chain.fail_closed else "detached for this flow"
        key = (index, what, sys.exc_info()[0])  # see AnalyzerChain.errors
        self._chain.errors.exception(
            key, "analyzer %r raised in %s on flow %s; %s", fn, what, self.info.describe(), action
        )
        if self._chain.on_error is not None:
            self._chain.on_error()

    async def start(self) -> Verdict:
        """Ask every analyzer; ``REJECT`` if any rejects (or fails, when fail-closed)."""
        verdict = Verdict.ALLOW
        for i, fn in self._chain._starts:
            if i in self._detached:
                continue
            try:
                v = await fn(self.info)
                if v is not None and not isinstance(v, Verdict):
                    raise TypeError(f"flow_start returned {v!r}, not a Verdict or None")
            except Detach:
                self._detach(i)
                continue
            except Exception:
                self._failed(i, fn, "flow_start")
                if self._chain.fail_closed:
                    return Verdict.REJECT
                continue
            if v is Verdict.REJECT:
                verdict = Verdict.REJECT  # still ask the rest: each sees flow_start and flow_end
        return verdict

    async def data(self, direction: Direction, data: bytes) -> bytes | Verdict | Halt:
        """Run ``data`` through each attached analyzer, each seeing what the one
        before returned.

        Returns:
            The bytes to forward: ``data`` itself (the same object) when no
            analyzer changed it, so the caller can tell with ``is``; ``b""``
            when one dropped them (the later analyzers see nothing).
            ``Verdict.RESET`` when one said so (the later ones see nothing).
            ``Halt.FAILED`` when one failed and the chain is fail-closed.
        """
        for i, fn in self._chain.data_hooks:
            if i in self._detached:
                continue
            try:
                out = await fn(self.info, direction, data)
                if out is None:
                    continue
                if out is Verdict.RESET:
                    return out
                if isinstance(out, bytearray | memoryview):
                    out = bytes(out)
                if not isinstance(out, bytes):
                    raise TypeError(f"data returned {out!r}, not bytes, Verdict.RESET or None")
            except Detach:
                self._detach(i)
                continue
            except Exception:
                self._failed(i, fn, "data")
                if self._chain.fail_closed:
                    return Halt.FAILED
                continue
            data = out
            if not data:
                break
        return data

    async def records(self, named: Iterable[tuple[str, object]]) -> Stop | None:
        """Show dissectors' records, in order, each to every attached analyzer with
        its hook (``(name, record)``, ``name`` one of ``RECORD_HOOKS``; a name no
        analyzer has is skipped).

        Every analyzer sees each record (as with ``flow_start``); the first
        verdict of a ``VERDICT_HOOKS`` hook (``Verdict.RESET`` or a ``Block``)
        decides, and the records after that one are not shown. The data path
        holds the bytes that completed these records until this returns.

        Returns:
            None to go on; the verdict; or ``Halt.FAILED`` when an analyzer
            failed and the chain is fail-closed: abort the flow.
        """
        record_hooks = self._chain.record_hooks
        for name, record in named:
            stop: Stop | None = None
            for i, fn in record_hooks.get(name, ()):
                if i in self._detached:
                    continue
                try:
                    v = await fn(self.info, record)
                    if v is not None and name in VERDICT_HOOKS and stop is None:
                        if v is not Verdict.RESET and not isinstance(v, Block):
                            raise TypeError(
                                f"{name} returned {v!r}, not Verdict.RESET, a Block or None"
                            )
                        stop = v
                except Detach:
                    self._detach(i)
                except Exception:
                    self._failed(i, fn, name)
                    if self._chain.fail_closed:
                        return Halt.FAILED
            if stop is not None:
                return stop
        return None

    async def end(self, end: FlowEnd) -> None:
        """Tell each attached analyzer how the flow ended; errors are only logged."""
        for i, fn in self._chain._ends:
            if i in self._detached:
                continue
            try:
                await fn(self.info, end)
            except Detach:
                pass
            except Exception:
                self._failed(i, fn, "flow_end")

    def finished(self, direction: Direction) -> None:
        """That direction's sender finished (TCP: FIN, after its last ``data``):
        tell the attached analyzers with a ``data_finished``; errors only detach."""
        for i, fn in self._chain._finishes:
            if i in self._detached:
                continue
            try:
                fn(self.info, direction)
            except Exception:
                self._failed(i, fn, "data_finished")
