"""DNS dissector: Zeek-style transactions over UDP and TCP, answer rendering,
matching and rtt, bounds, any split of a TCP stream, fuzzing."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.analysis.dissect.dns import (
    MAX_PENDING,
    DnsQuery,
    DnsRecord,
    DnsTcpDissector,
    DnsTransaction,
    DnsUdpDissector,
)
from tests.dissect_helpers import C2S, S2C, bytewise


def exchange(
    name: str, qtype: str, answers: list[tuple[str, int, str, str]], *, qid: int = 4660
) -> tuple[bytes, bytes]:
    q = dns.message.make_query(name, qtype, use_edns=0)
    q.id = qid
    r = dns.message.make_response(q)
    r.flags |= dns.flags.AA | dns.flags.RA
    for owner, ttl, rtype, text in answers:
        r.answer.append(dns.rrset.from_text(owner, ttl, "IN", rtype, text))
    return q.to_wire(), r.to_wire()


def test_udp_transaction_like_zeek() -> None:
    query, response = exchange(
        "WWW.Example.test.", "A",
        [("www.example.test.", 300, "CNAME", "edge.example.net."),
         ("edge.example.net.", 60, "A", "192.0.2.7"),
         ("edge.example.net.", 60, "A", "192.0.2.8")],
    )  # fmt: skip
    d = DnsUdpDissector()
    (q,) = d.datagram(C2S, query, 10.0)
    assert q == DnsQuery(10.0, 4660, "udp", "WWW.Example.test", 1, "C_INTERNET", 1, "A", 0, True)
    (tx,) = d.datagram(S2C, response, 10.025)
    assert isinstance(tx, DnsTransaction)
    assert (tx.ts, tx.trans_id, tx.proto, tx.query, tx.qtype_name) == (
        10.0, 4660, "udp", "WWW.Example.test", "A",
    )  # fmt: skip
    assert tx.rtt is not None and abs(tx.rtt - 0.025) < 1e-9
    assert (tx.rcode, tx.rcode_name, tx.aa, tx.ra, tx.rd, tx.tc) == (0, "NOERROR", True, True,
                                                                     True, False)  # fmt: skip
    assert tx.answers == ("edge.example.net", "192.0.2.7", "192.0.2.8")
    assert tx.ttls == (300, 60, 60)
    assert tx.saw_query and tx.saw_reply and not tx.rejected
    assert d.close(11.0) == []


def test_answer_rendering() -> None:
    # As base/protocols/dns/main.zeek renders each type.
    cases = [
        ("AAAA", "2001:db8::1", "2001:db8::1"),
        ("NS", "ns1.example.test.", "ns1.example.test"),
        ("PTR", "host.example.test.", "host.example.test"),
        ("MX", "10 mail.example.test.", "mail.example.test"),
        ("TXT", '"v=spf1 -all" "second"', "TXT 11 v=spf1 -all TXT 6 second"),
        ("SPF", '"v=spf1 -all"', "SPF 11 v=spf1 -all"),
        ("SOA", "ns1.example.test. admin.example.test. 1 7200 3600 1209600 300",
         "ns1.example.test"),
        ("SRV", "0 5 5060 sip.example.test.", "sip.example.test"),
        ("NAPTR", '100 10 "S" "SIP+D2U" "" _sip._udp.example.test.',
         "NAPTR 100 10 S SIP+D2U _sip._udp.example.test"),
        ("DS", "60485 5 1 2bb183af5f22588179a53b0a98631fad1a292118", "DS 5 1"),
        ("DNSKEY", "256 3 8 AwEAAag=", "DNSKEY 8"),
        ("RRSIG", "A 8 2 300 20300101000000 20200101000000 1 . AAAA", "RRSIG 1 <Root>"),
        ("NSEC", "next.example.test. A RRSIG", "NSEC example.test next.example.test"),
        ("SSHFP", "1 2 " + "ab" * 32, "SSHFP: " + "ab" * 32),
        ("HTTPS", '1 . alpn="h3"', "<unknown type=65>"),
    ]  # fmt: skip
    for rtype, text, rendered in cases:
        query, response = exchange("example.test.", rtype, [("example.test.", 5, rtype, text)])
        d = DnsUdpDissector()
        d.datagram(C2S, query, 1.0)
        (tx,) = d.datagram(S2C, response, 2.0)
        assert isinstance(tx, DnsTransaction)
        assert tx.answers == (rendered,), rtype
        assert tx.qtype_name == rtype


def test_errors_unanswered_and_unmatched() -> None:
    d = DnsUdpDissector()
    q = dns.message.make_query("missing.example.test.", "AAAA")
    q.id = 1
    d.datagram(C2S, q.to_wire(), 1.0)
    nx = dns.message.make_response(q)
    nx.set_rcode(dns.rcode.NXDOMAIN)
    (tx,) = d.datagram(S2C, nx.to_wire(), 1.5)
    assert isinstance(tx, DnsTransaction)
    assert (tx.rcode, tx.rcode_name, tx.qtype_name, tx.answers) == (3, "NXDOMAIN", "AAAA", ())
    # A response for another name with the same id is not the query's.
    d.datagram(C2S, q.to_wire(), 2.0)
    other = dns.message.make_response(dns.message.make_query("other.example.test.", "AAAA"))
    other.id = 1
    (stray,) = d.datagram(S2C, other.to_wire(), 2.1)
    assert isinstance(stray, DnsTransaction)
    assert stray.rtt is None and not stray.saw_query and stray.query == "other.example.test"
    # A refusal without a question matches by id alone and is "rejected".
    refused = dns.message.Message(id=1)
    refused.flags = dns.flags.QR
    refused.set_rcode(dns.rcode.REFUSED)
    (rej,) = d.datagram(S2C, refused.to_wire(), 2.2)
    assert isinstance(rej, DnsTransaction)
    assert rej.rejected and rej.saw_query and rej.query == "missing.example.test"
    # Unanswered queries come out at the end.
    q.id = 2
    d.datagram(C2S, q.to_wire(), 3.0)
    (left,) = d.close(4.0)
    assert isinstance(left, DnsTransaction)
    assert (left.trans_id, left.saw_reply, left.rcode, left.rtt) == (2, False, None, None)


def test_outstanding_queries_are_bounded() -> None:
    d = DnsUdpDissector()
    out: list[DnsRecord] = []
    for i in range(MAX_PENDING + 10):
        q = dns.message.make_query(f"n{i}.example.test.", "A")
        q.id = i
        out += d.datagram(C2S, q.to_wire(), float(i))
    evicted = [r for r in out if isinstance(r, DnsTransaction)]
    assert [r.trans_id for r in evicted] == list(range(10))
    assert len(d._core.pending) == MAX_PENDING
    assert len(d.close(1e3)) == MAX_PENDING


def tcp_stream() -> tuple[bytes, bytes]:
    c2s, s2c = b"", b""
    for i, name in enumerate(["a.example.test.", "b.example.test."]):
        query, response = exchange(name, "A", [(name, 30, "A", f"198.18.0.{i + 1}")], qid=i)
        c2s += len(query).to_bytes(2) + query
        s2c += len(response).to_bytes(2) + response
    return c2s, s2c


def run_tcp(c2s: list[bytes], s2c: list[bytes]) -> list[DnsRecord]:
    d = DnsTcpDissector()
    out: list[DnsRecord] = []
    for piece in c2s:
        out += d.feed(C2S, piece, 1.0)
    for piece in s2c:
        out += d.feed(S2C, piece, 2.0)
    out += d.close(3.0)
    assert d.failed is None, d.failed
    return out


def test_tcp_messages_split_anywhere() -> None:
    c2s, s2c = tcp_stream()
    whole = run_tcp([c2s], [s2c])
    assert [type(r).__name__ for r in whole] == ["DnsQuery"] * 2 + ["DnsTransaction"] * 2
    txs = [r for r in whole if isinstance(r, DnsTransaction)]
    assert [(t.proto, t.answers, t.rtt) for t in txs] == [
        ("tcp", ("198.18.0.1",), 1.0), ("tcp", ("198.18.0.2",), 1.0),
    ]  # fmt: skip
    assert run_tcp(bytewise(c2s), bytewise(s2c)) == whole
    for at in range(len(c2s) + 1):
        assert run_tcp([c2s[:at], c2s[at:]], [s2c]) == whole
    for at in range(len(s2c) + 1):
        assert run_tcp([c2s], [s2c[:at], s2c[at:]]) == whole


def test_tcp_bounds_and_garbage() -> None:
    d = DnsTcpDissector()
    d.feed(C2S, b"\xff\xff" + bytes(1000), 1.0)  # a 64 KiB message on its way
    assert d.failed is None and len(d._bufs[C2S]) == 1002
    d = DnsTcpDissector()
    d.feed(C2S, b"\x00\x05hello", 1.0)
    assert d.failed is not None
    d = DnsTcpDissector()
    d.feed(C2S, b"\x00\x0c" + bytes(12), 1.0)  # a header and no question
    assert d.failed is not None and not d.failed.startswith("internal")


def test_garbage_datagram_fails() -> None:
    d = DnsUdpDissector()
    d.datagram(C2S, b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0", 1.0)
    assert d.failed is not None and not d.failed.startswith("internal")
    assert d.datagram(C2S, exchange("a.test.", "A", [])[0], 2.0) == []


EXCHANGE = exchange(
    "www.example.test.", "A",
    [("www.example.test.", 300, "CNAME", "edge.example.net."),
     ("edge.example.net.", 60, "A", "192.0.2.7")],
)  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_messages(data: st.DataObject) -> None:
    d = DnsUdpDissector()
    for direction, wire in zip((C2S, S2C), EXCHANGE, strict=True):
        buf = bytearray(wire)
        for _ in range(data.draw(st.integers(0, 4))):
            buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
        d.datagram(direction, bytes(buf[: data.draw(st.integers(0, len(buf)))]), 1.0)
    d.close(2.0)
    assert d.failed is None or not d.failed.startswith("internal"), d.failed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=120)), max_size=6))
def test_fuzz_tcp_random(chunks: list[tuple[bool, bytes]]) -> None:
    d = DnsTcpDissector()
    for client, chunk in chunks:
        d.feed(C2S if client else S2C, chunk, 1.0)
        assert all(len(b) <= 2 + 65535 + 120 for b in d._bufs.values())
    d.close(2.0)
    assert d.failed is None or not d.failed.startswith("internal"), d.failed
