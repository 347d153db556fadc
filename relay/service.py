"""``tunrelay run``: the relay as a long-running service on a TUN device.

It creates the TUN device, routes packets *from* the client networks into it
with a policy rule (the relay's own upstream sockets do not match the rule, so
nothing loops), runs the packet loop until SIGINT or SIGTERM, and removes
everything it installed on every exit path.
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

import trio

from relay.config import RelayConfig
from relay.echo import enable_ping_sockets
from relay.engine import Relay
from relay.flowlog import FlowLog
from relay.netconfig import NetConfig, route_client_nets_into_tun
from relay.tun import TunDevice
from stack import DatagramConfig, Stack, StackConfig, TcpConfig

log = logging.getLogger("tunrelay")


class ConfigError(ValueError):
    """A bad setting; the message names the option."""


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Everything ``tunrelay run`` needs, validated."""

    tun: str
    client_nets: tuple[str, ...]
    analyzers: tuple[str, ...] = ()
    flow_log: str | None = None
    mtu: int = 1500
    txqueuelen: int = 4000
    table: int = 5197
    priority: int = 5197
    stats_interval: float = 0.0
    relay: RelayConfig = field(default_factory=RelayConfig)
    stack: StackConfig = field(default_factory=StackConfig)


def validate(
    *,
    tun: str,
    client_nets: Sequence[str],
    analyzers: Sequence[str] = (),
    flow_log: str | None = None,
    mtu: int = 1500,
    txqueuelen: int = 4000,
    table: int = 5197,
    priority: int = 5197,
    stats_interval: float = 0.0,
    connect_timeout: float = 10.0,
    max_flows: int = 65536,
    rcv_buf: int = 65535,
    snd_buf: int = 256 * 1024,
    fail_closed: bool = False,
    udp_idle_timeout: float = 60.0,
) -> RunOptions:
    """Check every setting and build ``RunOptions``.

    Raises:
        ConfigError: naming the option that is wrong and why.
    """
    if not 0 < len(tun.encode()) < 16 or "/" in tun or tun.strip() != tun:
        raise ConfigError(f"--tun: {tun!r} is not a valid interface name (1-15 bytes)")
    if not client_nets:
        raise ConfigError("--client-net: at least one client network is required")
    nets = []
    for net in client_nets:
        try:
            nets.append(str(ipaddress.ip_network(net, strict=True)))
        except ValueError as exc:
            raise ConfigError(f"--client-net: {net!r} is not a network: {exc}") from None
    for spec in analyzers:
        if spec.count(":") != 1 or not all(spec.split(":")):
            raise ConfigError(f"--analyzer: {spec!r} is not of the form module:attribute")
    checks = [
        ("--mtu", mtu, 1280, 65535),
        ("--txqueuelen", txqueuelen, 1, 1 << 20),
        ("--table", table, 1, 0xFFFFFFFF - 1),
        ("--priority", priority, 3, 32765),
        ("--max-flows", max_flows, 1, 1 << 22),
        ("--rcv-buf", rcv_buf, 1024, 65535),
        ("--snd-buf", snd_buf, 1024, 1 << 30),
    ]
    for name, value, lo, hi in checks:
        if not lo <= value <= hi:
            raise ConfigError(f"{name}: {value} is outside {lo}..{hi}")
    if table in (253, 254, 255):
        raise ConfigError(f"--table: {table} is a reserved table (default, main, local)")
    if connect_timeout <= 0:
        raise ConfigError(f"--connect-timeout: {connect_timeout} must be positive")
    if udp_idle_timeout <= 0:
        raise ConfigError(f"--udp-idle-timeout: {udp_idle_timeout} must be positive")
    if stats_interval < 0:
        raise ConfigError(f"--stats-interval: {stats_interval} must not be negative")
    tcp = TcpConfig(rcv_buf=rcv_buf, snd_buf=snd_buf, ooo_limit=rcv_buf, mss=mtu - 40)
    return RunOptions(
        tun=tun,
        client_nets=tuple(nets),
        analyzers=tuple(analyzers),
        flow_log=flow_log,
        mtu=mtu,
        txqueuelen=txqueuelen,
        table=table,
        priority=priority,
        stats_interval=stats_interval,
        relay=RelayConfig(connect_timeout=connect_timeout, fail_closed=fail_closed),
        stack=StackConfig(
            tcp=tcp, max_flows=max_flows, mtu=mtu, datagram=_datagram(udp_idle_timeout)
        ),
    )


def _datagram(udp_idle_timeout: float) -> DatagramConfig:
    # DNS and echo flows idle sooner by default; never later than other UDP flows.
    d = DatagramConfig()
    return DatagramConfig(
        udp_idle_timeout=udp_idle_timeout,
        dns_idle_timeout=min(d.dns_idle_timeout, udp_idle_timeout),
        echo_idle_timeout=min(d.echo_idle_timeout, udp_idle_timeout),
    )


def load_analyzer(spec: str) -> object:
    """Import ``module:attribute``; a class is instantiated with no arguments.

    Raises:
        ConfigError: naming the analyzer that could not be loaded.
    """
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        obj = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--analyzer: cannot load {spec!r}: {exc}") from None
    if isinstance(obj, type):
        try:
            return obj()
        except Exception as exc:
            raise ConfigError(f"--analyzer: {spec!r} failed to initialise: {exc}") from None
    return obj


def _open_flow_log(path: str | None) -> tuple[FlowLog | None, IO[str] | None]:
    if path is None:
        return None, None
    if path == "-":
        return FlowLog(sys.stdout), None
    try:
        stream = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise ConfigError(f"--flow-log: cannot open {path!r}: {exc.strerror}") from None
    return FlowLog(stream), stream


async def serve(
    opts: RunOptions, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Set up, relay until SIGINT/SIGTERM or cancellation, and tear down."""
    analyzers = [load_analyzer(spec) for spec in opts.analyzers]
    flow_log, stream = _open_flow_log(opts.flow_log)
    if flow_log is not None:
        analyzers.append(flow_log)
    try:
        with (
            NetConfig() as net,
            TunDevice.open(opts.tun, mtu=opts.mtu, txqueuelen=opts.txqueuelen) as tun,
        ):
            route_client_nets_into_tun(
                net, tun.name, list(opts.client_nets), table=opts.table, priority=opts.priority
            )
            enable_ping_sockets(net)  # ICMP echo is relayed through ICMP datagram sockets
            stack = Stack(opts.stack)
            relay = Relay(tun, stack=stack, config=opts.relay, analyzers=analyzers)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(relay.run)
                    if opts.stats_interval > 0:
                        nursery.start_soon(_log_stats, relay, stack, opts.stats_interval)
                    log.info(
                        "relaying TCP from %s through %s", ", ".join(opts.client_nets), tun.name
                    )
                    task_status.started()
                    async for signum in signals:
                        log.info("received %s: shutting down", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        break
            log.info("stopped: stack %s; relay %s", stack.stats, relay.stats)
    finally:
        if stream is not None:
            stream.close()


async def _log_stats(relay: Relay, stack: Stack, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        log.info("flows=%d stack %s; relay %s", len(stack), stack.stats, relay.stats)
