"""Lab only: let another user reach the Python installation, in a private mount namespace.

The relay's workers drop to an unprivileged user (``nobody`` by default) and
then import analyzers and lazily loaded modules, so that user must be able to
read the interpreter, its standard library, site-packages and the relay's
code. An installation under a directory it cannot enter (pyenv in a 0700
/root, a checkout in a 0750 home) makes the workers fail. For the lab's
relays (the netns tests and the demo) ``make_reachable`` works around it
without touching the host: in a new mount namespace of the process about to
exec the relay, each such directory is covered by an empty tmpfs into which
only the needed entries are bind-mounted back. Nothing else becomes visible,
and the host's mounts and permissions are unchanged.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import stat
import sys
from collections.abc import Iterable

__all__ = ["make_reachable", "python_paths", "unreachable"]

_CLONE_NEWNS = 0x00020000
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18
_ROUNDS = 8  # nested unreachable directories: one level per round

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _allows(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    if st.st_uid == uid:
        mode = st.st_mode >> 6
    elif st.st_gid == gid:
        mode = st.st_mode >> 3
    else:
        mode = st.st_mode
    return mode & bits == bits


def python_paths() -> list[str]:
    """What a Python child of this interpreter reads: the interpreter, sys.path."""
    paths = [os.path.realpath(sys.executable), *(p for p in sys.path if p)]
    return [os.path.realpath(p) for p in paths if os.path.exists(p)]


def unreachable(paths: Iterable[str], uid: int, gid: int) -> dict[str, set[str]]:
    """The shallowest directories ``uid`` cannot enter on the way to each path,
    with the entries below them that lead on to the paths."""
    found: dict[str, set[str]] = {}
    for path in paths:
        parts = os.path.realpath(path).strip("/").split("/")
        current = "/"
        for part in parts:
            st = os.stat(current)
            if not _allows(st, uid, gid, 1):
                found.setdefault(current, set()).add(part)
                break
            current = os.path.join(current, part)
    # A directory inside another one found here is handled in a later round.
    return {d: c for d, c in found.items() if not any(d.startswith(o + "/") for o in found)}


def make_reachable(paths: Iterable[str], user: str) -> list[str]:
    """Make ``paths`` reachable for ``user`` in a new private mount namespace of
    this process (only if needed: else nothing happens); the directories covered.

    Raises:
        OSError: unshare or a mount failed (needs CAP_SYS_ADMIN).
        KeyError: no such user.
    """
    entry = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    uid, gid = entry.pw_uid, entry.pw_gid
    wanted = list(paths)
    covered: list[str] = []
    for _ in range(_ROUNDS):
        blocked = unreachable(wanted, uid, gid)
        if not blocked:
            break
        if not covered:
            _check(_libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
            _check(_libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")
        for directory, entries in blocked.items():
            _cover(directory, entries)
            covered.append(directory)
    return covered


def _cover(directory: str, entries: set[str]) -> None:
    fds = {name: os.open(os.path.join(directory, name), os.O_PATH) for name in entries}
    try:
        flags = _MS_NOSUID | _MS_NODEV
        result = _libc.mount(b"tmpfs", directory.encode(), b"tmpfs", flags, b"mode=0755")
        _check(result, f"tmpfs on {directory}")
        for name, fd in fds.items():
            target = os.path.join(directory, name)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.mkdir(target)
            else:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
            source = f"/proc/self/fd/{fd}".encode()
            _check(_libc.mount(source, target.encode(), None, _MS_BIND | _MS_REC, None), target)
    finally:
        for fd in fds.values():
            os.close(fd)
