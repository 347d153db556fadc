"""IPv4 (RFC 791 3.2) and IPv6 (RFC 8200 4.5) reassembly of client packets.

Theory of operation: a fragment is filed under its datagram's key -- source,
destination, protocol and identification for IPv4 (RFC 791), source,
destination and identification for IPv6 (RFC 8200 4.5). Each datagram keeps
its fragments' data sorted by offset; the header of the offset-0 fragment
becomes the reassembled packet's header. A datagram is complete when the last
fragment (MF/M clear) has fixed the length and the bytes held cover it.

Overlaps: since fragments never overlap, "bytes held == length" means covered.
An exact duplicate (same offset and length) is ignored (RFC 5722, erratum
3089). Any other overlap abandons the whole datagram, and fragments of it that
arrive later are dropped too until its timeout (RFC 5722 4, RFC 8200 4.5).
IPv4 gets the same treatment: RFC 791 lets the receiver choose, Linux drops
overlapping IPv4 datagrams too, and one unambiguous reading is what a relay
that re-originates the data must have.

Bounds: ``FragmentConfig.max_bytes`` of fragment data and ``max_datagrams``
datagrams in progress, all clients. A new datagram that does not fit evicts
the oldest ones (counted): a legitimate datagram completes within a round
trip, so the oldest is almost always one that will never complete.
Each datagram is abandoned ``timeout_v4``/``timeout_v6`` seconds after its
first fragment arrived (RFC 791: at least 15 s; RFC 8200: 60 s). Timeouts are
FIFO per IP version (a fixed timeout from the arrival of the first fragment),
so the insertion-ordered dicts double as the timer queues: ``get_timer`` is
the older of their two heads.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable
from dataclasses import dataclass

from stack.clients import FRAGMENTS, ClientState, ClientTable
from stack.config import ClientQuotas, FragmentConfig
from stack.errors import ParseError
from stack.tcp.buffers import MemoryBudget
from stack.wire.checksum import checksum, pseudo_sum_v6
from stack.wire.icmp import ICMP6_TIME_EXCEEDED, TIME_EXCEEDED
from stack.wire.ip import PROTO_ICMP, PROTO_ICMPV6, IpHeader, ipv4_header, ipv6_header, parse_ip

__all__ = ["FragmentStats", "Reassembler", "build_time_exceeded", "fragment"]

_U16 = struct.Struct("!H")
_V4 = struct.Struct("!BBHHHBBH4s4s")
_V6 = struct.Struct("!IHBB16s16s")
_FRAG6 = struct.Struct("!BBHI")  # next header, reserved, offset | M, identification
_ICMP = struct.Struct("!BBHI")
_V4_QUOTE = 576 - 28  # RFC 1812 4.3.2.3
_V6_QUOTE = 1280 - 48  # RFC 4443 2.4 (c)


@dataclass(slots=True)
class FragmentStats:
    """Reassembly counters."""

    reassembled: int = 0  # datagrams completed (fed to the stack again)
    atomic: int = 0  # IPv6 atomic fragments, processed as whole datagrams (RFC 8021)
    duplicates: int = 0  # exact duplicates ignored (RFC 5722 erratum 3089)
    overlaps: int = 0  # datagrams abandoned for overlapping fragments (RFC 5722)
    invalid: int = 0  # datagrams abandoned as inconsistent (lengths, too many fragments)
    late: int = 0  # fragments of an abandoned datagram, dropped until its timeout
    timeouts: int = 0  # datagrams abandoned incomplete at their timeout
    evicted: int = 0  # datagrams dropped to stay within the memory bounds
    client_quota: int = 0  # fragments dropped: their client's share of max_bytes is full


class _Datagram:
    """One datagram being reassembled."""

    __slots__ = (
        "dead", "deadline", "first", "nparts", "owner", "parts", "received", "starts", "total",
    )  # fmt: skip

    def __init__(self, deadline: float, owner: ClientState) -> None:
        self.deadline = deadline  # arrival of the first fragment + timeout
        self.owner = owner  # the client's accounting: fragment_bytes
        self.starts: list[int] = []  # fragment offsets, sorted (bisect)
        self.parts: list[tuple[int, bytes]] = []  # (end, data), in the order of starts
        self.received = 0  # bytes held; == total when complete (no overlaps)
        self.total: int | None = None  # data length, set by the last fragment
        self.first: bytes | None = None  # headers of the offset-0 fragment
        self.nparts = 0
        self.dead = False  # abandoned: later fragments are dropped until the deadline


class Reassembler:
    """Reassembles IPv4 and IPv6 fragments; sans-IO, time passed in.

    Args:
        config: the bounds and timeouts.
        on_timeout: called with ICMP Time Exceeded, code 1 (RFC 792, RFC 8200
            4.5) for a datagram that timed out after its offset-0 fragment came,
            for the caller to send (rate-limited).
        stats: the counters to update (default: a new ``FragmentStats``).
    """

    def __init__(
        self,
        config: FragmentConfig | None = None,
        on_timeout: Callable[[bytes, float], None] | None = None,
        stats: FragmentStats | None = None,
        *,
        clients: ClientTable | None = None,
    ) -> None:
        self.config = config or FragmentConfig()
        if clients is None:  # standalone (tests): a table of its own
            clients = ClientTable(ClientQuotas(), MemoryBudget(0))
        self._clients = clients
        self.stats = stats if stats is not None else FragmentStats()
        self._tables: dict[int, dict[bytes, _Datagram]] = {4: {}, 6: {}}
        self._bytes = 0
        self._count = 0
        self._on_timeout = on_timeout

    def __len__(self) -> int:
        """Datagrams in progress (abandoned ones included until their timeout)."""
        return self._count

    @property
    def held_bytes(self) -> int:
        """Fragment data currently held."""
        return self._bytes

    def add(self, packet: bytes, ip: IpHeader, now: float) -> bytes | None:
        """File one fragment; return the reassembled packet when it completes one.

        Args:
            packet: the fragment, starting at its IP header.
            ip: ``parse_ip(packet)``, with ``fragment`` set.
            now: the current time.

        Returns:
            The whole packet (IPv4 header without fragmentation fields, or IPv6
            without the fragment header), to be parsed again; or None.
        """
        frag = ip.fragment
        assert frag is not None
        stats = self.stats
        data = packet[ip.offset : ip.end]
        start = frag.offset
        end = start + len(data)
        if ip.version == 6:
            if start == 0 and not frag.more:
                # RFC 8021 / RFC 6946: an atomic fragment is a whole datagram.
                stats.atomic += 1
                return self._assemble6(packet[: ip.offset - 8], ip.proto, len(data), [data])
            key = ip.src + ip.dst + packet[ip.offset - 4 : ip.offset]  # 32-bit identification
        else:
            key = ip.src + ip.dst + packet[9:10] + packet[4:6]  # protocol, identification
        if frag.more and len(data) & 7:
            # RFC 791 / RFC 8200 4.5: all but the last fragment carry multiples of 8 bytes.
            stats.invalid += 1
            return None
        table = self._tables[ip.version]
        d = table.get(key)
        if d is not None and d.dead:
            stats.late += 1
            return None
        owner = d.owner if d is not None else self._clients.get(ip.src, now)
        if owner.fragment_bytes + len(data) > self._clients.quotas.fragment_bytes:
            # This client's share is full: its own datagrams wait or time out,
            # nobody else's is evicted for it.
            stats.client_quota += 1
            self._clients.refuse(owner, FRAGMENTS)
            self._clients.done(owner)
            return None
        if not self._make_room(len(data), d):
            stats.evicted += 1
            self._clients.done(owner)
            return None
        if d is None:
            timeout = self.config.timeout_v6 if ip.version == 6 else self.config.timeout_v4
            d = table[key] = _Datagram(now + timeout, owner)
            self._count += 1
        if not self._insert(d, start, end, data, frag.more):
            return None
        if start == 0:
            d.first = packet[: ip.offset]
        if d.total is None or d.received != d.total or d.first is None:
            return None
        # Complete.
        del table[key]
        self._count -= 1
        self._uncharge(d)
        first, parts = d.first, [p[1] for p in d.parts]
        if ip.version == 4:
            whole = self._assemble4(first, d.total, parts)
        else:
            # first[-8:] is the fragment header; its Next Header names the payload.
            whole = self._assemble6(first[:-8], first[-8], d.total, parts)
        if whole is not None:
            stats.reassembled += 1
        return whole

    def _insert(self, d: _Datagram, start: int, end: int, data: bytes, more: bool) -> bool:
        if not more:
            if d.total is not None and d.total != end:
                return self._kill(d, "invalid")  # two different last fragments
            if d.parts and d.parts[-1][0] > end:
                return self._kill(d, "invalid")  # data beyond the end
        elif d.total is not None and end > d.total:
            return self._kill(d, "invalid")
        starts = d.starts
        i = bisect.bisect_left(starts, start)
        if i < len(starts) and starts[i] == start and d.parts[i][0] == end:
            self.stats.duplicates += 1
            return False
        if (i > 0 and d.parts[i - 1][0] > start) or (i < len(starts) and starts[i] < end):
            return self._kill(d, "overlaps")
        if d.nparts >= self.config.max_fragments:
            return self._kill(d, "invalid")
        if not more:
            d.total = end
        starts.insert(i, start)
        d.parts.insert(i, (end, data))
        d.nparts += 1
        d.received += len(data)
        self._bytes += len(data)
        d.owner.fragment_bytes += len(data)
        return True

    def _uncharge(self, d: _Datagram) -> None:
        """``d``'s bytes leave the pool (it completed, died or went)."""
        self._bytes -= d.received
        owner = d.owner
        owner.fragment_bytes -= d.received
        self._clients.done(owner)

    def _kill(self, d: _Datagram, why: str) -> bool:
        setattr(self.stats, why, getattr(self.stats, why) + 1)
        self._uncharge(d)
        d.dead = True
        d.starts, d.parts, d.first, d.received = [], [], None, 0
        return False

    def _make_room(self, need: int, keep: _Datagram | None) -> bool:
        # Evict the oldest datagrams other than ``keep`` until ``need`` more bytes fit.
        cfg = self.config
        if need > cfg.max_bytes:
            return False
        while self._bytes + need > cfg.max_bytes or (
            keep is None and self._count >= cfg.max_datagrams
        ):
            oldest = self._oldest(keep)
            if oldest is None:
                return False
            table, key = oldest
            d = table.pop(key)
            self._count -= 1
            self._uncharge(d)
            if not d.dead:
                self.stats.evicted += 1
        return True

    def _oldest(self, keep: _Datagram | None) -> tuple[dict[bytes, _Datagram], bytes] | None:
        best: tuple[dict[bytes, _Datagram], bytes] | None = None
        best_t = 0.0
        cfg = self.config
        for version, table in self._tables.items():
            for key, d in table.items():
                if d is keep:
                    continue  # only when it is the oldest: look at the next one
                # Compare arrival times: the deadlines add a per-version timeout.
                t = d.deadline - (cfg.timeout_v6 if version == 6 else cfg.timeout_v4)
                if best is None or t < best_t:
                    best, best_t = (table, key), t
                break
        return best

    def get_timer(self) -> float | None:
        """The earliest reassembly deadline, or None."""
        if not self._count:  # the usual case, asked on every pass of the relay's loop
            return None
        deadline = None
        for table in self._tables.values():
            if table:
                t = next(iter(table.values())).deadline
                if deadline is None or t < deadline:
                    deadline = t
        return deadline

    def handle_timer(self, now: float) -> None:
        """Abandon every datagram whose deadline has passed."""
        if not self._count:
            return
        for table in self._tables.values():
            while table:
                key = next(iter(table))
                d = table[key]
                if d.deadline > now:
                    break
                del table[key]
                self._count -= 1
                if d.dead:
                    continue
                self._uncharge(d)
                self.stats.timeouts += 1
                # RFC 792 / RFC 8200 4.5: Time Exceeded only if the first fragment came.
                if d.first is not None and self._on_timeout is not None:
                    self._on_timeout(build_time_exceeded(d.first + d.parts[0][1][:64]), now)

    @staticmethod
    def _assemble4(header: bytes, total: int, parts: list[bytes]) -> bytes | None:
        hl = len(header)
        if hl + total > 0xFFFF:
            return None
        hdr = bytearray(header)
        _U16.pack_into(hdr, 2, hl + total)
        _U16.pack_into(hdr, 6, 0)  # no MF, offset 0 (DF is meaningless after reassembly)
        _U16.pack_into(hdr, 10, 0)
        csum = -int.from_bytes(hdr, "big") % 0xFFFF  # RFC 1071, as stack.wire.ip does
        _U16.pack_into(hdr, 10, csum)
        return bytes(hdr) + b"".join(parts)

    def _assemble6(
        self, unfragmentable: bytes, proto: int, total: int, parts: list[bytes]
    ) -> bytes | None:
        if len(unfragmentable) - 40 + total > 0xFFFF:
            return None
        hdr = bytearray(unfragmentable)
        _U16.pack_into(hdr, 4, len(hdr) - 40 + total)
        # RFC 8200 4.5: the Next Header field of the last unfragmentable header gets the
        # fragment header's Next Header value.
        pos, off = 6, 40
        while off < len(hdr):
            pos = off
            off += (hdr[off + 1] + 1) << 3
        hdr[pos] = proto
        whole = bytes(hdr) + b"".join(parts)
        try:
            if parse_ip(whole).fragment is not None:
                raise ParseError("nested fragment header")  # RFC 8200 4.1: at most once
        except ParseError:
            self.stats.invalid += 1
            return None
        return whole


