"""``tunrelay run``: the relay as a long-running service on a TUN device.

It creates the TUN device, routes packets *from* the client networks into it
with a policy rule (the relay's own upstream sockets do not match the rule, so
nothing loops), runs the packet loop until SIGINT or SIGTERM, and removes
everything it installed on every exit path.

``relay.service.workers`` sets the network up in a supervisor process and runs one
packet loop per TUN queue in unprivileged worker processes (``--workers N``,
one or more), each doing what ``relay_queue`` does. Offloads are on by default
(``--no-offload`` turns them off): the TUN is opened with virtio-net headers and
TSO/checksum offloads (``relay.datapath.tun``). A kernel that refuses them
(``open_queue``) gets the plain path, one warning and ``offload='off(fallback)'``
in the queue's counters.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import importlib
import ipaddress
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from relay.datapath.config import RelayConfig
from relay.datapath.egress import EgressPolicy, RuleError, Upstream, host_routes, parse_rule
from relay.datapath.tun import DEFAULT_TXQUEUELEN, OFFLOADS, TunDevice
from relay.service.gcstats import GcStats, GcWatch
from relay.service.limits import Limits
from relay.service.logsetup import LOG_LEVELS
from relay.service.privileges import CAP_NET_RAW, Identity
from relay.service.runstate import STATE_DIR
from stack.config import DatagramConfig, StackConfig, TcpConfig

if TYPE_CHECKING:
    # Imported where used: pyroute2 is about 22 MB of RSS, and a worker process
    # (relay.service.workers) never touches netlink; only the process that sets up does.
    # The same for the Zeek logs, which bring the dissectors (~1 MB), only with --log-dir.
    # And the data path (the stack, the engine, the flows: ~4 MB of PSS) and the
    # analysis (the flow log, the analyzer hooks): the supervisor needs only the
    # configuration types (stack.config, relay.datapath.config).
    from relay.analysis.capture import Capture
    from relay.analysis.flowlog import FlowLog
    from relay.analysis.zeeklog import ZeekLogs
    from relay.datapath.engine import Relay
    from relay.host.netconfig import NetConfig
    from stack import Stack

log = logging.getLogger("tunrelay")


MAX_WORKERS = 64  # a multi-queue TUN has at most 256 queues; more cores than this is moot


class ConfigError(ValueError):
    """A bad setting; the message names the option."""


# An analyzer: "module:attribute", or that with keyword arguments for its class
# (a config file's [[analyzer]] table with options; plain data, so picklable).
AnalyzerSpec = str | tuple[str, dict[str, object]]


@dataclass(frozen=True, slots=True)
class RunOptions:
    """Everything ``tunrelay run`` needs, validated."""

    tun: str
    client_nets: tuple[str, ...]
    analyzers: tuple[AnalyzerSpec, ...] = ()
    flow_log: str | None = None
    log_dir: str | None = None  # Zeek-compatible logs (relay.analysis.zeeklog)
    capture_dir: str | None = None  # per-flow capture files (relay.analysis.capture)
    capture_filter: tuple[str, ...] = ()  # --capture-filter terms, checked by validate
    # --block-domain and --block-list: (pattern, rule), relay.analysis.blocklist
    block_rules: tuple[tuple[str, str], ...] = ()
    mtu: int = 1500
    txqueuelen: int = DEFAULT_TXQUEUELEN
    table: int = 5197
    priority: int = 5197
    stats_interval: float = 0.0
    offload: bool = True  # IFF_VNET_HDR + TUNSETOFFLOAD(CSUM, TSO4, TSO6)
    offload_fallback: bool = False  # asked for, refused by the kernel (without_offload)
    workers: int = 1  # worker processes, one TUN queue each
    iifs: tuple[str, ...] = ()  # the policy rule only for packets arriving on these
    fail_closed_routing: bool = True  # prohibit in the table while the TUN route is gone
    state_dir: str = STATE_DIR
    user: Identity | None = None  # the workers' (relay.service.privileges.resolve_worker)
    # Capabilities the workers keep: none, or CAP_NET_RAW for --fwmark (SO_MARK).
    worker_caps: frozenset[int] = frozenset()
    profile: str | None = None  # cProfile output of worker 0's packet loop
    metrics: tuple[str, int] | None = None  # --metrics HOST:PORT (relay.service.metrics)
    log_format: str = "text"  # the service's own log: text or json (relay.service.logsetup)
    log_level: str = "info"  # and its level (logsetup.LOG_LEVELS; SIGHUP changes it)
    relay: RelayConfig = field(default_factory=RelayConfig)
    stack: StackConfig = field(default_factory=StackConfig)
    limits: Limits = field(default_factory=Limits)  # as given (the stack's are in ``stack``)


def window_budget(txqueuelen: int, mtu: int) -> int:
    """The receive windows of a worker's flows together: half its TUN queue of full-sized
    segments, the other half left for the clients' ACKs and everything else.

    The TUN queue drops at its tail when the worker reads slower than clients send
    (many bulk uploads at once, a loaded machine), and a burst of such losses can
    make a client's congestion control crawl for many seconds (BBR takes heavy
    loss for a policer and paces at the rate it measured meanwhile). Windows that
    fit the queue make clients wait for the window instead (``stack.tcp.buffers``).
    """
    return txqueuelen * (mtu - 40) // 2


def validate(
    *,
    tun: str,
    client_nets: Sequence[str],
    analyzers: Sequence[AnalyzerSpec] = (),
    flow_log: str | None = None,
    log_dir: str | None = None,
    capture_dir: str | None = None,
    capture_filter: Sequence[str] = (),
    block_domains: Sequence[str] = (),
    block_lists: Sequence[str] = (),
    mtu: int = 1500,
    txqueuelen: int = DEFAULT_TXQUEUELEN,
    table: int = 5197,
    priority: int = 5197,
    stats_interval: float = 0.0,
    connect_timeout: float = 10.0,
    upstream_timeout: float = 0.0,
    client_idle_timeout: float = 0.0,
    memory_budget: int = 1 << 30,
    max_flows: int = 65536,
    flow_pass_bytes: int = 256 * 1024,
    flow_read_bytes: int = 512 * 1024,
    rcv_buf: int = 4 << 20,
    snd_buf: int = 4 << 20,
    fail_closed: bool = False,
    udp_idle_timeout: float = 60.0,
    offload: bool = True,
    workers: int = 1,
    egress_rules: Sequence[tuple[str, str]] = (),
    allow_client_to_client: bool = False,
    fwmark: str | int | None = None,
    bind_addresses: Sequence[str] = (),
    bind_interface: str | None = None,
    iifs: Sequence[str] = (),
    fail_closed_routing: bool = True,
    state_dir: str = STATE_DIR,
    metrics: str | None = None,
    log_format: str = "text",
    log_level: str = "info",
    limits: Limits | None = None,
) -> RunOptions:
    """Check every setting and build ``RunOptions``.

    ``egress_rules`` are ("allow" or "deny", ``CIDR[:PORTS]``) in command-line
    order. The egress policy has no host addresses yet: ``localize`` adds them
    in the process that sets the network up.

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
    for iif in iifs:
        if not 0 < len(iif.encode()) < 16 or "/" in iif or iif.strip() != iif:
            raise ConfigError(f"--iif: {iif!r} is not a valid interface name (1-15 bytes)")
        if iif == tun:
            raise ConfigError(f"--iif: {iif!r} is the TUN device itself")
    if not state_dir:
        raise ConfigError("--state-dir: must not be empty")
    if log_dir is not None and not os.path.isdir(log_dir):
        raise ConfigError(f"--log-dir: {log_dir!r} is not a directory")
    _check_capture(capture_dir, capture_filter)
    block_rules = _block_rules(block_domains, block_lists)
    metrics_address = None
    if metrics is not None:
        from relay.service.metrics import parse_address

        try:
            metrics_address = parse_address(metrics)
        except ValueError as exc:
            raise ConfigError(f"--metrics: {exc}") from None
    if log_format not in ("text", "json"):
        raise ConfigError(f"--log-format: {log_format!r} is neither text nor json")
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"--log-level: {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    for analyzer in analyzers:
        spec = analyzer if isinstance(analyzer, str) else analyzer[0]
        if spec.count(":") != 1 or not all(spec.split(":")):
            raise ConfigError(f"--analyzer: {spec!r} is not of the form module:attribute")
    checks = [
        ("--mtu", mtu, 1280, 65535),
        ("--txqueuelen", txqueuelen, 1, 1 << 20),
        ("--table", table, 1, 0xFFFFFFFF - 1),
        ("--priority", priority, 4, 32765),  # and the three rules just before it
        ("--max-flows", max_flows, 1, 1 << 22),
        ("--rcv-buf", rcv_buf, 4096, 1 << 30),
        ("--snd-buf", snd_buf, 4096, 1 << 30),
        ("--flow-read-bytes", flow_read_bytes, 4096, 1 << 20),  # 1 MiB: tune_malloc
        ("--workers", workers, 1, MAX_WORKERS),
    ]
    for name, value, lo, hi in checks:
        if not lo <= value <= hi:
            raise ConfigError(f"{name}: {value} is outside {lo}..{hi}")
    if table in (253, 254, 255):
        raise ConfigError(f"--table: {table} is a reserved table (default, main, local)")
    if connect_timeout <= 0:
        raise ConfigError(f"--connect-timeout: {connect_timeout} must be positive")
    if flow_pass_bytes < 0:
        raise ConfigError(f"--flow-pass-bytes: {flow_pass_bytes} must be 0 (no bound) or positive")
    if memory_budget < 1 << 20:
        raise ConfigError(f"--memory-budget: {memory_budget} must be at least 1 MiB (1048576)")
    if client_idle_timeout < 0:
        raise ConfigError(
            f"--client-idle-timeout: {client_idle_timeout} must be 0 (off) or positive seconds"
        )
    if not 0 <= upstream_timeout <= 2**31 // 1000:
        raise ConfigError(
            f"--upstream-timeout: {upstream_timeout} must be 0 (the kernel's) or positive seconds"
        )
    if udp_idle_timeout <= 0:
        raise ConfigError(f"--udp-idle-timeout: {udp_idle_timeout} must be positive")
    if stats_interval < 0:
        raise ConfigError(f"--stats-interval: {stats_interval} must not be negative")
    limits = limits or Limits()
    try:
        limits.check()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    rules = []
    for kind, spec in egress_rules:
        try:
            rules.append(parse_rule(spec, allow=kind == "allow"))
        except RuleError as exc:
            raise ConfigError(f"--{kind}: {exc}") from None
    upstream = _upstream(fwmark, bind_addresses, bind_interface, nets)
    # Buffers start small and grow with demand up to these caps; keepalive finds
    # clients that vanished without a FIN or RST (Linux's 2 h / 75 s / 9 probes).
    tcp = TcpConfig(
        rcv_buf=rcv_buf,
        rcv_buf_initial=min(64 * 1024, rcv_buf),
        snd_buf=snd_buf,
        snd_buf_initial=min(256 * 1024, snd_buf),
        ooo_limit=rcv_buf,
        mss=mtu - 40,
        keepalive=True,
        # A client that vanished mid-transfer answers no keepalive either, but the
        # retransmissions come first; this ends its flow after a silence that long.
        idle_timeout=client_idle_timeout or None,
        # Buffer growth of all flows of a worker together; past it buffers stay at
        # their initial sizes (windows close, data waits): slower, never lost.
        memory_budget=memory_budget,
        # Up to 44 segments (64 KB) per step of the sender; cut to the MSS on the
        # way out, or written as one GSO super-segment with offloads (the default).
        tso_segments=44,
        rcv_window_budget=window_budget(txqueuelen, mtu),
    )
    return RunOptions(
        tun=tun,
        client_nets=tuple(nets),
        analyzers=tuple(analyzers),
        flow_log=flow_log,
        log_dir=log_dir,
        capture_dir=capture_dir,
        capture_filter=tuple(capture_filter),
        block_rules=block_rules,
        mtu=mtu,
        txqueuelen=txqueuelen,
        table=table,
        priority=priority,
        stats_interval=stats_interval,
        offload=offload,
        workers=workers,
        iifs=tuple(dict.fromkeys(iifs)),
        fail_closed_routing=fail_closed_routing,
        state_dir=state_dir,
        metrics=metrics_address,
        log_format=log_format,
        log_level=log_level,
        # SO_MARK needs CAP_NET_RAW (or CAP_NET_ADMIN, which would let an analyzer
        # reconfigure the network): the workers keep the lesser one only if asked.
        worker_caps=frozenset({CAP_NET_RAW}) if upstream.fwmark is not None else frozenset(),
        relay=RelayConfig(
            connect_timeout=connect_timeout,
            upstream_timeout=upstream_timeout,
            flow_pass_bytes=flow_pass_bytes,
            recv_size=flow_read_bytes,
            fail_closed=fail_closed,
            max_c2s_queue=max(2 * rcv_buf, RelayConfig().max_c2s_queue),
            egress=EgressPolicy(
                tuple(rules), client_nets=tuple(nets), client_to_client=allow_client_to_client
            ),
            upstream=upstream,
        ),
        stack=limits.apply(
            StackConfig(
                tcp=tcp,
                max_flows=max_flows,
                mtu=mtu,
                datagram=_datagram(udp_idle_timeout),
                offload=offload,  # partial checksums, GSO writes (relay.datapath.tun frames them)
            )
        ),
        limits=limits,
    )


