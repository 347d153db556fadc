"""IPv4/IPv6 reassembly (stack.fragments) and fragmenting to the MTU, packet by packet.

The fragments come from two independent fragmenters: ours (``fragment``) and
scapy's (``fragment``/``fragment6``), so a shared misunderstanding of the
format would have to be made twice.
"""

from __future__ import annotations

import random
import struct

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet import fragment as scapy_fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.packet import Raw

from stack import (
    DatagramReceived,
    EchoRequest,
    FragmentConfig,
    Stack,
    StackConfig,
)
from stack.fragments import Reassembler, fragment
from stack.wire import parse_ip
from stack.wire.icmp import ICMP6_TIME_EXCEEDED, TIME_EXCEEDED

from packets import (
    ADDR_TEXT,
    ADDRS,
    V4_V6,
    echo_request_packet,
    parse_icmp_packet,
    stack_events,
    udp_packet,
)

_U16 = struct.Struct("!H")


def datagram(version: int, size: int = 4000, seed: int = 1) -> bytes:
    return udp_packet(version, random.Random(seed).randbytes(size))


def frags(packet: bytes, mtu: int = 1500, ident: int = 7) -> list[bytes]:
    return fragment(packet, mtu, ident)


def feed(r: Reassembler, pieces: list[bytes], now: float = 0.0) -> list[bytes]:
    done = []
    for p in pieces:
        whole = r.add(p, parse_ip(p), now)
        if whole is not None:
            done.append(whole)
    return done


def same_datagram(whole: bytes, original: bytes) -> None:
    """Equal but for IPv4's DF flag and header checksum (meaningless after reassembly)."""
    a, b = parse_ip(whole), parse_ip(original)
    assert (a.version, a.src, a.dst, a.proto) == (b.version, b.src, b.dst, b.proto)
    assert a.fragment is None
    assert whole[a.offset : a.end] == original[b.offset : b.end]


# --- fragmenting ----------------------------------------------------------------------


@V4_V6
@pytest.mark.parametrize("mtu", [1280, 1500, 9000])
def test_fragment_sizes_flags_and_offsets(version: int, mtu: int) -> None:
    original = datagram(version, 20000)
    pieces = frags(original, mtu, ident=0x1234)
    assert len(pieces) > 1
    assert all(len(p) <= mtu for p in pieces)
    offsets = []
    for i, p in enumerate(pieces):
        ip = parse_ip(p)  # IPv4 header checksums verify
        assert ip.fragment is not None
        assert ip.fragment.ident == 0x1234
        assert ip.fragment.more is (i < len(pieces) - 1)
        assert ip.proto == 17
        offsets.append((ip.fragment.offset, ip.end - ip.offset))
        if version == 4:
            assert _U16.unpack_from(p, 6)[0] & 0x4000 == 0  # DF clear (RFC 791)
    # Contiguous, in order, covering the IP payload exactly.
    pos = 0
    for off, n in offsets:
        assert off == pos
        pos += n
    assert pos == len(original) - (20 if version == 4 else 40)


@V4_V6
def test_our_fragments_reassemble_in_scapy(version: int) -> None:
    from scapy.layers.inet import defragment
    from scapy.layers.inet6 import defragment6

    original = datagram(version, 5000)
    pieces = frags(original)
    if version == 4:
        (pkt,) = defragment([IP(p) for p in pieces])
        assert bytes(pkt[UDP].payload) == original[28:]
    else:
        pkt = defragment6([IPv6(p) for p in pieces])
        assert bytes(pkt[UDP].payload) == original[48:]


# --- reassembly -----------------------------------------------------------------------


@V4_V6
@pytest.mark.parametrize("order", ["in-order", "reversed", "shuffled"])
def test_reassembles_in_any_order(version: int, order: str) -> None:
    original = datagram(version)
    pieces = frags(original, 1280)
    if order == "reversed":
        pieces.reverse()
    elif order == "shuffled":
        random.Random(5).shuffle(pieces)
    r = Reassembler()
    (whole,) = feed(r, pieces)
    same_datagram(whole, original)
    assert len(r) == 0 and r.held_bytes == 0
    assert r.stats.reassembled == 1


@V4_V6
def test_reassembles_scapy_fragments(version: int) -> None:
    c, s = ADDR_TEXT[version]
    payload = bytes(range(256)) * 16
    if version == 4:
        pkt = IP(src=c, dst=s, id=99) / UDP(sport=1, dport=2) / Raw(payload)
        pieces = [bytes(p) for p in scapy_fragment(pkt, fragsize=1000)]
    else:
        pkt = IPv6(src=c, dst=s) / IPv6ExtHdrFragment(id=99) / UDP(sport=1, dport=2) / Raw(payload)
        pieces = [bytes(p) for p in fragment6(pkt, 1280)]
    assert len(pieces) > 2
    (whole,) = feed(Reassembler(), pieces[::-1])
    ip = parse_ip(whole)
    assert ip.fragment is None and ip.proto == 17
    assert whole[ip.offset + 8 : ip.end] == payload