def fragment(packet: bytes, mtu: int, ident: int) -> list[bytes]:
    """Split an IPv4 packet (20-byte header) or IPv6 packet (no extension headers)
    into fragments of at most ``mtu`` bytes.

    RFC 791 2.3/3.2: IPv4 fragments carry DF clear, MF on all but the last, and
    offsets in 8-byte units. RFC 8200 4.5: IPv6 fragments carry a fragment
    header after the (unextended) IPv6 header, with the original next header.

    Args:
        packet: the whole packet, larger than ``mtu``.
        mtu: at least 68 (IPv4) or 1280 (IPv6).
        ident: the identification for every fragment.

    Returns:
        The fragments, in order.
    """
    view = memoryview(packet)
    pieces: list[bytes] = []
    if packet[0] >> 4 == 4:
        _, tos, _, _, _, ttl, proto, _, src, dst = _V4.unpack_from(packet)
        payload = view[20:]
        step = (mtu - 20) & ~7
        n = len(payload)
        for off in range(0, n, step):
            piece = payload[off : off + step]
            flags = (0x2000 if off + step < n else 0) | (off >> 3)
            total = 20 + len(piece)
            hdr = bytearray(_V4.pack(0x45, tos, total, ident, flags, ttl, proto, 0, src, dst))
            _U16.pack_into(hdr, 10, -int.from_bytes(hdr, "big") % 0xFFFF)  # RFC 1071
            pieces.append(bytes(hdr) + piece)
        return pieces
    vtf, _, nh, hlim, src, dst = _V6.unpack_from(packet)
    payload = view[40:]
    step = (mtu - 48) & ~7
    n = len(payload)
    for off in range(0, n, step):
        piece = payload[off : off + step]
        more = 1 if off + step < n else 0
        pieces.append(
            _V6.pack(vtf, 8 + len(piece), 44, hlim, src, dst)
            + _FRAG6.pack(nh, 0, off | more, ident)
            + piece
        )
    return pieces


def build_time_exceeded(first: bytes, ttl: int = 64) -> bytes:
    """ICMP Time Exceeded, fragment reassembly time exceeded (RFC 792; RFC 4443 3.3),
    to the source of the fragment that starts with ``first``, from its destination."""
    if first[0] >> 4 == 4:
        src, dst, quote = first[16:20], first[12:16], first[:_V4_QUOTE]
        msg = bytearray(_ICMP.pack(TIME_EXCEEDED, 1, 0, 0) + quote)
        _U16.pack_into(msg, 2, checksum(msg))
        return ipv4_header(src, dst, PROTO_ICMP, len(msg), ttl=ttl) + msg
    src, dst, quote = first[24:40], first[8:24], first[:_V6_QUOTE]
    msg = bytearray(_ICMP.pack(ICMP6_TIME_EXCEEDED, 1, 0, 0) + quote)
    _U16.pack_into(msg, 2, checksum(msg, pseudo_sum_v6(src, dst, PROTO_ICMPV6, len(msg))))
    return ipv6_header(src, dst, PROTO_ICMPV6, len(msg), hop_limit=ttl) + msg