def _upstream(
    fwmark: str | int | None,
    bind_addresses: Sequence[str],
    bind_interface: str | None,
    client_nets: Sequence[str],
) -> Upstream:
    mark = None
    if fwmark is not None:
        try:
            mark = fwmark if isinstance(fwmark, int) else int(fwmark, 0)
        except ValueError:
            raise ConfigError(f"--fwmark: {fwmark!r} is not a number") from None
        if not 1 <= mark <= 0xFFFFFFFF:
            raise ConfigError(f"--fwmark: {mark} is outside 1..0xffffffff")
    source: dict[int, str] = {}
    for text in bind_addresses:
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(f"--bind-address: {text!r} is not an IP address") from None
        if addr.version in source:
            raise ConfigError(
                f"--bind-address: two IPv{addr.version} addresses ({source[addr.version]}, "
                f"{addr}); give at most one per family"
            )
        if addr.is_unspecified or addr.is_multicast:
            raise ConfigError(f"--bind-address: {addr} cannot be a source address")
        for net in client_nets:
            if addr in ipaddress.ip_network(net):
                # The policy rule would route the relay's own packets into its TUN.
                raise ConfigError(f"--bind-address: {addr} is inside --client-net {net}")
        source[addr.version] = str(addr)
    if bind_interface is not None and (
        not 0 < len(bind_interface.encode()) < 16 or "/" in bind_interface
    ):
        raise ConfigError(f"--bind-interface: {bind_interface!r} is not an interface name")
    return Upstream(mark, source.get(4), source.get(6), bind_interface)


