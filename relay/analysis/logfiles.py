"""The files ``--log-dir`` holds and how they are opened.

Apart from ``relay.analysis.zeeklog``, which writes them in the workers, so that
the supervisor can check the directory at start-up without importing the
dissectors that the logs' rows come from.
"""

from __future__ import annotations

import os
from typing import Final

__all__ = ["LOGS", "OPEN_FLAGS", "log_paths", "open_logs"]

OPEN_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
LOGS: Final = ("conn", "ssl", "http", "dns", "quic")  # DIR/<name>.log


def log_paths(directory: str | os.PathLike[str]) -> list[str]:
    """The log files' paths in ``directory``, in ``LOGS`` order."""
    return [os.path.join(directory, f"{name}.log") for name in LOGS]


def open_logs(directory: str | os.PathLike[str]) -> list[int]:
    """Open (creating them) every log file in ``directory``: their fds, in ``LOGS``
    order.

    Raises:
        OSError: a file cannot be opened (the ones opened before it are closed).
    """
    fds: list[int] = []
    try:
        for path in log_paths(directory):
            fds.append(os.open(path, OPEN_FLAGS, 0o644))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds
