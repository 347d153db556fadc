"""``Stack.gauges`` (timer heap, bytes buffered and reserved) and the
``memory_budget_reached`` counter: what the soak and the metrics read, driven
through the stack's wire."""

from __future__ import annotations

from stack import Stack, StackConfig, TcpConfig
from stack.clients import ClientBudget
from stack.stack import StackStats
from stack.tcp.buffers import MemoryBudget

from packets import CLIENT_ISN, SERVER_ISN, open_tcp_flow, sent_tcp, stack_events, tcp_packet

KIB = 1024


def test_an_idle_stack_holds_nothing() -> None:
    stack = Stack()
    held = stack.gauges()
    assert (held.connections, held.timer_heap, held.timers) == (0, 0, 0)
    assert (held.buffered, held.reserved) == (0, 0)
    assert held.limit == TcpConfig().memory_budget


IDLE = StackConfig(tcp=TcpConfig(idle_timeout=300.0))  # a deadline for every connection


def test_buffered_counts_send_receive_and_reassembly_bytes_and_all_go_back_to_zero() -> None:
    stack = Stack(IDLE)
    flow = open_tcp_flow(stack)
    stack.get_timer()
    opened = stack.gauges()
    assert opened.connections == 1 and opened.buffered == 0
    assert opened.timers == 1 and opened.timer_heap == 1  # the idle deadline
    assert opened.reserved > 0  # the initial buffer sizes
    seq = CLIENT_ISN + 1
    stack.receive(tcp_packet(seq, SERVER_ISN + 1, payload=b"a" * 1000), 1.0)  # in order
    stack.receive(tcp_packet(seq + 2000, SERVER_ISN + 1, payload=b"b" * 500), 1.0)  # a hole
    stack_events(stack)  # DataReceived: delivered, not consumed yet
    assert stack.send(flow, b"c" * 3000) == 3000
    sent_tcp(stack, 1.0)  # sent, not acknowledged: still in the send buffer
    assert stack.gauges().buffered == 1000 + 500 + 3000
    stack.consumed(flow, 1000)
    assert stack.gauges().buffered == 500 + 3000
    stack.abort(flow)
    sent_tcp(stack, 1.0)
    stack.get_timer()  # drops the heap's stale entries
    held = stack.gauges()
    assert (held.connections, held.timer_heap, held.timers) == (0, 0, 0)
    assert (held.buffered, held.reserved) == (0, 0)


def test_the_heap_keeps_stale_entries_until_they_surface_or_it_is_compacted() -> None:
    stack = Stack(IDLE)
    flow = open_tcp_flow(stack)
    for i in range(1, 6):  # each exchange re-files the connection's deadline
        stack.receive(tcp_packet(CLIENT_ISN + i, SERVER_ISN + 1, payload=b"x"), float(i))
        stack_events(stack)
        stack.consumed(flow, 1)
        sent_tcp(stack, float(i))
    held = stack.gauges()
    assert held.timers == 1
    assert held.timer_heap > held.timers  # lazy deletion: the older deadlines wait in the heap
    stack.abort(flow)
    sent_tcp(stack, 6.0)
    stack.get_timer()
    assert (stack.gauges().timers, stack.gauges().timer_heap) == (0, 0)


def test_a_reached_budget_is_counted_once_per_reservation_it_cuts() -> None:
    cfg = TcpConfig(memory_budget=400 * KIB)  # one connection's 320 KiB, not two
    stack = Stack(StackConfig(tcp=cfg))
    open_tcp_flow(stack)
    assert stack.stats.memory_budget_reached == 0
    open_tcp_flow(stack, src=bytes([198, 18, 1, 3]))
    assert stack.stats.memory_budget_reached == 1  # the second one's initial buffers shrank
    assert stack.gauges().reserved <= cfg.memory_budget + 2 * 4 * 1460  # within the floors


def test_only_the_stack_wide_limit_counts_not_a_client_share() -> None:
    stats = StackStats()
    budget = MemoryBudget(1000, stats)
    client = ClientBudget(300, budget)
    assert client.reserve(500) == 300 and client.reserve(1) == 0
    assert stats.memory_budget_reached == 0  # the client's share, not the stack's limit
    assert budget.reserve(700) == 700 and budget.reserve(1) == 0 and budget.reserve(0) == 0
    assert stats.memory_budget_reached == 1
