"""``tunrelay lab``: a detached lab to try the relay and an analyzer by hand (root only).

``up [--name NAME] [--impair SPEC] [--wire] [--no-probe] [-- RUN-OPTIONS]``,
``exec NAME client|gateway|server CMD...``, ``status NAME [--json]``,
``impair NAME SPEC``, ``down NAME``, ``list``. The work is done by
`relay.lab.lab` and `relay.lab.detached`; this module only parses (it imports nothing heavy, because
``relay.cli`` builds its parser on every start).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

__all__ = ["add_parser", "run"]

DEFAULT_NAME = "lab"


def add_parser(sub: Any) -> None:
    """Add the ``lab`` subcommand to ``tunrelay``'s subparsers."""
    lab = sub.add_parser(
        "lab",
        help="a detached client/gateway/server lab with the relay, for trying it by hand "
        "(needs root)",
        description="Network namespaces trl-NAME-{cli,gw,srv} (198.18.0.0/15 and fd00::/8, "
        "no route out) with `tunrelay run` in the gateway; state in /run/tunrelay-lab/NAME.",
    )
    cmds = lab.add_subparsers(dest="lab_command", required=True)
    up = cmds.add_parser(
        "up",
        help="build a lab and start the relay in it; returns once it relays",
        description="Build the namespaces, start `tunrelay run RUN-OPTIONS` in the gateway "
        "(detached: it outlives this command) and return once a probe connection went "
        "through it. RUN-OPTIONS follow `--`, e.g. -- --analyzer mymod:MyAnalyzer.",
    )
    up.add_argument("--name", default=DEFAULT_NAME, help=f"lab name (default {DEFAULT_NAME})")
    up.add_argument(
        "--impair",
        metavar="SPEC",
        help="impair the client's link, e.g. loss=5%%,delay=10ms,dir=c2g (keys: loss, dup, "
        "reorder, gap, delay, dir, seed; parts for each direction joined by ;)",
    )
    up.add_argument(
        "--wire", action="store_true", help="insert the impairment wire (for `lab impair`)"
    )
    up.add_argument("--log-dir", action="store_true", help="run with --log-dir (Zeek logs)")
    up.add_argument("--no-probe", action="store_true", help="do not wait for a probe connection")
    up.add_argument("run_options", nargs="*", metavar="RUN-OPTIONS")
    ex = cmds.add_parser("exec", help="run a command in a lab namespace (its exit status)")
    ex.add_argument("name")
    ex.add_argument("role", choices=["client", "gateway", "server"])
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")
    st = cmds.add_parser("status", help="addresses, relay pid and log paths of a lab")
    st.add_argument("name", nargs="?", default=DEFAULT_NAME)
    st.add_argument("--json", action="store_true", help="as JSON")
    im = cmds.add_parser("impair", help="change a lab's impairment now (needs --wire/--impair)")
    im.add_argument("name")
    im.add_argument("spec", metavar="SPEC", help="e.g. loss=1%%;delay=20ms,dir=g2c, or none")
    dn = cmds.add_parser("down", help="stop and remove a lab (also after a crash; idempotent)")
    dn.add_argument("name", nargs="?", default=DEFAULT_NAME)
    cmds.add_parser("list", help="the labs that exist")


def run(args: argparse.Namespace) -> int:
    """Run ``tunrelay lab ...``; the exit status."""
    if os.geteuid() != 0:
        print("tunrelay lab: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    from relay.lab import detached as labmod

    cmd = args.lab_command
    try:
        if cmd == "up":
            return _up(args)
        if cmd == "exec":
            return _exec(args.name, args.role, args.cmd)
        if cmd == "status":
            return _status(args.name, args.json)
        if cmd == "impair":
            return _impair(args.name, args.spec)
        if cmd == "down":
            for line in labmod.down(args.name):
                print(line)
            return 0
        for name in labmod.detached_labs():
            state = labmod.read_state(name) or {}
            print(f"{name}\t{state.get('status', 'broken: run `tunrelay lab down`')}")
        return 0
    except (labmod.LabError, ValueError) as exc:
        print(f"tunrelay lab {cmd}: {exc}", file=sys.stderr)
        return 1


def _up(args: argparse.Namespace) -> int:
    from relay.lab.lab import Lab, LabOptions

    opts = LabOptions(
        args=args.run_options,
        log_dir=args.log_dir,
        impair=args.impair,
        wire=args.wire,
        probe=not args.no_probe,
        workers=None,
        pythonpath=[os.getcwd()],
    )
    lab = Lab.build(opts, name=args.name)
    print(f"lab {args.name} is up; relay pid {lab.relay_pid}; log {lab.log_path}")
    print(f"  try: tunrelay lab exec {args.name} client curl http://{lab.server_v4}:8000/")
    print(f"  then: tunrelay lab down {args.name}")
    return 0


def _exec(name: str, role: str, cmd: list[str]) -> int:
    from relay.lab.detached import LabError, read_state
    from relay.lab.nsexec import main as nsexec

    state = read_state(name)
    if state is None:
        raise LabError(f"no lab {name} (no state file): `tunrelay lab up --name {name}`")
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not cmd:
        raise LabError("no command given")
    return nsexec([state["namespaces"][role], "--", *cmd])  # execs: returns only on failure


def _status(name: str, as_json: bool) -> int:
    from relay.lab.detached import LabError, read_state
    from relay.lab.pids import start_time

    state = read_state(name)
    if state is None:
        raise LabError(f"no lab {name}")
    pid = state.get("relay_pid")
    state["relay_running"] = isinstance(pid, int) and start_time(pid) == state.get(
        "relay_start_time"
    )
    if as_json:
        print(json.dumps(state, indent=2))
        return 0
    running = "running" if state["relay_running"] else "NOT running"
    print(f"lab {name}: {state.get('status')}; relay pid {pid} ({running})")
    for role, ns in state["namespaces"].items():
        print(f"  {role:8} namespace {ns}")
    for key, addr in state["addresses"].items():
        print(f"  {key:24} {addr}")
    print(f"  impairment: {state.get('impairment') or 'none'}")
    for key, path in state["logs"].items():
        if path:
            print(f"  log {key:8} {path}")
    return 0


def _impair(name: str, spec: str) -> int:
    from relay.lab.detached import LabError, read_state
    from relay.lab.lab import reattach

    state = read_state(name)
    if state is None:
        raise LabError(f"no lab {name}")
    lab = reattach(name, state)
    now = lab.impair(spec)
    print(f"lab {name}: {now.describe()}")
    return 0
