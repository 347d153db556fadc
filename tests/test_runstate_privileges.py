"""The state file of a run (relay.service.runstate) and the privilege drop
(relay.service.privileges).

The drop itself is checked in a child process (it is for good) and needs root;
the rest needs nothing.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytun

from relay.datapath.tun import TunDevice
from relay.service import privileges, runstate
from relay.service.runstate import RunState, StateError


def dead_pid() -> int:
    """The pid of a child that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def test_claim_records_before_and_removes(tmp_path: Path) -> None:
    state = RunState.claim(str(tmp_path / "run"), "tr0")
    data = json.loads(state.path.read_text())
    assert state.path == tmp_path / "run" / "tr0.json"
    assert (data["format"], data["tun"], data["pid"], data["changes"]) == (
        1,
        "tr0",
        os.getpid(),
        [],
    )
    assert runstate.is_alive(data)
    started = datetime.datetime.fromisoformat(data["started"])  # ISO 8601, UTC, to the second
    assert started.utcoffset() == datetime.timedelta(0)
    now = datetime.datetime.now(datetime.UTC)
    assert now - datetime.timedelta(minutes=1) < started <= now
    entry = {"kind": "sysctl", "what": "x", "path": "/proc/sys/x", "old": "0", "new": "1"}
    state.record(entry)
    assert json.loads(state.path.read_text())["changes"] == [entry]
    state.remove()
    assert not state.path.exists()


def test_a_live_run_is_refused(tmp_path: Path) -> None:
    RunState.claim(str(tmp_path), "tr0")  # this process: alive
    with pytest.raises(StateError, match=rf"already running on tr0 \(pid {os.getpid()},"):
        RunState.claim(str(tmp_path), "tr0")


def test_a_dead_run_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = RunState.claim(str(tmp_path), "tr0")
    first.data["pid"] = dead_pid()
    first.record({"kind": "route", "what": "gone", "spec": {}, "dev": "no-such-link0"})
    with caplog.at_level(logging.INFO, logger="tunrelay"):
        second = RunState.claim(str(tmp_path), "tr0")
    assert second.data["pid"] == os.getpid() and second.data["changes"] == []
    assert "died without cleaning up: undoing its 1 changes" in caplog.text
    assert "cleanup: gone: gone" in caplog.text  # a device route whose device is gone


def test_a_dead_run_in_another_namespace_is_left_alone(tmp_path: Path) -> None:
    first = RunState.claim(str(tmp_path), "tr0")
    first.data.update(pid=dead_pid(), netns="0:1")
    first.record({"kind": "sysctl", "what": "x", "path": "/proc/sys/x", "old": "0", "new": "1"})
    with pytest.raises(StateError, match="ran in another network namespace"):
        RunState.claim(str(tmp_path), "tr0")
    assert first.path.exists()


def test_an_empty_file_is_taken_over_and_garbage_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tr0.json").write_text("")  # its writer died between create and write
    RunState.claim(str(tmp_path), "tr0").remove()
    (tmp_path / "tr0.json").write_text("{not json")
    with pytest.raises(StateError, match="is not a tunrelay state file"):
        RunState.claim(str(tmp_path), "tr0")


def test_cleanup_skips_live_runs_and_says_when_there_is_nothing(tmp_path: Path) -> None:
    assert runstate.cleanup(str(tmp_path / "none")) == (
        0,
        [f"nothing to clean up in {tmp_path / 'none'}"],
    )
    RunState.claim(str(tmp_path), "tr0")
    status, lines = runstate.cleanup(str(tmp_path), "tr0")
    assert (status, lines) == (
        1,
        [f"tr0: the relay (pid {os.getpid()}) is running; stop it instead"],
    )


def test_a_state_dir_that_cannot_be_made_names_the_option(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StateError, match=r"^--state-dir: cannot create"):
        RunState.claim(str(tmp_path / "file" / "run"), "tr0")


def test_tun_open_errors_are_one_readable_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for code, text in (
        (errno.ENOENT, "no /dev/net/tun (is the tun module loaded?)"),
        (errno.EPERM, "not permitted (needs CAP_NET_ADMIN)"),
        (errno.EBUSY, "a network device of that name exists already"),
    ):

        def fail(*args: object, code: int = code, **kwargs: object) -> None:
            raise pytun.Error(code, os.strerror(code))

        monkeypatch.setattr(pytun, "TunTapDevice", fail)
        with pytest.raises(OSError) as info:
            TunDevice.open("tr0")
        assert (info.value.errno, info.value.strerror) == (code, f"cannot open TUN 'tr0': {text}")


def test_user_option_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"^--user: no such user 'no-such-user'$"):
        privileges._lookup("no-such-user")
    monkeypatch.setattr(os, "geteuid", lambda: 65534)
    monkeypatch.setattr(os, "getegid", lambda: 65534)
    assert privileges.resolve_worker(None).uid == 65534  # started as nobody: stays nobody
    with pytest.raises(ValueError, match=r"^--user: cannot switch to 'root' when started as"):
        privileges.resolve_worker("root")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(ValueError, match=r"^--user: 'root' is root or in group root; the"):
        privileges.resolve_worker("root")


DROP = """
import os, socket
from relay.service import privileges
privileges.drop(privileges.resolve_worker("nobody"))
status = dict(l.split(":", 1) for l in open("/proc/self/status"))
print(*(status[k].strip() for k in ("Uid", "CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd",
                                     "NoNewPrivs")), sep="|")
try:
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
except PermissionError:
    print("raw socket refused")
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to nobody needs root")
def test_drop_leaves_nobody_with_nothing() -> None:
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root)
    done = subprocess.run(
        [sys.executable, "-c", DROP], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, done.stderr
    zero = "0000000000000000"
    assert done.stdout.splitlines() == [
        "|".join(["65534\t65534\t65534\t65534", zero, zero, zero, zero, zero, "1"]),
        "raw socket refused",
    ]
