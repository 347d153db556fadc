"""The demultiplexer: raw IP packets in, connections, events and packets out.

Theory of operation: ``receive()`` parses one packet, verifies it, and hands
the TCP segment to the connection its 4-tuple names, creating one in LISTEN
for a SYN to *any* address (this is a transparent endpoint). A connection that
was touched -- by a packet, a caller's call or a timer -- is remembered, and
``packets_to_send()`` asks only those for output and re-files their deadline
in a heap, so the cost of a batch follows the flows it touched, not the size
of the table. Deadlines in the heap are checked lazily: an entry whose time no
longer matches its connection's earliest deadline is skipped.

A SYN (and a new UDP or echo flow, a fragment) is first admitted against the
shared limits and its client's quotas (``stack.clients``): a client is an IPv4
address or an IPv6 prefix, and no client may hold more than its share.

Fragments go to ``stack.fragments`` and a reassembled packet comes back through
``receive``; UDP and ICMP go to ``stack.datagram`` (flows, replies, ICMP
errors); ``get_timer``/``handle_timer`` cover both. The packets themselves
are built by ``stack.emit``.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from stack.clients import (
    CONNECT_RATE,
    CONNECT_RATE_ALL,
    DESTINATION,
    PENDING,
    TCP_FLOWS,
    ClientState,
    ClientStats,
    ClientTable,
    TokenBucket,
)
from stack.compiled import mypyc_attr
from stack.config import StackConfig
from stack.datagram import Datagrams, DatagramStats
from stack.emit import answer, build_segments, build_segments_offload, reject_icmp
from stack.errors import ChecksumError, ParseError
from stack.events import (
    ConnectionRequest,
    Event,
    FlowId,
    Reject,
    Unreachable,
)
from stack.fragments import FragmentStats, Reassembler
from stack.seq import seq_add, seq_ge, seq_le, seq_lt
from stack.tcp.buffers import MemoryBudget
from stack.tcp.connection import State, TcpConnection
from stack.tcp.core import MAX_WINDOW, ConnectionCore
from stack.tcp.segment import VIEW_MIN, Payload, TcpSegment
from stack.tcp.timewait import TimeWaitTable
from stack.wire.checksum import pseudo_sum_v4, pseudo_sum_v6
from stack.wire.ip import PROTO_TCP, address_text, parse_ip
from stack.wire.tcp import (
    ACK,
    FIN,
    RST,
    SYN,
    TcpHeader,
    TcpOptions,
    parse_tcp,
)

# The connection timer heap is rebuilt once stale entries are over half of it.
_COMPACT_AT = 64
_ADDRESSES_KEPT = 4096  # Stack._address's table: distinct addresses before it is emptied


def _as_bytes(packet: bytes | memoryview) -> bytes:
    """What is kept of a packet (a SYN, a fragment, a datagram) is bytes."""
    return packet if type(packet) is bytes else bytes(packet)


@dataclass(slots=True)
class StackStats:
    """Counters; every dropped packet is counted under exactly one reason."""

    packets_in: int = 0
    packets_out: int = 0
    parse_errors: int = 0  # malformed IP or TCP headers
    checksum_errors: int = 0
    fragments: int = 0  # fragments received (see ``reassembly`` for their fate)
    not_tcp: int = 0  # neither TCP, UDP nor ICMP: dropped
    rst_sent: int = 0  # answers to segments for no connection
    syn_dropped: int = 0  # a SYN over the pending or flow limit
    quota_rst_limited: int = 0  # quota refusals not answered with RST: over the rate limit
    connections_opened: int = 0
    connections_closed: int = 0
    acks_merged: int = 0  # pure ACKs folded into a later one of the same batch
    # Buffer reservations the Stack-wide TcpConfig.memory_budget cut short: a new
    # connection's initial buffers shrunk, a receive or send buffer's growth refused.
    memory_budget_reached: int = 0
    datagram: DatagramStats = field(default_factory=DatagramStats)  # UDP and ICMP
    reassembly: FragmentStats = field(default_factory=FragmentStats)
    clients: ClientStats = field(default_factory=ClientStats)  # per-client quotas


@dataclass(frozen=True, slots=True)
class StackGauges:
    """What the stack holds now (``Stack.gauges``); unlike ``StackStats``, these go
    back down: all are 0 once every connection is gone."""

    connections: int  # TCP connections in the table (TIME-WAIT's compact table apart)
    timer_heap: int  # entries in the connection timer heap, stale ones included
    timers: int  # connections with a deadline filed (the heap's live entries)
    buffered: int  # bytes held in send, receive and reassembly buffers (TcpConnection.buffered)
    reserved: int  # buffer bytes reserved from the memory budget (sizes, not contents)
    limit: int  # the memory budget


class PacketCounts:
    """The packets of one TCP connection as the stack handled them: ``received``
    from the client (SYN, ACKs and retransmissions included; a pure ACK merged
    into a later one still counts) and ``sent`` to it. With TUN offloads a GRO
    super-segment in or a GSO write out is one packet here.

    ``Stack.packet_counts`` hands out the live object, which keeps counting
    until the connection is gone and keeps its last values after that.
    """

    __slots__ = ("received", "sent")

    def __init__(self) -> None:
        self.received = 0
        self.sent = 0

    def __repr__(self) -> str:
        return f"PacketCounts(received={self.received}, sent={self.sent})"


class _Connection(TcpConnection):
    """A connection the stack created, with its packet counts."""

    __slots__ = ("packets",)

    packets: PacketCounts  # set when the stack creates it


class _Entry:
    """Per-connection bookkeeping the connection itself does not need."""

    __slots__ = ("client", "key", "owner", "packets", "server", "syn_packet")

    def __init__(
        self, key: bytes, client: bytes, server: bytes, syn_packet: bytes | None,
        packets: PacketCounts, owner: ClientState,
    ) -> None:  # fmt: skip
        self.key = key  # dict key: client addr + server addr + ports
        self.owner = owner  # the client's accounting (stack.clients)
        self.client = client  # raw client address
        self.server = server  # raw original-destination address
        self.syn_packet = syn_packet  # kept for an ICMP reject, until decided
        self.packets = packets  # the connection's, counted on output


class _HeldAck:
    """The last pure ACK of a run being merged (``Stack.receive(batch=True)``)."""

    __slots__ = ("ack", "count", "options", "seq", "window")

    def __init__(self, seq: int, ack: int, window: int, options: TcpOptions) -> None:
        self.seq = seq
        self.ack = ack
        self.window = window
        self.options = options
        self.count = 1


@mypyc_attr(allow_interpreted_subclasses=True)  # tests subclass it
class Stack:
    """A userspace TCP endpoint for every address. See the module docstring."""

    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        self.stats = StackStats()
        self._by_key: dict[bytes, _Connection] = {}
        self._by_flow: dict[FlowId, TcpConnection] = {}
        self._entries: dict[TcpConnection, _Entry] = {}
        self._events: deque[Event] = deque()
        self._readable: list[ConnectionCore] = []
        self._touched: dict[TcpConnection, None] = {}  # ordered set
        self._raw_out: list[bytes] = []  # packets that belong to no connection
        self._held: dict[TcpConnection, _HeldAck] = {}  # pure ACKs merged in this batch
        self._timers: list[tuple[float, int, TcpConnection]] = []
        self._timer_seq = 0  # heap tie-breaker
        self._filed: dict[TcpConnection, float] = {}  # deadline each connection is filed under
        self._pending = 0  # connections in LISTEN
        self._orphans: dict[TcpConnection, _Entry] = {}  # closed, output not yet taken
        self._time_wait = TimeWaitTable(self.config.tcp.time_wait, self.config.max_time_wait)
        # All connections' buffers; reservations it cuts short count in the stats.
        self._tcp_memory = MemoryBudget(self.config.tcp.memory_budget, self.stats)
        # All connections' receive buffers, hence the windows they advertise (0: unbounded).
        window_budget = self.config.tcp.rcv_window_budget
        self._rcv_windows = MemoryBudget(window_budget) if window_budget else None
        cfg = self.config
        self._clients = ClientTable(cfg.clients, self._tcp_memory)
        self._clients.stats = self.stats.clients
        self._connects = TokenBucket(cfg.connects_per_second, cfg.connect_burst)
        self._dst_pending: dict[bytes, int] = {}  # pending requests per destination address
        self._addresses: dict[bytes, tuple[bytes, str]] = {}  # see _address
        # RSTs for quota refusals share the ICMP errors' rate: a spoofed flood gets
        # no more answers than it would get ICMP errors.
        dcfg = cfg.datagram
        self._quota_rsts = TokenBucket(dcfg.icmp_errors_per_second, dcfg.icmp_error_burst)
        self._datagrams = Datagrams(
            self.config.datagram,
            mtu=self.config.mtu,
            events=self._events,
            stats=self.stats.datagram,
            ttl=self.config.tcp.ttl,
            clients=self._clients,
        )
        self._fragments = Reassembler(
            self.config.fragments,
            self._reassembly_timed_out,
            self.stats.reassembly,
            clients=self._clients,
        )

    # ------------------------------------------------------------------ input

    def receive(
        self, packet: bytes | memoryview, now: float, *, csum_ok: bool = False, batch: bool = False
    ) -> None:
        """Take one raw IP packet from the client side. Never raises for bad input.

        A packet that completes a fragmented datagram is followed by the whole
        datagram, which is received (and counted in ``packets_in``) in turn.

        ``csum_ok``: the TCP/UDP checksum is not verified, because the caller
        knows it is good or only partial (TUN offloads: virtio NEEDS_CSUM or
        DATA_VALID). Such a packet may be a GRO super-segment: one TCP segment
        with up to ~64 KiB of payload, taken like any other segment, and may
        come as a memoryview (of the frame it was read into: not copied); what
        the Stack keeps of a packet beyond this call is bytes.

        ``batch``: the packet is one of a batch read at ``now`` that the caller
        ends with ``end_batch(now)``. A run of plain cumulative pure ACKs for one
        connection in the batch is then merged: only the last is processed, as
        standing for the run (``TcpConnection.merges_ack`` says which qualify).
        A bulk download's client sends one ACK per two segments, and the ACK
        path is most of what the Stack spends per packet on that direction.
        """
        self.stats.packets_in += 1
        try:
            ip = parse_ip(packet)
            if ip.fragment is not None:
                self.stats.fragments += 1
                whole = self._fragments.add(_as_bytes(packet), ip, now)
                if whole is not None:
                    self.receive(whole, now)
                return
            if ip.proto != PROTO_TCP:
                if not self._datagrams.receive(_as_bytes(packet), ip, now, self._raw_out, csum_ok):
                    self.stats.not_tcp += 1
                return
            length = ip.end - ip.offset
            pseudo: int | None
            if csum_ok:
                pseudo = None
            elif ip.version == 4:
                pseudo = pseudo_sum_v4(ip.src, ip.dst, PROTO_TCP, length)
            else:
                pseudo = pseudo_sum_v6(ip.src, ip.dst, PROTO_TCP, length)
            tcp = parse_tcp(packet, ip.offset, ip.end, pseudo)
        except ChecksumError:
            self.stats.checksum_errors += 1
            return
        except ParseError:
            self.stats.parse_errors += 1
            return
        off = ip.offset
        key = ip.src + ip.dst + packet[off : off + 4]
        conn = self._by_key.get(key)
        if conn is None:
            if key in self._time_wait and self._in_time_wait(key, tcp, ip.src, ip.dst, now):
                return
            self._no_connection(
                _as_bytes(packet), ip.src, ip.dst, tcp, key, ip.end - off - tcp.header_len, now
            )
            return
        conn.packets.received += 1
        start = off + tcp.header_len
        held = self._held
        if batch and tcp.flags == ACK and start == ip.end:
            run = held.get(conn)
            if run is None:
                if conn.merges_ack(tcp.seq, tcp.ack, tcp.options):
                    held[conn] = _HeldAck(tcp.seq, tcp.ack, tcp.window, tcp.options)
                    return
            elif self._extends(run, conn, tcp.seq, tcp.ack, tcp.options):
                run.ack, run.window, run.options = tcp.ack, tcp.window, tcp.options
                run.count += 1
                self.stats.acks_merged += 1
                return
        if held:
            run = held.pop(conn, None)
            if run is not None:
                # What came before goes first. A plain ACK leaves ESTABLISHED or
                # CLOSE-WAIT as it was, so the connection is still the one to ask.
                self._release(conn, run, now)
        end = ip.end
        # A GRO super-segment's payload (up to ~64 KiB) is passed as a view of the
        # packet: flush_data copies it once, with the rest of the pass, where a
        # slice here and the join there were two copies of every byte.
        payload: Payload = (
            memoryview(packet)[start:end]
            if end - start >= VIEW_MIN and type(packet) is bytes
            else packet[start:end]  # a view of a view is not copied either
        )
        conn.on_segment(tcp.seq, tcp.ack, tcp.flags, tcp.window, payload, tcp.options, now)
        self._after_segment(conn, now)

    @staticmethod
    def _extends(run: _HeldAck, conn: TcpConnection, seq: int, ack: int, o: TcpOptions) -> bool:
        """Whether a pure ACK continues the held run: same sequence number, a
        higher ACK still within what was sent, no SACK blocks, and timestamps that
        do not go backwards (PAWS is checked on the one processed). Only what
        varies per ACK: the connection's state, which ``merges_ack`` checked for
        the run's first, cannot change before the run is released."""
        if seq != run.seq or not seq_lt(run.ack, ack) or not seq_le(ack, conn.snd_max):
            return False
        if o.sack_blocks:
            return False
        new, old = o.timestamps, run.options.timestamps
        if new is None or old is None:
            return new is old
        return seq_ge(new[0], old[0])

    def _release(self, conn: TcpConnection, run: _HeldAck, now: float) -> None:
        conn.on_segment(run.seq, run.ack, ACK, run.window, b"", run.options, now, run.count)
        self._after_segment(conn, now)

    def end_batch(self, now: float) -> None:
        """Process the ACKs held by ``receive(batch=True)``. ``handle_timer`` and
        ``packets_to_send`` call it first, so a caller cannot leave one behind."""
        held = self._held
        while held:
            conn, run = held.popitem()
            self._release(conn, run, now)

    def _after_segment(self, conn: TcpConnection, now: float) -> None:
        self._touched[conn] = None
        state = conn.state
        if state is State.CLOSED:
            self._forget(conn)
        elif state is State.TIME_WAIT:
            self._retire(conn, now)

    def _in_time_wait(self, key: bytes, tcp: TcpHeader, src: bytes, dst: bytes, now: float) -> bool:
        """Handle a segment for a 4-tuple in TIME-WAIT; False when a SYN reopens it."""
        flags = tcp.flags
        tw = self._time_wait
        if flags & SYN and not flags & ACK and tw.reopens(key, tcp.seq):
            return False
        entry = tw.get(key)
        if entry is not None and flags & FIN and not flags & RST:
            snd_nxt, rcv_nxt, window = entry
            self._raw_out.append(answer(src, dst, tcp, snd_nxt, rcv_nxt, ACK, window))
            tw.restart(key, now)
        return True

    def _retire(self, conn: TcpConnection, now: float) -> None:
        # TIME-WAIT: the application is done, so Closed goes out now and only a
        # compact record stays (see stack.tcp.timewait). The ACK of the peer's
        # FIN is still owed: build it before the connection goes.
        entry = self._entries[conn]
        out = self._raw_out
        n = len(out)
        self._build(entry, conn.segments_to_send(now), out)
        entry.packets.sent += len(out) - n
        window = min(self.config.tcp.rcv_buf, MAX_WINDOW)
        self._time_wait.add(entry.key, conn.snd_max, conn.rcv_nxt, window, now)
        conn.retire()
        self._forget(conn)
        self._orphans.pop(conn, None)

    def _no_connection(
        self, packet: bytes, src: bytes, dst: bytes, tcp: TcpHeader, key: bytes,
        payload_len: int, now: float,
    ) -> None:  # fmt: skip
        flags = tcp.flags
        if flags & RST:
            return  # RFC 9293 3.10.7.1: an RST for no connection is dropped
        if flags & SYN and not flags & ACK:
            cfg = self.config
            if self._pending >= cfg.max_pending or len(self._by_key) >= cfg.max_flows:
                self.stats.syn_dropped += 1
                return
            client = self._admit(src, dst, tcp, now)
            if client is not None:
                self._open(packet, src, dst, tcp, key, client)
            return
        # RFC 9293 3.10.7.1: answer anything else with a reset.
        if flags & ACK:
            seq, ack, rflags = tcp.ack, 0, RST
        else:
            seg_len = payload_len + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            seq, ack, rflags = 0, seq_add(tcp.seq, seg_len), RST | ACK
        self._raw_out.append(answer(src, dst, tcp, seq, ack, rflags, 0))
        self.stats.rst_sent += 1

    def _admit(self, src: bytes, dst: bytes, tcp: TcpHeader, now: float) -> ClientState | None:
        """The per-client and per-destination checks on a new SYN (``stack.clients``).

        Over a count (the client's TCP flows) the SYN is refused as a busy server
        refuses it: RST, within the ICMP errors' rate. Over a rate or the
        destination's pending share it is dropped silently, as by a full SYN
        queue: the client's SYN retransmission tries again a second later. At
        its pending quota the client's *oldest* request is reset to make room,
        so a client flooding silent destinations only ever evicts itself.
        """
        clients = self._clients
        c = clients.get(src, now)
        quotas = clients.quotas
        if c.tcp >= quotas.tcp_flows:
            clients.refuse(c, TCP_FLOWS)
            if self._quota_rsts.take(now):
                self._raw_out.append(answer(src, dst, tcp, 0, seq_add(tcp.seq, 1), RST | ACK, 0))
                self.stats.rst_sent += 1
            else:
                self.stats.quota_rst_limited += 1
            return None
        if self._dst_pending.get(dst, 0) >= self.config.max_pending_per_destination:
            clients.refuse(c, DESTINATION)
            clients.done(c)
            return None
        if not c.bucket.ready(now):
            clients.refuse(c, CONNECT_RATE)
            clients.done(c)
            return None
        if not self._connects.take(now):
            clients.refuse(c, CONNECT_RATE_ALL)
            clients.done(c)
            return None
        c.bucket.take(now)
        if len(c.pending) >= quotas.pending:
            clients.refuse(c, PENDING)
            oldest = next(iter(c.pending))
            assert isinstance(oldest, TcpConnection)
            self.reject(self._flow_of(oldest), Reject.RST)
        return c

    def _open(
        self, packet: bytes, src: bytes, dst: bytes, tcp: TcpHeader, key: bytes,
        client: ClientState,
    ) -> None:  # fmt: skip
        version = 4 if len(src) == 4 else 6
        src, client_text = self._address(src)
        dst, server_text = self._address(dst)
        flow = FlowId(version, client_text, tcp.src_port, server_text, tcp.dst_port)
        cfg = self.config.tcp
        conn = _Connection(
            local_port=tcp.dst_port,
            remote_port=tcp.src_port,
            config=cfg,
            flow=flow,
            mss=cfg.mss if version == 4 else cfg.mss - 20,  # the IPv6 header is 20 bytes longer
            events=self._events,
            readable=self._readable,
            budget=client.budget,
            rcv_budget=self._rcv_windows,
        )
        conn.listen(
            TcpSegment(
                tcp.src_port,
                tcp.dst_port,
                tcp.seq,
                tcp.ack,
                tcp.flags,
                tcp.window,
                b"",
                tcp.options,
            )
        )
        packets = conn.packets = PacketCounts()
        packets.received = 1  # the SYN
        self._by_key[key] = conn
        self._by_flow[flow] = conn
        self._entries[conn] = _Entry(key, src, dst, bytes(packet), packets, client)
        self._pending += 1
        client.tcp += 1
        client.pending[conn] = None
        self._dst_pending[dst] = self._dst_pending.get(dst, 0) + 1
        self.stats.connections_opened += 1
        self._events.append(ConnectionRequest(flow, tcp.options))

    def _address(self, raw: bytes) -> tuple[bytes, str]:
        """One shared (raw, text) pair per address: the flows of a client, and to a
        server, hold the same two objects rather than copies (memory per flow).
        A bounded table, emptied when full (a spoofed flood only refills it)."""
        known = self._addresses.get(raw)
        if known is None:
            if len(self._addresses) >= _ADDRESSES_KEPT:
                self._addresses.clear()
            known = self._addresses[raw] = (raw, address_text(raw))
        return known

    def _forget(self, conn: TcpConnection) -> None:
        entry = self._entries.pop(conn, None)
        if entry is None:
            return
        if entry.syn_packet is not None:
            self._unpend(conn, entry)
        entry.owner.tcp -= 1
        self._clients.done(entry.owner)
        del self._by_key[entry.key]
        del self._by_flow[self._flow_of(conn)]
        self._filed.pop(conn, None)
        self.stats.connections_closed += 1
        # Keep the entry's addresses for any RST still queued on the connection.
        self._orphans[conn] = entry

    def _flow_of(self, conn: TcpConnection) -> FlowId:
        assert conn.flow is not None
        return conn.flow

    # ------------------------------------------------------------ caller side

    def accept(self, flow: FlowId, *, isn: int) -> None:
        """Answer a ``ConnectionRequest`` with a SYN-ACK."""
        conn = self._by_flow.get(flow)
        if conn is None or conn.state is not State.LISTEN:
            return
        self._decided(conn)
        conn.accept(isn)
        self._touched[conn] = None

    def reject(
        self, flow: FlowId, how: Reject = Reject.RST, *, unreachable: Unreachable = Unreachable.HOST
    ) -> None:
        """Refuse a ``ConnectionRequest``: RST, ICMP destination unreachable, or silence."""
        conn = self._by_flow.get(flow)
        if conn is None or conn.state is not State.LISTEN:
            return
        entry = self._entries[conn]
        syn = entry.syn_packet
        self._decided(conn)
        if how is Reject.ICMP and syn is not None:
            self._raw_out.append(reject_icmp(syn, flow.version, unreachable, entry.server))
        conn.reject(rst=how is Reject.RST)
        self._touched[conn] = None
        self._forget(conn)

    def _decided(self, conn: TcpConnection) -> None:
        entry = self._entries[conn]
        if entry.syn_packet is not None:
            entry.syn_packet = None
            self._unpend(conn, entry)

    def _unpend(self, conn: TcpConnection, entry: _Entry) -> None:
        """The request was decided or went: out of the pending counts."""
        self._pending -= 1
        entry.owner.pending.pop(conn, None)
        dst = entry.server
        n = self._dst_pending[dst] - 1
        if n:
            self._dst_pending[dst] = n
        else:
            del self._dst_pending[dst]

    def send(self, flow: FlowId, data: bytes | bytearray | memoryview) -> int:
        """Queue server-to-client bytes; returns how many the send buffer took."""
        conn = self._by_flow.get(flow)
        if conn is None or conn.state is State.CLOSED or conn.state is State.LISTEN:
            return 0
        self._touched[conn] = None
        # Even with no room, offering bytes arms a later SendSpace event.
        return conn.send(data)

    def send_space(self, flow: FlowId) -> int:
        """Free bytes in the flow's send buffer (0 for a flow that is gone).

        A 0 for a live flow arms a ``SendSpace`` event for when room frees.
        """
        conn = self._by_flow.get(flow)
        if conn is None:
            return 0
        space = conn.send_space or conn.grow_send_buffer()
        if space == 0:
            conn.arm_send_space()  # a SendSpace event follows once ACKs free room
        return space

    def send_burst(self, flow: FlowId) -> int:
        """Bytes the flow's sender takes per segment it builds: its MSS times
        ``TcpConfig.tso_segments`` (0 for a flow that is gone). Bytes offered in
        multiples of it go out with no short segment at the end of each offer."""
        conn = self._by_flow.get(flow)
        return 0 if conn is None else conn.send_burst

    def consumed(self, flow: FlowId, n: int) -> None:
        """``n`` delivered bytes were written upstream: reopen the client's window."""
        conn = self._by_flow.get(flow)
        if conn is not None:
            conn.consumed(n)
            self._touched[conn] = None

    def close(self, flow: FlowId) -> None:
        """Half-close toward the client: FIN once the send buffer drains."""
        conn = self._by_flow.get(flow)
        if conn is not None:
            conn.close()
            self._touched[conn] = None
            if conn.state is State.CLOSED:
                self._forget(conn)

    def abort(self, flow: FlowId) -> None:
        """Reset the flow toward the client; ``Closed(ABORTED)`` follows."""
        conn = self._by_flow.get(flow)
        if conn is not None:
            if conn.state is State.LISTEN:
                self._decided(conn)
            conn.abort()
            self._touched[conn] = None
            self._forget(conn)

    def packet_counts(self, flow: FlowId) -> PacketCounts | None:
        """The live packet counts of the flow's connection (None for no connection).

        Kept by the caller, the object goes on counting until the connection is
        gone and then holds its final counts (``Closed`` comes after the stack
        forgot the flow, so asking then would be too late)."""
        conn = self._by_flow.get(flow)
        if conn is None:
            return None
        entry = self._entries.get(conn)
        return None if entry is None else entry.packets

    def state_of(self, flow: FlowId) -> State | None:
        """The flow's TCP state, or None once it is gone (for tests and diagnostics)."""
        conn = self._by_flow.get(flow)
        return None if conn is None else conn.state

    @property
    def memory_budget(self) -> MemoryBudget:
        """The buffer bytes all TCP connections reserve together (``used``, ``limit``)."""
        return self._tcp_memory

    def gauges(self) -> StackGauges:
        """The timer heap's size and the bytes buffered and reserved now.

        Walks every connection (about 1 ms for 10,000): for a stats line or a
        snapshot once a second, not for the packet path.
        """
        budget = self._tcp_memory
        return StackGauges(
            connections=len(self._by_key),
            timer_heap=len(self._timers),
            timers=len(self._filed),
            buffered=ConnectionCore.buffered_total(self._by_key.values()),
            reserved=budget.used,
            limit=budget.limit,
        )

    def __len__(self) -> int:
        return len(self._by_key)

    # ----------------------------------------------------------------- output

    def next_event(self) -> Event | None:
        """Pop the next event, or None when there is none."""
        if not self._events and self._readable:
            for conn in self._readable:
                conn.flush_data()
            self._readable.clear()
        return self._events.popleft() if self._events else None

    def packets_to_send(self, now: float) -> list[bytes]:
        """Raw IP packets to write toward the clients."""
        if self._held:
            self.end_batch(now)
        out = self._raw_out
        self._raw_out = []
        touched = self._touched
        if not touched:
            self.stats.packets_out += len(out)
            return out
        self._touched = {}
        for conn in touched:
            segs = conn.segments_to_send(now)
            entry = self._entries.get(conn) or self._orphans.pop(conn, None)
            if entry is None:
                continue
            if segs:  # often none: a pass that only read, or a response not yet sent
                n = len(out)
                self._build(entry, segs, out)
                entry.packets.sent += len(out) - n
            if conn.state is State.CLOSED:
                self._forget(conn)
                self._orphans.pop(conn, None)
            else:
                self._file_timer(conn)
        self.stats.packets_out += len(out)
        return out

    def _build(self, entry: _Entry, segs: list[TcpSegment], out: list[bytes]) -> None:
        cfg = self.config
        if cfg.offload:
            build_segments_offload(entry.server, entry.client, segs, cfg.tcp.ttl, cfg.gso_max, out)
        else:
            build_segments(entry.server, entry.client, segs, cfg.tcp.ttl, out)

    # ----------------------------------------------------------------- timers

    def _file_timer(self, conn: TcpConnection) -> None:
        deadline = conn.timers.earliest()  # conn.get_timer(), one call less per filing
        if deadline is None:
            self._filed.pop(conn, None)
            return
        if self._filed.get(conn) == deadline:
            return
        self._filed[conn] = deadline
        self._timer_seq += 1
        timers = self._timers
        heapq.heappush(timers, (deadline, self._timer_seq, conn))
        if len(timers) > _COMPACT_AT and len(timers) > 2 * len(self._filed):
            self._compact_timers()

    def _compact_timers(self) -> None:
        """Rebuild the heap from the live deadlines, dropping the stale entries
        (amortized O(1) per filing). In place: ``handle_timer`` may hold the list.

        Without it a stale entry would leave the heap only on reaching its top,
        so a long-lived connection that goes idle after each exchange would leave
        one keepalive deadline (2 h ahead) per exchange behind it: 7,200 entries
        for an hour of one request a second.
        """
        seq = self._timer_seq
        entries = []
        for conn, deadline in self._filed.items():
            seq += 1
            entries.append((deadline, seq, conn))
        self._timer_seq = seq
        self._timers[:] = entries
        heapq.heapify(self._timers)

    def get_timer(self) -> float | None:
        """The earliest deadline over all connections, datagram flows and reassembly."""
        # The connections' (asked twice per request/response exchange by the relay):
        # file what was touched since the last output, then drop stale heap tops.
        for conn in self._touched:
            if conn.state is not State.CLOSED:
                self._file_timer(conn)
        timers, filed = self._timers, self._filed
        deadline = None
        while timers:
            top, _, conn = timers[0]
            if filed.get(conn) == top:
                deadline = top
                break
            heapq.heappop(timers)  # stale: re-filed or closed since
        other = self._datagrams.get_timer()
        if other is not None and (deadline is None or other < deadline):
            deadline = other
        other = self._fragments.get_timer()
        if other is not None and (deadline is None or other < deadline):
            deadline = other
        return deadline

    def handle_timer(self, now: float) -> None:
        """Run every connection timer that is due; a no-op when none is."""
        if self._held:
            self.end_batch(now)
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, _, conn = heapq.heappop(timers)
            if self._filed.get(conn) != deadline:
                continue
            del self._filed[conn]
            conn.handle_timer(now)
            self._touched[conn] = None
            if conn.state is State.CLOSED:
                self._forget(conn)
        self._datagrams.handle_timer(now)
        self._fragments.handle_timer(now)
        self._time_wait.expire(now)

    # -------------------------------------------------------- UDP and ICMP echo

    def send_datagram(self, flow: FlowId, data: bytes, now: float) -> bool:
        """Send a UDP datagram to the client from the flow's original destination.

        Replies larger than ``StackConfig.mtu`` are fragmented. Counts as activity
        for the flow's idle timeout.

        Returns:
            False when the flow is gone (closed, or never existed).
        """
        return self._datagrams.send(flow, data, now, self._raw_out)

    def send_echo_reply(self, flow: FlowId, seq: int, data: bytes, now: float) -> bool:
        """Answer an ``EchoRequest`` with the client's own echo identifier.

        Returns:
            False when the echo flow is gone.
        """
        return self._datagrams.send_echo_reply(flow, seq, data, now, self._raw_out)

    def datagram_unreachable(
        self,
        flow: FlowId,
        code: Unreachable | int,
        now: float,
        *,
        src: str | None = None,
        quote: bytes = b"",
    ) -> bool:
        """Send the client ICMP/ICMPv6 destination unreachable about a UDP or echo flow.

        Args:
            flow: the flow.
            code: an ``Unreachable``, or the raw code of the flow's ICMP version.
            now: the current time (ICMP errors are rate-limited).
            src: source of the error (e.g. the router that reported it); default
                the original destination.
            quote: the offending datagram's payload, or for echo its ICMP message.

        Returns:
            False when the flow is gone.
        """
        return self._datagrams.unreachable(flow, code, now, self._raw_out, src=src, quote=quote)

    def refuse_datagrams(self, flow: FlowId, code: Unreachable | int | None) -> None:
        """Stop delivering the flow's client datagrams; answer each with destination
        unreachable ``code`` (rate-limited), or drop them silently when None. The
        flow stays in the table until it idles out, so it is not opened again."""
        self._datagrams.refuse(flow, code)

    def end_datagram_flow(self, flow: FlowId) -> None:
        """Remove a UDP or echo flow now; ``DatagramFlowClosed(ABORTED)`` follows."""
        self._datagrams.end(flow)

    def top_refused_clients(self, n: int = 5) -> list[tuple[str, int]]:
        """The clients refused most by their quotas (bounded table, upper bounds)."""
        return self._clients.top_refused(n)

    @property
    def datagram_flows(self) -> int:
        """UDP and echo flows in the table."""
        return len(self._datagrams)

    def _reassembly_timed_out(self, icmp: bytes, now: float) -> None:
        self._datagrams.icmp_error(icmp, now, self._raw_out)
