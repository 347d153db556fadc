"""Settings of the relay side (the stack has its own ``StackConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.datapath.egress import EgressPolicy, Upstream


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Relay settings, each with a sane default.

    Memory per TCP flow is bounded by configuration, never by traffic:

    * client -> server: bytes reported by ``DataReceived`` wait in the flow's
      queue until ``sock.send`` took them; only then does the relay call
      ``stack.consumed()``, which is what reopens the client's window. So the
      queue holds at most ``TcpConfig.rcv_buf`` bytes (the receive buffer
      cap, 4 MiB by default; buffers start at 64 KiB and grow with demand);
      ``max_c2s_queue`` is a hard cap behind that (exceeding it aborts the
      flow; it only happens if the stack over-reports).
    * server -> client: the flow reads the kernel socket only while the stack
      has send space, at most ``recv_size`` bytes per read, so it holds at most
      ``recv_size`` bytes, and the stack at most ``TcpConfig.snd_buf``.
    * the stack itself: ``rcv_buf + snd_buf + ooo_limit`` of ``TcpConfig``
      (out-of-order runs charged with their objects' overhead, at most
      ``ooo_max_runs`` of them).
    * the kernel socket: ``upstream_rcvbuf + upstream_sndbuf`` when set
      (``None`` leaves the kernel's autotuning, capped by ``tcp_rmem`` and
      ``tcp_wmem``).

    A flow starts with at most ``recv_size`` in the relay and the stack's initial
    buffers (64 KiB receive, 256 KiB send); buffers grow only while the flow
    moves data faster than they allow, up to the caps, and all of them are
    charged to the Stack's ``TcpConfig.memory_budget``.
    """

    connect_timeout: float = 10.0  # upstream connect; on expiry the SYN is dropped silently
    # TCP_USER_TIMEOUT of upstream sockets, seconds (0: the kernel's, ~15 min of
    # retransmissions): bytes unacknowledged this long fail the socket, and the flow
    # is reset toward the client instead of hanging on an upstream that vanished.
    upstream_timeout: float = 0.0
    max_batch: int = 256  # packets drained per loop iteration before letting flow tasks run
    # Bytes of one client flow the stack takes per loop pass (relay.datapath.fairshare;
    # at least one packet; 0: no bound): with GRO a batch could hold megabytes of one
    # upload, and a request read beside them waited for all. (recv_size, its download
    # counterpart, was 256 KiB too; this share was not measured larger.)
    flow_pass_bytes: int = 256 * 1024
    # Upper bound of one upstream read (server -> client), --flow-read-bytes: one
    # read, its stack.send and its GSO writes to the TUN device are one step of the
    # flow task, and each step costs a packet-loop pass for the client's ACKs too
    # (~110-130 us, whatever its size). One worker, 1 stream down (bench_netns,
    # 3 rounds): 512 KiB 12.4 Gbit/s, 256 KiB 8.0, 128 KiB 5.4, 64 KiB 3.7; a
    # request beside it waits for the step (median 1,082 / 733 / 587 / 416 us).
    # Not above the workers' 1 MiB mmap threshold (relay.service.run.tune_malloc):
    # a larger read would map fresh pages each time.
    recv_size: int = 512 * 1024
    max_c2s_queue: int = 64 << 20  # hard cap of queued client -> server bytes per flow
    upstream_sndbuf: int | None = None  # SO_SNDBUF of upstream sockets; None = kernel default
    upstream_rcvbuf: int | None = None  # SO_RCVBUF of upstream sockets; None = kernel default
    fail_closed: bool = False  # an analyzer that raises aborts its flow instead of being detached
    close_drain_timeout: float = 30.0  # after an orderly close, time to flush queued bytes upstream
    flow_end_timeout: float = 5.0  # analyzers' flow_end calls, shielded from shutdown, are bounded
    # Which destinations flows may go to; the default denies loopback, private and
    # other internal ranges (relay.datapath.egress). EgressPolicy.open() denies nearly nothing.
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    upstream: Upstream = field(default_factory=Upstream)  # fwmark, source address, device

    def __post_init__(self) -> None:
        if self.connect_timeout <= 0:
            raise ValueError("connect_timeout must be positive")
        if not 0 <= self.upstream_timeout <= 2**31 // 1000:
            raise ValueError("upstream_timeout must be 0 (the kernel's) or positive seconds")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.recv_size < 1:
            raise ValueError("recv_size must be at least 1")
        if self.flow_pass_bytes < 0:
            raise ValueError("flow_pass_bytes must not be negative")
        if self.max_c2s_queue < 1:
            raise ValueError("max_c2s_queue must be at least 1")
