"""UDP and ICMP echo flows, ICMP errors toward clients, and fragmenting to the MTU.

Theory of operation: the stack relays UDP per *flow* -- client address and
port, original destination address and port -- and ICMP/ICMPv6 echo per
(client, destination, echo identifier). ``Datagrams`` keeps the flow table:
the first datagram (or echo request) of a flow opens it with
``DatagramFlowOpened``; every datagram then costs one parse (checksum
verified), one dict lookup and one ``DatagramReceived``/``EchoRequest`` event.
Replies from the caller (``send``, ``send_echo_reply``) are built as IP
packets from the original destination, and fragmented to the MTU the way the
kernel would send them (RFC 791 2.3: IPv4 fragments with DF clear; RFC 8200
4.5: an IPv6 fragment header; the source fragments, as the relay's reply is a
locally originated datagram).

Idle timeouts: each flow notes the time of its last datagram either way
(``last``); a heap holds one entry per flow, checked lazily: when an entry
comes due and the flow was active since, it is filed again at
``last + timeout``. So the per-datagram cost is one attribute store.

ICMP toward clients: the caller reports what the network said about a flow
(``unreachable``: the kernel's ICMP error for the relay's own socket, relayed
with its code), or ``refuse``\\ s a flow, after which every client datagram on it
is answered with one destination unreachable (or dropped silently) without
reaching the caller. All ICMP errors the stack sends share one token bucket
(RFC 1812 4.3.2.8, RFC 4443 2.4 (f)). Errors quote a packet rebuilt from the
flow, which is what the client's kernel matches on (addresses, ports, echo
identifier).

Quietly dropped and counted: the kernel's own IPv6 neighbour discovery and
MLD (RFC 4861, RFC 3810) on the TUN, datagrams to multicast or broadcast
addresses, ICMP other than echo requests.
"""

from __future__ import annotations

import heapq
import ipaddress
import struct
from collections import deque
from dataclasses import dataclass

from stack.clients import ECHO_FLOWS, UDP_FLOWS, ClientState, ClientTable
from stack.config import ClientQuotas, DatagramConfig
from stack.events import (
    CloseReason,
    DatagramFlowClosed,
    DatagramFlowOpened,
    DatagramReceived,
    EchoRequest,
    Event,
    FlowId,
    Unreachable,
)
from stack.fragments import fragment
from stack.tcp.buffers import MemoryBudget
from stack.wire.checksum import pseudo_sum_v4, pseudo_sum_v6
from stack.wire.icmp import (
    ADMIN_PROHIBITED,
    ECHO_REQUEST,
    HOST_UNREACH,
    ICMP6_ADDR_UNREACH,
    ICMP6_ADMIN_PROHIBITED,
    ICMP6_ECHO_REQUEST,
    ICMP6_NEIGHBOR_AND_MLD_TYPES,
    ICMP6_NO_ROUTE,
    ICMP6_PORT_UNREACH,
    NET_UNREACH,
    PORT_UNREACH,
    build_echo,
    build_icmp_unreachable,
    parse_icmp,
)
from stack.wire.ip import PROTO_ICMP, PROTO_ICMPV6, PROTO_UDP, IpHeader, address_text
from stack.wire.udp import build_udp_packet, parse_udp

__all__ = ["DatagramStats", "Datagrams", "unreachable_code"]

_U16 = struct.Struct("!H")
_SILENT = -1  # ``refused`` value: drop without an ICMP error
_V4_QUOTE = 576 - 28  # RFC 1812 4.3.2.3
_V6_QUOTE = 1280 - 48  # RFC 4443 2.4 (c)

_CODES = {
    Unreachable.NET: (NET_UNREACH, ICMP6_NO_ROUTE),
    Unreachable.HOST: (HOST_UNREACH, ICMP6_ADDR_UNREACH),
    Unreachable.PORT: (PORT_UNREACH, ICMP6_PORT_UNREACH),
    Unreachable.ADMIN: (ADMIN_PROHIBITED, ICMP6_ADMIN_PROHIBITED),
}


def unreachable_code(version: int, what: Unreachable | int) -> int:
    """The destination-unreachable code for ``what`` in IP ``version`` (ints pass through)."""
    if isinstance(what, Unreachable):
        v4, v6 = _CODES[what]
        return v4 if version == 4 else v6
    return what


