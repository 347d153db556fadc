"""Limits and tunables, each with a sane default."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TcpConfig:
    """Per-connection TCP settings."""

    mss: int = 1460  # MSS we advertise (what we can receive per segment)
    default_peer_mss: int = 536  # RFC 9293 3.7.1: when the SYN carries no MSS option
    rcv_buf: int = 65535  # receive buffer: bytes held until the caller consumes them
    snd_buf: int = 256 * 1024  # send buffer: bytes accepted from the caller until ACKed
    ooo_limit: int = 65535  # out-of-order bytes held per connection
    rto_initial: float = 1.0  # RFC 6298 (2.1)
    rto_min: float = 0.2  # RFC 6298 (2.4) says 1 s; Linux and most stacks use 200 ms
    rto_max: float = 60.0  # RFC 6298 (2.5)
    max_retries: int = 8  # retransmissions of one segment before giving up
    syn_retries: int = 5  # SYN or SYN-ACK retransmissions before giving up
    delayed_ack: float = 0.04  # RFC 9293 3.8.6.3: must be under 0.5 s (issue: <= 0.2 s)
    time_wait: float = 2.0  # short TIME-WAIT: RFC 9293's 2*MSL is 4 minutes
    fin_wait_2_timeout: float = 60.0  # Linux tcp_fin_timeout
    nagle: bool = False  # a relay forwards what it has (RFC 9293 3.7.4 makes Nagle a SHOULD)
    challenge_ack_limit: int = 10  # RFC 5961 10: challenge ACKs per second per connection
    ttl: int = 64


@dataclass(frozen=True, slots=True)
class StackConfig:
    """Settings for the demultiplexer and every connection it makes."""

    tcp: TcpConfig = field(default_factory=TcpConfig)
    max_flows: int = 65536  # TCP connections in the table, any state
    max_pending: int = 1024  # connection requests awaiting accept()/reject()
