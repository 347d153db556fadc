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
        for name, option in _OPTIONS.items():
            if option.lo is None or option.hi is None:
                continue  # a flag
            value = getattr(self, name)
            if not option.lo <= value <= option.hi:
                raise ValueError(f"{_flag(name)}: {value} is outside {option.lo:g}..{option.hi:g}")

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


@dataclass(frozen=True, slots=True)
class _Option:
    """One option's help text and accepted range (none for a flag)."""

    help: str
    lo: float | None = None
    hi: float | None = None


# Every field of Limits, in its order (the order the checks run in).
_OPTIONS = {
    "client_prefix_v6": _Option(
        "IPv6 prefix length that makes one client (default %(default)s: a /64)", 1, 128
    ),
    "client_tcp_flows": _Option(
        "TCP flows per client, any state; past it SYNs get RST", 1, 1 << 22
    ),
    "client_pending": _Option(
        "connections per client awaiting their upstream connect; past it the "
        "client's oldest is reset", 1, 1 << 20,
    ),
    "client_connect_rate": _Option(
        "new TCP connections (upstream connects) per second per client; "
        "past it SYNs are dropped (the client retries)", 0.001, 1e7,
    ),
    "client_connect_burst": _Option("burst of --client-connect-rate", 1, 1 << 24),
    "client_udp_flows": _Option(
        "UDP flows per client; past it new flows are dropped", 1, 1 << 22
    ),
    "client_echo_flows": _Option(
        "ping flows per client; past it new ones are dropped", 1, 1 << 22
    ),
    "client_fragment_bytes": _Option(
        "fragment bytes held per client; past it fragments are dropped", 0, 1 << 30
    ),
    "client_memory": _Option(
        "TCP buffer bytes per client, within the stack's memory budget", 0, 1 << 40
    ),
    "max_pending": _Option(
        "connections awaiting their upstream connect, all clients", 1, 1 << 20
    ),
    "max_pending_per_destination": _Option(
        "connections awaiting an upstream connect to one "
        "destination address; past it SYNs to it are dropped", 1, 1 << 20,
    ),
    "connect_rate": _Option(
        "new TCP connections (upstream connects) per second, all clients", 0.001, 1e7
    ),
    "connect_burst": _Option("burst of --connect-rate", 1, 1 << 24),
    "synrecv_timeout": _Option(
        "seconds a client may take to answer our SYN-ACK before the flow and "
        "its upstream connection are dropped (RST upstream)", 0.1, 600.0,
    ),
    "flow_log_max_bytes": _Option(
        "size cap of --flow-log, bytes (0: none); past it lines are dropped "
        "until the file is rotated, or see --flow-log-rotate", 0, 1 << 50,
    ),
    "flow_log_rotate": _Option(
        "past --flow-log-max-bytes, rename the flow log to FILE.1 and start anew"
    ),
    "error_log_interval": _Option(
        "seconds between two log lines of one kind of error a client can "
        "provoke (analyzer exceptions, failed flows); the next line counts those suppressed",
        0.0, 86400.0,
    ),
}  # fmt: skip


def _flag(name: str) -> str:
    """The option of a ``Limits`` field: ``client_tcp_flows`` -> ``--client-tcp-flows``."""
    return "--" + name.replace("_", "-")


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
        default, help_ = f.default, _OPTIONS[f.name].help
        if isinstance(default, bool):
            group.add_argument(_flag(f.name), action="store_true", help=help_)
            continue
        assert type(default) in (int, float)
        if "%(default)s" not in help_:
            help_ += " (default %(default)s)"
        group.add_argument(
            _flag(f.name), type=type(default), default=default, metavar="N", help=help_
        )


def from_args(args: argparse.Namespace) -> Limits:
    """The ``Limits`` the parsed options give."""
    return Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
