"""systemd's ``Type=notify`` protocol (sd_notify(3)), without libsystemd.

A message is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX datagram
socket named by ``$NOTIFY_SOCKET``: a path, or an abstract name written with a
leading ``@`` (sent with a leading NUL byte). The supervisor sends ``READY=1``
once the device, the routing and every worker are up and their loops turn,
``STATUS=`` lines, ``STOPPING=1`` on shutdown and ``WATCHDOG=1`` every half
``$WATCHDOG_USEC`` while every worker's loop turns.

``from_environment`` removes the variables, so the workers (and the analyzers
they run) never see them. A send that fails is logged once and otherwise
ignored: a service manager that went away is no reason to stop relaying.
"""

from __future__ import annotations

import logging
import os
import socket

__all__ = ["Notifier", "encode", "from_environment"]

log = logging.getLogger("tunrelay")


def encode(**fields: str | int) -> bytes:
    """``READY=1\\nSTATUS=...`` for ``encode(READY=1, STATUS="...")``; values one line."""
    lines = []
    for key, value in fields.items():
        text = str(value)
        if "\n" in text:
            raise ValueError(f"{key}: a notify value is one line")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode()


class Notifier:
    """Sends to one notify socket.

    Args:
        address: ``$NOTIFY_SOCKET`` (``@name`` for an abstract socket).
        watchdog: ``$WATCHDOG_USEC`` in seconds, if the watchdog is on.
    """

    def __init__(self, address: str, watchdog: float | None = None) -> None:
        if not address or address[0] not in "/@":
            raise ValueError(f"NOTIFY_SOCKET: {address!r} is neither a path nor @abstract")
        self.address = "\0" + address[1:] if address[0] == "@" else address
        self.watchdog = watchdog
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)
        self._failed = False

    def notify(self, **fields: str | int) -> bool:
        """Send one message; False if it could not be sent (logged the first time)."""
        try:
            self._sock.sendto(encode(**fields), self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("sd_notify to %r failed: %s", self.address, exc)
            self._failed = True
            return False
        return True

    def close(self) -> None:
        self._sock.close()


def from_environment(environ: dict[str, str] | None = None) -> Notifier | None:
    """A ``Notifier`` for ``$NOTIFY_SOCKET`` (None when unset), with the watchdog
    interval of ``$WATCHDOG_USEC`` when ``$WATCHDOG_PID`` is unset or this process;
    the variables are removed from ``environ`` (``os.environ`` by default)."""
    env = os.environ if environ is None else environ
    address = env.pop("NOTIFY_SOCKET", None)
    usec = env.pop("WATCHDOG_USEC", None)
    pid = env.pop("WATCHDOG_PID", None)
    if not address:
        return None
    watchdog = None
    if usec is not None and (pid is None or pid == str(os.getpid())):
        try:
            watchdog = int(usec) / 1e6 if int(usec) > 0 else None
        except ValueError:
            log.warning("WATCHDOG_USEC: %r is not a number; no watchdog pings", usec)
    try:
        return Notifier(address, watchdog)
    except ValueError as exc:
        log.warning("%s; not notifying", exc)
        return None
