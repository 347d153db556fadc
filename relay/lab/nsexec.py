"""Run a command inside a named network namespace.

Usage: python -m relay.lab.nsexec NSNAME -- cmd args...

Like `ip netns exec` without the extra mount namespace: the process joins the
network namespace and execs `cmd` in place, so the PID the caller holds is the
command's own PID (a test can signal and wait for it directly). It imports
only relay.host.netns (no pyroute2, no trio) to keep start-up around 30 ms.
"""

from __future__ import annotations

import os
import sys

from relay.host import netns

USAGE = "usage: python -m relay.lab.nsexec NSNAME -- cmd [args...]"


def main(argv: list[str] | None = None) -> int:
    """Enter the namespace and exec the command; returns only on failure."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 2 and args[1] == "--":
        name, command = args[0], args[2:]
    elif len(args) >= 1 and not args[0].startswith("-"):
        name, command = args[0], args[1:]
    else:
        command = []
    if not command:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        fd = netns.open_fd(name)
    except (OSError, ValueError) as exc:
        print(f"nsexec: cannot open namespace {name!r}: {exc}", file=sys.stderr)
        return 1
    try:
        # Still single-threaded here, so the whole process is in the
        # namespace and so is everything exec'd from it.
        netns.setns_fd(fd, name)
    except OSError as exc:
        print(f"nsexec: setns {name!r}: {exc}", file=sys.stderr)
        return 1
    finally:
        os.close(fd)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"nsexec: {command[0]}: {exc}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    return 1  # not reached: execvp does not return


if __name__ == "__main__":
    sys.exit(main())
