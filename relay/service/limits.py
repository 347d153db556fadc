"""The ``tunrelay run`` options for per-client quotas, connection admission and log sizes.

One place for their names, defaults, checks and how they become a
``StackConfig`` (``stack.clients`` enforces them, see its docstring), so the
command line, the config file (whose keys come from the run parser) and
``run.validate`` agree. Every quota is per worker: each worker's stack counts
what its own TUN queue brings, and the kernel spreads one client's flows over
the queues by flow hash.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from stack import ClientQuotas, StackConfig

__all__ = ["Limits", "add_arguments", "from_args"]

_Q = ClientQuotas()
_S = StackConfig()


@dataclass(frozen=True, slots=True)
class Limits:
    """The values of the options below, unchecked until ``check``."""

    client_prefix_v6: int = _Q.prefix_v6
    client_tcp_flows: int = _Q.tcp_flows
    client_pending: int = _Q.pending
    client_connect_rate: float = _Q.connects_per_second
    client_connect_burst: int = _Q.connect_burst
    client_udp_flows: int = _Q.udp_flows
    client_echo_flows: int = _Q.echo_flows
    client_fragment_bytes: int = _Q.fragment_bytes
    client_memory: int = _Q.memory
    max_pending: int = _S.max_pending
    max_pending_per_destination: int = _S.max_pending_per_destination
    connect_rate: float = _S.connects_per_second
    connect_burst: int = _S.connect_burst
    synrecv_timeout: float = 5.0
    flow_log_max_bytes: int = 1 << 30
    flow_log_rotate: bool = False
    error_log_interval: float = 10.0

    def check(self) -> None:
        """Raises: ValueError, naming the option."""
        ranges: list[tuple[str, float, float, float]] = [
            ("--client-prefix-v6", self.client_prefix_v6, 1, 128),
            ("--client-tcp-flows", self.client_tcp_flows, 1, 1 << 22),
            ("--client-pending", self.client_pending, 1, 1 << 20),
            ("--client-connect-rate", self.client_connect_rate, 0.001, 1e7),
            ("--client-connect-burst", self.client_connect_burst, 1, 1 << 24),
            ("--client-udp-flows", self.client_udp_flows, 1, 1 << 22),
            ("--client-echo-flows", self.client_echo_flows, 1, 1 << 22),
            ("--client-fragment-bytes", self.client_fragment_bytes, 0, 1 << 30),
            ("--client-memory", self.client_memory, 0, 1 << 40),
            ("--max-pending", self.max_pending, 1, 1 << 20),
            ("--max-pending-per-destination", self.max_pending_per_destination, 1, 1 << 20),
            ("--connect-rate", self.connect_rate, 0.001, 1e7),
            ("--connect-burst", self.connect_burst, 1, 1 << 24),
            ("--synrecv-timeout", self.synrecv_timeout, 0.1, 600.0),
            ("--flow-log-max-bytes", self.flow_log_max_bytes, 0, 1 << 50),
            ("--error-log-interval", self.error_log_interval, 0.0, 86400.0),
        ]
        for name, value, lo, hi in ranges:
            if not lo <= value <= hi:
                raise ValueError(f"{name}: {value} is outside {lo:g}..{hi:g}")

    def apply(self, stack: StackConfig) -> StackConfig:
        """``stack`` with these limits."""
        quotas = ClientQuotas(
            prefix_v6=self.client_prefix_v6,
            tcp_flows=self.client_tcp_flows,
            pending=self.client_pending,
            connects_per_second=self.client_connect_rate,
            connect_burst=self.client_connect_burst,
            udp_flows=self.client_udp_flows,
            echo_flows=self.client_echo_flows,
            fragment_bytes=self.client_fragment_bytes,
            memory=self.client_memory,
        )
        return dataclasses.replace(
            stack,
            tcp=dataclasses.replace(stack.tcp, synrecv_timeout=self.synrecv_timeout),
            max_pending=self.max_pending,
            max_pending_per_destination=self.max_pending_per_destination,
            connects_per_second=self.connect_rate,
            connect_burst=self.connect_burst,
            clients=quotas,
        )


_HELP = {
    "client_prefix_v6": "IPv6 prefix length that makes one client (default %(default)s: a /64)",
    "client_tcp_flows": "TCP flows per client, any state; past it SYNs get RST",
    "client_pending": "connections per client awaiting their upstream connect; past it the "
    "client's oldest is reset",
    "client_connect_rate": "new TCP connections (upstream connects) per second per client; "
    "past it SYNs are dropped (the client retries)",
    "client_connect_burst": "burst of --client-connect-rate",
    "client_udp_flows": "UDP flows per client; past it new flows are dropped",
    "client_echo_flows": "ping flows per client; past it new ones are dropped",
    "client_fragment_bytes": "fragment bytes held per client; past it fragments are dropped",
    "client_memory": "TCP buffer bytes per client, within the stack's memory budget",
    "max_pending": "connections awaiting their upstream connect, all clients",
    "max_pending_per_destination": "connections awaiting an upstream connect to one "
    "destination address; past it SYNs to it are dropped",
    "connect_rate": "new TCP connections (upstream connects) per second, all clients",
    "connect_burst": "burst of --connect-rate",
    "synrecv_timeout": "seconds a client may take to answer our SYN-ACK before the flow and "
    "its upstream connection are dropped (RST upstream)",
    "flow_log_max_bytes": "size cap of --flow-log, bytes (0: none); past it lines are dropped "
    "until the file is rotated, or see --flow-log-rotate",
    "flow_log_rotate": "past --flow-log-max-bytes, rename the flow log to FILE.1 and start anew",
    "error_log_interval": "seconds between two log lines of one kind of error a client can "
    "provoke (analyzer exceptions, failed flows); the next line counts those suppressed",
}


def add_arguments(run: argparse.ArgumentParser) -> None:
    """Add the options to the ``run`` parser, as one group."""
    group = run.add_argument_group(
        "quotas and limits",
        "What one client (an IPv4 address, or an IPv6 prefix) may hold of the shared limits, "
        "how fast new connections are admitted, and how large the logs may grow. All per "
        "worker. Defaults are fractions of the global pools that a heavy browser user never "
        "meets.",
    )
    for f in dataclasses.fields(Limits):
        option = "--" + f.name.replace("_", "-")
        default = f.default
        help_ = _HELP[f.name]
        if isinstance(default, bool):
            group.add_argument(option, action="store_true", help=help_)
            continue
        kind = type(default)
        assert kind in (int, float)
        group.add_argument(
            option, type=kind, default=default, metavar="N", help=f"{help_} (default %(default)s)"
            if "%(default)s" not in help_ else help_,
        )  # fmt: skip


def from_args(args: argparse.Namespace) -> Limits:
    """The ``Limits`` the parsed options give."""
    return Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
