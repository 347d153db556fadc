"""The ``tunrelay`` command line: ``run`` (the service), ``cleanup`` (after a dead run),
``demo`` (the embedded default) and ``lab`` (a detached lab to try it by hand)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Sequence

import trio

from relay.datapath.tun import DEFAULT_TXQUEUELEN
from relay.lab import labcli
from relay.service import limits
from relay.service.configfile import (
    ConfigFile,
    Key,
    blame,
    given,
    keys_of,
    merge,
    overridden,
    read_config,
)
from relay.service.logsetup import LOG_LEVELS
from relay.service.logsetup import configure as configure_logging
from relay.service.privileges import CAP_NET_ADMIN, current_caps, resolve_worker
from relay.service.run import MAX_WORKERS, ConfigError, RunOptions, validate
from relay.service.runstate import STATE_DIR, StateError, cleanup
from relay.service.stackbuild import stack_build
from relay.service.workers import supervise

log = logging.getLogger("tunrelay")
LOG_LEVEL_HELP = "the service's own log level (default info; SIGHUP applies a config file's)"
NEEDS_CAP = "needs CAP_NET_ADMIN (root, or an ambient capability: see the README's systemd unit)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunrelay",
        description="A VPN endpoint that terminates client TCP in userspace, relays it to the "
        "original destination, and lets analyzers see each direction as an ordered stream.",
    )
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, help=LOG_LEVEL_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="relay traffic from client networks through a TUN device (needs CAP_NET_ADMIN)",
        description="Create the TUN device, route packets from the client networks into it "
        "with a policy rule, and relay every TCP connection until SIGINT or SIGTERM. "
        "Everything installed is removed on exit.",
    )
    run.add_argument(
        "--config",
        metavar="FILE",
        help="read options from this TOML file (keys below); options given here override it",
    )
    run.add_argument(
        "--tun", help="TUN device name to create, e.g. tunrelay0 (required, here or in --config)"
    )
    run.add_argument(
        "--client-net",
        action="append",
        metavar="CIDR",
        help="network whose packets are relayed (repeat for several; IPv4 and IPv6; required, "
        "here or in --config)",
    )
    run.add_argument(
        "--iif",
        action="append",
        default=[],
        metavar="IFACE",
        help="relay only packets arriving on this interface, the VPN's (repeatable; "
        "recommended: without it, spoofed client addresses from elsewhere are relayed too)",
    )
    run.add_argument(
        "--user",
        help="user the workers run as, with no capabilities (default: nobody when started "
        "as root, else the starting user)",
    )
    run.add_argument(
        "--no-fail-closed-routing",
        dest="fail_closed_routing",
        action="store_false",
        help="no prohibit route: if the relay dies, client traffic is forwarded by the kernel "
        "around it instead of being refused until `tunrelay cleanup` or the next run",
    )
    run.add_argument(
        "--state-dir",
        default=STATE_DIR,
        help=f"where the record of what this run changed is kept (default {STATE_DIR})",
    )
    run.add_argument(
        "--analyzer",
        action="append",
        default=[],
        metavar="MODULE:ATTR",
        help="analyzer object or class to load (repeatable); a class is instantiated",
    )
    run.add_argument(
        "--flow-log", metavar="PATH|-", help="append one JSON object per finished flow"
    )
    run.add_argument(
        "--log-dir",
        metavar="DIR",
        help="write Zeek-compatible JSON logs into DIR (conn.log, ssl.log, http.log, dns.log, "
        "quic.log; appended to): protocols are detected by content and dissected",
    )
    run.add_argument(
        "--capture-dir",
        metavar="DIR",
        help="write each TCP flow's bytes into DIR as <uid>.c2s, <uid>.s2c and a synthetic "
        "<uid>.pcap (UDP: the pcap only); DIR is created 0700 for the workers' user",
    )
    run.add_argument(
        "--capture-filter",
        action="append",
        default=[],
        metavar="TERMS",
        help="capture only flows with an end matching 'port N', 'net CIDR' or a bare CIDR "
        "(repeatable, or a comma list; any term matches; default: every TCP and UDP flow)",
    )
    run.add_argument(
        "--block-domain",
        action="append",
        default=[],
        metavar="PATTERN",
        help="block a name (repeatable): 'ads.example' or '*.example.com' (the name and every "
        "name under it); DNS gets NXDOMAIN, TLS is reset, HTTP gets 403, QUIC is dropped",
    )
    run.add_argument(
        "--block-list",
        action="append",
        default=[],
        metavar="FILE",
        help="block the patterns in FILE (repeatable): one a line, '#' comments, blank lines",
    )
    run.add_argument("--mtu", type=int, default=1500, help="TUN MTU (default 1500)")
    run.add_argument(
        "--txqueuelen", type=int, default=DEFAULT_TXQUEUELEN, help="TUN queue length, per queue"
    )
    run.add_argument("--table", type=int, default=5197, help="routing table for the TUN route")
    run.add_argument("--priority", type=int, default=5197, help="policy rule priority")
    run.add_argument(
        "--connect-timeout", type=float, default=10.0, help="upstream connect timeout, seconds"
    )
    run.add_argument(
        "--upstream-timeout",
        type=float,
        default=0.0,
        help="seconds an upstream may leave sent bytes unacknowledged before its flow is "
        "reset (TCP_USER_TIMEOUT; default 0: the kernel's, ~15 min)",
    )
    run.add_argument(
        "--client-idle-timeout",
        type=float,
        default=0.0,
        help="reset a TCP flow whose client sent nothing for this many seconds "
        "(default 0: off; keepalive still finds idle clients that vanished, after 2 h)",
    )
    run.add_argument(
        "--memory-budget",
        type=int,
        default=1 << 30,
        help="TCP buffer bytes all flows of one worker may grow to together (default 1 GiB); "
        "past it buffers keep their initial sizes",
    )
    run.add_argument("--max-flows", type=int, default=65536, help="TCP flows at most")
    run.add_argument(
        "--flow-pass-bytes",
        type=int,
        default=256 * 1024,
        help="bytes of one client flow each pass of a worker's packet loop takes (default "
        "256 KiB; 0: no bound): larger gives a bulk upload more throughput and the flows "
        "beside it more latency",
    )
    run.add_argument(
        "--flow-read-bytes",
        type=int,
        default=512 * 1024,
        help="bytes one flow reads from its server at a time (default 512 KiB): smaller "
        "makes a request beside a bulk download wait less, and the download slower "
        "(4096..1048576)",
    )
    run.add_argument(
        "--rcv-buf", type=int, default=4 << 20, help="per-flow receive buffer cap, bytes"
    )
    run.add_argument("--snd-buf", type=int, default=4 << 20, help="per-flow send buffer cap, bytes")
    run.add_argument(
        "--udp-idle-timeout",
        type=float,
        default=60.0,
        help="seconds a UDP flow may be idle (DNS and ping: at most 10)",
    )
    run.add_argument(
        "--fail-closed",
        action="store_true",
        help="reset a flow whose analyzer raises (default: detach the analyzer)",
    )
    run.add_argument(
        "--stats-interval", type=float, default=0.0, help="log counters every N seconds (0: off)"
    )
    run.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at /metrics and a health check at /healthz on this "
        "TCP address ([V6]:PORT for IPv6); off by default",
    )
    run.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="the service's own log on stderr: text lines or JSON lines (default text)",
    )
    # Also here, so that it is a config file key (log_level) like every run option; the
    # global form (tunrelay --log-level LEVEL run) stays. SUPPRESS: no default of its
    # own, which would overwrite the global one's value.
    run.add_argument(
        "--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS, help=LOG_LEVEL_HELP
    )
    run.add_argument(
        "--offload",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="TUN offloads: virtio-net headers, checksum offload and TSO (GRO super-segments "
        "in, GSO out; checksums the kernel vouches for are not recomputed). On by default; "
        "a kernel that refuses them gets the plain path and one warning",
    )
    run.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="worker processes, one TUN queue each (multi-queue TUN; the kernel keeps a flow on "
        "one queue); 1 runs everything in one process (default: the number of usable CPUs)",
    )
    egress = run.add_argument_group(
        "egress",
        "Which destinations clients may reach through the relay, and how its upstream "
        "sockets look. By default loopback, link-local, multicast, broadcast, private and "
        "reserved ranges, the relay host's own addresses and the client networks are denied "
        "(ICMP administratively prohibited). Rules are tried in command-line order, before "
        "the defaults; the first that matches decides. An --allow opens a default-denied "
        "address only if its network lies inside the default range that denies it "
        "(--allow 10.0.0.0/8 opens the 10/8 LAN, not the relay's own 10.x addresses).",
    )
    for kind, what in (("allow", "may"), ("deny", "may not")):
        egress.add_argument(
            f"--{kind}",
            action="append",
            dest="egress_rules",
            default=[],
            type=functools.partial(_tagged, kind),
            metavar="CIDR[:PORTS]",
            help=f"clients {what} reach CIDR (repeatable; PORTS: 443, 8000-8100 or a comma "
            f"list of them; IPv6 in brackets to give ports: [fd00::/8]:443)",
        )
    egress.add_argument(
        "--allow-client-to-client",
        action="store_true",
        help="let clients reach the client networks (each other)",
    )
    egress.add_argument(
        "--fwmark", metavar="N", help="SO_MARK of every upstream socket (e.g. 0x1 or 1)"
    )
    egress.add_argument(
        "--bind-address",
        action="append",
        default=[],
        metavar="ADDR",
        help="source address of upstream sockets (one IPv4 and/or one IPv6)",
    )
    egress.add_argument(
        "--bind-interface",
        metavar="IFACE",
        help="send upstream traffic through IFACE only (SO_BINDTODEVICE)",
    )
    limits.add_arguments(run)
    run.add_argument(
        "--profile",
        metavar="PATH",
        help="write a cProfile of the packet loop to PATH on exit (pstats format; "
        "needs --workers 1); for finding where the time goes, not for production",
    )

    run.epilog = (
        "config file keys (TOML; arrays for repeatable options, [[analyzer]] tables with path "
        "and an [analyzer.options] table of keyword arguments): " + ", ".join(keys_of(run))
    )

    check = sub.add_parser(
        "check-config",
        help="check a `tunrelay run --config` file and print the settings it gives",
        description="Check FILE as `tunrelay run --config FILE` would (no root needed, "
        "nothing is changed) and print every option's value and whether it came from the "
        "file or is the default.",
    )
    check.add_argument("file", metavar="FILE")

    clean = sub.add_parser(
        "cleanup",
        help="undo what a dead `tunrelay run` left (rules, routes, sysctls)",
        description="Undo the changes recorded in the state files of runs that are no longer "
        "running (SIGKILL, OOM kill, crash), restoring sysctls to their recorded values. "
        "A running relay is left alone.",
    )
    clean.add_argument("--tun", help="only the run on this TUN (default: every dead run)")
    clean.add_argument("--state-dir", default=STATE_DIR, help=f"default {STATE_DIR}")

    demo = sub.add_parser(
        "demo",
        help="self-contained demo in network namespaces (needs root)",
        description="Build client, gateway and server namespaces (198.18.0.0/15, fd00::/8, no "
        "route out), run the relay in the gateway with analyzers, drive real traffic from the "
        "client, print what the analyzers saw, and tear everything down.",
    )
    demo.add_argument("--bulk-mib", type=int, default=16, help="size of the bulk transfers")
    labcli.add_parser(sub)
    return parser


def _tagged(kind: str, value: str) -> tuple[str, str]:
    # --allow and --deny share one list, so their relative order is kept.
    return kind, value


def default_workers() -> int:
    """One worker per CPU this process may run on (at most ``MAX_WORKERS``)."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