@V4_V6
def test_exact_duplicates_are_ignored(version: int) -> None:
    original = datagram(version)
    pieces = frags(original)
    r = Reassembler()
    assert feed(r, [pieces[0], pieces[0], pieces[1], pieces[1]]) == []
    (whole,) = feed(r, [pieces[2]])
    same_datagram(whole, original)
    assert r.stats.duplicates == 2  # RFC 5722 erratum 3089


def _overlapping(version: int) -> list[bytes]:
    """Fragments where the second starts 8 bytes inside the first."""
    original = datagram(version, 3000)
    a = frags(original, 1500)
    b = frags(original, 1492)  # same data, cut 8 bytes earlier
    return [a[0], b[1], a[1], a[2]]


@V4_V6
def test_overlap_drops_the_whole_datagram(version: int) -> None:
    # RFC 5722 4 (IPv6); IPv4 gets the same treatment (as Linux does).
    first, overlapping, *rest = _overlapping(version)
    r = Reassembler()
    assert feed(r, [first, overlapping]) == []
    assert r.stats.overlaps == 1
    assert r.held_bytes == 0
    # Fragments of it that arrive later are dropped too, until the timeout.
    assert feed(r, rest) == []
    assert r.stats.late == 2
    assert len(r) == 1
    timeout = 30.0 if version == 4 else 60.0
    assert r.get_timer() == timeout
    r.handle_timer(timeout)
    assert len(r) == 0
    assert r.stats.timeouts == 0  # abandoned already: no second count, no ICMP
    # The same identification may be used again after that.
    original = datagram(version, 3000)
    (whole,) = feed(r, frags(original), now=timeout)
    same_datagram(whole, original)


@V4_V6
def test_timeout_abandons_and_reports_when_the_first_fragment_came(version: int) -> None:
    reports: list[bytes] = []
    r = Reassembler(on_timeout=lambda icmp, now: reports.append(icmp))
    pieces = frags(datagram(version))
    feed(r, [pieces[0], pieces[2]], now=5.0)
    timeout = 30.0 if version == 4 else 60.0  # RFC 791 / RFC 8200 4.5
    assert r.get_timer() == 5.0 + timeout
    r.handle_timer(5.0 + timeout - 0.001)
    assert len(r) == 1
    r.handle_timer(5.0 + timeout)
    assert len(r) == 0 and r.held_bytes == 0 and r.get_timer() is None
    assert r.stats.timeouts == 1
    (icmp,) = reports  # Time Exceeded, quoting the first fragment
    hl = 20 if version == 4 else 40
    assert icmp[hl + 8 : hl + 8 + hl] == pieces[0][:hl]
    # Without the offset-0 fragment: no report (RFC 792, RFC 8200 4.5).
    feed(r, [pieces[1]], now=100.0)
    r.handle_timer(200.0)
    assert len(reports) == 1 and r.stats.timeouts == 2


def test_memory_bound_evicts_the_oldest() -> None:
    cfg = FragmentConfig(max_bytes=10_000, max_datagrams=100)
    r = Reassembler(cfg)
    for i in range(50):  # 50 incomplete datagrams of 1480 bytes each held
        pieces = frags(datagram(4, 4000, seed=i), ident=i)
        feed(r, pieces[:1], now=float(i))
        assert r.held_bytes <= cfg.max_bytes
    assert len(r) == 6  # 6 * 1480 <= 10000
    assert r.stats.evicted == 44
    # A new datagram still gets through, evicting old ones.
    original = datagram(4, 4000, seed=99)
    (whole,) = feed(r, frags(original, ident=999), now=60.0)
    same_datagram(whole, original)
    assert r.held_bytes <= cfg.max_bytes


def test_datagram_count_bound() -> None:
    cfg = FragmentConfig(max_datagrams=8)
    r = Reassembler(cfg)
    for i in range(20):
        feed(r, frags(datagram(6, 3000, seed=i), ident=i)[:1], now=float(i))
        assert len(r) <= 8
    assert r.stats.evicted == 12


def test_a_datagram_larger_than_the_memory_bound_is_dropped() -> None:
    r = Reassembler(FragmentConfig(max_bytes=3000))
    assert feed(r, frags(datagram(4, 8000))) == []
    assert r.held_bytes <= 3000


