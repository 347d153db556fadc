"""What starting and stopping `tunrelay run` in a lab costs, by phase (root).

Every end-to-end test in netns-tests/ starts a relay in a fresh lab and stops it,
so this is the suite's fixed cost per test. The relay is started as the
tests' ``start_relay`` starts it (nsexec into the gateway, one worker, the
default analyzers, the lab's client networks) ``--runs`` times, each in its own
lab, and its log's timestamps split the start into:

    supervisor     Popen to the supervisor's first log line (the egress policy):
                   nsexec, a Python interpreter, importing relay.cli, the options,
                   the state file, the TUN device, the host's routes
    worker         to the worker's "relaying on a queue": multiprocessing's
                   'spawn' (a second interpreter, its imports), the queue, the drop
    routing        to "relaying TCP" (the tests' readiness mark): rules and routes
    stop           SIGTERM to the supervisor's exit: the worker's exit, the TUN
                   device's removal, the undo, the interpreter's finalization

and, for comparison, how long a bare interpreter takes to import what each of
the two imports (``python -c "import relay.cli"``, ``relay.service.workers``).

    sudo .venv/bin/python benchmarks/startup_netns.py --runs 10
"""

from __future__ import annotations

import argparse
import datetime
import os
import pwd
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relay.lab.topology import Topology

TUN = "trtun0"
READY = "relaying TCP"
ANALYZERS = ("relay.analysis.digest:StreamDigest", "relay.lab.analyzers:StateDump")


def _stamp(line: str) -> float:
    """The wall-clock time of a log line ("2026-12-02 09:37:15,593 INFO ...")."""
    when = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return when.timestamp()


def one_run(files: Path) -> dict[str, float]:
    topo = Topology.build()
    state = Path(tempfile.mkdtemp(prefix="tunrelay-state-"))
    try:
        log = files / "relay.log"
        argv = [
            sys.executable, "-m", "relay.cli", "run", "--tun", TUN,
            "--client-net", topo.client_net_v4, "--client-net", topo.client_net_v6,
            "--flow-log", str(files / "flows.jsonl"), "--state-dir", str(state),
            *topo.relay_allow, "--workers", "1",
        ]  # fmt: skip
        for spec in ANALYZERS:
            argv += ["--analyzer", spec]
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            TUNRELAY_DIGEST_LOG=str(files / "digests.jsonl"),
            TUNRELAY_STATE_DUMP=str(files / "state.txt"),
        )
        t0 = time.time()
        with open(log, "wb") as out:
            proc = topo.spawn(
                "gw", argv, stdout=out, stderr=subprocess.STDOUT, env=env, reachable_by="nobody"
            )
        deadline = time.monotonic() + 30.0
        while READY not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the relay did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.005)
        ready = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20.0)
        stopped = time.time()
        lines = log.read_text(errors="replace").splitlines()
        first = _stamp(lines[0])
        worker = _stamp(next(ln for ln in lines if "relaying on a queue" in ln))
        routed = _stamp(next(ln for ln in lines if READY in ln))
        log.unlink()
        return {
            "supervisor": first - t0,
            "worker": worker - first,
            "routing": routed - worker,
            "ready (total)": ready - t0,
            "stop": stopped - ready,
        }
    finally:
        topo.close()
        shutil.rmtree(state, ignore_errors=True)


def import_seconds(module: str, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    files = Path(tempfile.mkdtemp(prefix="tunrelay-startup-"))
    nobody = pwd.getpwnam("nobody")
    os.chown(files, nobody.pw_uid, nobody.pw_gid)  # the worker writes the flow log
    try:
        runs = [one_run(files) for _ in range(args.runs)]
    finally:
        shutil.rmtree(files, ignore_errors=True)
    print(f"tunrelay run in a lab, {args.runs} runs (seconds: median, min, max)")
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"  {key:14} {statistics.median(values):6.3f} {min(values):6.3f} {max(values):6.3f}")
    print("a fresh interpreter importing (median of 5):")
    for module in ("relay.cli", "relay.service.workers"):
        print(f"  {module:22} {import_seconds(module, 5):6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