def localize(opts: RunOptions, net: NetConfig) -> RunOptions:
    """``opts`` for this host: the egress policy also denies every address in the
    local routing table of ``net``'s namespace, read now (addresses added later are
    delivered locally, and so reach the relay only IPv4-mapped, which is denied).

    Raises:
        ConfigError: an upstream socket option (``--fwmark``, ``--bind-address``,
            ``--bind-interface``) is refused here.
    """
    upstream = opts.relay.upstream
    for option, value, exc in upstream.probe():
        raise ConfigError(f"{option}: {value}: {exc.strerror or exc}")
    egress = opts.relay.egress.with_host(host_routes(net.ipr))
    log.info("egress policy: %s", egress.describe())
    if opts.block_rules:
        log.info("blocking %d domain patterns", len(opts.block_rules))
    return dataclasses.replace(opts, relay=dataclasses.replace(opts.relay, egress=egress))


def _datagram(udp_idle_timeout: float) -> DatagramConfig:
    # DNS and echo flows idle sooner by default; never later than other UDP flows.
    d = DatagramConfig()
    return DatagramConfig(
        udp_idle_timeout=udp_idle_timeout,
        dns_idle_timeout=min(d.dns_idle_timeout, udp_idle_timeout),
        echo_idle_timeout=min(d.echo_idle_timeout, udp_idle_timeout),
    )


