"""Run a command inside a named network namespace.

Usage: python -m relay.lab.nsexec NSNAME [--reachable-by USER] -- cmd args...

Like `ip netns exec` without the extra mount namespace: the process joins the
network namespace and execs `cmd` in place, so the PID the caller holds is the
command's own PID (a test can signal and wait for it directly). It imports
only relay.host.netns (no pyroute2, no trio) to keep start-up around 30 ms.

`--reachable-by USER`: first make this interpreter's installation reachable
for USER in a private mount namespace (relay.lab.reachable), for a relay whose
workers run as USER.
"""

from __future__ import annotations

import os
import sys

from relay.host import netns

USAGE = "usage: python -m relay.lab.nsexec NSNAME [--reachable-by USER] -- cmd [args...]"


def main(argv: list[str] | None = None) -> int:
    """Enter the namespace and exec the command; returns only on failure."""
    args = sys.argv[1:] if argv is None else argv
    reachable_by = None
    if len(args) >= 3 and args[1] == "--reachable-by":
        reachable_by = args[2]
        args = [args[0], *args[3:]]
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
    if reachable_by is not None:
        from relay.lab.reachable import make_reachable, python_paths

        try:
            make_reachable(python_paths(), reachable_by)
        except (OSError, KeyError) as exc:
            print(f"nsexec: cannot make Python reachable by {reachable_by}: {exc}", file=sys.stderr)
            return 1
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
