"""A longer soak of `tunrelay run`: netns-tests/test_relay_soak.py for --duration seconds.

    sudo .venv/bin/python benchmarks/soak.py --duration 600

Mixed load (short request/response, 256 KiB bulk, abandoned connections,
upstreams that reset or never read, UDP echo; 5% loss on the client's link
during the middle third); printed every 10 s: RSS, PSS and fds of the
supervisor and the worker, and the worker's connections, flow tasks, UDP
flows, timer heap (entries and live timers), bytes buffered and reserved, and
memory-budget refusals. Passes when every checked transfer is byte-exact, the
relay is idle again within 30 s after the load (nothing left: no connection,
flow, deadline or buffered byte), and the worker's RSS at the end is within
10% of its RSS after the first third. Bounded: the run is killed at
``--duration`` + 180 s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    opts = parser.parse_args()
    if not 10 <= opts.duration <= 24 * 3600:
        parser.error(f"--duration: {opts.duration} must be 10 s to 24 h")
    env = dict(os.environ, TUNRELAY_SOAK_SECONDS=str(opts.duration))
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "netns-tests/test_relay_soak.py"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, timeout=opts.duration + 180, check=False)
    except subprocess.TimeoutExpired:
        print(f"soak: not finished {opts.duration + 180:.0f} s after it started", file=sys.stderr)
        return 1
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
