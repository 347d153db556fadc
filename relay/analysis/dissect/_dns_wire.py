"""The part of the DNS dissector that needs dnspython: a message's wire format
read into plain values, and Zeek's names and renderings.

``dns.py`` imports this module on the first DNS message it parses, not
before, so that a worker that never sees DNS does not load dnspython (about
1.5 MiB of heap per process). The import then costs about 20 ms, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdatatype
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

from .base import Malformed

__all__ = ["NS_TYPES", "Message", "qtype_name", "rcode_name", "read", "render"]

NS_TYPES = (dns.rdatatype.NS, dns.rdatatype.CNAME, dns.rdatatype.PTR)
QR = int(dns.flags.QR)


@dataclass(frozen=True, slots=True)
class Message:
    """What the dissector reads of one message.

    Attributes:
        id: the transaction id.
        flags: the header's flags (QR, AA, TC, RD, RA, Z, AD, CD, as dnspython has them).
        opcode, rcode: the header's (the rcode with EDNS's extended bits).
        question: the first question's name (without the final dot; the root
            is ``""``), type and class; None without a question.
        answers: a response's answer section rendered as Zeek renders it
            (``render``; empty for a query), and each one's TTL in ``ttls``.
    """

    id: int
    flags: int
    opcode: int
    rcode: int
    question: tuple[str, int, int] | None
    answers: tuple[str, ...]
    ttls: tuple[int, ...]


def read(wire: bytes) -> Message:
    """One message's wire format read.

    Raises:
        Malformed: dnspython cannot parse it.
    """
    try:
        # one_rr_per_rrset keeps the wire order of the answers and each one's TTL.
        msg = dns.message.from_wire(wire, ignore_trailing=True, one_rr_per_rrset=True)
    except Exception as e:  # whatever dnspython raises, the message is malformed
        raise Malformed(f"DNS: {type(e).__name__}: {e}") from None
    q = msg.question[0] if msg.question else None
    flags = int(msg.flags)
    answers: list[str] = []
    ttls: list[int] = []
    if flags & QR:
        for rrset in msg.answer:
            for rd in rrset:
                text = render(rd, rrset.name)
                if text:
                    answers.append(text)
                    ttls.append(int(rrset.ttl))
    return Message(
        msg.id,
        flags,
        int(msg.opcode()),
        int(msg.rcode()),
        (_name(q.name), int(q.rdtype), int(q.rdclass)) if q is not None else None,
        tuple(answers),
        tuple(ttls),
    )


def qtype_name(qtype: int) -> str:
    """A query type as Zeek names it: ``A``, ``AAAA``, ``*`` (ANY), ``query-N``."""
    if qtype == 255:
        return "*"
    text = dns.rdatatype.to_text(dns.rdatatype.RdataType.make(qtype))
    return f"query-{qtype}" if text.startswith("TYPE") else text


def rcode_name(rcode: int) -> str:
    try:
        return dns.rcode.to_text(dns.rcode.Rcode.make(rcode))
    except ValueError:
        return f"rcode-{rcode}"


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