def load_analyzer(spec: str, options: dict[str, object] | None = None) -> object:
    """Import ``module:attribute``; a class is instantiated with ``options`` as
    keyword arguments (none if not given).

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
            obj = obj(**options) if options else obj()
        except Exception as exc:
            raise ConfigError(f"--analyzer: {spec!r} failed to initialise: {exc}") from None
    elif options:
        raise ConfigError(f"--analyzer: {spec!r} is not a class, so it takes no options")
    from relay.analysis.streams import check_stream_analyzer, is_stream_analyzer

    if is_stream_analyzer(obj):
        try:
            check_stream_analyzer(obj)
        except TypeError as exc:
            raise ConfigError(f"--analyzer: {spec!r}: {exc}") from None
    return obj


def open_flow_log(opts: RunOptions, worker: int = 0) -> FlowLog | None:
    """The ``--flow-log``, opened (by a worker before it drops its privileges).

    Raises:
        ConfigError: the flow log cannot be opened.
    """
    if opts.flow_log is None:
        return None
    from relay.analysis.flowlog import FlowLog

    try:
        target = sys.stdout if opts.flow_log == "-" else opts.flow_log
        limits = opts.limits
        return FlowLog(
            target,
            worker=worker,
            max_bytes=limits.flow_log_max_bytes,
            rotate=limits.flow_log_rotate,
        )
    except OSError as exc:
        raise ConfigError(f"--flow-log: cannot open {opts.flow_log!r}: {exc.strerror}") from None


def _block_rules(domains: Sequence[str], lists: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``--block-domain`` patterns and ``--block-list`` files as (pattern, rule) pairs."""
    if not domains and not lists:
        return ()
    from relay.analysis.blocklist import BlockListError, parse_pattern, read_block_list

    rules = []
    for text in domains:
        try:
            pattern = parse_pattern(text)
        except BlockListError as exc:
            raise ConfigError(f"--block-domain: {exc}") from None
        rules.append((pattern, f"block-domain {pattern}"))
    for path in lists:
        try:
            rules += read_block_list(path)
        except BlockListError as exc:
            raise ConfigError(f"--block-list: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise ConfigError(f"--block-list: cannot read {path!r}: {why}") from None
    return tuple(rules)


def check_log_dir(opts: RunOptions) -> None:
    """Open and close the ``--log-dir`` files, as a worker will (the supervisor's
    check at start-up: the logs themselves import the dissectors).

    Raises:
        ConfigError: a file cannot be opened.
    """
    if opts.log_dir is None:
        return
    from relay.analysis.logfiles import open_logs

    try:
        fds = open_logs(opts.log_dir)
    except OSError as exc:
        raise _log_dir_error(exc, opts.log_dir) from None
    for fd in fds:
        os.close(fd)


def open_log_dir(opts: RunOptions, worker: int = 0) -> ZeekLogs | None:
    """The ``--log-dir`` files, opened (by a worker before it drops its privileges).

    Raises:
        ConfigError: a file cannot be opened.
    """
    if opts.log_dir is None:
        return None
    from relay.analysis.zeeklog import ZeekLogs

    try:
        return ZeekLogs(opts.log_dir, worker=worker)
    except OSError as exc:
        raise _log_dir_error(exc, opts.log_dir) from None


def _log_dir_error(exc: OSError, log_dir: str) -> ConfigError:
    """The error that names ``--log-dir`` and the file that could not be opened."""
    where = exc.filename or log_dir
    return ConfigError(f"--log-dir: cannot open {where!r}: {exc.strerror}")


def _check_capture(capture_dir: str | None, capture_filter: Sequence[str]) -> None:
    if capture_filter and capture_dir is None:
        raise ConfigError("--capture-filter: needs --capture-dir")
    if capture_dir is None:
        return
    if not capture_dir:
        raise ConfigError("--capture-dir: must not be empty")
    if os.path.lexists(capture_dir):
        if os.path.islink(capture_dir) or not os.path.isdir(capture_dir):
            raise ConfigError(f"--capture-dir: {capture_dir!r} is not a directory")
    elif not os.path.isdir(os.path.dirname(os.path.abspath(capture_dir))):
        raise ConfigError(f"--capture-dir: the parent of {capture_dir!r} does not exist")
    from relay.analysis.capture import CaptureFilterError, parse_capture_filter

    try:
        parse_capture_filter(capture_filter)
    except CaptureFilterError as exc:
        raise ConfigError(f"--capture-filter: {exc}") from None


def prepare_capture_dir(opts: RunOptions, user: Identity) -> None:
    """Create ``--capture-dir`` for the workers' ``user`` (by the supervisor, while it
    may still chown): mode 0700, owned by that user, since it will hold every
    captured byte. A directory that exists must be that user's already (a
    previous run's) and writable by no one else; it is used as it is.

    Raises:
        ConfigError: the directory cannot be created, or belongs to someone else.
    """
    path = opts.capture_dir
    if path is None:
        return
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        st = os.lstat(path)
        if not os.path.isdir(path) or os.path.islink(path):
            raise ConfigError(f"--capture-dir: {path!r} is not a directory") from None
        if st.st_uid != user.uid:
            raise ConfigError(
                f"--capture-dir: {path!r} exists and belongs to uid {st.st_uid}, not to the "
                f"workers' user {user.name!r} (uid {user.uid}): give a new path (it is "
                f"created) or chown it"
            ) from None
        if st.st_mode & 0o022:  # others could plant or swap files among the captures
            raise ConfigError(
                f"--capture-dir: {path!r} is writable by others (mode {st.st_mode & 0o777:o})"
            ) from None
        return
    except OSError as exc:
        raise ConfigError(f"--capture-dir: cannot create {path!r}: {exc.strerror}") from None
    try:
        os.chown(path, user.uid, user.gid)
        os.chmod(path, 0o700)  # whatever the umask
    except OSError as exc:
        raise ConfigError(f"--capture-dir: cannot give {path!r} to {user.name!r}: {exc}") from None


def open_capture_dir(opts: RunOptions) -> Capture | None:
    """The ``--capture-dir`` analyzer, its directory opened by a worker before it
    drops its privileges (the files are then created relative to that descriptor:
    the path's ancestors need not be open to the workers' user).

    Raises:
        ConfigError: the directory cannot be opened.
    """
    if opts.capture_dir is None:
        return None
    from relay.analysis.capture import Capture, DirectorySink, parse_capture_filter

    try:
        sink = DirectorySink.open(opts.capture_dir)
    except OSError as exc:
        raise ConfigError(
            f"--capture-dir: cannot open {opts.capture_dir!r}: {exc.strerror}"
        ) from None
    capture = Capture(sink, parse_capture_filter(opts.capture_filter))
    log.info("capturing %s into %s", capture.selection.describe(), opts.capture_dir)
    return capture


def load_analyzers(
    opts: RunOptions,
    flow_log: FlowLog | None = None,
    logs: ZeekLogs | None = None,
    capture: Capture | None = None,
) -> list[object]:
    """``capture`` first, so it sees the bytes before any rewrite; then the domain
    blocker (``--block-domain``, ``--block-list``), so its verdict decides; then
    the ``--analyzer`` objects, then ``flow_log`` and ``logs`` if given.

    Raises:
        ConfigError: an analyzer cannot be loaded.
    """
    analyzers: list[object] = [] if capture is None else [capture]
    if opts.block_rules:
        from relay.analysis.blocklist import DomainBlocker

        on_block = logs.note_block if logs is not None else None
        analyzers.append(DomainBlocker(opts.block_rules, on_block=on_block))
    for spec in opts.analyzers:
        analyzers.append(load_analyzer(spec) if isinstance(spec, str) else load_analyzer(*spec))
    return analyzers + [a for a in (flow_log, logs) if a is not None]


def open_queue(
    opts: RunOptions, *, multi_queue: bool = False, attach: bool = False, exclusive: bool = False
) -> TunDevice:
    """Open (create, or attach one more queue to) the TUN device ``opts`` describes,
    with its offloads (a setting of the device: every queue gets super-segments).
    ``attach``: one more queue of a multi-queue device that exists and whose
    link is set up (a worker's queue). ``exclusive``: never attach to a device
    that exists already (another relay's, or anything else of that name).

    When the kernel refuses IFF_VNET_HDR or TUNSETOFFLOAD (``OFFLOAD_REFUSED``)
    and this is not an attached queue, the device is opened again without them
    and one warning names the errno; the caller sees ``tun.vnet_hdr`` False and
    must run the stack without offloads (``without_offload``). An attached
    queue never falls back alone: IFF_VNET_HDR is the whole device's setting.

    Raises:
        OSError: the device cannot be opened or configured.
    """

    def opened(offload: bool) -> TunDevice:
        tun = TunDevice.open(
            opts.tun,
            mtu=opts.mtu,
            txqueuelen=opts.txqueuelen,
            vnet_hdr=offload,
            multi_queue=multi_queue or attach,
            configure_link=not attach,
            exclusive=exclusive,
        )
        if offload:
            try:
                tun.set_offload(OFFLOADS)
            except BaseException:
                tun.close()
                raise
        return tun

    if not opts.offload:
        tun = opened(False)
        tun.stats.offload = "off(fallback)" if opts.offload_fallback else "off"
        return tun
    try:
        tun = opened(True)
    except OSError as exc:
        if attach or exc.errno not in OFFLOAD_REFUSED:
            raise
        log.warning(
            "TUN offloads refused by the kernel (%s: %s): relaying without them "
            "(about a fifth of the throughput)",
            errno.errorcode.get(exc.errno, exc.errno), exc.strerror,
        )  # fmt: skip
        tun = opened(False)
        tun.stats.offload = "off(fallback)"
        return tun
    tun.stats.offload = "on"
    return tun


# What a kernel says when it lacks IFF_VNET_HDR or a TUNSETOFFLOAD flag (an
# unknown flag: EINVAL; no such ioctl, as in some sandboxes: ENOTTY, EOPNOTSUPP).
OFFLOAD_REFUSED = frozenset({errno.EINVAL, errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS})


def without_offload(opts: RunOptions) -> RunOptions:
    """``opts`` for a device ``open_queue`` had to open without offloads: the
    stack writes complete packets, and the workers open their queues plainly."""
    return dataclasses.replace(
        opts,
        offload=False,
        offload_fallback=True,
        stack=dataclasses.replace(opts.stack, offload=False),
    )


def route_into(
    net: NetConfig, tun: TunDevice, opts: RunOptions, ping_gid: int | None = None
) -> None:
    """Route the client networks into ``tun`` and allow ICMP sockets for ``ping_gid``
    (default: this process's group); all undone by ``net``."""
    from relay.host.netconfig import enable_ping_sockets, route_client_nets_into_tun

    for iif in opts.iifs:
        if not net.ipr.link_lookup(ifname=iif):  # a rule may name a link that comes later
            log.warning("--iif %s: no such interface (yet); its rule applies once it exists", iif)
    route_client_nets_into_tun(
        net, tun.name, list(opts.client_nets), table=opts.table, priority=opts.priority,
        iifs=opts.iifs, fail_closed=opts.fail_closed_routing,
    )  # fmt: skip
    enable_ping_sockets(net, ping_gid)  # ICMP echo is relayed through ICMP datagram sockets


# glibc mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks below this come from the heap (a 256 KiB upstream read, the bytes of a
# pass of GRO super-segments), not from an mmap of fresh pages each.
MALLOC_MMAP_THRESHOLD = 1 << 20
# Free memory at the top of the heap kept rather than given back, at most this.
MALLOC_TRIM_THRESHOLD = 8 << 20


def tune_malloc() -> bool:
    """Keep the relay's large buffers on the heap and its pages mapped (glibc).

    The send buffer (stack.tcp.sendbuf) keeps upstream reads (256 KiB each)
    until the client acknowledges them, and an ACK frees several at once. With
    glibc's defaults (a dynamic threshold that settles at about 256 KiB for mmap
    and twice that for trimming) the heap top was then given back on most ACKs
    and taken again by the next read: 971 brk calls in 3 s of one download, and
    a page fault per 4 KiB read into (3.4 % of the worker's time). Fixed
    thresholds (setting them also ends the dynamic adjustment) keep up to
    ``MALLOC_TRIM_THRESHOLD`` of free heap resident. False where there is no
    mallopt (another libc): nothing changes.
    """
    import ctypes  # the worker's only use: the supervisor does without

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )


# After bulk traffic, free heap goes back to the kernel (glibc malloc_trim). The
# trim threshold above keeps up to 8 MiB of it per worker while bytes flow, which
# is what it is for, but not once they stop. Checked once a second from the
# relay's byte counts; a check costs two additions.
TRIM_CHECK_SECONDS = 1.0
BULK_BYTES_PER_CHECK = 16 << 20  # a second that moved this much was bulk traffic
QUIET_BYTES_PER_CHECK = 1 << 20  # and one below this after it: the bulk ended


class BulkEnd:
    """Tells, from a cumulative byte count read once per check, when a busy
    period (a check that moved at least ``bulk`` bytes) has been followed by a
    quiet one (less than ``quiet``): once per busy period."""

    __slots__ = ("_busy", "_last", "bulk", "quiet")

    def __init__(
        self, start: int, bulk: int = BULK_BYTES_PER_CHECK, quiet: int = QUIET_BYTES_PER_CHECK
    ) -> None:
        self._last = start
        self._busy = False
        self.bulk, self.quiet = bulk, quiet

    def observe(self, total: int) -> bool:
        moved, self._last = total - self._last, total
        if moved >= self.bulk:
            self._busy = True
        elif self._busy and moved < self.quiet:
            self._busy = False
            return True
        return False


