"""Processes of the lab, by PID: signalled only while /proc shows the start time recorded
for them, so a PID the kernel reused for something else is never touched; and the
processes inside given network namespaces, found by the namespace's inode."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from relay.host import netns

__all__ = ["kill", "pids_in", "same", "start_time", "stop_pid", "wait_ready"]

STOP_TIMEOUT = 10.0


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot), or None if no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def same(pid: int, started: int | None) -> bool:
    return started is not None and start_time(pid) == started


def stop_pid(pid: int, started: int | None, grace: float = STOP_TIMEOUT) -> str:
    """SIGTERM the process (and its group if it leads one), SIGKILL after ``grace``;
    only while it is the process recorded with ``started``. What happened."""
    if not same(pid, started):
        return "not running"
    kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not same(pid, started):
            return "stopped"
        time.sleep(0.02)
    if same(pid, started):
        kill(pid, signal.SIGKILL)
    return "killed"


def kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def pids_in(namespaces: Sequence[str]) -> list[int]:
    """Every process whose network namespace is one of ``namespaces`` (by inode)."""
    inodes = set()
    for name in namespaces:
        with contextlib.suppress(OSError):
            st = os.stat(os.path.join(netns.NETNS_RUN_DIR, name))
            inodes.add((st.st_dev, st.st_ino))
    found = []
    if inodes:
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                with contextlib.suppress(OSError):
                    st = os.stat(f"/proc/{entry}/ns/net")
                    if (st.st_dev, st.st_ino) in inodes:
                        found.append(int(entry))
    return sorted(found)


def wait_ready(path: Path, mark: str, pid: int, timeout: float) -> str | None:
    """None once ``mark`` is in the file at ``path``; otherwise why not."""
    started = start_time(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mark in path.read_text(errors="replace"):
            return None
        if not same(pid, started):
            return "it exited"
        time.sleep(0.02)
    return f"not ready after {timeout:.0f} s"
