"""A lab: client, gateway and server namespaces with `tunrelay run` in the gateway.

Theory of operation: `Lab.build` makes a `relay.lab.topology.Topology`
(198.18.0.0/15 and fd00::/8 only, no route out), optionally puts the impairment
wire between client and gateway (`relay.lab.impair.Wire`, its forwarder
started with the SPEC of `relay.lab.impairspec`), then starts ``tunrelay run``
in the gateway through ``python -m relay.lab.nsexec`` (its own session, its
output in ``relay.log``, its workers' files in ``files/``, which the workers'
user owns) and returns once the relay logged that it relays and, unless told
otherwise, a probe connection from the client to a listener in the server
namespace went through it.

Two owners use it. The pytest plugin (`relay.lab.pytest_plugin`) builds a lab
per test with a `tr-<pid>-<n>` base, so the test suite's leftover checks see
it, and closes it in the same process. ``tunrelay lab up`` builds a *detached*
lab named ``trl-NAME`` whose processes outlive the command; everything needed
to take it down is in ``/run/tunrelay-lab/NAME/state.json``, written before the
first namespace exists and updated as processes start (`relay.lab.detached`).
`down` there trusts nothing else being alive: it stops the relay (SIGTERM, then
SIGKILL), kills every process whose network namespace is one of the lab's
(found by inode, so a relay whose PID was never recorded is found too),
deletes the veths and removes the namespaces, then the state directory. It is
idempotent.

Processes are signalled by PID only, and only while /proc shows the start time
recorded for them, or while their network namespace is the lab's (`relay.lab.pids`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from relay.host import netns
from relay.lab.detached import (
    LAB_PREFIX,
    STATE_ROOT,
    LabError,
    check_name,
    down,
    lab_namespaces,
    read_state,
)
from relay.lab.impair import WIRE_A, WIRE_B, Wire
from relay.lab.impairspec import ImpairSpec, parse_spec
from relay.lab.pids import STOP_TIMEOUT, kill, pids_in, same, start_time, stop_pid, wait_ready
from relay.lab.topology import Topology

__all__ = ["LAB_PREFIX", "STATE_ROOT", "Lab", "LabError", "LabOptions", "down", "reattach"]

# The directory holding the relay package: first on the children's PYTHONPATH, so they
# run the same code as the caller.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
TUN = "trtun0"
READY_MARK = "relaying TCP"
READY_TIMEOUT = 20.0
PROBE_TIMEOUT = 10.0
FORWARDER_SECONDS = 7 * 86400  # the wire's forwarder exits by itself after a week
ROLES = {"client": "cli", "gateway": "gw", "server": "srv", "cli": "cli", "gw": "gw", "srv": "srv"}
T = TypeVar("T")


@dataclass
class LabOptions:
    """How to build a lab and run its relay.

    ``analyzers``: ``module:attr`` specs (``--analyzer``); ``args``: more
    ``tunrelay run`` options; ``rules``: ``--allow``/``--deny`` tried before the
    lab's own ``--allow 198.18.0.0/15 --allow [fd00::/8]``; ``env``: the relay's
    extra environment; in ``args`` and ``env`` values ``{files}`` is the
    directory the workers may write. ``log_dir``: add ``--log-dir {files}/logs``.
    ``impair``: a SPEC (`relay.lab.impairspec`), which also inserts the wire;
    ``wire``: insert it even without one (for ``lab.impair()`` later).
    ``relay``: start the relay at all; ``probe``: wait for a connection through
    it. ``pythonpath``: directories the relay imports analyzers from (made
    readable for its workers). ``setup(lab)``: called after the namespaces
    exist and before the relay starts.
    """

    analyzers: Sequence[str] = ()
    args: Sequence[str] = ()
    rules: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    log_dir: bool = False
    impair: str | None = None
    wire: bool = False
    relay: bool = True
    probe: bool = True
    workers: int | None = 1
    pythonpath: Sequence[str] = ()
    setup: Callable[[Lab], object] | None = None


# --- the lab --------------------------------------------------------------------------


class Lab:
    """One client/gateway/server lab and its relay. Use `Lab.build`."""

    def __init__(
        self, topology: Topology, state_dir: Path, options: LabOptions, name: str | None
    ) -> None:
        self.topology = topology
        self.state_dir = state_dir
        self.options = options
        self.name = name  # a detached lab's NAME, else None
        self.files = state_dir / "files"
        self.log_path = state_dir / "relay.log"
        self.flow_log = self.files / "flows.jsonl"
        self.log_dir = self.files / "logs"
        self.wire: Wire | None = None
        self.wire_ns: str | None = None
        self.impairment: ImpairSpec | None = None
        self.relay_proc: subprocess.Popen[bytes] | None = None
        self.relay_pid: int | None = None
        self.relay_started: int | None = None
        self.exit_status: int | None = None
        self.probe_port: int | None = None
        self.notes: dict[str, Any] = {}  # free for the lab's user (a test's own data)
        self.teardown_checks: list[Callable[[], object]] = []
        self._forwarder: tuple[int, int | None] | None = None
        self._forwarder_proc: subprocess.Popen[bytes] | None = None
        self._closed = False

    # --- names and addresses ---

    @property
    def detached(self) -> bool:
        return self.name is not None

    @property
    def namespaces(self) -> dict[str, str]:
        """{"client": ..., "gateway": ..., "server": ...} (and "wire" if inserted)."""
        topo = self.topology
        found = {"client": topo.cli, "gateway": topo.gw, "server": topo.srv}
        if self.wire_ns is not None:
            found["wire"] = self.wire_ns
        return found

    def ns(self, role: str) -> str:
        """The namespace of ``role``: client, gateway, server (or cli, gw, srv)."""
        if role not in ROLES:
            raise ValueError(f"{role!r}: client, gateway or server")
        return self.topology.ns(ROLES[role])

    @property
    def addresses(self) -> dict[str, str]:
        t = self.topology
        return {
            "client_v4": t.cli_v4,
            "client_v6": t.cli_v6,
            "gateway_client_side_v4": t.gw_cli_v4,
            "gateway_client_side_v6": t.gw_cli_v6,
            "gateway_server_side_v4": t.gw_srv_v4,
            "gateway_server_side_v6": t.gw_srv_v6,
            "server_v4": t.srv_v4,
            "server_v6": t.srv_v6,
        }

    @property
    def client_v4(self) -> str:
        return self.topology.cli_v4

    @property
    def client_v6(self) -> str:
        return self.topology.cli_v6

    @property
    def server_v4(self) -> str:
        return self.topology.srv_v4

    @property
    def server_v6(self) -> str:
        return self.topology.srv_v6

    # --- build ---

    @classmethod
    def build(
        cls, options: LabOptions, *, name: str | None = None, state_dir: Path | None = None
    ) -> Lab:
        """Build the namespaces and start the relay (``options``).

        ``name``: a detached lab (``trl-NAME``, state in ``STATE_ROOT/NAME``);
        else a test lab (``tr-<pid>-<n>``, state in a new temporary directory).

        Raises:
            LabError: why, after removing whatever was built.
        """
        spec = parse_spec(options.impair) if options.impair is not None else None
        if name is not None:
            check_name(name)
            state_dir = STATE_ROOT / name
            if state_dir.exists() or any(netns.exists(n) for n in lab_namespaces(name)):
                raise LabError(f"lab {name} exists: `tunrelay lab down {name}` first")
            state_dir.mkdir(parents=True, mode=0o755)
            topology = Topology(LAB_PREFIX + name)
        else:
            state_dir = state_dir or Path(tempfile.mkdtemp(prefix="tunrelay-lab-"))
            topology = Topology.build()
        state_dir.chmod(0o755)  # the workers must reach files/
        lab = cls(topology, state_dir, options, name)
        try:
            user = pwd.getpwnam(lab.worker_user())
            for directory in (lab.files, lab.log_dir):
                directory.mkdir(exist_ok=True)
                os.chown(directory, user.pw_uid, user.pw_gid)
            if name is not None:
                me = os.getpid()
                lab.save(status="building", up_pid=me, up_start_time=start_time(me))
                topology._build()
            if options.wire or spec is not None:
                lab.wire = Wire.insert(topology)
                lab.wire_ns = lab.wire.ns
                if name is not None:  # its close (and temporary files) belong to `down`
                    shutil.rmtree(lab.wire._tmp, ignore_errors=True)
                lab.impair(spec or parse_spec(""))
            if options.setup is not None:
                options.setup(lab)
            if options.relay:
                lab.start_relay()
                if options.probe:
                    lab.probe()
            lab.save(status="up")
        except BaseException:
            if name is not None:
                down(name)
            lab.close()
            raise
        return lab

    def worker_user(self) -> str:
        args = list(self.options.args)
        return args[args.index("--user") + 1] if "--user" in args[:-1] else "nobody"

    def _expand(self, value: str) -> str:
        return value.replace("{files}", str(self.files))

    def relay_argv(self) -> list[str]:
        """The ``tunrelay run`` command line (without the nsexec prefix)."""
        topo, opts = self.topology, self.options
        argv = [
            sys.executable, "-m", "relay.cli", "run", "--tun", TUN,
            "--client-net", topo.client_net_v4, "--client-net", topo.client_net_v6,
            "--flow-log", str(self.flow_log), "--state-dir", str(self.state_dir / "run"),
            *opts.rules, *topo.relay_allow,
        ]  # fmt: skip
        for spec in opts.analyzers:
            argv += ["--analyzer", spec]
        if opts.log_dir:
            argv += ["--log-dir", str(self.log_dir)]
        args = [self._expand(a) for a in opts.args]
        if opts.workers is not None and "--workers" not in args:
            argv += ["--workers", str(opts.workers)]
        return argv + args

    def start_relay(self) -> None:
        """Start ``tunrelay run`` in the gateway; return once it relays.

        Raises:
            LabError: it exited or was not ready in time (with its log's tail).
        """
        (self.state_dir / "run").mkdir(exist_ok=True)
        paths = [str(PACKAGE_ROOT), *self.options.pythonpath, os.environ.get("PYTHONPATH", "")]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.update({k: self._expand(v) for k, v in self.options.env.items()})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (*paths, env.get("PYTHONPATH", "")) if p)
        cmd = [
            sys.executable, "-m", "relay.lab.nsexec", self.ns("gateway"),
            "--reachable-by", self.worker_user(), "--", *self.relay_argv(),
        ]  # fmt: skip
        with open(self.log_path, "ab") as out:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        self.relay_proc = proc
        self.relay_pid, self.relay_started = proc.pid, start_time(proc.pid)
        self.exit_status = None
        self.save(status="starting")
        why = wait_ready(self.log_path, READY_MARK, proc.pid, READY_TIMEOUT)
        if why is not None:
            raise LabError(f"tunrelay run: {why}; its log:\n{self.log_tail()}")

    def probe(self, timeout: float = PROBE_TIMEOUT) -> float:
        """Connect from the client to a listener in the server namespace, through the
        relay, and exchange a few bytes; the seconds it took.

        Raises:
            LabError: no exchange within ``timeout``.
        """
        t0 = time.monotonic()
        with netns.entered(self.ns("server")):
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with contextlib.closing(srv):
            srv.bind((self.server_v4, 0))
            srv.listen(4)
            srv.settimeout(1.0)
            self.probe_port = srv.getsockname()[1]
            last: Exception | None = None
            while time.monotonic() - t0 < timeout:
                try:
                    self._probe_once(srv)
                    return time.monotonic() - t0
                except OSError as exc:
                    last = exc
                    time.sleep(0.1)
        raise LabError(f"no probe connection through the relay in {timeout:.0f} s ({last})")

    def _probe_once(self, srv: socket.socket) -> None:
        with netns.entered(self.ns("client")):
            cli = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with contextlib.closing(cli):
            cli.settimeout(1.0)
            cli.connect((self.server_v4, self.probe_port))
            conn, _ = srv.accept()
            with contextlib.closing(conn):
                conn.settimeout(1.0)
                cli.sendall(b"tunrelay-lab-probe")
                conn.sendall(conn.recv(64))
                if cli.recv(64) != b"tunrelay-lab-probe":
                    raise OSError("the probe's bytes came back changed")

    # --- impairment ---

    def impair(self, spec: str | ImpairSpec) -> ImpairSpec:
        """Replace the wire's impairment (restarts its forwarder); what is now in force.

        Raises:
            LabError: the lab has no wire. ValueError: a bad SPEC.
        """
        new = parse_spec(spec) if isinstance(spec, str) else spec
        if self.wire_ns is None:
            raise LabError("this lab has no wire: build it with an impairment (or wire=True)")
        self._stop_forwarder()
        out = self.state_dir / "forwarder.out"
        out.write_bytes(b"")
        cmd = [
            sys.executable, "-m", "relay.lab.nsexec", self.wire_ns, "--",
            sys.executable, "-m", "relay.lab.impair", "forward", "--a", WIRE_A, "--b", WIRE_B,
            "--c2g", new.c2g.spec(), "--g2c", new.g2c.spec(), "--seed", str(new.seed),
            "--stats", str(self.state_dir / "forwarder.json"),
            "--max-seconds", str(FORWARDER_SECONDS),
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p
        ))  # fmt: skip
        with open(out, "ab") as f, open(self.state_dir / "forwarder.err", "ab") as err:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=err, env=env,
                start_new_session=True,
            )  # fmt: skip
        self._forwarder_proc = proc
        self._forwarder = (proc.pid, start_time(proc.pid))
        why = wait_ready(out, "ready", proc.pid, READY_TIMEOUT)
        if why is not None:
            err_text = (self.state_dir / "forwarder.err").read_text(errors="replace")[-2000:]
            raise LabError(f"the wire's forwarder: {why}: {err_text}")
        self.impairment = new
        self.save_fields(
            forwarder_pid=proc.pid, forwarder_start_time=self._forwarder[1], impairment=new.text
        )
        return new

    def _stop_forwarder(self) -> None:
        if self._forwarder is not None:
            stop_pid(*self._forwarder, grace=5.0)
            self._forwarder = None
        if self._forwarder_proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._forwarder_proc.wait(timeout=5.0)
            self._forwarder_proc = None

    # --- the relay's output ---

    def log_text(self) -> str:
        """The relay's stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def relay_alive(self) -> bool:
        if self.relay_proc is not None:
            return self.relay_proc.poll() is None
        return self.relay_pid is not None and same(self.relay_pid, self.relay_started)

    def flow_records(self, include_probe: bool = False) -> list[dict[str, Any]]:
        """The flow log's records (``--flow-log``), without the probe's unless asked."""
        records = read_jsonl(self.flow_log)
        if include_probe or self.probe_port is None:
            return records
        return [r for r in records if r.get("id.resp_p") != self.probe_port]

    def conn_log(self) -> list[dict[str, Any]]:
        """``conn.log`` rows (``log_dir=True``), the probe's left out."""
        rows = read_jsonl(self.log_dir / "conn.log")
        return [r for r in rows if r.get("id.resp_p") != self.probe_port]

    def counters(self) -> dict[str, int]:
        """The counters of the relay's "stopped: stack ...; relay ..." lines (written when
        it stops), summed over its workers: ``name=value`` fields, the first of each
        name on a line."""
        found: dict[str, int] = {}
        for line in self.log_text().splitlines():
            if "stopped: stack" in line:
                seen: dict[str, int] = {}
                for key, value in re.findall(r"\b([a-z_0-9]+)=(\d+)\b", line):
                    seen.setdefault(key, int(value))  # the first of a name on a line
                for key, value in seen.items():
                    found[key] = found.get(key, 0) + value
        return found

    # --- state file (detached labs) ---

    def state(self) -> dict[str, Any]:
        """What ``tunrelay lab status --json`` prints."""
        return {
            "name": self.name,
            "namespaces": self.namespaces,
            "addresses": self.addresses,
            "relay_pid": self.relay_pid,
            "relay_start_time": self.relay_started,
            "relay_running": self.relay_alive(),
            "relay_argv": self.relay_argv() if self.options.relay else None,
            "forwarder_pid": self._forwarder[0] if self._forwarder else None,
            "forwarder_start_time": self._forwarder[1] if self._forwarder else None,
            "impairment": self.impairment.text if self.impairment else None,
            "state_dir": str(self.state_dir),
            "logs": {
                "relay": str(self.log_path),
                "flows": str(self.flow_log),
                "log_dir": str(self.log_dir) if self.options.log_dir else None,
            },
        }

    def save(self, **extra: Any) -> None:
        """Write the state file (detached labs only), atomically."""
        if self.name is None:
            return
        data = {**(read_state(self.name) or {}), **self.state(), **extra}
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.state_dir / "state.json")

    def save_fields(self, **fields: Any) -> None:
        """Change only these keys of the state file (detached labs only)."""
        if self.name is not None and (old := read_state(self.name)) is not None:
            tmp = self.state_dir / "state.json.tmp"
            tmp.write_text(json.dumps({**old, **fields}, indent=2) + "\n")
            tmp.replace(self.state_dir / "state.json")

    # --- tear-down ---

    def at_teardown(self, check: Callable[[], object]) -> None:
        """Run ``check()`` at the pytest plugin's tear-down, first (the relay still running
        unless the test stopped it); an AssertionError from it fails the test."""
        self.teardown_checks.append(check)

    def stop_relay(self) -> int | None:
        """SIGTERM the relay and wait (SIGKILL after ``STOP_TIMEOUT``); its exit status
        (None if it is not our child)."""
        proc = self.relay_proc
        if proc is None:
            if self.relay_pid is not None:
                stop_pid(self.relay_pid, self.relay_started)
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5.0)
        self.exit_status = proc.returncode
        return self.exit_status

    def close(self) -> None:
        """Stop everything and remove the namespaces and the state directory; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stop_relay()
        self._stop_forwarder()
        for pid in pids_in(list(self.namespaces.values())):
            stop_pid(pid, start_time(pid), grace=2.0)
        self.topology.close()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- running things inside ---

    def nsexec_argv(self, role: str, cmd: Sequence[str]) -> list[str]:
        return [sys.executable, "-m", "relay.lab.nsexec", self.ns(role), "--", *cmd]

    @contextlib.contextmanager
    def entered(self, role: str) -> Iterator[None]:
        """Run the block in ``role``'s namespace: this thread only (setns is per thread;
        sockets created inside stay in that namespace after the block)."""
        with netns.entered(self.ns(role)):
            yield

    def run(
        self, role: str, *cmd: str, timeout: float = 60.0, check: bool = False, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in ``role``'s namespace and wait (bounded); stdout and stderr as text."""
        return subprocess.run(
            self.nsexec_argv(role, cmd), capture_output=True, text=True, timeout=timeout,
            check=check, **kw,
        )  # fmt: skip

    def spawn(self, role: str, *cmd: str, **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` in ``role``'s namespace (its own session); killed at tear-down."""
        return self.topology.spawn(ROLES[role], cmd, **popen_kwargs)

    def socket(
        self, role: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM
    ) -> socket.socket:
        """A socket in ``role``'s namespace, closed at tear-down."""
        return self.topology.socket(ROLES[role], family, type)

    async def arun(
        self, role: str, *cmd: str, timeout: float = 60.0, check: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        """`run` for trio: ``await lab.arun("client", "curl", ...)`` (bounded)."""
        import trio

        with trio.fail_after(timeout):
            return await trio.run_process(
                self.nsexec_argv(role, cmd), check=check, capture_stdout=True,
                capture_stderr=True,
            )  # fmt: skip

    async def acall(self, role: str, fn: Callable[..., T], *args: Any) -> T:
        """Call ``fn(*args)`` in a worker thread that has entered ``role``'s namespace:
        blocking client code (sockets, http.client, ssl) from a trio test."""
        import trio

        def inside() -> T:
            with netns.entered(self.ns(role)):
                return fn(*args)

        return await trio.to_thread.run_sync(inside)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a JSON-lines log; a line cut short by a writer is skipped."""
    records = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def reattach(name: str, state: dict[str, Any]) -> Lab:
    """A `Lab` for detached lab ``name`` from its state file: to change its impairment."""
    lab = Lab(Topology(LAB_PREFIX + name), STATE_ROOT / name, LabOptions(relay=False), name)
    lab.wire_ns = state["namespaces"].get("wire")
    pid = state.get("forwarder_pid")
    if isinstance(pid, int):
        lab._forwarder = (pid, state.get("forwarder_start_time"))
    return lab
