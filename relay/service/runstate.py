"""What a ``tunrelay run`` changed, on disk, so that a dead run can be undone.

Theory of operation: before the supervisor touches the network it claims
``<state dir>/<tun>.json`` (created with O_EXCL, so two starts cannot both
own it) holding its pid, the pid's start time and the boot id (a pid alone
could be reused), its network namespace, and the TUN name. Every rule, route
and sysctl change is appended to the file *before* it is made (``NetConfig``'s
journal; each update is a rename over the old file, so a kill leaves either
the old or the new list). A clean exit undoes everything and removes the file.

After SIGKILL, an OOM kill or a crash the file stays, and so do the changes,
including the fail-closed ``prohibit`` route that keeps client traffic from
being forwarded around the dead relay. ``tunrelay cleanup`` undoes them from
the file; ``tunrelay run`` does the same for a dead predecessor on its TUN and
refuses to start over a live one. A sysctl is put back to the value recorded
before the run only if it still has the value the run set.

The file, for one IPv4 client network::

    {"format": 1, "tun": "tunrelay0", "pid": 4242, "start_time": 912345,
     "boot_id": "...", "netns": "4:4026531840", "started": "2025-...+00:00",
     "changes": [
       {"kind": "route", "what": "unicast route 0.0.0.0/0 dev tunrelay0 table 5197 metric 1",
        "spec": {"dst": "0.0.0.0", "dst_len": 0, "family": 2, "table": 5197,
                 "type": "unicast", "priority": 1}, "dev": "tunrelay0"},
       {"kind": "rule", "what": "rule 5197: from 10.8.0.0/24 iif wg0 lookup 5197",
        "spec": {"family": 2, "src": "10.8.0.0", "src_len": 24, "priority": 5197,
                 "iifname": "wg0", "table": 5197}},
       {"kind": "sysctl", "what": "...", "path": "/proc/sys/net/ipv4/ip_forward",
        "old": "0", "new": "1"}, ...]}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "STATE_DIR", "RunState", "StateError", "cleanup", "is_alive", "undo"]

log = logging.getLogger("tunrelay")

STATE_DIR = "/run/tunrelay"
FORMAT = 1
TUN_GONE_TIMEOUT = 20.0  # a dead run's workers may take their SIGTERM grace to let go


class StateError(ValueError):
    """Why a state file cannot be claimed or cleaned up (one line)."""


def _start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks after boot), None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def _netns() -> str:
    st = os.stat("/proc/thread-self/ns/net")
    return f"{st.st_dev}:{st.st_ino}"


def is_alive(data: dict[str, Any]) -> bool:
    """The process that wrote ``data`` still runs (same pid, start time and boot)."""
    try:
        pid, start = int(data["pid"]), int(data["start_time"])
    except (KeyError, TypeError, ValueError):
        return False
    return data.get("boot_id") == _boot_id() and _start_time(pid) == start


def _load(path: Path) -> dict[str, Any] | None:
    """The state in ``path``; None for an empty file (its writer died before writing).

    Raises:
        StateError: the file is not a state file.
    """
    text = path.read_text()
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise StateError(f"{path} is not a tunrelay state file (format {FORMAT}): check, remove")
    return data


def _wait_tun_gone(data: dict[str, Any]) -> None:
    """A dead run's TUN goes when its last worker exits; until then its routes stay."""
    tun = str(data.get("tun"))
    deadline = time.monotonic() + TUN_GONE_TIMEOUT
    while os.path.exists(f"/proc/sys/net/ipv4/conf/{tun}"):
        if time.monotonic() > deadline:
            raise StateError(
                f"TUN {tun} of the dead relay (pid {data.get('pid')}) still exists after "
                f"{TUN_GONE_TIMEOUT:.0f} s: a process still holds it (one of its workers?)"
            )
        time.sleep(0.05)


