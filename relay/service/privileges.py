"""Who runs what: the workers' user, and dropping capabilities.

Theory of operation: ``tunrelay run`` starts with CAP_NET_ADMIN (as root, or as
any user given it as an ambient capability). The supervisor sets the network
up; every worker opens its TUN queue and the flow log, then calls ``drop``:
it switches to the workers' user (``--user``, by default ``nobody`` when
started as root, else the starting user), gives up every capability
(effective, permitted, inheritable, ambient, and the bounding set when it is
allowed to) and sets PR_SET_NO_NEW_PRIVS, so no exec can give any back. Only
then are analyzers imported. ``reduce_supervisor`` leaves the supervisor with
just what tear-down needs.

Capabilities are read and set with capget(2)/capset(2) and prctl(2) through
ctypes: the standard library has set*id and setgroups but nothing for these.
"""

from __future__ import annotations

import ctypes
import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "CAP_KILL",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "Caps",
    "Identity",
    "PrivilegeError",
    "current_caps",
    "drop",
    "reduce_supervisor",
    "resolve_worker",
    "set_dumpable",
    "set_parent_death_signal",
]

CAP_KILL = 5
CAP_SETGID = 6
CAP_SETUID = 7
CAP_SETPCAP = 8
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAP_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


class PrivilegeError(OSError):
    """A privilege change failed or did not take effect."""


