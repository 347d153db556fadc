"""Detached labs (``tunrelay lab``): names, the state file, and `down`.

A detached lab ``NAME`` has namespaces ``trl-NAME-{cli,gw,srv,wire}`` (the test
suite's are ``tr-<pid>-<n>-*``) and a state directory ``/run/tunrelay-lab/NAME``
whose ``state.json`` `relay.lab.lab.Lab` writes before the first namespace exists
and after each process starts. `down` trusts nothing else being alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from relay.host import netns
from relay.lab.pids import pids_in, same, start_time, stop_pid
from relay.lab.topology import Topology

__all__ = [
    "LAB_PREFIX",
    "STATE_ROOT",
    "LabError",
    "check_name",
    "detached_labs",
    "down",
    "lab_namespaces",
    "read_state",
]

LAB_PREFIX = "trl-"  # detached labs; the tests' are tr-<pid>-<n>
STATE_ROOT = Path("/run/tunrelay-lab")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_]{0,23}$")


class LabError(Exception):
    """The lab could not be built, started or found (one line, for the user)."""


def check_name(name: str) -> None:
    if not _NAME.match(name):
        raise LabError(f"--name {name!r}: 1-24 of a-z, 0-9 and _, starting with a letter or digit")


def lab_namespaces(name: str) -> list[str]:
    base = LAB_PREFIX + name
    return [f"{base}-cli", f"{base}-gw", f"{base}-srv", f"{base}-wire"]


def read_state(name: str) -> dict[str, Any] | None:
    """A detached lab's state file, or None."""
    try:
        data: dict[str, Any] = json.loads((STATE_ROOT / name / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return data


def down(name: str) -> list[str]:
    """Remove detached lab ``name`` whatever state it is in; what was done (empty:
    nothing of it existed). Idempotent."""
    check_name(name)
    done = []
    state = read_state(name) or {}
    up_pid, up_started = state.get("up_pid"), state.get("up_start_time")
    if isinstance(up_pid, int) and up_pid != os.getpid() and same(up_pid, up_started):
        done.append(f"`tunrelay lab up` (pid {up_pid}): {stop_pid(up_pid, up_started)}")
    for key in ("relay", "forwarder"):
        pid = state.get(f"{key}_pid")
        if isinstance(pid, int):
            what = stop_pid(pid, state.get(f"{key}_start_time"))
            if what != "not running":
                done.append(f"{key} (pid {pid}): {what}")
    names = lab_namespaces(name)
    for pid in pids_in(names):
        done.append(f"process {pid} in the lab: {stop_pid(pid, start_time(pid), grace=2.0)}")
    gw = f"{LAB_PREFIX}{name}-gw"
    if netns.exists(gw):
        with contextlib.suppress(Exception):
            ipr = netns.ipr(gw)
            try:
                for ifname in (Topology.gw_cli_if, Topology.gw_srv_if):
                    for index in ipr.link_lookup(ifname=ifname):
                        ipr.link("del", index=index)
            finally:
                ipr.close()
    for ns in names:
        if netns.exists(ns):
            netns.remove(ns, missing_ok=True)
            done.append(f"namespace {ns} removed")
    state_dir = STATE_ROOT / name
    if state_dir.exists():
        shutil.rmtree(state_dir, ignore_errors=True)
        done.append(f"{state_dir} removed")
    return done


def detached_labs() -> list[str]:
    """Names of the detached labs that have a state directory or a namespace."""
    names = set(os.listdir(STATE_ROOT)) if STATE_ROOT.is_dir() else set()
    if os.path.isdir(netns.NETNS_RUN_DIR):
        for ns in os.listdir(netns.NETNS_RUN_DIR):
            if ns.startswith(LAB_PREFIX):
                names.add(ns[len(LAB_PREFIX) :].rsplit("-", 1)[0])
    return sorted(names)
