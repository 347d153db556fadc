"""The ``tunrelay`` command line: ``run`` (the service) and ``demo`` (the embedded default)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Sequence

import trio

from relay.datapath.tun import DEFAULT_TXQUEUELEN
from relay.service.run import MAX_WORKERS, ConfigError, RunOptions, serve, validate
from relay.service.workers import supervise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunrelay",
        description="A VPN endpoint that terminates client TCP in userspace, relays it to the "
        "original destination, and lets analyzers see each direction as an ordered stream.",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="relay traffic from client networks through a TUN device (needs root)",
        description="Create the TUN device, route packets from the client networks into it "
        "with a policy rule, and relay every TCP connection until SIGINT or SIGTERM. "
        "Everything installed is removed on exit.",
    )
    run.add_argument("--tun", required=True, help="TUN device name to create, e.g. tunrelay0")
    run.add_argument(
        "--client-net",
        action="append",
        required=True,
        metavar="CIDR",
        help="network whose packets are relayed (repeat for several; IPv4 and IPv6)",
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
    run.add_argument("--mtu", type=int, default=1500, help="TUN MTU (default 1500)")
    run.add_argument(
        "--txqueuelen", type=int, default=DEFAULT_TXQUEUELEN, help="TUN queue length, per queue"
    )
    run.add_argument("--table", type=int, default=5197, help="routing table for the TUN route")
    run.add_argument("--priority", type=int, default=5197, help="policy rule priority")
    run.add_argument(
        "--connect-timeout", type=float, default=10.0, help="upstream connect timeout, seconds"
    )
    run.add_argument("--max-flows", type=int, default=65536, help="TCP flows at most")
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
        "--offload",
        action="store_true",
        help="TUN offloads: virtio-net headers, checksum offload and TSO (GRO super-segments "
        "in; checksums the kernel vouches for are not recomputed)",
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
    run.add_argument(
        "--profile",
        metavar="PATH",
        help="write a cProfile of the packet loop to PATH on exit (pstats format; "
        "needs --workers 1); for finding where the time goes, not for production",
    )

    demo = sub.add_parser(
        "demo",
        help="self-contained demo in network namespaces (needs root)",
        description="Build client, gateway and server namespaces (198.18.0.0/15, fd00::/8, no "
        "route out), run the relay in the gateway with analyzers, drive real traffic from the "
        "client, print what the analyzers saw, and tear everything down.",
    )
    demo.add_argument("--bulk-mib", type=int, default=16, help="size of the bulk transfers")
    return parser


def _tagged(kind: str, value: str) -> tuple[str, str]:
    # --allow and --deny share one list, so their relative order is kept.
    return kind, value


def default_workers() -> int:
    """One worker per CPU this process may run on (at most ``MAX_WORKERS``)."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


def _profiled(opts: RunOptions, path: str) -> None:
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    try:
        trio.run(serve, opts)
    finally:
        profile.disable()
        profile.dump_stats(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tunrelay`` console script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "demo":
        from relay.lab.demo import run_demo

        return run_demo(bulk_mib=args.bulk_mib)
    try:
        opts = validate(
            tun=args.tun,
            client_nets=args.client_net,
            analyzers=args.analyzer,
            flow_log=args.flow_log,
            mtu=args.mtu,
            txqueuelen=args.txqueuelen,
            table=args.table,
            priority=args.priority,
            stats_interval=args.stats_interval,
            connect_timeout=args.connect_timeout,
            max_flows=args.max_flows,
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
        )
        if args.profile and opts.workers != 1:
            raise ConfigError("--profile: needs --workers 1 (one process to profile)")
        if os.geteuid() != 0:
            print("tunrelay run: needs root (CAP_NET_ADMIN) to create the TUN", file=sys.stderr)
            return 2
        if opts.workers > 1:
            return trio.run(supervise, opts, args.log_level)
        if args.profile:
            _profiled(opts, args.profile)
        else:
            trio.run(serve, opts)
    except ConfigError as exc:
        print(f"tunrelay run: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"tunrelay run: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
