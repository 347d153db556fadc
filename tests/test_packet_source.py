"""Unit tests of MemoryPacketSource and the PacketSource contract (no root)."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from relay.datapath.packet_source import MemoryPacketSource, PacketSource, PacketStats
from relay.datapath.tun import TunDevice


def _is_packet_source(source: PacketSource) -> PacketSource:
    return source  # mypy checks that both implementations fit the Protocol


def test_implementations_fit_the_protocol() -> None:
    _is_packet_source(MemoryPacketSource())
    tun: type[PacketSource] = TunDevice  # static check only: needs no device
    assert tun is TunDevice


def test_drain_is_fifo_and_respects_max_batch() -> None:
    src = MemoryPacketSource()
    for i in range(5):
        src.inject(bytes([i]) * (i + 1))
    assert src.drain(max_batch=2) == [b"\x00", b"\x01\x01"]
    assert src.drain(max_batch=0) == []
    assert src.drain(max_batch=10) == [b"\x02" * 3, b"\x03" * 4, b"\x04" * 5]
    assert src.drain(max_batch=10) == []
    assert src.stats == PacketStats(packets_in=5, bytes_in=15)


def test_full_queues_drop_and_count() -> None:
    src = MemoryPacketSource(inbound_capacity=2, outbound_capacity=3)
    for _ in range(4):
        src.inject(b"in")
    src.write_all([b"o1", b"o2", b"o3", b"o4", b"o5"])
    assert src.stats.drops_in == 2
    assert src.stats.drops_out == 2
    assert src.drain(100) == [b"in", b"in"]
    assert src.take() == [b"o1", b"o2", b"o3"]
    assert src.take() == []
    src.write_all(iter([b"o6"]))  # any iterable; room again after take()
    assert src.take() == [b"o6"]
    assert (src.stats.packets_out, src.stats.bytes_out) == (4, 8)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        MemoryPacketSource(inbound_capacity=0)


async def test_wait_readable_returns_at_once_when_packets_queued() -> None:
    src = MemoryPacketSource()
    src.inject(b"x")
    with trio.fail_after(1):
        await src.wait_readable()
    assert src.drain(1) == [b"x"]


async def test_inject_wakes_wait_readable(autojump_clock: trio.testing.MockClock) -> None:
    src = MemoryPacketSource()
    woke_at: list[float] = []

    async def waiter() -> None:
        await src.wait_readable()
        woke_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(3)
        assert woke_at == []
        src.inject(b"p")
    assert woke_at == [3.0]


async def test_receive_batch_waits_and_returns_everything_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    src = MemoryPacketSource()
    got: list[list[bytes]] = []

    async def vpn_side() -> None:
        got.append(await src.receive_batch())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(vpn_side)
        await trio.sleep(1)
        src.write_all([b"a", b"b"])
    assert got == [[b"a", b"b"]]


async def test_close_wakes_waiters_and_ends_receive() -> None:
    src = MemoryPacketSource()
    outcomes: list[str] = []

    async def relay_side() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await src.wait_readable()
        outcomes.append("relay")

    async def vpn_side() -> None:
        with pytest.raises(trio.EndOfChannel):
            await src.receive_batch()
        outcomes.append("vpn")

    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay_side)
            nursery.start_soon(vpn_side)
            await trio.testing.wait_all_tasks_blocked()
            src.close()
            src.close()  # twice is fine
    assert sorted(outcomes) == ["relay", "vpn"]
    assert src.closed
    with pytest.raises(trio.ClosedResourceError):
        src.inject(b"late")
    with pytest.raises(trio.ClosedResourceError):
        src.write_all([b"late"])


async def test_packets_written_before_close_can_still_be_received() -> None:
    src = MemoryPacketSource()
    src.write_all([b"last"])
    src.close()
    assert await src.receive_batch() == [b"last"]
    with pytest.raises(trio.EndOfChannel):
        await src.receive_batch()


async def test_packet_loop_shape_echoes_with_timer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The minimal shape of the relay's packet loop runs on a MemoryPacketSource:
    drain a batch, receive it (the relay: ``stack.receive``; here: reverse each
    packet), ``handle_timer`` once the deadline has passed, dispatch the events
    (none here), write what is to be sent, then sleep until a packet arrives or
    the deadline comes."""
    src = MemoryPacketSource()
    timer_fired: list[float] = []

    async def packet_loop() -> None:
        deadline: float | None = 10.0
        while True:
            echoed = [p[::-1] for p in src.drain(max_batch=256)]
            now = trio.current_time()
            if deadline is not None and now >= deadline:
                timer_fired.append(now)
                deadline = None
            src.write_all(echoed)
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await src.wait_readable()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(packet_loop)
        for p in (b"ab", b"cd"):
            src.inject(p)
        assert await src.receive_batch() == [b"ba", b"dc"]
        await trio.sleep(20)
        assert timer_fired == [10.0]
        src.inject(b"xyz")
        assert await src.receive_batch() == [b"zyx"]
        nursery.cancel_scope.cancel()


@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("inject"), st.binary(max_size=8)),
            st.tuples(st.just("drain"), st.integers(min_value=0, max_value=5)),
        ),
        max_size=60,
    ),
    capacity=st.integers(min_value=1, max_value=6),
)
def test_inbound_queue_model(ops: list[tuple[str, object]], capacity: int) -> None:
    """FIFO order, never more than `capacity` queued, every packet counted once."""
    src = MemoryPacketSource(inbound_capacity=capacity)
    model: list[bytes] = []
    offered = drained = 0
    for op, arg in ops:
        if op == "inject":
            assert isinstance(arg, bytes)
            offered += 1
            src.inject(arg)
            if len(model) < capacity:
                model.append(arg)
        else:
            assert isinstance(arg, int)
            out = src.drain(arg)
            assert out == model[:arg]
            del model[:arg]
            drained += len(out)
    assert src.stats.packets_in == drained
    assert offered == drained + len(model) + src.stats.drops_in
