"""A wake-up for one waiting task: what ``trio.lowlevel.ParkingLot`` does for
many, at a fraction of the memory.

Theory of operation: a TCP flow's task waits for several conditions (connected,
send space, the client's FIN written upstream, Closed) but never two at once,
and nothing else waits on them. A ``ParkingLot`` is an attrs object holding an
``OrderedDict`` that keeps its table after the first wait (about 400 bytes per
flow, held by every idle connection); ``Waiter`` is one slot. ``park`` and
``unpark_all`` keep the lot's names, so callers read the same.
"""

from __future__ import annotations

import trio

__all__ = ["Waiter"]


class Waiter:
    """At most one parked task, woken by ``unpark_all``."""

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: trio.lowlevel.Task | None = None

    async def park(self) -> None:
        """Wait until ``unpark_all`` (a checkpoint: cancellable like ``ParkingLot.park``)."""
        if self._task is not None:
            raise trio.BusyResourceError("another task is already parked here")
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def unpark_all(self) -> None:
        """Wake the parked task, if any (nothing is remembered when none waits)."""
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)