def _run_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            run: argparse.ArgumentParser = action.choices["run"]
            return run
    raise AssertionError("no run subcommand")


def _options(args: argparse.Namespace) -> RunOptions:
    """``validate`` the ``run`` options in ``args`` (command line and config file merged).

    Raises:
        ConfigError: naming the option.
    """
    for option, value in (("--tun", args.tun), ("--client-net", args.client_net)):
        if not value:
            raise ConfigError(f"{option}: required (on the command line or in --config)")
    opts = validate(
        tun=args.tun,
        client_nets=args.client_net,
        analyzers=args.analyzer,
        flow_log=args.flow_log,
        log_dir=args.log_dir,
        capture_dir=args.capture_dir,
        capture_filter=args.capture_filter,
        block_domains=args.block_domain,
        block_lists=args.block_list,
        mtu=args.mtu,
        txqueuelen=args.txqueuelen,
        table=args.table,
        priority=args.priority,
        stats_interval=args.stats_interval,
        connect_timeout=args.connect_timeout,
        upstream_timeout=args.upstream_timeout,
        client_idle_timeout=args.client_idle_timeout,
        memory_budget=args.memory_budget,
        max_flows=args.max_flows,
        flow_pass_bytes=args.flow_pass_bytes,
        flow_read_bytes=args.flow_read_bytes,
        rcv_buf=args.rcv_buf,
        snd_buf=args.snd_buf,
        fail_closed=args.fail_closed,
        udp_idle_timeout=args.udp_idle_timeout,
        offload=args.offload,
        workers=default_workers() if args.workers is None else args.workers,
        egress_rules=args.egress_rules,
        allow_client_to_client=args.allow_client_to_client,
        fwmark=args.fwmark,
        bind_addresses=args.bind_address,
        bind_interface=args.bind_interface,
        iifs=args.iif,
        fail_closed_routing=args.fail_closed_routing,
        state_dir=args.state_dir,
        limits=limits.from_args(args),
        metrics=args.metrics,
        log_format=args.log_format,
        log_level=args.log_level,
    )
    if args.profile and opts.workers != 1:
        raise ConfigError("--profile: needs --workers 1 (one process to profile)")
    return opts


