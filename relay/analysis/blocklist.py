"""Built-in analyzer: block domain names (``tunrelay run --block-domain``, ``--block-list``).

Theory of operation: ``DomainBlocker`` has only record hooks, so it turns
dissection on for DNS, TLS, HTTP and QUIC, and judges each name as soon as
its record is complete, while the relay still holds the client bytes that
completed it (``relay.analysis.hooks.Block``):

* a DNS query (UDP or TCP) for a blocked name is answered by the relay with
  NXDOMAIN (same id and question, RD copied, RA set) and never sent
  upstream. UDP: one datagram, and the flow goes on (the next queries on it
  are judged again). TCP: the length-prefixed answer, then the relay closes
  the connection.
* a TLS ClientHello whose SNI is blocked resets both sides: the server never
  sees the ClientHello.
* a QUIC Initial whose SNI is blocked is dropped, and so is the rest of the flow.
* an HTTP/1.x request whose Host is blocked gets ``403 Forbidden`` from the
  relay (``Connection: close``), and the connection closes; the server never
  sees the request.

A pattern is a name (``ads.example.com``: that name only) or ``*.`` and a
name (``*.example.com``: the name itself and every name under it, as
Pi-hole's wildcards do). Matching ignores case and a trailing dot. Names are
judged, never addresses: other names on the same server are unaffected.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from relay.analysis.hooks import Block, FlowInfo

if TYPE_CHECKING:
    from relay.analysis.dissect import DnsQuery, HttpRequest, QuicClientHello, TlsClientHello

__all__ = ["BlockListError", "DomainBlocker", "parse_pattern", "read_block_list"]

_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\Z")


class BlockListError(ValueError):
    """A pattern that is not a domain name; the message says where and why."""


def normalize(name: str) -> str:
    """Lower case, without the trailing dot: the form names are compared in."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def parse_pattern(text: str) -> str:
    """Check one pattern and return it normalized (``*.example.com``, ``a.example``).

    Raises:
        BlockListError: not a name, or a ``*`` anywhere but a leading ``*.``.
    """
    pattern = normalize(text.strip())
    name = pattern[2:] if pattern.startswith("*.") else pattern
    if not name:
        raise BlockListError(f"{text!r} is not a domain name")
    if "*" in name:
        raise BlockListError(f"{text!r}: '*' is allowed only as a leading '*.'")
    if len(name) > 253:
        raise BlockListError(f"{text!r} is longer than 253 characters")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise BlockListError(f"{text!r}: {label!r} is not a valid label")
    return pattern


def read_block_list(path: str) -> list[tuple[str, str]]:
    """The patterns of a block-list file: one a line, ``#`` comments, blank lines.

    Returns:
        ``(pattern, rule)`` pairs, ``rule`` naming the file and line.

    Raises:
        BlockListError: a bad line (``FILE:LINE: why``).
        OSError: the file cannot be read.
    """
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                pattern = parse_pattern(text)
            except BlockListError as exc:
                raise BlockListError(f"{path}:{lineno}: {exc}") from None
            out.append((pattern, f"block-list {path}:{lineno} {pattern}"))
    return out


def nxdomain(q: DnsQuery) -> bytes | None:
    """The NXDOMAIN answer to ``q`` (TCP: length-prefixed); None if it cannot be built."""
    # dnspython: loaded already by the DNS dissector that made ``q``; not imported
    # with this module, which the supervisor also reads (``parse_pattern``).
    import dns.flags
    import dns.message
    import dns.name
    import dns.opcode
    import dns.rcode
    import dns.rdataclass
    import dns.rdatatype
    import dns.rrset

    try:
        query = dns.message.Message(id=q.trans_id)
        query.flags = dns.flags.RD if q.rd else 0
        query.set_opcode(dns.opcode.Opcode.make(q.opcode))
        name = dns.name.from_text(q.query + "." if q.query else ".")
        query.question = [
            dns.rrset.RRset(
                name,
                dns.rdataclass.RdataClass.make(q.qclass),
                dns.rdatatype.RdataType.make(q.qtype),
            )
        ]
        answer = dns.message.make_response(query, recursion_available=True)
        answer.set_rcode(dns.rcode.NXDOMAIN)
        wire = answer.to_wire()
    except Exception:  # a name dnspython will not encode: the query is dropped instead
        return None
    return struct.pack("!H", len(wire)) + wire if q.proto == "tcp" else wire


def forbidden(host: str) -> bytes:
    """The relay's 403 for a blocked HTTP host."""
    body = f"Blocked: {host}\n".encode("utf-8", "replace")
    head = (
        "HTTP/1.1 403 Forbidden\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def _http_host(host: str) -> str:
    """The name in a Host header (without a port); an IPv6 literal stays bracketed."""
    if host.startswith("["):
        return host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class DomainBlocker:
    """Blocks DNS queries, TLS/QUIC server names and HTTP hosts by name.

    Args:
        rules: ``(pattern, rule)`` pairs: a pattern ``parse_pattern`` accepts,
            and the rule to log when it matches (``"block-domain *.example.com"``).
        on_block: called with the flow's uid, the rule and, for DNS, the
            query's id, before the relay answers (the protocol logs add the rule
            to that flow's rows).
    """

    def __init__(
        self,
        rules: Iterable[tuple[str, str]],
        on_block: Callable[[str, str, int | None], None] | None = None,
    ) -> None:
        self._exact: dict[str, str] = {}
        self._suffix: dict[str, str] = {}  # "*.example.com" as "example.com"
        for pattern, rule in rules:
            pattern = parse_pattern(pattern)
            if pattern.startswith("*."):
                self._suffix.setdefault(pattern[2:], rule)
            else:
                self._exact.setdefault(pattern, rule)
        self._on_block = on_block

    def match(self, name: str) -> str | None:
        """The rule that blocks ``name``, or None."""
        name = normalize(name)
        rule = self._exact.get(name)
        if rule is not None or not self._suffix:
            return rule
        while True:  # the name itself, then each parent
            rule = self._suffix.get(name)
            if rule is not None:
                return rule
            dot = name.find(".")
            if dot < 0:
                return None
            name = name[dot + 1 :]

    def _block(self, flow: FlowInfo, rule: str, dns_id: int | None = None) -> None:
        if self._on_block is not None:
            self._on_block(flow.uid, rule, dns_id)

    async def dns_query(self, flow: FlowInfo, q: DnsQuery) -> Block | None:
        rule = self.match(q.query)
        if rule is None:
            return None
        self._block(flow, rule, q.trans_id)
        answer = nxdomain(q)
        return Block(rule, answer or b"", keep_open=True)

    async def tls_clienthello(self, flow: FlowInfo, hello: TlsClientHello) -> Block | None:
        if hello.server_name is None or (rule := self.match(hello.server_name)) is None:
            return None
        self._block(flow, rule)
        return Block(rule)  # TCP without a reply: both sides reset

    async def quic_clienthello(self, flow: FlowInfo, quic: QuicClientHello) -> Block | None:
        name = quic.hello.server_name
        if name is None or (rule := self.match(name)) is None:
            return None
        self._block(flow, rule)
        return Block(rule)  # UDP without a reply: the flow's datagrams are dropped

    async def http_request(self, flow: FlowInfo, req: HttpRequest) -> Block | None:
        if req.host is None or (rule := self.match(_http_host(req.host))) is None:
            return None
        self._block(flow, rule)
        return Block(rule, forbidden(req.host))
