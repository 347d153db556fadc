"""`tunrelay lab` and the installed pytest plugin, from the outside (root only).

(a) The README's "Testing your analyzer" example, copied into a throwaway
    project (its analyzer and its test, nothing else: no conftest, no ini),
    passes under ``python -m pytest`` of this interpreter, through the
    plugin's entry point, against a real relay (the test asserts the
    analyzer's rewrite), and leaves no namespace behind.
(b) ``tunrelay lab up/status/exec/impair/down`` as subprocesses: the lab
    relays, ``exec`` passes exit statuses through, and after ``down`` no
    namespace, link or process of it is left (pyroute2 looks); ``down`` also
    cleans up after ``up`` was killed with SIGKILL while the relay started,
    and after the relay was, and a second ``down`` is a no-op.
(c) The plugin's other features in a second throwaway project: trio helpers,
    a live impairment, conn.log and counters, the factory; a relay that dies
    during a test fails that test's tear-down.

Bounds: every subprocess has a timeout; a lab a failing test leaves is taken
down in ``finally``.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from relay.lab.detached import LAB_PREFIX, STATE_ROOT
from relay.lab.lab import PACKAGE_ROOT

README = Path(__file__).resolve().parent.parent / "README.md"
LAB_LINKS = {"cli-gw", "gw-cli", "gw-srv", "srv-gw", "w-cli", "w-gw", "trtun0"}


def readme_example(name: str) -> str:
    """The code block after ``<!-- example: NAME -->`` in the README."""
    text = README.read_text()
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"no '{name}' example in {README}"
    return match.group(1)


def child_env() -> dict[str, str]:
    # This checkout first, as for every process the lab starts.
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path)


def namespaces() -> list[str]:
    return list(pr_netns.listnetns())


def host_links() -> set[str]:
    with IPRoute() as ipr:
        return {str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}


# --- (a) the plugin from another project ----------------------------------------------------


def test_readme_example_passes_in_a_throwaway_project(netns_root: None, tmp_path: Path) -> None:
    plugins = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pytest11")}
    assert plugins.get("tunrelay") == "relay.lab.pytest_plugin", (
        f"the pytest11 entry point is not installed (pytest11: {plugins}); "
        "reinstall the package: pip install -e ."
    )
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "tests" / "my_analyzer.py").write_text(readme_example("lab-analyzer"))
    (project / "tests" / "test_my_analyzer.py").write_text(readme_example("lab-test"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests"],
        cwd=project, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(out)
    assert proc.returncode == 0, out
    assert re.search(r"\b1 passed\b", out) and "skipped" not in out, out
    left = [ns for ns in namespaces() if ns.startswith(f"tr-{proc.pid}-")]
    assert left == [], f"the throwaway project's run left {left}"


FEATURES = """
import os, signal, socket, time
import pytest
import trio


@pytest.mark.trio
@pytest.mark.tunrelay(log_dir=True, wire=True)
async def test_trio_clients_live_impairment_and_logs(tunrelay_lab):
    lab = tunrelay_lab
    srv = lab.socket("server", socket.AF_INET6)
    srv.bind((lab.server_v6, 9000))
    srv.listen()

    def client():
        with socket.create_connection((lab.server_v6, 9000), timeout=5) as c:
            c.sendall(b"x")

    def server():
        conn, _ = srv.accept()
        with conn:
            return conn.recv(10)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, server)
        await lab.acall("client", client)
    done = await lab.arun("client", "ip", "-6", "route", "show", "default")
    assert b"via fd00:1::1" in done.stdout
    lab.impair("delay=100ms,dir=c2g")
    t0 = time.monotonic()
    assert lab.run("client", "ping", "-c", "1", "-W", "3", lab.server_v4).returncode == 0
    assert time.monotonic() - t0 >= 0.1
    lab.stop_relay()
    assert lab.exit_status == 0
    assert [r["id.resp_p"] for r in lab.conn_log() if r["proto"] == "tcp"] == [9000]
    assert lab.counters()["flows_accepted"] == 2  # the probe's and ours


def test_factory(tunrelay_lab_factory):
    bare = tunrelay_lab_factory(relay=False)
    other = tunrelay_lab_factory(probe=False)
    assert bare.relay_pid is None and bare.topology.gw != other.topology.gw
    with pytest.raises(Exception, match="no wire"):
        other.impair("loss=1%")


def test_relay_killed(tunrelay_lab):
    os.kill(tunrelay_lab.relay_pid, signal.SIGKILL)
    tunrelay_lab.relay_proc.wait(timeout=10)
"""


def test_plugin_features_and_a_dead_relay_fails_the_test(netns_root: None, tmp_path: Path) -> None:
    """trio helpers, a live impairment, conn.log and counters, the factory; a relay
    that dies during a test makes its tear-down fail."""
    (tmp_path / "test_features.py").write_text(FEATURES)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_features.py"],
        cwd=tmp_path, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(out)
    # pytest counts the last test as passed and its tear-down as an error.
    assert re.search(r"\b3 passed, 1 error\b", out), out
    assert "ERROR test_features.py::test_relay_killed" in out, out
    assert "the relay died during the test" in out, out
    assert [ns for ns in namespaces() if ns.startswith(f"tr-{proc.pid}-")] == []


# --- (b) the command line -------------------------------------------------------------------


def lab(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", "lab", *args], env=child_env(), capture_output=True,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def assert_gone(name: str, pids: list[int]) -> None:
    ours = [ns for ns in namespaces() if ns.startswith(f"{LAB_PREFIX}{name}-")]
    assert ours == [], f"namespaces left: {ours}"
    assert not (host_links() & LAB_LINKS), f"lab links in the host: {host_links() & LAB_LINKS}"
    assert [p for p in pids if alive(p)] == [], f"processes left: {pids}"
    assert not (STATE_ROOT / name).exists()


def test_lab_up_exec_status_impair_down(netns_root: None) -> None:
    name = f"t{os.getpid()}"
    pids: list[int] = []
    server = None
    passed = False
    try:
        up = lab("up", "--name", name, "--impair", "delay=2ms", "--", "--workers", "1")
        assert up.returncode == 0, up.stdout + up.stderr
        status = lab("status", name, "--json")
        assert status.returncode == 0, status.stderr
        state = json.loads(status.stdout)
        assert state["relay_running"] and state["status"] == "up", state
        assert state["namespaces"]["wire"] == f"{LAB_PREFIX}{name}-wire"
        assert state["addresses"]["server_v4"] == "198.18.2.2"
        pids += [state["relay_pid"], state["forwarder_pid"]]
        assert Path(state["logs"]["relay"]).read_text().count("relaying TCP") == 1
        # A server in the server namespace, a client through the relay.
        server = subprocess.Popen(
            [sys.executable, "-m", "relay.cli", "lab", "exec", name, "server", sys.executable,
             "-c", ECHO_ONCE],
            env=child_env(), stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        client = lab("exec", name, "client", sys.executable, "-c", CLIENT)
        assert (client.returncode, client.stdout.strip()) == (0, "echo: hello"), client.stderr
        assert server.wait(timeout=10) == 0
        assert lab("exec", name, "gateway", "sh", "-c", "exit 3").returncode == 3
        changed = lab("impair", name, "loss=0%,dir=c2g;delay=1ms,dir=g2c")
        assert changed.returncode == 0, changed.stderr
        assert "g2c: 1 ms delay" in changed.stdout, changed.stdout
        state = json.loads(lab("status", name, "--json").stdout)
        assert state["forwarder_pid"] not in pids and state["relay_running"]
        pids.append(state["forwarder_pid"])
        assert lab("exec", name, "client", sys.executable, "-c", CLIENT_REFUSED).returncode == 0
        flows = Path(state["logs"]["flows"])
        down = lab("down", name)
        assert down.returncode == 0, down.stderr
        assert "relay" in down.stdout and "removed" in down.stdout, down.stdout
        assert not flows.exists()
        assert_gone(name, pids)
        again = lab("down", name)
        assert (again.returncode, again.stdout) == (0, ""), again
        passed = True
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        if not passed:  # else `down` ran, and a second one was a no-op
            lab("down", name)


def test_down_after_up_was_killed(netns_root: None) -> None:
    """SIGKILL `up` while the relay starts: the relay lives on (its own session);
    `down` finds it through the state file and the namespaces and removes it all."""
    name = f"k{os.getpid()}"
    state_file = STATE_ROOT / name / "state.json"
    up = subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "lab", "up", "--name", name, "--wire"],
        env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    relay_pid = None
    passed = False
    try:
        deadline = time.monotonic() + 30
        while relay_pid is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                relay_pid = json.loads(state_file.read_text()).get("relay_pid")
            time.sleep(0.01)
        assert relay_pid is not None, "no relay pid in the state file within 30 s"
        up.send_signal(signal.SIGKILL)
        assert up.wait(timeout=10) == -signal.SIGKILL
        assert alive(relay_pid)
        assert f"{LAB_PREFIX}{name}-gw" in namespaces()
        down = lab("down", name)
        assert down.returncode == 0, down.stderr
        assert f"relay (pid {relay_pid})" in down.stdout, down.stdout
        assert_gone(name, [relay_pid])
        assert lab("down", name).stdout == ""
        status = lab("status", name)
        assert status.returncode == 1 and f"no lab {name}" in status.stderr
        passed = True
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if not passed:  # else `down` ran, and a second one was a no-op
            lab("down", name)


def test_down_after_the_relay_was_killed(netns_root: None) -> None:
    """SIGKILL the relay of a lab that is up: status says so, `down` removes the rest
    (its workers, its rules with the namespaces, its state file)."""
    name = f"r{os.getpid()}"
    passed = False
    try:
        up = lab("up", "--name", name, "--", "--workers", "2")
        assert up.returncode == 0, up.stdout + up.stderr
        state = json.loads(lab("status", name, "--json").stdout)
        relay_pid = state["relay_pid"]
        workers = [
            int(p) for p in os.listdir("/proc") if p.isdigit() and parent_of(int(p)) == relay_pid
        ]
        assert len(workers) == 2, workers
        os.kill(relay_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while alive(relay_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not json.loads(lab("status", name, "--json").stdout)["relay_running"]
        down = lab("down", name)
        assert down.returncode == 0, down.stderr
        assert_gone(name, [relay_pid, *workers])
        passed = True
    finally:
        if not passed:  # else `down` ran and left nothing
            lab("down", name)


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


ECHO_ONCE = """
import socket
s = socket.create_server(("198.18.2.2", 7007))
print("listening", flush=True)
c, _ = s.accept()
c.sendall(b"echo: " + c.recv(100))
c.close()
"""
CLIENT = """
import socket
c = socket.create_connection(("198.18.2.2", 7007), timeout=10)
c.sendall(b"hello")
print(c.recv(100).decode())
"""
CLIENT_REFUSED = """
import socket
try:
    socket.create_connection(("198.18.2.2", 7008), timeout=10)
except ConnectionRefusedError:
    pass
else:
    raise SystemExit("connected to a closed port")
"""