def _configured(
    args: argparse.Namespace, keys: dict[str, Key], path: str, on_command_line: set[str]
) -> tuple[RunOptions, ConfigFile]:
    """Read the config file at ``path`` into ``args`` and validate the result.

    Raises:
        ConfigError: ``FILE:LINE: key: why`` for what the file gives.
    """
    config = read_config(path, keys)
    merge(args, config, on_command_line)
    try:
        return _options(args), config
    except ConfigError as exc:
        raise blame(exc, keys, config, on_command_line) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tunrelay`` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "demo":
        from relay.lab.demo import run_demo

        return run_demo(bulk_mib=args.bulk_mib)
    if args.command == "cleanup":
        return _cleanup(args.state_dir, args.tun)
    if args.command == "lab":
        return labcli.run(args)
    keys = keys_of(_run_parser(parser))
    if args.command == "check-config":
        return _check_config(args.file, keys)
    try:
        if args.config is not None:
            opts, _ = _configured(args, keys, args.config, given(_parser(), argv))
        else:
            opts = _options(args)
        if (stale := stack_build().problem()) is not None:
            print(f"tunrelay run: {stale}", file=sys.stderr)
            return 2
        if not current_caps().has(CAP_NET_ADMIN):
            print(f"tunrelay run: {NEEDS_CAP}", file=sys.stderr)
            return 2
        if not all(current_caps().has(cap) for cap in opts.worker_caps):
            print("tunrelay run: --fwmark: the workers need CAP_NET_RAW to set SO_MARK,"
                  " and this process does not have it", file=sys.stderr)  # fmt: skip
            return 2
        try:
            user = resolve_worker(args.user)
        except ValueError as bad:
            raise ConfigError(str(bad)) from None
        opts = dataclasses.replace(opts, user=user, profile=args.profile)
        configure_logging(opts.log_level, opts.log_format)
        reread = None
        if args.config is not None:

            def reread() -> RunOptions:  # SIGHUP: the file again, the command line over it
                fresh = _parser().parse_args(argv)
                pinned = given(_parser(), argv)
                new, config = _configured(fresh, keys, args.config, pinned)
                for what in overridden(config, keys, fresh, pinned):
                    log.warning("reload: %s; keeping its value", what)
                return dataclasses.replace(new, user=user, profile=args.profile)

        return trio.run(functools.partial(supervise, reread=reread), opts, opts.log_level)
    except Exception as exc:  # at start above all: one line, never a traceback
        leaf = _leaf(exc)
        if isinstance(leaf, ConfigError | StateError):
            print(f"tunrelay run: {leaf}", file=sys.stderr)
            return 2
        log.debug("tunrelay run failed", exc_info=True)
        print(f"tunrelay run: {_one_line(leaf)}", file=sys.stderr)
        return 1