@V4_V6
def test_conflicting_last_fragments_abandon_the_datagram(version: int) -> None:
    pieces = frags(datagram(version, 3000))
    shorter = frags(datagram(version, 2000))[-1]  # a last fragment ending elsewhere
    r = Reassembler()
    assert feed(r, [pieces[-1], shorter, *pieces[:-1]]) == []
    assert r.stats.invalid == 1


def test_ipv4_non_last_fragment_must_be_a_multiple_of_8() -> None:
    pieces = frags(datagram(4, 3000))
    bad = bytearray(pieces[0][:-3])  # MF set, 1477 data bytes
    _U16.pack_into(bad, 2, len(bad))
    _U16.pack_into(bad, 10, 0)
    _U16.pack_into(bad, 10, -int.from_bytes(bad[:20], "big") % 0xFFFF)
    r = Reassembler()
    assert feed(r, [bytes(bad)]) == []
    assert r.stats.invalid == 1 and len(r) == 0


def test_too_many_fragments_abandon_the_datagram() -> None:
    r = Reassembler(FragmentConfig(max_fragments=4))
    pieces = frags(datagram(6, 8000), 1280)
    assert len(pieces) > 5
    assert feed(r, pieces) == []
    assert r.stats.invalid == 1


def test_ipv6_atomic_fragment_is_a_whole_datagram() -> None:
    original = datagram(6, 100)
    atomic = (
        _U16.pack(0x6000) + b"\0\0" + _U16.pack(len(original) - 40 + 8) + bytes([44, 64])
        + original[8:40] + struct.pack("!BBHI", 17, 0, 0, 5) + original[40:]
    )  # fmt: skip
    r = Reassembler()
    (whole,) = feed(r, [atomic])
    assert whole == original
    assert r.stats.atomic == 1 and len(r) == 0


def test_ipv6_nested_fragment_header_is_dropped() -> None:
    inner = frags(datagram(6, 3000))[0]  # a fragment, carried as the payload of another
    c, s = ADDRS[6]
    payload = inner[40:]  # fragment header + data: next header 44
    outer = fragment(
        _U16.pack(0x6000) + b"\0\0" + _U16.pack(len(payload)) + bytes([44, 64]) + c + s + payload,
        1280,
        77,
    )
    r = Reassembler()
    assert feed(r, outer) == []
    assert r.stats.invalid == 1


# --- through the Stack ------------------------------------------------------------------


@V4_V6
def test_stack_delivers_a_reassembled_udp_datagram(version: int) -> None:
    stack = Stack()
    original = datagram(version, 4000)
    for p in reversed(frags(original)):
        stack.receive(p, 0.0)
    evs = stack_events(stack)
    data = [e for e in evs if isinstance(e, DatagramReceived)]
    assert len(data) == 1
    assert data[0].data == original[(28 if version == 4 else 48) :]
    assert stack.stats.fragments == 3
    assert stack.stats.reassembly.reassembled == 1


@V4_V6
def test_stack_delivers_a_reassembled_echo_request(version: int) -> None:
    payload = bytes(range(256)) * 12
    stack = Stack()
    for p in frags(echo_request_packet(version, ident=9, seq=3, payload=payload)):
        stack.receive(p, 0.0)
    (echo,) = [e for e in stack_events(stack) if isinstance(e, EchoRequest)]
    assert (echo.flow.client_port, echo.seq, echo.data) == (9, 3, payload)


@V4_V6
def test_stack_sends_time_exceeded_at_the_reassembly_timeout(version: int) -> None:
    c, s = ADDRS[version]
    stack = Stack()
    pieces = frags(datagram(version))
    stack.receive(pieces[0], 1.0)
    assert stack.packets_to_send(1.0) == []
    deadline = stack.get_timer()
    assert deadline == 1.0 + (30.0 if version == 4 else 60.0)
    stack.handle_timer(deadline)
    (err,) = stack.packets_to_send(deadline)
    ip, icmp = parse_icmp_packet(err)
    assert (ip.src, ip.dst) == (s, c)
    assert icmp.type == (TIME_EXCEEDED if version == 4 else ICMP6_TIME_EXCEEDED)
    assert icmp.code == 1  # fragment reassembly time exceeded
    assert err[ip.offset + 8 : ip.offset + 28] == pieces[0][:20]  # quotes the first fragment
    assert stack.get_timer() is None


def test_stack_config_bounds_reassembly() -> None:
    stack = Stack(StackConfig(fragments=FragmentConfig(max_datagrams=2)))
    for i in range(5):
        stack.receive(frags(datagram(4, 3000, seed=i), ident=i)[0], float(i))
    assert stack.stats.reassembly.evicted == 3