@dataclass(slots=True)
class DatagramStats:
    """UDP and echo counters; every dropped packet is counted under one reason."""

    udp_in: int = 0  # client datagrams delivered (DatagramReceived)
    udp_out: int = 0  # datagrams sent toward clients
    echo_in: int = 0  # echo requests delivered (EchoRequest)
    echo_out: int = 0  # echo replies sent toward clients
    fragments_out: int = 0  # fragments sent for packets over the MTU
    flows_opened: int = 0
    flows_closed: int = 0
    flow_limit: int = 0  # dropped: would open a flow over max_flows or the client's quota
    refused: int = 0  # dropped: on a refused flow (answered with ICMP, or silently)
    multicast: int = 0  # dropped: to a multicast or broadcast address
    invalid: int = 0  # dropped: port 0, echo request with a nonzero code
    neighbor_discovery: int = 0  # dropped quietly: IPv6 ND and MLD from the kernel
    icmp_other: int = 0  # dropped: ICMP other than echo requests
    icmp_errors: int = 0  # ICMP errors sent toward clients
    icmp_rate_limited: int = 0  # ICMP errors not sent: over the rate limit


class _Flow:
    """One UDP or echo flow."""

    __slots__ = (
        "client", "closed", "echo", "flow", "key", "last", "owner", "refused", "server", "timeout",
    )  # fmt: skip

    def __init__(
        self, flow: FlowId, key: bytes, client: bytes, server: bytes, timeout: float, now: float,
        owner: ClientState,
    ) -> None:  # fmt: skip
        self.flow = flow
        self.owner = owner  # the client's accounting (stack.clients)
        self.key = key  # src + dst + ports (UDP, 12/36 bytes) or + identifier (echo, 10/34)
        self.client = client  # raw client address
        self.server = server  # raw original-destination address
        self.echo = flow.proto == "icmp"
        self.timeout = timeout  # idle timeout
        self.last = now  # the last datagram either way
        self.refused: int | None = None  # an unreachable code, _SILENT, or None (open)
        self.closed = False