def malloc_trimmer() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)`` (free heap back to the kernel), or None without it."""
    import ctypes  # the worker's only use: the supervisor does without

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return lambda: trim(0)


async def _trim_after_bulk(relay: Relay, trim: Callable[[], object]) -> None:
    stats = relay.stats
    edge = BulkEnd(stats.bytes_c2s + stats.bytes_s2c)
    while True:
        await trio.sleep(TRIM_CHECK_SECONDS)
        if edge.observe(stats.bytes_c2s + stats.bytes_s2c):
            trim()
            stats.heap_trims += 1


async def relay_queue(
    opts: RunOptions,
    tun: TunDevice,
    analyzers: Sequence[object],
    *,
    on_ready: Callable[[], None],
    logs: ZeekLogs | None = None,
    on_running: Callable[[trio.Nursery, Relay, Stack, TunDevice, GcStats], None] | None = None,
    stats_interval: Callable[[], float] | None = None,
) -> None:
    """Run the packet loop on one TUN queue until SIGINT/SIGTERM or cancellation.

    ``on_ready`` is called once packets are being relayed. ``logs`` (one of
    ``analyzers``) gets its writer task here; its owner closes it, which writes
    what is left. On the way out the stack's, the relay's, the queue's and the
    garbage collector's counters are logged ("stopped: stack"). ``on_running``
    starts tasks beside the packet loop (the worker's control link);
    ``stats_interval`` is read before each stats line (a reload may change it).
    """
    from relay.analysis.ratelimit import set_interval
    from relay.datapath.engine import Relay
    from stack import Stack

    set_interval(opts.limits.error_log_interval)
    stack = Stack(opts.stack)
    relay = Relay(tun, stack=stack, config=opts.relay, analyzers=analyzers)
    # What exists now (modules, classes, analyzers) lives as long as the process:
    # keep it out of every full collection, whose pause grows with the objects
    # it scans (about 25,000 at start, 9.5 ms here; 10,000 flows add 260 ms).
    gc.freeze()
    # Full collections much rarer (considered after 1,000 collections of
    # generation 1, not 10): an ended flow is freed by reference counting and
    # young collections (2,000 flows ended by FIN, or by RST, left nothing for a
    # full one), while a full collection costs ~26 us per live flow. Measured
    # (bench_netns e, connrate then 10,000 idle): 11 full collections of up to
    # 306 ms and 2.7 s of pauses became none and 0.6 s, with the same RSS.
    # Cyclic garbage an analyzer makes waits longer for its collection.
    gc.set_threshold(700, 10, 1000)
    tune_malloc()
    watch = GcWatch()
    watch.install()
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                if logs is not None:
                    await nursery.start(logs.run)
                await nursery.start(relay.run)
                if stats_interval is not None or opts.stats_interval > 0:
                    interval = stats_interval or (lambda: opts.stats_interval)
                    nursery.start_soon(_log_stats, relay, stack, tun, watch.stats, interval)
                if (trim := malloc_trimmer()) is not None:
                    nursery.start_soon(_trim_after_bulk, relay, trim)
                if on_running is not None:
                    on_running(nursery, relay, stack, tun, watch.stats)
                on_ready()
                async for signum in signals:
                    log.info("received %s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break
    finally:
        watch.remove()
    log.info(
        "stopped: stack %s; relay %s; tun %s; gc %s%s; most refused clients %s",
        stack.stats, relay.stats, tun.stats, watch.stats,
        "" if logs is None else f"; logs {logs.stats}", _top(stack),
    )  # fmt: skip


async def _log_stats(
    relay: Relay, stack: Stack, tun: TunDevice, gcs: GcStats, interval: Callable[[], float]
) -> None:
    while True:
        if interval() <= 0:  # off until a reload sets it
            await trio.sleep(1.0)
            continue
        await trio.sleep(interval())
        held = stack.gauges()
        log.info(
            "flows=%d timer_heap=%d timers=%d buffered=%d reserved=%d stack %s; relay %s; "
            "tun %s; gc %s; most refused clients %s",
            held.connections, held.timer_heap, held.timers, held.buffered, held.reserved,
            stack.stats, relay.stats, tun.stats, gcs, _top(stack),
        )  # fmt: skip


def _top(stack: Stack) -> str:
    """The clients refused most by their quotas, for the stats line (bounded)."""
    return ", ".join(f"{c}={n}" for c, n in stack.top_refused_clients()) or "none"
