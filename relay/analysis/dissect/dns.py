"""DNS dissector on dnspython: queries, and transactions as Zeek's dns.log has them.

Over UDP each datagram is one message (``DnsUdpDissector.datagram``); over TCP
each message has a two-byte length prefix (RFC 1035 §4.2.2, RFC 7766) and may
be split anywhere (``DnsTcpDissector.feed``). A query emits a ``DnsQuery`` at
once; its response emits a ``DnsTransaction`` with the round-trip time
(response ``now`` minus query ``now``). Responses match queries by
transaction id and question; at most ``MAX_PENDING`` queries wait for an
answer (the oldest is then emitted unanswered, as ``close`` does with the
rest). A message dnspython cannot parse fails the dissector.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.NSEC import NSEC
from dns.rdtypes.ANY.RRSIG import RRSIG
from dns.rdtypes.ANY.SOA import SOA
from dns.rdtypes.ANY.SSHFP import SSHFP
from dns.rdtypes.dnskeybase import DNSKEYBase
from dns.rdtypes.dsbase import DSBase
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA
from dns.rdtypes.IN.NAPTR import NAPTR
from dns.rdtypes.IN.SRV import SRV
from dns.rdtypes.mxbase import MXBase
from dns.rdtypes.nsbase import NSBase
from dns.rdtypes.txtbase import TXTBase

from .base import DatagramDissector, Direction, Malformed, StreamDissector

__all__ = ["DnsQuery", "DnsRecord", "DnsTcpDissector", "DnsTransaction", "DnsUdpDissector"]

MAX_PENDING: Final = 256

# Zeek's names (base/protocols/dns/consts.zeek) where they differ from dnspython's.
_CLASSES = {1: "C_INTERNET", 2: "C_CSNET", 3: "C_CHAOS", 4: "C_HESIOD", 254: "C_NONE", 255: "C_ANY"}
NS_TYPES = (dns.rdatatype.NS, dns.rdatatype.CNAME, dns.rdatatype.PTR)
_OPCODES = {0: "query", 1: "inverse-query", 2: "status", 4: "notify", 5: "dynamic-update"}


def qtype_name(qtype: int) -> str:
    """A query type as Zeek names it: ``A``, ``AAAA``, ``*`` (ANY), ``query-N``."""
    if qtype == 255:
        return "*"
    text = dns.rdatatype.to_text(dns.rdatatype.RdataType.make(qtype))
    return f"query-{qtype}" if text.startswith("TYPE") else text


def qclass_name(qclass: int) -> str:
    return _CLASSES.get(qclass, f"qclass-{qclass}")


def rcode_name(rcode: int) -> str:
    try:
        return dns.rcode.to_text(dns.rcode.Rcode.make(rcode))
    except ValueError:
        return f"rcode-{rcode}"


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


def _name(name: dns.name.Name) -> str:
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True)


def _strings(kind: str, strings: tuple[bytes, ...]) -> str:
    return " ".join(f"{kind} {len(s)} {s.decode('utf-8', 'backslashreplace')}" for s in strings)


def render(rd: dns.rdata.Rdata, owner: dns.name.Name) -> str:
    """One answer's data as Zeek's dns.log writes it (base/protocols/dns/main.zeek)."""
    t = rd.rdtype
    if isinstance(rd, A | AAAA):
        return str(rd.address)
    if isinstance(rd, NSBase) and t in NS_TYPES:
        return _name(rd.target)
    if isinstance(rd, MXBase):
        return _name(rd.exchange)
    if isinstance(rd, SOA):
        return _name(rd.mname)
    if isinstance(rd, SRV):
        return _name(rd.target)
    if isinstance(rd, TXTBase) and t in (dns.rdatatype.TXT, dns.rdatatype.SPF):
        return _strings(t.name, rd.strings)
    if isinstance(rd, NAPTR):
        tail = " ".join(x for x in (rd.regexp.decode("latin-1"), _name(rd.replacement)) if x)
        flags, service = rd.flags.decode("latin-1"), rd.service.decode("latin-1")
        return f"NAPTR {rd.order} {rd.preference} {flags} {service} {tail}"
    if isinstance(rd, DNSKEYBase):
        return f"DNSKEY {int(rd.algorithm)}"
    if isinstance(rd, DSBase):
        return f"DS {int(rd.algorithm)} {rd.digest_type}"
    if isinstance(rd, RRSIG):
        return f"RRSIG {int(rd.type_covered)} {_name(rd.signer) or '<Root>'}"
    if isinstance(rd, NSEC):
        return f"NSEC {_name(owner)} {_name(rd.next)}"
    if t == dns.rdatatype.NSEC3:
        return "NSEC3"
    if t == dns.rdatatype.NSEC3PARAM:
        return "NSEC3PARAM"
    if isinstance(rd, SSHFP):
        return f"SSHFP: {rd.fingerprint.hex()}"
    if t == dns.rdatatype.WKS:
        return ""
    return f"<unknown type={int(t)}>"


_Key = tuple[int, str, int, int]


class _DnsCore:
    """Query/response matching shared by the UDP and TCP dissectors."""

    __slots__ = ("pending", "proto")

    def __init__(self, proto: str) -> None:
        self.proto = proto
        self.pending: OrderedDict[_Key, DnsQuery] = OrderedDict()

    def message(self, wire: bytes, now: float, out: list[DnsRecord]) -> None:
        try:
            # one_rr_per_rrset keeps the wire order of the answers and each one's TTL.
            msg = dns.message.from_wire(wire, ignore_trailing=True, one_rr_per_rrset=True)
        except Exception as e:  # whatever dnspython raises, the message is malformed
            raise Malformed(f"DNS: {type(e).__name__}: {e}") from None
        q = msg.question[0] if msg.question else None
        key = (
            (msg.id, _name(q.name).lower(), int(q.rdtype), int(q.rdclass))
            if q is not None
            else None
        )
        if not msg.flags & dns.flags.QR:
            if q is None or key is None:
                raise Malformed("DNS query without a question")
            qclass, qtype = int(q.rdclass), int(q.rdtype)
            query = DnsQuery(
                now, msg.id, self.proto, _name(q.name), qclass, qclass_name(qclass),
                qtype, qtype_name(qtype), int(msg.opcode()), bool(msg.flags & dns.flags.RD),
            )  # fmt: skip
            out.append(query)
            if key not in self.pending:
                if len(self.pending) >= MAX_PENDING:
                    _, oldest = self.pending.popitem(last=False)
                    out.append(self._unanswered(oldest))
                self.pending[key] = query
            return
        out.append(self._response(msg, q, key, now))

    def _match(self, msg_id: int, key: _Key | None) -> DnsQuery | None:
        if key is not None:
            return self.pending.pop(key, None)
        for k in self.pending:  # a response without a question: match the id alone
            if k[0] == msg_id:
                return self.pending.pop(k)
        return None

    def _response(
        self, msg: dns.message.Message, q: dns.rrset.RRset | None, key: _Key | None, now: float
    ) -> DnsTransaction:
        query = self._match(msg.id, key)
        answers: list[str] = []
        ttls: list[int] = []
        for rrset in msg.answer:
            for rd in rrset:
                text = render(rd, rrset.name)
                if text:
                    answers.append(text)
                    ttls.append(int(rrset.ttl))
        flags = msg.flags
        rcode = int(msg.rcode())
        if query is not None:
            ts, name, qclass, qtype = query.ts, query.query, query.qclass, query.qtype
        elif q is not None:
            ts, name, qclass, qtype = now, _name(q.name), int(q.rdclass), int(q.rdtype)
        else:
            ts, name, qclass, qtype = now, None, None, None
        opcode = int(msg.opcode())
        return DnsTransaction(
            ts, msg.id, self.proto, name, qclass,
            qclass_name(qclass) if qclass is not None else None, qtype,
            qtype_name(qtype) if qtype is not None else None, rcode, rcode_name(rcode),
            bool(flags & dns.flags.AA), bool(flags & dns.flags.TC), bool(flags & dns.flags.RD),
            bool(flags & dns.flags.RA), (flags >> 4) & 0x7, tuple(answers), tuple(ttls),
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
