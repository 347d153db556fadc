"""Fixtures for tests that need real network namespaces (root only).

``topology``     a fresh client -> gateway -> server lab (``relay.lab.topology``);
``start_relay``  a factory that runs ``tunrelay run`` in the lab's gateway and
                 checks it, and the gateway, at tear-down (``relay_harness``);
``relay``        ``start_relay()`` with the default test set-up.

Tests ported to the installed pytest plugin use its ``tunrelay_lab`` instead
(`relay.lab.pytest_plugin`), with this suite's defaults from
``tunrelay_lab_options`` below, and ``RelayProcess.of(lab)`` for the checks.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

# Let `import relay` work from a plain checkout too (CI installs the package).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from relay.host import netns  # noqa: E402
from relay.lab.topology import Topology, remove_stale_namespaces  # noqa: E402

from relay_harness import (  # noqa: E402
    DEFAULT_ANALYZERS,
    LAB_OPTIONS,
    READY_MARK,
    READY_TIMEOUT,
    TUN,
    WORKER_USER,
    RelayProcess,
    gateway_snapshot,
)

NEEDS_ROOT = "needs root to create network namespaces"


@pytest.fixture(scope="session")
def netns_root() -> None:
    """Skip unless root; remove namespaces a killed earlier run left behind."""
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)
    # Only `tr-<pid>-*` names whose process is gone (SIGKILL, OOM, power loss).
    remove_stale_namespaces()


@pytest.fixture
def tunrelay_lab_options() -> dict[str, Any]:
    """The plugin's lab with this suite's analyzers and logs (``LAB_OPTIONS``)."""
    return dict(LAB_OPTIONS)


@pytest.fixture
def topology(netns_root: None) -> Iterator[Topology]:
    """A fresh client -> gateway -> server network, torn down after the test."""
    topo = Topology.build()
    try:
        yield topo
    finally:
        topo.close()


@pytest.fixture(name="relay_files")
def relay_files_fixture() -> Iterator[Path]:
    """A directory the relay's workers (``WORKER_USER``) own: for the files they write."""
    # Not under tmp_path: pytest's base directory is 0700, closed to the workers.
    path = Path(tempfile.mkdtemp(prefix="tunrelay-test-"))
    user = pwd.getpwnam(WORKER_USER)
    os.chown(path, user.pw_uid, user.pw_gid)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(name="start_relay")
def start_relay_fixture(
    topology: Topology, tmp_path: Path, relay_files: Path
) -> Iterator[Callable[..., RelayProcess]]:
    """Factory: ``start_relay(analyzers=, env=, args=, rules=, expected_tracebacks=,
    prefix=, before=, state_dir=)``.

    ``analyzers`` are ``module:attr`` specs loaded after the default
    ``StreamDigest``; ``env`` adds environment variables (analyzer settings);
    ``args`` are extra ``tunrelay run`` options (``--workers 1`` unless they say
    otherwise); ``rules`` are ``--allow``/``--deny`` options tried before the lab's
    own ``--allow`` of its networks (``Topology.relay_allow``), which would
    otherwise match first; ``prefix`` is a command that runs the relay
    (``setpriv ...``); ``before`` is the gateway snapshot to compare with at its
    stop (default: taken now); ``state_dir`` is its ``--state-dir`` (default:
    ``tmp_path``).
    """
    relays: list[RelayProcess] = []

    def start(
        analyzers: Sequence[str] = (),
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        expected_tracebacks: Sequence[str] = (),
        rules: Sequence[str] = (),
        prefix: Sequence[str] = (),
        before: set[str] | None = None,
        state_dir: Path | None = None,
    ) -> RelayProcess:
        n = len(relays)
        # The supervisor keeps no CAP_DAC_OVERRIDE: as root, a directory root owns.
        state_dir = state_dir or tmp_path
        log_path = tmp_path / f"relay{n}.log"
        flow_log = relay_files / f"flows{n}.jsonl"
        digest_log = relay_files / f"digests{n}.jsonl"
        state_file = relay_files / f"state{n}.txt"
        argv = [
            *prefix, sys.executable, "-m", "relay.cli", "--log-level", "info", "run",
            "--tun", TUN,
            "--client-net", topology.client_net_v4, "--client-net", topology.client_net_v6,
            "--flow-log", str(flow_log), "--state-dir", str(state_dir),
            *rules, *topology.relay_allow,
        ]  # fmt: skip
        for spec in (*DEFAULT_ANALYZERS, *analyzers):
            argv += ["--analyzer", spec]
        argv += list(args)
        if "--workers" not in args:
            # One worker by default: the tests look at its RSS, fds, CPU and exit line.
            argv += ["--workers", "1"]
        full_env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            TUNRELAY_DIGEST_LOG=str(digest_log),
            TUNRELAY_STATE_DUMP=str(state_file),
            **(env or {}),
        )
        if before is None:
            before = gateway_snapshot(topology)
        t0 = time.monotonic()
        with open(log_path, "wb") as out:
            proc = topology.spawn(
                "gw", argv, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                reachable_by=WORKER_USER,
            )  # fmt: skip
        relay = RelayProcess(
            topology, proc, log_path, flow_log, digest_log, state_file,
            state_dir / f"{TUN}.json", t0,
            expected_tracebacks=tuple(expected_tracebacks), gateway_before=before,
        )  # fmt: skip
        relays.append(relay)
        deadline = t0 + READY_TIMEOUT
        while READY_MARK not in relay.log_text():
            assert relay.alive(), f"the relay exited while starting: {relay.describe()}"
            assert time.monotonic() < deadline, (
                f"the relay was not ready after {READY_TIMEOUT} s: {relay.describe()}"
            )
            time.sleep(0.02)
        relay._ready_seconds = time.monotonic() - t0
        return relay

    yield start

    failures = []
    for relay in relays:
        # A relay the test stopped itself was checked then.
        checks = [] if relay.stopped else [relay.check_running, relay.stop]
        for check in checks:
            try:
                check()
            except AssertionError as exc:
                failures.append(str(exc))
    # Tear the lab down now (``topology``'s own close is then a no-op) to check it.
    topology.close()
    left = [name for name in (topology.cli, topology.gw, topology.srv) if netns.exists(name)]
    if left:
        failures.append(f"namespaces left behind: {left}")
    if failures:
        pytest.fail("relay tear-down checks failed:\n" + "\n\n".join(failures), pytrace=False)


@pytest.fixture(name="relay")
def relay_fixture(start_relay: Callable[..., RelayProcess]) -> RelayProcess:
    """`tunrelay run` in the gateway with StreamDigest and the flow log, ready."""
    return start_relay()
