"""Run a pytest selection N times from the current tree and tabulate the outcomes.

Usage (as root for the netns suite; see scripts/ci-repeat):

    python scripts/ci_repeat.py N [pytest args...]      # default args: netns-tests

Each run writes its own JUnit XML (``--junitxml``) into a fresh directory; the
runs are bounded by ``--timeout-per-run`` (default 1,800 s, then the run is
killed and counted as failed). The table lists every test with its passes,
failures (errors included) and skips, the flaky and failing ones first. The
exit status is 0 only if every run finished and no test failed or errored.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

MAX_RUNS = 1000
OUTCOMES = ("passed", "failed", "skipped")


def outcomes_of(xml_path: Path) -> dict[str, str]:
    """test id -> passed/failed/skipped, from one JUnit XML file."""
    found: dict[str, str] = {}
    root = ET.parse(xml_path).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            found[name] = "failed"  # a test may have both (a failing teardown): failed
        elif "skipped" in tags:
            found[name] = "skipped"
        else:
            found[name] = "passed"
    return found


def run_once(index: int, args: list[str], out_dir: Path, timeout: float) -> tuple[Path, str]:
    """One pytest run; returns its XML path and "ok", "failed" or "timeout"."""
    xml = out_dir / f"run-{index:04d}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", f"--junitxml={xml}", *args]
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: pytest and its children
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return xml, "timeout"
    return xml, "ok" if code == 0 else "failed"


def table(per_test: dict[str, dict[str, int]], runs: int) -> str:
    """The pass/fail table: failing tests first, then by name."""
    rows = sorted(per_test.items(), key=lambda kv: (-kv[1]["failed"], kv[0]))
    width = max([len("test"), *(len(name) for name in per_test)])
    lines = [f"{'test':<{width}}  {'pass':>5} {'fail':>5} {'skip':>5} {'missing':>7}"]
    for name, counts in rows:
        missing = runs - sum(counts[o] for o in OUTCOMES)
        lines.append(
            f"{name:<{width}}  {counts['passed']:>5} {counts['failed']:>5} "
            f"{counts['skipped']:>5} {missing:>7}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=int, help=f"how many runs (1-{MAX_RUNS})")
    parser.add_argument(
        "--timeout-per-run", type=float, default=1800.0, help="seconds before a run is killed"
    )
    parser.add_argument("--keep", type=Path, help="write the JUnit files here (kept)")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="default: netns-tests")
    opts = parser.parse_args(argv)
    if not 1 <= opts.runs <= MAX_RUNS:
        parser.error(f"runs: must be 1-{MAX_RUNS}, got {opts.runs}")
    if opts.timeout_per_run <= 0:
        parser.error("--timeout-per-run: must be positive")
    args = opts.pytest_args or ["netns-tests"]
    with tempfile.TemporaryDirectory(prefix="ci-repeat-") as tmp:
        out_dir = opts.keep or Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        per_test: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(OUTCOMES, 0))
        bad_runs: list[str] = []
        for i in range(1, opts.runs + 1):
            t0 = time.monotonic()
            xml, status = run_once(i, args, out_dir, opts.timeout_per_run)
            seconds = time.monotonic() - t0
            print(f"ci-repeat: run {i}/{opts.runs}: {status} in {seconds:.0f} s", flush=True)
            if status != "ok":
                bad_runs.append(f"run {i}: {status}")
            if xml.exists():
                for name, outcome in outcomes_of(xml).items():
                    per_test[name][outcome] += 1
            elif status == "ok":
                bad_runs.append(f"run {i}: no JUnit file")
        print(table(per_test, opts.runs))
        failed = sorted(name for name, c in per_test.items() if c["failed"])
        print(
            f"ci-repeat: {opts.runs} runs, {len(per_test)} tests, {len(failed)} with failures"
            + (f"; {', '.join(bad_runs)}" if bad_runs else "")
        )
        return 1 if failed or bad_runs else 0


if __name__ == "__main__":
    sys.exit(main())
