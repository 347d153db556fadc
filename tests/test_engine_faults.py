"""Faults inside the packet loop are contained, counted, and never stop the relay.

An exception out of an event handler resets that flow only (``dispatch_errors``);
one out of the stack's timers (``timer_errors``) or out of building or writing
a batch toward the clients (``write_errors``: that batch is lost, TCP repairs
it) is counted and the loop goes on. Each test injects one fault and then
relays another flow byte-exact through the same relay. Uses the scripted
client and harness of ``test_engine.py`` (trio's autojump clock).
"""

from __future__ import annotations

from typing import Any

import trio
import trio.testing
from test_engine import Client, harness, pattern, recv_exactly, send_all, until

from stack import DataReceived, Stack


async def _relays(h: Any, port: int) -> None:
    """A fresh client on ``port`` sends and receives 100 kB through the relay, byte-exact."""
    c = Client(h, port=port)
    await c.connect()
    server = await h.connector.server(c.flow)
    up, down = pattern(100_000, port), pattern(100_000, port + 1)
    async with trio.open_nursery() as n:
        n.start_soon(c.send, up)
        n.start_soon(send_all, server, down)
        assert await recv_exactly(server, len(up)) == up
        await until(lambda: len(c.received) >= len(down))
    assert c.received == down


async def test_a_raising_event_handler_resets_only_its_flow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        victim = Client(h, port=40001)
        await victim.connect()
        await h.connector.server(victim.flow)
        handlers = h.relay._handlers
        real = handlers[DataReceived]

        def fragile(event: DataReceived) -> None:
            if event.flow == victim.flow:
                raise RuntimeError("an injected handler bug")
            real(event)

        handlers[DataReceived] = fragile
        await victim.send(b"boom")
        await until(lambda: victim.rst)  # that flow, and only it, is reset
        assert h.relay.stats.dispatch_errors == 1
        assert (await h.tap.end_of(40001)).how in ("aborted", "rst", "error")
        await _relays(h, 40002)  # the relay goes on
        assert h.relay.stats.dispatch_errors == 1


async def test_a_failed_tun_write_loses_one_batch_only(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with harness() as h:
        source = h.source
        real = source.write_all
        failures = [OSError(5, "injected EIO"), RuntimeError("injected bug")]

        def fragile(packets: Any) -> None:
            if failures:
                raise failures.pop(0)
            real(packets)

        source.write_all = fragile  # type: ignore[method-assign]
        await _relays(h, 40003)  # the SYN-ACKs lost with the batches are repeated
        assert h.relay.stats.write_errors == 2
        assert not failures


async def test_a_raising_stack_timer_is_counted_and_the_loop_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class FragileTimers(Stack):
        fail = 1

        def handle_timer(self, now: float) -> None:
            due = self.get_timer()
            if self.fail and due is not None and due <= now:
                self.fail -= 1
                raise RuntimeError("an injected timer bug")
            super().handle_timer(now)

    async with harness(stack=FragileTimers()) as h:
        c = Client(h, port=40004)
        await c.connect()
        await c.send(b"one segment")  # its delayed ACK is the first timer due
        await until(lambda: h.relay.stats.timer_errors == 1)
        await _relays(h, 40005)
        assert h.relay.stats.timer_errors == 1