class Datagrams:
    """The UDP and echo flow table. ``Stack`` owns one and forwards to it.

    Output packets are appended to the ``out`` list each method is given (the
    stack's pending output); events go to ``events``.
    """

    def __init__(
        self,
        config: DatagramConfig,
        *,
        mtu: int,
        events: deque[Event],
        stats: DatagramStats,
        ttl: int = 64,
        clients: ClientTable | None = None,
    ) -> None:
        self.config = config
        self.stats = stats
        self._mtu = mtu
        self._ttl = ttl
        self._events = events
        self._by_key: dict[bytes, _Flow] = {}
        self._by_flow: dict[FlowId, _Flow] = {}
        if clients is None:  # standalone (tests): a table of its own
            clients = ClientTable(ClientQuotas(), MemoryBudget(0))
        self._clients = clients
        self._timers: list[tuple[float, int, _Flow]] = []
        self._timer_seq = 0
        self._tokens = float(config.icmp_error_burst)
        self._tokens_at = 0.0
        self._ident4 = 0  # IPv4 identification of fragmented replies (RFC 6864 4.2)
        self._ident6 = 0  # IPv6 fragment identification (RFC 8200 4.5)

    def __len__(self) -> int:
        return len(self._by_key)

    # ------------------------------------------------------------------ input

    def receive(
        self, packet: bytes, ip: IpHeader, now: float, out: list[bytes], csum_ok: bool = False
    ) -> bool:
        """Handle a whole (reassembled) non-TCP packet; False if not UDP or ICMP.

        ``csum_ok`` skips verifying a UDP checksum (see ``Stack.receive``); ICMP
        checksums are always verified (no offload computes them).

        Raises:
            ParseError: a malformed UDP/ICMP header or a bad checksum (the
                stack counts it).
        """
        proto = ip.proto
        if proto == PROTO_UDP:
            self._udp(packet, ip, now, out, csum_ok)
            return True
        if proto == (PROTO_ICMP if ip.version == 4 else PROTO_ICMPV6):
            self._icmp(packet, ip, now, out)
            return True
        return False

    def _udp(
        self, packet: bytes, ip: IpHeader, now: float, out: list[bytes], csum_ok: bool
    ) -> None:
        src, dst, off, end = ip.src, ip.dst, ip.offset, ip.end
        v4 = ip.version == 4
        if dst[0] >= 224 if v4 else dst[0] == 0xFF:
            self.stats.multicast += 1
            return
        pseudo: int | None
        if csum_ok:
            pseudo = None
        elif v4:
            pseudo = pseudo_sum_v4(src, dst, PROTO_UDP, end - off)
        else:
            pseudo = pseudo_sum_v6(src, dst, PROTO_UDP, end - off)
        udp = parse_udp(packet, off, end, pseudo, ipv6=not v4)
        key = src + dst + packet[off : off + 4]
        f = self._by_key.get(key)
        if f is None:
            if not udp.src_port or not udp.dst_port:
                self.stats.invalid += 1
                return
            f = self._open(key, ip, udp.src_port, udp.dst_port, "udp", now)
        if f is None or not self._active(f, packet, now, out):
            return
        self.stats.udp_in += 1
        self._events.append(DatagramReceived(f.flow, packet[off + 8 : off + udp.length]))

    def _icmp(self, packet: bytes, ip: IpHeader, now: float, out: list[bytes]) -> None:
        src, dst, off, end = ip.src, ip.dst, ip.offset, ip.end
        if ip.version == 6:
            if off < end and packet[off] in ICMP6_NEIGHBOR_AND_MLD_TYPES:
                self.stats.neighbor_discovery += 1
                return
            hdr = parse_icmp(packet, off, end, pseudo_sum_v6(src, dst, PROTO_ICMPV6, end - off))
            request, multicast = ICMP6_ECHO_REQUEST, dst[0] == 0xFF
        else:
            hdr = parse_icmp(packet, off, end)
            request, multicast = ECHO_REQUEST, dst[0] >= 224
        if hdr.type != request:
            self.stats.icmp_other += 1
            return
        if hdr.code:
            self.stats.invalid += 1
            return
        if multicast:
            self.stats.multicast += 1
            return
        key = src + dst + packet[off + 4 : off + 6]
        f = self._by_key.get(key) or self._open(key, ip, hdr.rest >> 16, 0, "icmp", now)
        if f is None or not self._active(f, packet, now, out):
            return
        self.stats.echo_in += 1
        self._events.append(EchoRequest(f.flow, hdr.rest & 0xFFFF, packet[off + 8 : end]))

    def _open(
        self, key: bytes, ip: IpHeader, cport: int, sport: int, proto: str, now: float
    ) -> _Flow | None:
        cfg, src, dst = self.config, ip.src, ip.dst
        if len(self._by_key) >= cfg.max_flows:
            self.stats.flow_limit += 1
            return None
        clients = self._clients
        owner = clients.get(src, now)
        echo = proto == "icmp"
        quotas = clients.quotas
        if owner.echo >= quotas.echo_flows if echo else owner.udp >= quotas.udp_flows:
            # Dropped silently: an ICMP error to a source that may be spoofed would
            # make the relay a reflector (RFC 1812 4.3.2.7 spirit); the client's
            # own retries find room once its flows idle out.
            clients.refuse(owner, ECHO_FLOWS if echo else UDP_FLOWS)
            self.stats.flow_limit += 1
            clients.done(owner)
            return None
        client, server = address_text(src), address_text(dst)
        flow = FlowId(ip.version, client, cport, server, sport, proto)
        if proto == "icmp":
            timeout = cfg.echo_idle_timeout
        else:
            timeout = cfg.dns_idle_timeout if sport == 53 else cfg.udp_idle_timeout
        f = _Flow(flow, key, src, dst, timeout, now, owner)
        self._by_key[key] = f
        self._by_flow[flow] = f
        if echo:
            owner.echo += 1
        else:
            owner.udp += 1
        self._file(f, now + timeout)
        self.stats.flows_opened += 1
        self._events.append(DatagramFlowOpened(flow))
        return f

    def _active(self, f: _Flow, packet: bytes, now: float, out: list[bytes]) -> bool:
        # Note the activity; a refused flow answers (or drops) the packet itself.
        f.last = now
        if f.refused is None:
            return True
        self.stats.refused += 1
        if f.refused != _SILENT:
            self.icmp_error(build_icmp_unreachable(packet, code=f.refused, src=f.server), now, out)
        return False

    # ------------------------------------------------------------ caller side

    def send(self, flow: FlowId, data: bytes, now: float, out: list[bytes]) -> bool:
        """One UDP datagram to the client; False when the flow is gone (or not UDP)."""
        f = self._by_flow.get(flow)
        if f is None or f.echo:
            return False
        try:
            packet = build_udp_packet(
                f.server, f.client, flow.server_port, flow.client_port, data, ttl=self._ttl
            )
        except ValueError:
            return False
        f.last = now
        self.stats.udp_out += 1
        self._emit(packet, out)
        return True

    def send_echo_reply(
        self, flow: FlowId, seq: int, data: bytes, now: float, out: list[bytes]
    ) -> bool:
        """An echo reply with the client's own identifier; False when the flow is gone."""
        f = self._by_flow.get(flow)
        if f is None or not f.echo:
            return False
        try:
            packet = build_echo(
                f.server, f.client, ident=flow.client_port, seq=seq & 0xFFFF, payload=data,
                reply=True,
            )  # fmt: skip
        except ValueError:
            return False
        f.last = now
        self.stats.echo_out += 1
        self._emit(packet, out)
        return True

    def unreachable(
        self,
        flow: FlowId,
        code: Unreachable | int,
        now: float,
        out: list[bytes],
        *,
        src: str | None = None,
        quote: bytes = b"",
    ) -> bool:
        """Destination unreachable about ``flow``; see ``Stack.datagram_unreachable``.

        For echo, ``quote`` is the ICMP message: its sequence number is kept, its
        identifier replaced by the client's. False when the flow is gone or ``src``
        is not of the flow's family.
        """
        f = self._by_flow.get(flow)
        if f is None:
            return False
        server = f.server
        if src is not None:
            try:
                server = ipaddress.ip_address(src).packed
            except ValueError:
                return False
            if len(server) != len(f.client):
                return False
        limit = _V4_QUOTE if flow.version == 4 else _V6_QUOTE
        if f.echo:
            seq = _U16.unpack_from(quote, 6)[0] if len(quote) >= 8 else 0
            original = build_echo(
                f.client, f.server, ident=flow.client_port, seq=seq, payload=quote[8:limit],
                reply=False,
            )  # fmt: skip
        else:
            original = build_udp_packet(
                f.client, f.server, flow.client_port, flow.server_port, quote[:limit]
            )
        code = unreachable_code(flow.version, code)
        self.icmp_error(build_icmp_unreachable(original, code=code, src=server), now, out)
        return True

    def refuse(self, flow: FlowId, code: Unreachable | int | None) -> None:
        """From now on answer the client's datagrams on ``flow`` with destination
        unreachable ``code`` (None: drop them silently) instead of delivering them."""
        f = self._by_flow.get(flow)
        if f is not None:
            f.refused = _SILENT if code is None else unreachable_code(flow.version, code)

    def end(self, flow: FlowId) -> None:
        """Forget ``flow`` now; ``DatagramFlowClosed(ABORTED)`` follows."""
        f = self._by_flow.get(flow)
        if f is not None:
            self._close(f, CloseReason.ABORTED)

    # ----------------------------------------------------------------- output

    def _emit(self, packet: bytes, out: list[bytes]) -> None:
        if len(packet) <= self._mtu:
            out.append(packet)
            return
        if packet[0] >> 4 == 4:
            self._ident4 = ident = (self._ident4 + 1) & 0xFFFF
        else:
            self._ident6 = ident = (self._ident6 + 1) & 0xFFFFFFFF
        pieces = fragment(packet, self._mtu, ident)
        self.stats.fragments_out += len(pieces)
        out.extend(pieces)

    def icmp_error(self, packet: bytes, now: float, out: list[bytes]) -> None:
        """Send an ICMP error toward a client, within the rate limit."""
        cfg = self.config
        elapsed = max(0.0, now - self._tokens_at)
        tokens = self._tokens + elapsed * cfg.icmp_errors_per_second
        tokens = min(float(cfg.icmp_error_burst), tokens)
        self._tokens_at = now
        if tokens < 1.0:
            self._tokens = tokens
            self.stats.icmp_rate_limited += 1
            return
        self._tokens = tokens - 1.0
        self.stats.icmp_errors += 1
        out.append(packet)

    # ----------------------------------------------------------------- timers

    def _file(self, f: _Flow, deadline: float) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (deadline, self._timer_seq, f))

    def get_timer(self) -> float | None:
        """The earliest idle deadline filed (possibly early: it is re-checked)."""
        timers = self._timers
        while timers and timers[0][2].closed:
            heapq.heappop(timers)
        return timers[0][0] if timers else None

    def handle_timer(self, now: float) -> None:
        """Close every flow idle for its timeout."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, f = heapq.heappop(timers)
            if f.closed:
                continue
            deadline = f.last + f.timeout
            if deadline > now:
                self._file(f, deadline)  # active since it was filed
            else:
                self._close(f, CloseReason.IDLE)

    def _close(self, f: _Flow, reason: CloseReason) -> None:
        f.closed = True
        del self._by_key[f.key]
        del self._by_flow[f.flow]
        owner = f.owner
        if f.echo:
            owner.echo -= 1
        else:
            owner.udp -= 1
        self._clients.done(owner)
        self.stats.flows_closed += 1
        self._events.append(DatagramFlowClosed(f.flow, reason))
