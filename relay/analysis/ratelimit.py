"""Log lines, at most one per key per interval, so traffic cannot fill a disk.

Theory of operation: an analyzer that raises on every flow, or an upstream
that fails every connection, would otherwise write one line (and a
traceback) per flow, which a client can drive at thousands a second.
``RateLimitedLog.log`` keeps, per key (an analyzer and the reason, for
example), when the next line may go; lines before that are only counted, and
the next line that goes says how many were suppressed. Keys are bounded: past
``max_keys`` the oldest key is forgotten (its count goes into ``suppressed``
in total, the figure the stats line shows).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Hashable

__all__ = ["DEFAULT_INTERVAL", "RateLimitedLog", "set_interval"]

DEFAULT_INTERVAL = 10.0  # seconds between two lines of one key

_interval = DEFAULT_INTERVAL
_instances: weakref.WeakSet[RateLimitedLog] = weakref.WeakSet()


class RateLimitedLog:
    """A logger wrapper; see the module docstring.

    Args:
        logger: where the lines go.
        interval: seconds between two lines of the same key (default: the
            process's, ``set_interval``, which also changes every instance's).
        clock: seconds, monotonic (tests pass their own).
        max_keys: keys remembered at most.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        self.logger = logger
        self.interval = _interval if interval is None else interval
        self.suppressed = 0  # lines not written, in total
        self._clock = clock
        self._max_keys = max_keys
        self._keys: dict[Hashable, list[float]] = {}  # key -> [next allowed, suppressed since]
        _instances.add(self)

    def log(
        self, level: int, key: Hashable, msg: str, *args: object, exc_info: bool = False
    ) -> bool:
        """Log ``msg % args`` unless a line of ``key`` went less than an interval
        ago; returns whether it was written. ``exc_info``: attach the exception
        being handled (call from an ``except`` block), as ``log.exception``."""
        now = self._clock()
        keys = self._keys
        entry = keys.get(key)
        if entry is not None and now < entry[0]:
            entry[1] += 1
            self.suppressed += 1
            return False
        missed = int(entry[1]) if entry is not None else 0
        if entry is None:
            if len(keys) >= self._max_keys:
                del keys[next(iter(keys))]  # the oldest; its suppressed lines stay counted
            keys[key] = [now + self.interval, 0.0]
        else:
            entry[0], entry[1] = now + self.interval, 0.0
        if missed:
            msg += " (%d more like this suppressed in the last %g s)"
            args = (*args, missed, self.interval)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def exception(self, key: Hashable, msg: str, *args: object) -> bool:
        """``log(ERROR, ..., exc_info=True)``: from an ``except`` block."""
        return self.log(logging.ERROR, key, msg, *args, exc_info=True)

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)


def set_interval(seconds: float) -> None:
    """Set the interval of every ``RateLimitedLog`` made so far (the process's
    module-level ones: ``tunrelay run --error-log-interval``) and the default of
    those made later."""
    global _interval
    _interval = seconds
    for instance in _instances:
        instance.interval = seconds
