"""Synthetic pcap conversations: what a flow's bytes would have looked like on a wire.

Theory of operation: the relay never sees one TCP connection end to end (it
terminates the client's and opens its own to the server), so a capture of a
flow is *written*, not recorded: ``TcpConversation`` turns the bytes of each
direction, in the order and at the times the relay saw them, into the packets
of one clean TCP connection between the original addresses and ports: a
three-way handshake (RFC 9293 3.5) with window scaling (RFC 7323 2), each
chunk cut into segments of at most ``SEGMENT`` bytes with sequence and
acknowledgment numbers that follow the bytes of both directions, and the FINs
or an RST as the flow ended. Nothing is lost or retransmitted on this wire,
so Wireshark's "Follow TCP Stream" gives back exactly the bytes of each
direction, and every dissector sees a clean stream. ``UdpConversation`` does
the same for datagrams, one UDP packet each.

The file is classic pcap (the libpcap format: a 24-byte header, then a
16-byte record header per packet; microsecond timestamps) with
``LINKTYPE_RAW``: each record is an IPv4 or IPv6 packet, built by
``stack.wire`` with every checksum. Records are appended to ``out``, a list
of buffers (a record header, then the packet: the payload is copied once,
into its packet) that the caller writes out, e.g. with ``os.writev``, and
clears; ``size`` counts its bytes. ``file_header()`` starts the file.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Final

from stack.wire.tcp import ACK, FIN, PSH, RST, SYN, build_tcp_packet, encode_options
from stack.wire.udp import build_udp_packet

__all__ = [
    "LINKTYPE_RAW",
    "SEGMENT",
    "SNAPLEN",
    "Records",
    "TcpConversation",
    "UdpConversation",
    "file_header",
]

LINKTYPE_RAW: Final = 101  # the record is an IP packet, version from its first nibble
SNAPLEN: Final = 65535
# Payload bytes per synthetic segment: the largest that keeps every packet (IPv4
# 20 + TCP 20, IPv6 40 + 20) within the 16-bit length fields and SNAPLEN. Fewer,
# larger packets make both the writing and the reading cheaper.
SEGMENT: Final = 65000
_WSCALE: Final = 14  # RFC 7323 2.3's largest: a window that never looks full
_WINDOW: Final = 0xFFFF
_SYN_OPTIONS: Final = encode_options(mss=SEGMENT, wscale=_WSCALE)
_HEADER: Final = struct.Struct("<IHHiIII")
_RECORD: Final = struct.Struct("<IIII")
_MASK: Final = 0xFFFFFFFF


def file_header() -> bytes:
    """The 24-byte pcap file header: magic, version 2.4, UTC, snaplen, link type."""
    return _HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_RAW)


class Records:
    """pcap records waiting to be written: ``out`` (buffers, in order) and ``size``."""

    __slots__ = ("out", "size")

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.size = 0

    def add(self, ts: float, packet: bytes) -> None:
        sec = int(ts)
        usec = min(int((ts - sec) * 1_000_000), 999_999)
        n = len(packet)
        self.out.append(_RECORD.pack(sec, usec, n, n))
        self.out.append(packet)
        self.size += 16 + n

    def take(self) -> list[bytes]:
        """The buffers so far; ``out`` starts anew."""
        out, self.out, self.size = self.out, [], 0
        return out


def _packed(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


class TcpConversation(Records):
    """The packets of one TCP connection, appended to ``out`` as events come.

    Args:
        client_ip, client_port, server_ip, server_port: the flow's 4-tuple (the
            original destination the client addressed).
        client_isn, server_isn: initial sequence numbers (any 32-bit values;
            arithmetic is mod 2**32, RFC 9293 3.4).
    """

    __slots__ = (
        "_addr",
        "_cport",
        "_ended",
        "_isn",
        "_next",
        "_open",
        "_sport",
    )

    def __init__(
        self,
        client_ip: str,
        client_port: int,
        server_ip: str,
        server_port: int,
        *,
        client_isn: int = 0,
        server_isn: int = 0,
    ) -> None:
        self._addr = (_packed(client_ip), _packed(server_ip))
        self._cport, self._sport = client_port, server_port
        self._isn = (client_isn & _MASK, server_isn & _MASK)
        # The next sequence number each side sends: [client, server].
        self._next = [(client_isn + 1) & _MASK, (server_isn + 1) & _MASK]
        self._open = False  # the handshake is written
        self._ended = [False, False]  # a FIN from [client, server] is written
        super().__init__()

    def _packet(self, side: int, flags: int, ts: float, payload: bytes | memoryview = b"") -> None:
        src, dst = self._addr[side], self._addr[1 - side]
        sport, dport = (self._cport, self._sport) if side == 0 else (self._sport, self._cport)
        seq = self._next[side] if not flags & SYN else self._isn[side]
        ack = self._next[1 - side] if flags & ACK else 0
        options = _SYN_OPTIONS if flags & SYN else b""
        packet = build_tcp_packet(
            src, dst, sport, dport, seq, ack, flags, _WINDOW, options, payload
        )
        self.add(ts, packet)

    def handshake(self, syn_at: float, synack_at: float) -> None:
        """SYN at ``syn_at``; SYN-ACK and the client's ACK at ``synack_at``."""
        if self._open:
            return
        self._open = True
        self._packet(0, SYN, syn_at)
        self._packet(1, SYN | ACK, synack_at)
        self._packet(0, ACK, synack_at)

    def unanswered(self, syn_at: float, rst_at: float | None = None) -> None:
        """A SYN that never opened a connection: no answer, or (``rst_at``) the
        server's RST-ACK (a refused connection, RFC 9293 3.10.7.1)."""
        if self._open:
            return
        self._open = True
        self._packet(0, SYN, syn_at)
        if rst_at is not None:
            # From the server, seq 0, acknowledging the SYN.
            self.add(
                rst_at,
                build_tcp_packet(
                    self._addr[1], self._addr[0], self._sport, self._cport,
                    0, self._next[0], RST | ACK, 0,
                ),
            )  # fmt: skip
        self._ended = [True, True]

    @property
    def opened(self) -> bool:
        """The handshake (or an unanswered SYN) is written."""
        return self._open

    def data(self, from_server: bool, payload: bytes, ts: float) -> None:
        """One direction's next bytes, as segments of at most ``SEGMENT`` bytes;
        the last one carries PSH."""
        side = 1 if from_server else 0
        if self._ended[side] or not payload:
            return
        view = memoryview(payload)
        n = len(view)
        for start in range(0, n, SEGMENT):
            chunk = view[start : start + SEGMENT]
            last = start + SEGMENT >= n
            self._packet(side, ACK | PSH if last else ACK, ts, chunk)
            self._next[side] = (self._next[side] + len(chunk)) & _MASK

    def fin(self, from_server: bool, ts: float) -> None:
        """That side's FIN (it takes one sequence number); once both are written,
        the last one's ACK."""
        side = 1 if from_server else 0
        if self._ended[side]:
            return
        self._packet(side, FIN | ACK, ts)
        self._next[side] = (self._next[side] + 1) & _MASK
        self._ended[side] = True
        if self._ended[1 - side]:
            self._packet(1 - side, ACK, ts)

    def reset(self, from_server: bool, ts: float) -> None:
        """That side's RST-ACK; nothing is written after it."""
        if self._ended == [True, True]:
            return
        self._packet(1 if from_server else 0, RST | ACK, ts)
        self._ended = [True, True]

    @property
    def ended(self) -> bool:
        return self._ended == [True, True]


class UdpConversation(Records):
    """The datagrams of one UDP flow, one packet each, appended to ``out``."""

    __slots__ = ("_addr", "_ports")

    def __init__(self, client_ip: str, client_port: int, server_ip: str, server_port: int) -> None:
        self._addr = (_packed(client_ip), _packed(server_ip))
        self._ports = (client_port, server_port)
        super().__init__()

    def datagram(self, from_server: bool, payload: bytes, ts: float) -> None:
        (c, s), (cp, sp) = self._addr, self._ports
        if from_server:
            packet = build_udp_packet(s, c, sp, cp, payload)
        else:
            packet = build_udp_packet(c, s, cp, sp, payload)
        self.add(ts, packet)
