"""Limits and tunables, each with a sane default."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True)
class TcpConfig:
    """Per-connection TCP settings (the memory budget is per Stack)."""

    mss: int = 1460  # MSS we advertise (what we can receive per segment)
    default_peer_mss: int = 536  # RFC 9293 3.7.1: when the SYN carries no MSS option
    min_snd_mss: int = 48  # floor on the peer's MSS, as Linux's tcp_min_snd_mss
    tail_loss_probe: bool = True  # RFC 8985 7: probe after 2 SRTT without an ACK
    # New data taken from the send buffer per TcpSegment, in segments: the Stack
    # cuts larger ones to the MSS (or, with StackConfig.offload, writes them as one
    # GSO super-segment), so per-segment work in the connection is paid once.
    tso_segments: int = 1
    # Buffers (stack.tcp.buffers). Each starts at its *_initial size and grows with
    # demand (auto-tuning) up to the cap, within the Stack-wide memory_budget.
    rcv_buf: int = 4 << 20  # receive buffer cap: bytes held until the caller consumes them
    rcv_buf_initial: int = 64 * 1024  # about the largest unscaled window (RFC 7323 2.2)
    snd_buf: int = 4 << 20  # send buffer cap: bytes accepted from the caller until ACKed
    snd_buf_initial: int = 256 * 1024
    # Out-of-order data held per connection (stack.tcp.reassembly): bytes charged,
    # each run as its payload plus its objects' overhead (Linux's truesize), and
    # never more than the receive buffer; and runs (holes) at most. A loss pattern
    # needs a few dozen runs; a hostile client sending one-byte segments with gaps
    # gets no more than this many, each costing O(log runs) to place.
    ooo_limit: int = 4 << 20
    ooo_max_runs: int = 1024
    memory_budget: int = 1 << 30  # buffer bytes all connections of one Stack may reserve
    # Receive-buffer bytes all connections of one Stack may hold together (0: no
    # bound but memory_budget). The windows advertised never add up to more than
    # this (beyond the per-connection floors), so what clients may have in flight
    # toward a reader that falls behind fits the queue in front of it (buffers.py).
    rcv_window_budget: int = 0
    # Options, each used only when the peer's SYN (or SYN-ACK) carries it too.
    window_scaling: bool = True  # RFC 7323 2: windows beyond 64 KiB
    timestamps: bool = True  # RFC 7323 3-5: RTT measurement on every ACK, and PAWS
    sack: bool = True  # RFC 2018 SACK blocks out, RFC 6675 loss recovery with the peer's
    congestion: Literal["cubic", "newreno"] = "cubic"  # RFC 9438 / RFC 5681 + RFC 6582
    rto_initial: float = 1.0  # RFC 6298 (2.1)
    rto_min: float = 0.2  # RFC 6298 (2.4) says 1 s; Linux and most stacks use 200 ms
    rto_max: float = 60.0  # RFC 6298 (2.5)
    max_retries: int = 8  # retransmissions of one segment before giving up
    syn_retries: int = 5  # SYN or SYN-ACK retransmissions before giving up
    delayed_ack: float = 0.04  # RFC 9293 3.8.6.3: under 0.5 s; Linux uses 40-200 ms
    time_wait: float = 60.0  # as Linux; RFC 9293's 2*MSL is 4 minutes
    fin_wait_2_timeout: float = 60.0  # Linux tcp_fin_timeout
    # Lingering ESTABLISHED / CLOSE-WAIT flows (the other states have their own timers).
    keepalive: bool = False  # RFC 9293 3.8.4 / RFC 1122 4.2.3.6: probe an idle peer
    keepalive_idle: float = 7200.0  # idle seconds before the first probe (Linux: 2 h)
    keepalive_interval: float = 75.0  # between unanswered probes (Linux: 75 s)
    keepalive_probes: int = 9  # unanswered probes before closing TIMED_OUT (Linux: 9)
    idle_timeout: float | None = None  # no segment from the peer this long: RST, IDLE
    # SYN-RECEIVED at most this long from the first SYN-ACK, then CLOSED(TIMED_OUT)
    # silently. A relay connects upstream before it accepts, so a client that never
    # ACKs the SYN-ACK would otherwise hold an established upstream connection for
    # the whole SYN-ACK retransmission schedule (about a minute). None: no bound.
    synrecv_timeout: float | None = 5.0
    nagle: bool = False  # a relay forwards what it has (RFC 9293 3.7.4 makes Nagle a SHOULD)
    challenge_ack_limit: int = 10  # RFC 5961 10: challenge ACKs per second per connection
    ttl: int = 64

    def __post_init__(self) -> None:
        if self.congestion not in ("cubic", "newreno"):
            raise ValueError(f"congestion {self.congestion!r}: 'cubic' or 'newreno'")
        if self.rcv_window_budget < 0:
            raise ValueError(f"rcv_window_budget {self.rcv_window_budget}: must not be negative")


@dataclass(frozen=True, slots=True)
class DatagramConfig:
    """UDP and ICMP echo flows (``stack.datagram``)."""

    udp_idle_timeout: float = 60.0  # a UDP flow with no datagram either way ends
    dns_idle_timeout: float = 10.0  # the same for flows to port 53: one query, one answer
    echo_idle_timeout: float = 10.0  # an echo flow (one ping run) with no request or reply
    max_flows: int = 16384  # UDP and echo flows in the table, all clients
    # (per client: ClientQuotas.udp_flows and echo_flows)
    # RFC 1812 4.3.2.8, RFC 4443 2.4 (f): ICMP errors toward clients are rate-limited
    # (a token bucket, like Linux's icmp_msgs_per_sec and icmp_msgs_burst).
    icmp_errors_per_second: float = 1000.0
    icmp_error_burst: int = 50


@dataclass(frozen=True, slots=True)
class FragmentConfig:
    """IPv4/IPv6 reassembly of client packets (``stack.fragments``)."""

    timeout_v4: float = 30.0  # RFC 791 (15 s lower bound); Linux ipfrag_time is 30 s
    timeout_v6: float = 60.0  # RFC 8200 4.5
    max_bytes: int = 4 << 20  # fragment data held, all datagrams (Linux ipfrag_high_thresh)
    max_datagrams: int = 1024  # datagrams being reassembled
    max_fragments: int = 256  # fragments of one datagram (64 KiB at an MTU of 296)


@dataclass(frozen=True, slots=True)
class ClientQuotas:
    """What one client may hold of the Stack's shared limits (``stack.clients``).

    A client is an IPv4 address or an IPv6 prefix of ``prefix_v6`` bits (a /64 is
    one subscriber: SLAAC and privacy addresses make every host many addresses).
    Each quota is a fraction of the matching global pool (1/16 for most), so
    ten abusive clients cannot take it all, and high enough that a heavy
    browser user (hundreds of flows, a burst of a few hundred connections)
    never meets it.
    """

    prefix_v6: int = 64
    tcp_flows: int = 4096  # TCP connections, any state (of StackConfig.max_flows: 1/16)
    # Awaiting the upstream connect (of max_pending: 1/16); oldest evicted. A page
    # load may open a couple of hundred at once, all pending until connects finish.
    pending: int = 256
    connects_per_second: float = 200.0  # new TCP connections = upstream connect() calls
    connect_burst: int = 400
    udp_flows: int = 1024  # of DatagramConfig.max_flows: 1/16
    echo_flows: int = 64  # ping flows (client, destination, identifier)
    fragment_bytes: int = 256 << 10  # fragment data held (of FragmentConfig.max_bytes: 1/16)
    # TCP buffer bytes (of TcpConfig.memory_budget: 1/4, not 1/16: a page load's
    # few hundred flows start with 320 KiB of buffers each). Past it buffers stop
    # growing (smaller windows); nothing is refused.
    memory: int = 256 << 20
    top: int = 16  # clients with the most refusals kept for the stats (space-saving)

    def __post_init__(self) -> None:
        if not 0 <= self.prefix_v6 <= 128:
            raise ValueError(f"prefix_v6 {self.prefix_v6} outside 0..128")
        for name in ("tcp_flows", "pending", "connect_burst", "udp_flows", "echo_flows", "top"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.connects_per_second <= 0:
            raise ValueError("connects_per_second must be positive")
        if self.fragment_bytes < 0 or self.memory < 0:
            raise ValueError("fragment_bytes and memory must not be negative")


@dataclass(frozen=True, slots=True)
class StackConfig:
    """Settings for the demultiplexer and every connection it makes."""

    tcp: TcpConfig = field(default_factory=TcpConfig)
    max_flows: int = 65536  # TCP connections in the table, any state
    max_pending: int = 4096  # connection requests awaiting accept()/reject()
    # Requests awaiting accept() toward one destination address: a silent target
    # (or one being flooded through us) holds slots only up to here (1/16 of max_pending).
    max_pending_per_destination: int = 256
    # New connections (each one an upstream connect() and SYN) per second, all
    # clients: a token bucket; ClientQuotas has the per-client one.
    connects_per_second: float = 5000.0
    connect_burst: int = 5000
    clients: ClientQuotas = field(default_factory=ClientQuotas)
    max_time_wait: int = 65536  # 4-tuples kept in TIME-WAIT (Linux tcp_max_tw_buckets)
    mtu: int = 1500  # the clients' path MTU: larger UDP replies are fragmented to it
    # TCP out as OffloadPackets (stack.wire.tcp): partial checksums, and runs of
    # full-sized segments as GSO super-segments of up to gso_max payload bytes.
    # Only for a writer that frames them (relay.datapath.tun with virtio-net headers).
    offload: bool = False
    gso_max: int = 63 * 1024
    datagram: DatagramConfig = field(default_factory=DatagramConfig)
    fragments: FragmentConfig = field(default_factory=FragmentConfig)

    def __post_init__(self) -> None:
        if not 1280 <= self.mtu <= 65535:  # RFC 8200 5: IPv6 needs at least 1280
            raise ValueError(f"mtu {self.mtu} outside 1280..65535")
