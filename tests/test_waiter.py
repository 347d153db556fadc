"""relay.datapath.waiter: one parked task, woken by unpark_all, cancellable."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from relay.datapath.waiter import Waiter


async def test_unpark_wakes_the_parked_task() -> None:
    w = Waiter()
    woken: list[float] = []

    async def parker() -> None:
        await w.park()
        woken.append(trio.current_time())

    async with trio.open_nursery() as n:
        n.start_soon(parker)
        await trio.testing.wait_all_tasks_blocked()
        assert not woken
        w.unpark_all()
        await trio.testing.wait_all_tasks_blocked()
        assert len(woken) == 1


async def test_unpark_without_a_waiter_is_not_remembered() -> None:
    w = Waiter()
    w.unpark_all()
    with trio.move_on_after(0.05) as scope:
        await w.park()
    assert scope.cancelled_caught  # the earlier unpark did not wake this park


async def test_a_cancelled_park_frees_the_slot() -> None:
    w = Waiter()
    with trio.move_on_after(0.01):
        await w.park()
    w.unpark_all()  # nothing parked: must not reschedule the cancelled task
    async with trio.open_nursery() as n:
        n.start_soon(w.park)
        await trio.testing.wait_all_tasks_blocked()
        w.unpark_all()


async def test_a_second_waiter_is_refused() -> None:
    w = Waiter()
    async with trio.open_nursery() as n:
        n.start_soon(w.park)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await w.park()
        w.unpark_all()
