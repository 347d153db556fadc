"""DNS dissector on dnspython: queries, and transactions as Zeek's dns.log has them.

Over UDP each datagram is one message (``DnsUdpDissector.datagram``); over TCP
each message has a two-byte length prefix (RFC 1035 §4.2.2, RFC 7766) and may
be split anywhere (``DnsTcpDissector.feed``). A query emits a ``DnsQuery`` at
once; its response emits a ``DnsTransaction`` with the round-trip time
(response ``now`` minus query ``now``). Responses match queries by
transaction id and question; at most ``MAX_PENDING`` queries wait for an
answer (the oldest is then emitted unanswered, as ``close`` does with the
rest). A message dnspython cannot parse fails the dissector.

dnspython is imported with ``_dns_wire`` when the first message is parsed
(about 20 ms, once), not with this module: a process that never sees DNS
does not carry it (about 1.5 MiB of heap).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from .base import DatagramDissector, Direction, Malformed, StreamDissector

if TYPE_CHECKING:
    from ._dns_wire import Message

__all__ = ["DnsQuery", "DnsRecord", "DnsTcpDissector", "DnsTransaction", "DnsUdpDissector"]

MAX_PENDING: Final = 256

# Zeek's names (base/protocols/dns/consts.zeek) where they differ from dnspython's.
_CLASSES = {1: "C_INTERNET", 2: "C_CSNET", 3: "C_CHAOS", 4: "C_HESIOD", 254: "C_NONE", 255: "C_ANY"}
_OPCODES = {0: "query", 1: "inverse-query", 2: "status", 4: "notify", 5: "dynamic-update"}
_QR, _AA, _TC, _RD, _RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080  # RFC 1035 §4.1.1

# Names that need dnspython, from ._dns_wire when asked for.
_FROM_WIRE = frozenset({"NS_TYPES", "qtype_name", "rcode_name", "render"})


def __getattr__(name: str) -> object:
    if name in _FROM_WIRE:
        from . import _dns_wire

        return getattr(_dns_wire, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def qclass_name(qclass: int) -> str:
    return _CLASSES.get(qclass, f"qclass-{qclass}")


@dataclass(frozen=True, slots=True)
class DnsQuery:
    """A query message (its first question), as soon as it was seen.

    Attributes:
        ts: when the query was seen.
        trans_id: the 16-bit transaction id.
        proto: ``"udp"`` or ``"tcp"``.
        query: the queried name, without the final dot (the root is ``""``).
        qclass, qclass_name, qtype, qtype_name: the question's class and type.
        opcode: the header's opcode (0 is a standard query).
        rd: recursion desired.
    """

    ts: float
    trans_id: int
    proto: str
    query: str
    qclass: int
    qclass_name: str
    qtype: int
    qtype_name: str
    opcode: int
    rd: bool


@dataclass(frozen=True, slots=True)
class DnsTransaction:
    """A query and its response, or either alone, like one line of Zeek's dns.log.

    Attributes:
        ts: the query's time (the response's when no query was seen).
        trans_id, proto, query, qclass, qclass_name, qtype, qtype_name: as in
            ``DnsQuery`` (from the response's question when no query was seen;
            ``None`` when neither had one).
        rcode, rcode_name: the response code (``None`` without a response).
        aa, tc, rd, ra: the authoritative, truncated, recursion desired and
            recursion available flags (the response's, else the query's).
        z: the three bits after RA (Z, AD, CD).
        answers: the answer section rendered as Zeek renders it (addresses,
            names without the final dot, ``TXT <len> <text>``, ...).
        ttls: the answers' TTLs in seconds.
        rejected: an error response without a question.
        rtt: response time minus query time, when both were seen.
        opcode, opcode_name: the header's opcode.
        saw_query, saw_reply: which messages were seen.
    """

    ts: float
    trans_id: int
    proto: str
    query: str | None
    qclass: int | None
    qclass_name: str | None
    qtype: int | None
    qtype_name: str | None
    rcode: int | None
    rcode_name: str | None
    aa: bool
    tc: bool
    rd: bool
    ra: bool
    z: int
    answers: tuple[str, ...]
    ttls: tuple[int, ...]
    rejected: bool
    rtt: float | None
    opcode: int
    opcode_name: str
    saw_query: bool
    saw_reply: bool


DnsRecord = DnsQuery | DnsTransaction


_Key = tuple[int, str, int, int]


class _DnsCore:
    """Query/response matching shared by the UDP and TCP dissectors."""

    __slots__ = ("pending", "proto")

    def __init__(self, proto: str) -> None:
        self.proto = proto
        self.pending: OrderedDict[_Key, DnsQuery] = OrderedDict()

    def message(self, wire: bytes, now: float, out: list[DnsRecord]) -> None:
        from . import _dns_wire as w  # dnspython, loaded by the first message

        msg = w.read(wire)
        q = msg.question
        key = (msg.id, q[0].lower(), q[1], q[2]) if q is not None else None
        if not msg.flags & _QR:
            if q is None or key is None:
                raise Malformed("DNS query without a question")
            name, qtype, qclass = q
            query = DnsQuery(
                now, msg.id, self.proto, name, qclass, qclass_name(qclass),
                qtype, w.qtype_name(qtype), msg.opcode, bool(msg.flags & _RD),
            )  # fmt: skip
            out.append(query)
            if key not in self.pending:
                if len(self.pending) >= MAX_PENDING:
                    _, oldest = self.pending.popitem(last=False)
                    out.append(self._unanswered(oldest))
                self.pending[key] = query
            return
        out.append(self._response(msg, key, now))

    def _match(self, msg_id: int, key: _Key | None) -> DnsQuery | None:
        if key is not None:
            return self.pending.pop(key, None)
        for k in self.pending:  # a response without a question: match the id alone
            if k[0] == msg_id:
                return self.pending.pop(k)
        return None

    def _response(self, msg: Message, key: _Key | None, now: float) -> DnsTransaction:
        from ._dns_wire import qtype_name, rcode_name

        query = self._match(msg.id, key)
        flags, rcode, q = msg.flags, msg.rcode, msg.question
        if query is not None:
            ts, name, qclass, qtype = query.ts, query.query, query.qclass, query.qtype
        elif q is not None:
            ts, (name, qtype, qclass) = now, q
        else:
            ts, name, qclass, qtype = now, None, None, None
        opcode = msg.opcode
        return DnsTransaction(
            ts, msg.id, self.proto, name, qclass,
            qclass_name(qclass) if qclass is not None else None, qtype,
            qtype_name(qtype) if qtype is not None else None, rcode, rcode_name(rcode),
            bool(flags & _AA), bool(flags & _TC), bool(flags & _RD),
            bool(flags & _RA), (flags >> 4) & 0x7, msg.answers, msg.ttls,
            rcode != 0 and q is None, now - query.ts if query is not None else None,
            opcode, _OPCODES.get(opcode, f"opcode-{opcode}"), query is not None, True,
        )  # fmt: skip

    def _unanswered(self, q: DnsQuery) -> DnsTransaction:
        return DnsTransaction(
            q.ts, q.trans_id, q.proto, q.query, q.qclass, q.qclass_name, q.qtype, q.qtype_name,
            None, None, False, False, q.rd, False, 0, (), (), False, None, q.opcode,
            _OPCODES.get(q.opcode, f"opcode-{q.opcode}"), True, False,
        )  # fmt: skip

    def flush(self, out: list[DnsRecord]) -> None:
        while self.pending:
            out.append(self._unanswered(self.pending.popitem(last=False)[1]))


class DnsUdpDissector(DatagramDissector[DnsRecord]):
    """DNS over UDP: one message per datagram."""

    __slots__ = ("_core",)

    proto = "dns"

    def __init__(self) -> None:
        super().__init__()
        self._core = _DnsCore("udp")

    def _datagram(
        self, direction: Direction, data: bytes, now: float, out: list[DnsRecord]
    ) -> None:
        self._core.message(data, now, out)

    def _close(self, now: float, out: list[DnsRecord]) -> None:
        self._core.flush(out)


class DnsTcpDissector(StreamDissector[DnsRecord]):
    """DNS over TCP: messages behind two-byte lengths, split anywhere."""

    __slots__ = ("_bufs", "_core")

    proto = "dns"

    def __init__(self) -> None:
        super().__init__()
        self._core = _DnsCore("tcp")
        self._bufs = {d: bytearray() for d in Direction}

    def _feed(self, direction: Direction, data: bytes, now: float, out: list[DnsRecord]) -> None:
        buf = self._bufs[direction]
        buf += data  # at most one message (2 + 65535 bytes) plus this chunk
        while len(buf) >= 2:
            n = int.from_bytes(buf[:2])
            if n < 12:
                raise Malformed(f"DNS message of {n} bytes")
            if len(buf) < 2 + n:
                break
            wire = bytes(buf[2 : 2 + n])
            del buf[: 2 + n]
            self._core.message(wire, now, out)

    def _close(self, now: float, out: list[DnsRecord]) -> None:
        self._core.flush(out)
