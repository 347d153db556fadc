"""`tunrelay demo` end to end, as a user runs it: a subprocess, then nothing left behind.

The demo names its namespaces `tr-<its pid>-<n>-*`, so "nothing left" is
checked for that prefix only (other tests may be running their own). The
relay's PID is read from the demo's output and must be gone afterwards too.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from relay.host import netns
from relay.lab.topology import NAME_PREFIX

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 60.0


def demo(bulk_mib: int) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "demo", "--bulk-mib", str(bulk_mib)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def relay_pid(output: str) -> int | None:
    match = re.search(r"\(pid (\d+)\)", output)
    return int(match.group(1)) if match else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def leftovers(demo_pid: int) -> list[str]:
    prefix = f"{NAME_PREFIX}{demo_pid}-"
    names = os.listdir(netns.NETNS_RUN_DIR) if os.path.isdir(netns.NETNS_RUN_DIR) else []
    return sorted(n for n in names if n.startswith(prefix))


def force_clean(proc: subprocess.Popen[str], output: str) -> None:
    """After a failed test: kill the demo and its relay by PID, remove its namespaces."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    pid = relay_pid(output)
    if pid is not None and alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for name in leftovers(proc.pid):
        netns.remove(name, missing_ok=True)


def assert_nothing_left(proc: subprocess.Popen[str], output: str) -> None:
    assert leftovers(proc.pid) == []
    pid = relay_pid(output)
    if pid is not None:
        deadline = time.monotonic() + 5.0
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(pid), f"relay pid {pid} still running"


def flow_rows(output: str) -> list[str]:
    """The rows of the demo's flow-log table."""
    _, found, table = output.partition("\nflow log (")
    assert found, "no flow log table in the output"
    lines = table.split("\n\n", 1)[0].splitlines()[2:]  # skip the title and the header
    return [line.strip() for line in lines]


def test_demo_runs_and_cleans_up(netns_root: None) -> None:
    proc = demo(4)
    out = err = ""
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        force_clean(proc, out)
    assert proc.returncode == 0, out + err
    assert out.count("Hello from the server namespace, via tunrelay!") >= 2
    assert out.count("match ✓") == 2
    assert "connection refused (as without a relay)" in out
    assert "all checks passed" in out
    rows = flow_rows(out)
    assert len(rows) == 7, rows
    size = str(4 << 20)
    for destination, wanted in [
        ("198.18.2.2:80", ["fin"]),
        ("[fd00:2::2]:80", ["fin"]),
        ("198.18.2.2:5001", [size, "fin"]),
        ("[fd00:2::2]:5002", [size, "fin"]),
        ("198.18.2.2:5003", ["refused"]),
        ("198.18.2.2:443", ["fin"]),
        ("198.18.2.2:53", ["udp", "idle"]),
    ]:
        row = [r for r in rows if r.split()[2] == destination]
        assert len(row) == 1, (destination, rows)
        assert all(w in row[0].split() for w in wanted), row
    # DemoAnalyzer saw each stream's destination and first bytes.
    assert "→ tcp 198.18.1.2:" in out
    assert "→ [fd00:2::2]:80" in out
    assert "c2s first bytes: b'GET / HTTP/1.1" in out
    assert "s2c first bytes: b'HTTP/1.1 200 OK" in out
    # The Zeek-compatible logs (--log-dir): TLS, HTTP and DNS rows, and conn.log's view.
    (ssl_line,) = [ln for ln in out.splitlines() if ln.startswith("  ssl.log ")]
    assert "198.18.2.2:443  TLSv13 TLS_" in ssl_line and "server_name demo.example" in ssl_line
    assert "established True" in ssl_line and " ja4 t13d" in ssl_line
    http_lines = [ln for ln in out.splitlines() if ln.startswith("  http.log ")]
    assert len(http_lines) == 2 and all(" GET " in ln and " 200 OK " in ln for ln in http_lines)
    (dns_line,) = [ln for ln in out.splitlines() if ln.startswith("  dns.log ")]
    assert "udp www.demo.example A → 198.18.2.2  NOERROR" in dns_line
    conn_lines = [ln for ln in out.splitlines() if ln.startswith("  conn.log ")]
    assert len(conn_lines) == 7
    assert any("198.18.2.2:443  service ssl  SF  history ShAD" in ln for ln in conn_lines)
    assert any("198.18.2.2:53  service dns  SF  history Dd" in ln for ln in conn_lines)
    assert any("198.18.2.2:5003  service -  REJ  history Sr" in ln for ln in conn_lines)
    assert_nothing_left(proc, out)


@pytest.mark.parametrize(
    ("signum", "trigger"),
    [(signal.SIGINT, "→ upload"), (signal.SIGTERM, "relay: `tunrelay run")],
    ids=["sigint-mid-upload", "sigterm-relay-ready"],
)
def test_demo_signal_tears_down(netns_root: None, signum: int, trigger: str) -> None:
    proc = demo(64)  # big enough that the upload is in flight when the signal lands
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if trigger in line:
                proc.send_signal(signum)
                break
        else:
            pytest.fail("timed out waiting for the trigger line")
        assert any(trigger in line for line in seen), "".join(seen)
        proc.wait(timeout=30)
        reader.join(timeout=5)
        seen += [line for line in list(lines.queue) if line is not None]
    finally:
        force_clean(proc, "".join(seen))
    assert proc.stderr is not None
    err = proc.stderr.read()
    output = "".join(seen)
    assert proc.returncode == 128 + signum, output + err
    assert "everything torn down" in err
    assert_nothing_left(proc, output)


def test_demo_needs_root(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from relay.lab.demo import run_demo

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert run_demo(bulk_mib=1) == 2
    assert "needs root" in capsys.readouterr().err