class _Header(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _Data(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


@dataclass(frozen=True, slots=True)
class Caps:
    """A thread's capability sets, as bit masks (bit N: capability N)."""

    effective: int
    permitted: int
    inheritable: int

    def has(self, cap: int) -> bool:
        return bool(self.effective >> cap & 1)


@dataclass(frozen=True, slots=True)
class Identity:
    """The user and group the workers run as."""

    name: str
    uid: int
    gid: int


def _prctl(option: int, arg2: int = 0, what: str = "prctl") -> int:
    result = int(_libc.prctl(option, ctypes.c_ulong(arg2), 0, 0, 0))
    if result < 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"{what}: {os.strerror(err)}")
    return result


def _mask(caps: Iterable[int]) -> int:
    mask = 0
    for cap in caps:
        mask |= 1 << cap
    return mask


def current_caps() -> Caps:
    """This thread's effective, permitted and inheritable capabilities."""
    header = _Header(_CAP_VERSION_3, 0)
    data = (_Data * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"capget: {os.strerror(err)}")
    return Caps(
        effective=data[0].effective | data[1].effective << 32,
        permitted=data[0].permitted | data[1].permitted << 32,
        inheritable=data[0].inheritable | data[1].inheritable << 32,
    )


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    header = _Header(_CAP_VERSION_3, 0)
    data = (_Data * 2)()
    for i in range(2):
        shift = 32 * i
        data[i].effective = effective >> shift & 0xFFFFFFFF
        data[i].permitted = permitted >> shift & 0xFFFFFFFF
        data[i].inheritable = inheritable >> shift & 0xFFFFFFFF
    if _libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"capset: {os.strerror(err)}")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def _status_masks() -> dict[str, int]:
    """CapAmb and CapBnd from /proc/self/status (capget has neither)."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("CapAmb", "CapBnd"):
                found[key] = int(value, 16)
    return found


def resolve_worker(user: str | None) -> Identity:
    """The workers' identity for ``--user``.

    Started as root: ``user`` (default ``nobody``), which must not be root.
    Started as another user: that user; ``--user`` may only name it (switching
    needs CAP_SETUID, which such a start does not have).

    Raises:
        ValueError: naming ``--user``.
    """
    euid = os.geteuid()
    if euid != 0:
        me = _lookup(str(euid))
        if user is not None and _lookup(user).uid != euid:
            raise ValueError(
                f"--user: cannot switch to {user!r} when started as {me.name!r} (uid {euid}) "
                "without root; leave --user out to run the workers as that user"
            )
        return Identity(me.name, euid, os.getegid())
    target = _lookup(user or "nobody")
    if target.uid == 0 or target.gid == 0:
        raise ValueError(
            f"--user: {target.name!r} is root or in group root; the workers must not run as root"
        )
    caps = current_caps()
    missing = [name for cap, name in ((CAP_SETUID, "CAP_SETUID"), (CAP_SETGID, "CAP_SETGID"))
               if not caps.has(cap)]  # fmt: skip
    if missing:
        raise ValueError(
            f"--user: switching the workers to {target.name!r} needs {' and '.join(missing)} "
            "(run as root with them, or as the workers' user with CAP_NET_ADMIN)"
        )
    return target


def _lookup(user: str) -> Identity:
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except (KeyError, OverflowError):
        raise ValueError(f"--user: no such user {user!r}") from None
    return Identity(entry.pw_name, entry.pw_uid, entry.pw_gid)


def drop(target: Identity, keep: frozenset[int] = frozenset()) -> None:
    """Become ``target`` with only the capabilities in ``keep`` (usually none), for good.

    Order matters: the bounding set is cut while CAP_SETPCAP is still held;
    PR_SET_KEEPCAPS carries ``keep`` over the uid change (which otherwise
    clears the permitted set); capset then leaves exactly ``keep`` and clears
    the inheritable set (a uid change does not); no_new_privs last. A process
    not started as root keeps its bounding set (it may not change it) but has
    no capability it could use from there.

    Raises:
        PrivilegeError: a step failed, or the result is not what was asked.
    """
    want = _mask(keep)
    if current_caps().has(CAP_SETPCAP):
        for cap in range(_last_cap() + 1):
            if not want >> cap & 1 and _prctl(_PR_CAPBSET_READ, cap, "capbset read"):
                _prctl(_PR_CAPBSET_DROP, cap, "capbset drop")
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "clear ambient capabilities")
    if os.getresuid() != (target.uid,) * 3 or os.getresgid() != (target.gid,) * 3:
        if want:
            _prctl(_PR_SET_KEEPCAPS, 1, "keepcaps")
        try:
            if os.geteuid() == 0:
                os.setgroups([])
            os.setresgid(target.gid, target.gid, target.gid)
            os.setresuid(target.uid, target.uid, target.uid)
        except OSError as exc:
            msg = f"cannot switch to {target.name!r}: {exc.strerror}"
            raise PrivilegeError(exc.errno, msg) from None
        _prctl(_PR_SET_KEEPCAPS, 0, "keepcaps")
    _capset(want, want, 0)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")
    _verify(target, want)


def _verify(target: Identity, want: int) -> None:
    caps = current_caps()
    problems = []
    if os.getresuid() != (target.uid,) * 3 or os.getresgid() != (target.gid,) * 3:
        problems.append(f"uids {os.getresuid()}, gids {os.getresgid()}")
    if (caps.effective, caps.permitted, caps.inheritable) != (want, want, 0):
        problems.append(f"capabilities {caps}")
    if _status_masks().get("CapAmb", 0):
        problems.append("ambient capabilities left")
    if problems:
        raise PrivilegeError(0, f"privileges not dropped as asked: {'; '.join(problems)}")


def reduce_supervisor(keep: frozenset[int]) -> None:
    """Keep only ``keep`` in the supervisor (what tear-down needs), with no_new_privs.

    Its uid stays: as root it owns the state file and /run/tunrelay; the
    bounding set is cut where allowed, and nothing is left to inherit.

    Raises:
        PrivilegeError: a step failed.
    """
    want = _mask(keep) & current_caps().permitted
    if current_caps().has(CAP_SETPCAP):
        for cap in range(_last_cap() + 1):
            if not want >> cap & 1 and _prctl(_PR_CAPBSET_READ, cap, "capbset read"):
                _prctl(_PR_CAPBSET_DROP, cap, "capbset drop")
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "clear ambient capabilities")
    _capset(want, want, 0)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")
    set_dumpable(False)


def set_dumpable(on: bool) -> None:
    """Not dumpable: no core dumps, and /proc/PID and ptrace are root's only, so
    another process of the same user (another ``nobody``) cannot read it."""
    _prctl(_PR_SET_DUMPABLE, int(on), "dumpable")


def set_parent_death_signal(signum: int) -> None:
    """Get ``signum`` when the parent dies (cleared by any uid or gid change: set it after)."""
    _prctl(_PR_SET_PDEATHSIG, signum, "pdeathsig")