def undo(data: dict[str, Any]) -> list[str]:
    """Undo the changes of a dead run (newest first); what happened to each.

    Raises:
        StateError: the run was in another network namespace, or its TUN
            still exists.
        OSError: an undo failed (EPERM without CAP_NET_ADMIN, ...).
    """
    if data.get("netns") != _netns():
        raise StateError(
            f"the relay on {data.get('tun')} (pid {data.get('pid')}) ran in another network "
            f"namespace ({data.get('netns')}); run `tunrelay cleanup` there"
        )
    _wait_tun_gone(data)
    from relay.host.netconfig import NetConfig  # pyroute2: only where the network is changed

    done = []
    with NetConfig() as net:
        for entry in reversed(data.get("changes", [])):
            done.append(net.undo_recorded(entry))
    return done


class RunState:
    """The state file of the running relay (see the module doc)."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path = path
        self.data = data

    @classmethod
    def claim(cls, state_dir: str, tun: str, **extra: Any) -> RunState:
        """Create the state file for ``tun``, first undoing a dead predecessor's changes.

        Raises:
            StateError: a relay on ``tun`` runs, or the file cannot be made.
            OSError: undoing a dead predecessor failed.
        """
        directory = Path(state_dir)
        try:
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"--state-dir: cannot create {state_dir}: {exc.strerror}") from None
        path = directory / f"{tun}.json"
        data = {
            "format": FORMAT,
            "tun": tun,
            "pid": os.getpid(),
            "start_time": _start_time(os.getpid()),
            "boot_id": _boot_id(),
            "netns": _netns(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),  # ISO 8601
            **extra,
            "changes": [],
        }
        for _ in range(3):  # bounded: only a concurrent start racing us loops
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                _take_over(path, tun)
                continue
            except OSError as exc:
                raise StateError(f"--state-dir: cannot create {path}: {exc.strerror}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            return cls(path, data)
        raise StateError(f"{path} keeps reappearing: is another tunrelay starting on {tun}?")

    def record(self, entry: dict[str, Any]) -> None:
        """Append a change, on disk before it is made (``NetConfig``'s journal)."""
        self.data["changes"].append(entry)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as exc:
            msg = f"cannot write the state file {self.path}: {exc.strerror}"
            raise OSError(exc.errno, msg) from None

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _take_over(path: Path, tun: str) -> None:
    """Undo a dead predecessor's changes and remove its file; refuse a live one."""
    try:
        data = _load(path)
    except FileNotFoundError:
        return
    if data is not None:
        if is_alive(data):
            raise StateError(
                f"a relay is already running on {tun} (pid {data['pid']}, state {path}); "
                "stop it first"
            )
        log.warning(
            "the relay on %s (pid %s, started %s) died without cleaning up: undoing its "
            "%d changes", tun, data.get("pid"), data.get("started"), len(data.get("changes", [])),
        )  # fmt: skip
        for line in undo(data):
            log.info("cleanup: %s", line)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _state_files(state_dir: str, tun: str | None) -> Iterator[Path]:
    directory = Path(state_dir)
    if tun is not None:
        yield directory / f"{tun}.json"
    elif directory.is_dir():
        yield from sorted(directory.glob("*.json"))


def cleanup(state_dir: str, tun: str | None = None) -> tuple[int, list[str]]:
    """``tunrelay cleanup``: undo every dead run's changes (or only ``tun``'s).

    Returns:
        The exit status (0: nothing left to do; 1: something could not be
        cleaned up) and the lines to print.
    """
    status, lines = 0, list[str]()
    found = False
    for path in _state_files(state_dir, tun):
        try:
            data = _load(path)
        except FileNotFoundError:
            continue
        except StateError as exc:
            status, lines = 1, [*lines, str(exc)]
            continue
        found = True
        name = path.stem if data is None else data.get("tun")
        if data is not None and is_alive(data):
            lines.append(f"{name}: the relay (pid {data['pid']}) is running; stop it instead")
            status = 1
            continue
        try:
            done = [] if data is None else undo(data)
        except (StateError, OSError) as exc:
            lines.append(f"{name}: {exc}")
            status = 1
            continue
        lines += [f"{name}: {line}" for line in done]
        path.unlink(missing_ok=True)
        lines.append(f"{name}: cleaned up after pid {data['pid'] if data else '?'}")
    if not found and status == 0:
        lines.append(f"nothing to clean up in {state_dir}" + (f" for {tun}" if tun else ""))
    return status, lines
