"""Lingering flows: keepalive (RFC 9293 3.8.4, RFC 1122 4.2.3.6) and idle timeout.

ESTABLISHED and CLOSE-WAIT are the states that can wait for ever on a client
that vanished; these two timers clean them up. The other states have their
own bounds (FIN-WAIT-2 and TIME-WAIT timers, retransmission give-up), which
``test_tcp_timers``/``test_tcp_states`` cover.
"""

from __future__ import annotations

from dataclasses import replace

from stack import Stack, StackConfig
from stack.config import TcpConfig
from stack.events import Closed, CloseReason
from stack.tcp.connection import State

from packets import open_tcp_flow, sent_tcp
from tcp_helpers import (
    ACK,
    FLOW,
    IRS,
    ISS,
    REPLY,
    RST,
    TEMPLATE,
    close_wait,
    deadline,
    drain,
    established,
    fin_wait_2,
    recv,
    recv_nothing,
    send,
)

KA = TcpConfig(
    keepalive=True, keepalive_idle=100.0, keepalive_interval=10.0, keepalive_probes=3,
    time_wait=2.0,
)  # fmt: skip
IDLE = TcpConfig(idle_timeout=30.0, time_wait=2.0)
PROBE = replace(REPLY, seq=ISS)  # RFC 1122 4.2.3.6: SEG.SEQ = SND.NXT - 1, no data


def test_off_by_default() -> None:
    c = established()
    assert c.get_timer() is None
    assert TcpConfig().keepalive is False and TcpConfig().idle_timeout is None
    # Linux's values once turned on.
    assert (TcpConfig().keepalive_idle, TcpConfig().keepalive_interval) == (7200.0, 75.0)
    assert TcpConfig().keepalive_probes == 9


def test_keepalive_probe_after_idle_and_the_answer_resets_it() -> None:
    c = established(config=KA)
    assert deadline(c) == 100.0
    c.handle_timer(99.9)
    recv_nothing(c, 99.9)
    c.handle_timer(100.0)
    assert recv(c, 100.0) == [PROBE]
    assert deadline(c) == 110.0
    send(c, TEMPLATE, 105.0)  # the client's ACK: alive
    recv_nothing(c, 105.0)
    c.handle_timer(110.0)
    recv_nothing(c, 110.0)
    assert deadline(c) == 205.0  # idle again from its answer
    assert c.state is State.ESTABLISHED


def test_dead_client_closes_timed_out_after_the_probes() -> None:
    c = established(config=KA)
    for t in (100.0, 110.0, 120.0):
        assert deadline(c) == t
        c.handle_timer(t)
        assert recv(c, t) == [PROBE]
    assert deadline(c) == 130.0
    c.handle_timer(130.0)
    assert c.state is State.CLOSED
    assert recv(c, 130.0) == [replace(REPLY, seq=ISS + 1, flags=RST | ACK, window=0)]
    assert drain(c) == [Closed(FLOW, CloseReason.TIMED_OUT)]
    assert c.get_timer() is None


def test_traffic_postpones_the_keepalive() -> None:
    c = established(config=KA)
    send(c, replace(TEMPLATE, payload=b"hi"), 60.0)
    drain(c)
    c.consumed(2)
    c.handle_timer(60.04)
    recv(c, 60.04)  # the delayed ACK
    c.handle_timer(100.0)  # the original deadline: the client spoke since
    recv_nothing(c, 100.0)
    assert deadline(c) == 160.0


def test_no_keepalive_while_data_is_outstanding() -> None:
    # RFC 1122 4.2.3.6: only when nothing is in flight; the retransmission timer
    # watches the client meanwhile.
    c = established(config=replace(KA, max_retries=100, rto_max=5.0))
    send(c, TEMPLATE, 99.0)
    c.send(b"data")
    recv(c, 99.0)
    for _ in range(3):
        t = deadline(c)
        c.handle_timer(t)
        assert all(s.payload == b"data" for s in recv(c, t))  # retransmissions only
    assert c.state is State.ESTABLISHED


def test_keepalive_in_close_wait() -> None:
    c = close_wait(config=KA)
    assert deadline(c) == 100.0
    c.handle_timer(100.0)
    assert recv(c, 100.0) == [replace(PROBE, ack=IRS + 2, window=65534)]


def test_idle_timeout_resets_the_flow() -> None:
    c = established(config=IDLE)
    assert deadline(c) == 30.0
    c.handle_timer(30.0)
    assert c.state is State.CLOSED
    assert recv(c, 30.0) == [replace(REPLY, flags=RST | ACK, window=0)]
    assert drain(c) == [Closed(FLOW, CloseReason.IDLE)]


def test_idle_timeout_counts_from_the_last_segment() -> None:
    c = established(config=IDLE)
    send(c, replace(TEMPLATE, flags=ACK), 20.0)
    c.handle_timer(30.0)
    assert c.state is State.ESTABLISHED
    assert deadline(c) == 50.0
    c.handle_timer(50.0)
    assert drain(c) == [Closed(FLOW, CloseReason.IDLE)]


def test_idle_timeout_with_keepalive_the_earlier_wins() -> None:
    c = established(config=replace(KA, idle_timeout=115.0))
    c.handle_timer(100.0)
    assert recv(c, 100.0) == [PROBE]
    c.handle_timer(110.0)
    assert recv(c, 110.0) == [PROBE]
    assert deadline(c) == 115.0
    c.handle_timer(115.0)
    assert drain(c) == [Closed(FLOW, CloseReason.IDLE)]


def test_fin_wait_2_keeps_its_own_timer() -> None:
    c = fin_wait_2(config=replace(IDLE, fin_wait_2_timeout=60.0))
    assert deadline(c) == 60.0  # not the idle timeout: FIN-WAIT-2 has its own
    c.handle_timer(30.0)
    assert c.state is State.FIN_WAIT_2
    c.handle_timer(60.0)
    assert drain(c) == [Closed(FLOW, CloseReason.IDLE)]


def test_stack_forgets_an_idle_flow() -> None:
    stack = Stack(StackConfig(tcp=IDLE))
    flow = open_tcp_flow(stack)
    assert stack.get_timer() == 30.0
    stack.handle_timer(30.0)
    (rst,) = sent_tcp(stack, 30.0)
    assert rst.tcp.flags == RST | ACK
    assert stack.state_of(flow) is None
    ev = stack.next_event()
    assert ev == Closed(flow, CloseReason.IDLE)
