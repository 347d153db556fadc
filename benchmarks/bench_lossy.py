"""Goodput on a lossy path: kernel forwarding vs tunrelay, side by side.

Run (root): ``sudo .venv/bin/python benchmarks/bench_lossy.py [--repeat N] [--seconds T]
[--loss P] [--loss-toward-gateway-only] [--rtt-ms R] [--kernel-extra-us U ...]
[--time-limit S] [--json PATH] [--log-dir DIR]``

Each round builds a fresh ``relay.lab.topology.Topology`` with a ``relay.lab.impair.Wire``
on the client's link: the seeded userspace forwarder drops ``--loss`` (default
1%) of the frames in *each* direction and delays each direction by half of
``--rtt-ms`` (default 20 ms RTT). On that path, one after the other and with
the same seed:

    a  kernel forwarding in the gateway (the client's TCP talks to the server's)
    d  ``tunrelay run`` in the gateway (the relay terminates the client's TCP)

The kernel endpoints (iperf3 client and server) use ``--cc`` (default cubic,
via iperf3 ``-C``): new namespaces inherit the host's default, BBR on the
project machine, which ignores random loss and would make (a) a different
benchmark from one machine to the next.

and for each, single-stream ``iperf3 -t T`` up (client -> server) and down
(``-R``); goodput = ``end.sum_received.bits_per_second``. Rounds interleave a
and d; the table shows the median per configuration and the ratio d/a for up
and down (goal: >= 0.8), and the sender's mean RTT and retransmissions as
iperf3 reports them.

The same path, not just the same wire: the relay adds its processing time
to every round trip, and a loss-limited sender's rate falls with the RTT.
``--kernel-extra-us U`` (repeatable) adds configurations ``a+U``: kernel
forwarding with U microseconds more delay each way (the forwarder keeps
sub-millisecond delays, ``relay.lab.impair.FINE_DELAY_BELOW``), so d can be
read beside Linux on a path with the relay's RTT.
``--loss-toward-gateway-only`` puts the loss on the client -> gateway
direction alone (the other direction gets only the delay).

Bounded and clean: every child has a hard time limit, a global alarm
(``--time-limit``, default 600 s) ends the run, and every lab (with its wire
namespace and forwarder) is torn down on every exit path, Ctrl-C included.
Only 198.18.0.0/15 and fd00::/8 inside throw-away namespaces; no route to any
real network.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench_netns import (
    IPERF_PORT,
    MeasureError,
    Report,
    finish,
    fresh_lab,
    listening,
    stop,
    wait_for,
)

from relay.lab.impair import Impairment, Wire, WireStats
from relay.lab.topology import REPO_ROOT, Topology

TUN = "trl0"
CONFIGS = {"a": "kernel forwarding", "d": "tunrelay"}
MODES = ("up", "down")
GOAL = 0.8


class _Stopped(BaseException):
    """SIGTERM or the global alarm: unwind (tearing labs down) and print what we have."""


@dataclass
class Results(Report):
    """bench_netns's Report (samples: cfg -> up/down -> Mbit/s), plus the wire's counters."""

    wire: list[str] = field(default_factory=list)


def start_relay(topo: Topology, log_path: Path) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "relay.cli", "run", "--tun", TUN,
        "--client-net", topo.client_net_v4, "--client-net", topo.client_net_v6,
        "--iif", topo.gw_cli_if, "--state-dir", str(log_path.parent),
        *topo.relay_allow,
    ]  # fmt: skip
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as out:
        proc = topo.spawn(
            "gw", argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
            reachable_by="nobody",  # the workers' user
        )  # fmt: skip

    def ready() -> bool:
        if proc.poll() is not None:
            raise MeasureError(f"tunrelay exited with status {proc.returncode}")
        return "relaying TCP" in log_path.read_text(errors="replace")

    wait_for(ready, 20, "tunrelay")
    return proc


def iperf(topo: Topology, mode: str, seconds: float, cc: str = "") -> tuple[float, str]:
    """One single-stream iperf3 run from the client ns; (goodput Mbit/s, summary).

    `cc`: the kernel endpoints' congestion control (iperf3 -C: both ends of the
    data connection); "" keeps the namespace default.
    """
    server = topo.spawn(
        "srv",
        ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: listening(server.pid, IPERF_PORT), 10, "iperf3 server")
        argv = ["iperf3", "-c", topo.srv_v4, "-p", str(IPERF_PORT), "-t", f"{seconds:g}"]
        argv += ["-J", "--connect-timeout", "10000"] + (["-R"] if mode == "down" else [])
        argv += ["-C", cc] if cc else []
        client = topo.spawn("cli", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = finish(client, seconds + 40, f"iperf3 {mode}")
        try:
            result = json.loads(out)
        except json.JSONDecodeError:
            raise MeasureError(
                f"iperf3 {mode}: exit {client.returncode}, no JSON: {err.strip()[:200]}"
            ) from None
        if "error" in result:
            raise MeasureError(f"iperf3 {mode}: {result['error']}")
        mbps = float(result["end"]["sum_received"]["bits_per_second"]) / 1e6
        retransmits = result["end"].get("sum_sent", {}).get("retransmits")
        summary = f"{mbps:.1f} Mbit/s"
        if retransmits is not None:
            summary += f", {retransmits} retransmits (iperf3 sender)"
        rtts = [s.get("sender", {}).get("mean_rtt") for s in result["end"].get("streams", [])]
        if rtts and rtts[0]:
            summary += f", mean RTT {rtts[0]} us"
        used = result["end"].get("sender_tcp_congestion")
        if used:
            summary += f", sender {used}"
        return mbps, summary
    finally:
        stop(server, 2.0)


def config_name(cfg: str) -> str:
    """``a``, ``d`` or ``a+U`` (kernel forwarding, U us more each way)."""
    if cfg.startswith("a+"):
        return f"kernel forwarding, {cfg[2:]} us more each way"
    return CONFIGS[cfg]


def run_config(
    cfg: str,
    imp: tuple[Impairment, Impairment],
    seed: int,
    seconds: float,
    cc: str,
    res: Results,
    where: str,
    logs: Path,
) -> None:
    print(f"  {where}: {config_name(cfg)}", flush=True)
    c2g, g2c = imp
    if cfg.startswith("a+"):
        extra = int(cfg[2:]) / 1e6
        c2g, g2c = c2g.with_delay(c2g.delay + extra), g2c.with_delay(g2c.delay + extra)
    with fresh_lab() as topo:
        wire = Wire.insert(topo)
        relay: subprocess.Popen[bytes] | None = None
        log_path = logs / f"{where.replace(' ', '-')}.log"
        try:
            if cfg.startswith("a"):
                topo.enable_forwarding()
            else:
                relay = start_relay(topo, log_path)
            for mode in MODES:
                wire.start(c2g, g2c, seed=seed)
                stats: WireStats | None = None
                try:
                    mbps, summary = iperf(topo, mode, seconds, cc)
                    stats = wire.stop()
                    res.add(cfg, mode, mbps)
                    print(f"    {mode:5} {summary}", flush=True)
                    res.wire.append(f"[{where} {mode}] {stats.summary()}")
                    if stats.uncontrolled_drops():
                        res.note(
                            f"{where} {mode}",
                            f"{stats.uncontrolled_drops()} frames lost outside "
                            "the impairment (forwarder overloaded)",
                        )
                except MeasureError as exc:
                    res.note(f"{where} {mode}", str(exc))
                finally:
                    if stats is None and wire.running:
                        wire.stop()
                if relay is not None and relay.poll() is not None:
                    res.note(where, f"tunrelay exited ({relay.returncode})")
                    break
        except MeasureError as exc:
            res.note(where, f"set-up failed: {exc}")
        finally:
            if relay is not None:
                rc = stop(relay, 10.0)
                if rc not in (0, -signal.SIGTERM):
                    res.note(where, f"tunrelay exited with status {rc} on SIGTERM")
                text = log_path.read_text(errors="replace") if log_path.exists() else ""
                bad = [ln for ln in text.splitlines() if re.search(r"ERROR|CRITICAL|Traceback", ln)]
                for ln in bad[:3]:
                    res.note(where, f"tunrelay log: {ln[:300]}")


def print_table(
    res: Results,
    imp: Impairment,
    rtt_ms: float,
    seconds: float,
    rounds: int,
    cc: str,
    extra: list[str],
    one_way: bool,
) -> None:
    print()
    print(
        f"path: {imp.loss * 100:g}% loss {'client -> gateway' if one_way else 'each way'}, "
        f"{rtt_ms:g} ms RTT; single stream, "
        f"iperf3 -t {seconds:g}, kernel endpoints {cc or 'default'}; "
        f"median of {rounds} round(s)"
    )
    head = f"{'':12}{'a: kernel, Mbit/s':>20}{'d: tunrelay, Mbit/s':>22}{'d/a':>8}  goal"
    print(head)
    for mode in MODES:
        a, d = res.median("a", mode), res.median("d", mode)
        ratio = d / a if a and d is not None else None
        verdict = "n/a" if ratio is None else ("met" if ratio >= GOAL else "NOT met")
        print(f"{mode:12}{_fmt(a):>20}{_fmt(d):>22}{_fmt(ratio, 2):>8}  >= {GOAL:g}: {verdict}")
    for cfg in extra:
        for mode in MODES:
            k, d = res.median(cfg, mode), res.median("d", mode)
            ratio = d / k if k and d is not None else None
            print(f"{mode:12}{cfg + ': kernel':>20}{_fmt(k):>9} Mbit/s; d/{cfg} {_fmt(ratio, 2)}")


def _fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="goodput on a lossy path: kernel vs tunrelay")
    p.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    p.add_argument("--seconds", type=float, default=10.0, help="iperf3 -t (default 10)")
    p.add_argument("--loss", type=float, default=0.01, help="loss each way (default 0.01)")
    p.add_argument("--rtt-ms", type=float, default=20.0, help="added RTT (default 20)")
    p.add_argument(
        "--loss-toward-gateway-only",
        action="store_true",
        help="lose frames client -> gateway only (the other way gets the delay alone)",
    )
    p.add_argument(
        "--kernel-extra-us",
        type=int,
        action="append",
        default=[],
        help="also kernel forwarding with this many us more delay each way (repeatable)",
    )
    p.add_argument("--seed", type=int, default=1, help="round r uses seed + r")
    p.add_argument(
        "--cc",
        default="cubic",
        help='kernel endpoints\' congestion control, iperf3 -C (default cubic; "" = default)',
    )
    p.add_argument("--time-limit", type=float, default=600.0, help="abort after S seconds")
    p.add_argument("--json", type=Path, help="also write all samples and notes here")
    p.add_argument("--log-dir", type=Path, help="keep tunrelay's logs here")
    args = p.parse_args(argv)
    if not (1 <= args.repeat <= 20 and 1 <= args.seconds <= 60 and 0 <= args.loss <= 0.5):
        p.error("--repeat 1..20, --seconds 1..60, --loss 0..0.5")
    if not 0 <= args.rtt_ms <= 1000:
        p.error("--rtt-ms 0..1000")
    if not all(0 < us <= 100_000 for us in args.kernel_extra_us):
        p.error("--kernel-extra-us 1..100000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_lossy: needs root (it builds network namespaces)", file=sys.stderr)
        return 2
    imp = Impairment(loss=args.loss, delay=args.rtt_ms / 2000)
    pair = (imp, Impairment(delay=imp.delay) if args.loss_toward_gateway_only else imp)
    extra = [f"a+{us}" for us in args.kernel_extra_us]
    res = Results()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise _Stopped(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(int(args.time_limit))
    start = time.monotonic()
    status = 0
    print(
        f"bench_lossy: {args.loss * 100:g}% loss each way, {args.rtt_ms:g} ms RTT, "
        f"{args.repeat} round(s) of {','.join([*CONFIGS, *extra])}, iperf3 -t {args.seconds:g}; "
        f"time limit {args.time_limit:.0f} s",
        flush=True,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="bench-lossy-") as tmpdir:
            logs = args.log_dir or Path(tmpdir)
            logs.mkdir(parents=True, exist_ok=True)
            for r in range(args.repeat):
                for cfg in [*CONFIGS, *extra]:
                    where = f"round {r + 1} {cfg}"
                    run_config(cfg, pair, args.seed + r, args.seconds, args.cc, res, where, logs)
    except (_Stopped, KeyboardInterrupt) as exc:
        print(f"\nbench_lossy: stopped ({exc or 'SIGINT'}); partial results:", file=sys.stderr)
        status = 1
    finally:
        signal.alarm(0)
    print_table(
        res, imp, args.rtt_ms, args.seconds, args.repeat, args.cc, extra,
        args.loss_toward_gateway_only,
    )  # fmt: skip
    print("\nall samples, Mbit/s:")
    for cfg, by_mode in res.samples.items():
        parts = [f"{m}=" + "/".join(f"{v:.1f}" for v in vals) for m, vals in by_mode.items()]
        print(f"  {cfg}: " + "  ".join(parts))
    print("\nwire counters:")
    for ln in res.wire:
        print(f"  {ln}")
    if res.notes:
        print("\nnotes:")
        for ln in res.notes:
            print(f"  {ln}")
    print(f"\nwall time {time.monotonic() - start:.0f} s")
    if args.json:
        out: dict[str, Any] = {
            "loss": args.loss,
            "rtt_ms": args.rtt_ms,
            "loss_toward_gateway_only": args.loss_toward_gateway_only,
            "kernel_extra_us": args.kernel_extra_us,
            "seconds": args.seconds,
            "cc": args.cc,
            "samples_mbps": res.samples,
            "notes": res.notes,
            "wire": res.wire,
        }
        args.json.write_text(json.dumps(out, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