def _check_config(path: str, keys: dict[str, Key]) -> int:
    """``tunrelay check-config FILE``: validate, then print the effective settings."""
    args = _run_parser(_parser()).parse_args([], argparse.Namespace(log_level="info"))
    try:
        opts, config = _configured(args, keys, path, set())
    except ConfigError as exc:
        print(f"tunrelay check-config: {exc}", file=sys.stderr)
        return 2
    print(f"# {path}: valid; the settings of `tunrelay run --config {path}`")
    rules: list[tuple[str, str]] = args.egress_rules
    for name, key in keys.items():
        value = getattr(args, key.dest)
        if key.dest == "egress_rules":
            value = [spec for kind, spec in rules if kind == name]
        elif name == "workers" and value is None:
            value = opts.workers
        source = "file" if name in config.keys else "default"
        print(f"{name} = {_toml(value)}  # {source}")
    return 0


def _toml(value: object) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        if len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], dict):
            return f"{{ path = {_toml(value[0])}, options = {_toml(value[1])} }}"
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    return str(value)


def _leaf(exc: Exception) -> Exception:
    """The one exception inside (nested) single-exception groups (trio's nurseries)."""
    for _ in range(16):
        if not isinstance(exc, ExceptionGroup) or len(exc.exceptions) != 1:
            break
        exc = exc.exceptions[0]
    return exc


def _one_line(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    code = getattr(exc, "code", None)  # pyroute2's NetlinkError: (code, message)
    if isinstance(code, int) and code > 0:
        return f"netlink: {os.strerror(code)}"
    return str(exc) or type(exc).__name__


def _cleanup(state_dir: str, tun: str | None) -> int:
    if not current_caps().has(CAP_NET_ADMIN):
        print(f"tunrelay cleanup: {NEEDS_CAP}", file=sys.stderr)
        return 2
    try:
        status, lines = cleanup(state_dir, tun)
    except Exception as exc:
        log.debug("tunrelay cleanup failed", exc_info=True)
        print(f"tunrelay cleanup: {_one_line(exc)}", file=sys.stderr)
        return 1
    for line in lines:
        print(line, file=sys.stdout if status == 0 else sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
