"""Every state transition of TcpConnection, packet by packet (RFC 9293 3.3.2, 3.10).

Also the close orders with data in flight and RST/SYN handling per state
(RFC 9293 3.10.7, RFC 5961 3.2 and 4.2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from stack.config import TcpConfig
from stack.errors import LocalProtocolError
from stack.events import Closed, CloseReason, Connected, ConnectionReset, DataReceived, PeerFinished
from stack.tcp.connection import State, TcpConnection
from stack.tcp.segment import TcpSegment
from stack.tcp.timestamps import offset_for
from stack.tcp.transitions import ALLOWED, CLOSE_SIDE, Close
from stack.wire.tcp import TcpOptions

import tcp_helpers
from tcp_helpers import (
    ACK,
    FIN,
    FLOW,
    IRS,
    ISS,
    LPORT,
    PEER_WINDOW,
    PSH,
    REPLY,
    RPORT,
    RST,
    SYN,
    TEMPLATE,
    WINDOW,
    close_wait,
    closing,
    deadline,
    drain,
    established,
    fin_wait_1,
    fin_wait_2,
    last_ack,
    listen,
    recv,
    recv_nothing,
    send,
    syn_received,
    syn_sent,
    time_wait,
)

SYN_IN = TcpSegment(RPORT, LPORT, IRS, 0, SYN, PEER_WINDOW, b"", TcpOptions(mss=1460))
SYN_ACK_OUT = TcpSegment(LPORT, RPORT, ISS, IRS + 1, SYN | ACK, WINDOW, b"", TcpOptions(mss=1460))

S = State


@pytest.fixture(autouse=True)
def transitions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[State, State]]:
    """Every state change a test makes, each checked against transitions.ALLOWED.

    The tests' connections are a subclass that checks: a method patched on the
    class would not be seen by a Stack compiled with mypyc (scripts/build-compiled),
    whose own calls do not look methods up by name."""
    seen: list[tuple[State, State]] = []

    class Checked(TcpConnection):
        def _set_state(self, state: State) -> None:
            assert (self.state, state) in ALLOWED, f"{self.state} -> {state}"
            seen.append((self.state, state))
            super()._set_state(state)

    monkeypatch.setattr(tcp_helpers, "TcpConnection", Checked)
    monkeypatch.setitem(globals(), "TcpConnection", Checked)
    return seen


def test_the_close_side_table_is_figure_5() -> None:
    # RFC 9293 3.3.2, figure 5 (and 3.10.4 for close() before the handshake).
    assert CLOSE_SIDE == {
        (S.LISTEN, Close.CALL): S.CLOSED,
        (S.SYN_SENT, Close.CALL): S.CLOSED,
        (S.SYN_RECEIVED, Close.CALL): S.SYN_RECEIVED,  # FIN queued until ESTABLISHED
        (S.ESTABLISHED, Close.CALL): S.FIN_WAIT_1,
        (S.CLOSE_WAIT, Close.CALL): S.LAST_ACK,
        (S.ESTABLISHED, Close.FIN): S.CLOSE_WAIT,
        (S.FIN_WAIT_1, Close.FIN): S.CLOSING,
        (S.FIN_WAIT_2, Close.FIN): S.TIME_WAIT,
        (S.FIN_WAIT_1, Close.FIN_ACKED): S.FIN_WAIT_2,
        (S.CLOSING, Close.FIN_ACKED): S.TIME_WAIT,
        (S.LAST_ACK, Close.FIN_ACKED): S.CLOSED,
    }


def test_every_close_side_transition_is_taken(transitions: list[tuple[State, State]]) -> None:
    # The builders walk the close side; the rest closes what they leave open.
    for build in (time_wait, closing, last_ack):
        c = build()
        send(c, replace(TEMPLATE, seq=c.irs + 2, ack=c.iss + 2), 0.0)
    for build in (listen, syn_sent):
        build().close()
    taken = {(s, nxt) for (s, _), nxt in CLOSE_SIDE.items() if s is not nxt}
    assert taken <= set(transitions)


# ------------------------------------------------------------------ LISTEN


def test_listen_is_silent_until_accept_and_absorbs_repeated_syns() -> None:
    c = listen()
    recv_nothing(c, 0.0)
    assert c.get_timer() is None
    send(c, SYN_IN, 1.0)  # the client's SYN retransmission while the caller decides
    recv_nothing(c, 1.0)
    send(c, SYN_IN, 3.0)
    recv_nothing(c, 3.0)
    assert c.state is State.LISTEN
    assert drain(c) == []
    c.accept(isn=ISS)
    assert recv(c, 3.5) == [SYN_ACK_OUT]
    assert c.state is State.SYN_RECEIVED
    assert c.get_timer() == pytest.approx(4.5)  # rto_initial


def test_reject_with_rst() -> None:
    c = listen()
    c.reject(rst=True)
    # RFC 9293 3.10.7.1: <SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>
    assert recv(c, 0.0) == [TcpSegment(LPORT, RPORT, 0, IRS + 1, RST | ACK, 0)]
    assert c.state is State.CLOSED
    assert drain(c) == [Closed(FLOW, CloseReason.REJECTED)]
    recv_nothing(c, 0.0)
    assert c.get_timer() is None


def test_reject_silently() -> None:
    c = listen()
    c.reject(rst=False)
    recv_nothing(c, 0.0)
    assert c.state is State.CLOSED
    assert drain(c) == [Closed(FLOW, CloseReason.REJECTED)]
    send(c, SYN_IN, 1.0)  # a later SYN retransmission finds nothing here
    recv_nothing(c, 1.0)


def test_accept_and_reject_only_in_listen() -> None:
    c = established()
    with pytest.raises(LocalProtocolError):
        c.accept(isn=1)
    with pytest.raises(LocalProtocolError):
        c.reject(rst=True)


# ------------------------------------------------------------ SYN-RECEIVED


def test_syn_received_to_established() -> None:
    c = syn_received()
    assert drain(c) == []
    send(c, TEMPLATE, 0.1)
    assert c.state is State.ESTABLISHED
    assert drain(c) == [Connected(FLOW)]
    recv_nothing(c, 0.1)  # an ACK is not acknowledged
    assert c.get_timer() is None


def test_lost_syn_ack_client_repeats_syn() -> None:
    c = syn_received()
    send(c, SYN_IN, 0.5)
    assert recv(c, 0.5) == [SYN_ACK_OUT]
    assert c.state is State.SYN_RECEIVED
    send(c, TEMPLATE, 0.6)
    assert c.state is State.ESTABLISHED
    assert drain(c) == [Connected(FLOW)]


def test_syn_ack_retransmitted_with_backoff_then_gives_up() -> None:
    c = syn_received(config=TcpConfig(syn_retries=5, synrecv_timeout=None))
    # RFC 6298 (5.5): 1, 2, 4, 8, 16 s between retransmissions.
    for t in (1.0, 3.0, 7.0, 15.0, 31.0):
        assert c.get_timer() == pytest.approx(t)
        c.handle_timer(t - 0.001)
        recv_nothing(c, t - 0.001)
        c.handle_timer(t)
        assert recv(c, t) == [SYN_ACK_OUT]
    assert c.get_timer() == pytest.approx(63.0)
    c.handle_timer(63.0)
    assert c.state is State.CLOSED
    assert drain(c) == [Closed(FLOW, CloseReason.TIMED_OUT)]
    recv_nothing(c, 63.0)
    assert c.get_timer() is None


def test_syn_received_bad_ack_gets_rst() -> None:
    c = syn_received()
    send(c, replace(TEMPLATE, ack=ISS + 5), 0.1)
    # RFC 9293 3.10.7.4 SYN-RECEIVED: <SEQ=SEG.ACK><CTL=RST>
    assert recv(c, 0.1) == [TcpSegment(LPORT, RPORT, ISS + 5, 0, RST, 0)]
    assert c.state is State.SYN_RECEIVED


def test_close_in_syn_received_sends_fin_after_handshake() -> None:
    c = syn_received()
    c.close()
    recv_nothing(c, 0.05)
    send(c, TEMPLATE, 0.1)
    assert c.state is State.FIN_WAIT_1
    assert drain(c) == [Connected(FLOW)]
    assert recv(c, 0.1) == [replace(REPLY, flags=FIN | ACK)]


# --------------------------------------------------------------- active open


def test_active_open() -> None:
    c = syn_sent()
    syn_ack = TcpSegment(RPORT, LPORT, IRS, ISS + 1, SYN | ACK, 4000, b"", TcpOptions(mss=536))
    send(c, syn_ack, 0.1)
    assert c.state is State.ESTABLISHED
    assert drain(c) == [Connected(FLOW)]
    assert recv(c, 0.1) == [REPLY]
    assert c.snd_wnd == 4000
    assert c.snd_mss == 536


def test_syn_sent_sends_exact_syn_and_retransmits() -> None:
    # Default changed with RFC 7323 / RFC 2018 support: an active open offers window
    # scaling (shift 7 covers the 4 MiB receive-buffer cap), SACK and timestamps
    # (TSval = now in ms + a per-connection offset derived from the ISN).
    c = TcpConnection(local_port=LPORT, remote_port=RPORT)
    c.connect(isn=ISS)
    off = offset_for(ISS)

    def syn(tsval: int) -> TcpSegment:
        opts = TcpOptions(mss=1460, wscale=7, sack_permitted=True, timestamps=(tsval, 0))
        return TcpSegment(LPORT, RPORT, ISS, 0, SYN, WINDOW, b"", opts)

    assert recv(c, 0.0) == [syn(off)]
    c.handle_timer(1.0)
    assert recv(c, 1.0) == [syn(off + 1000)]
    assert c.get_timer() == pytest.approx(3.0)


def test_syn_sent_without_options_configured_sends_mss_only() -> None:
    cfg = TcpConfig(window_scaling=False, sack=False, timestamps=False)
    c = TcpConnection(local_port=LPORT, remote_port=RPORT, config=cfg)
    c.connect(isn=ISS)
    syn = TcpSegment(LPORT, RPORT, ISS, 0, SYN, WINDOW, b"", TcpOptions(mss=1460))
    assert recv(c, 0.0) == [syn]


def test_syn_sent_unacceptable_ack_gets_rst() -> None:
    c = syn_sent()
    send(c, TcpSegment(RPORT, LPORT, IRS, ISS + 7, SYN | ACK, 100), 0.1)
    assert recv(c, 0.1) == [TcpSegment(LPORT, RPORT, ISS + 7, 0, RST, 0)]
    assert c.state is State.SYN_SENT


def test_syn_sent_rst_with_acceptable_ack_resets() -> None:
    c = syn_sent()
    send(c, TcpSegment(RPORT, LPORT, 0, ISS + 1, RST | ACK, 0), 0.1)
    assert c.state is State.CLOSED
    assert drain(c) == [ConnectionReset(FLOW), Closed(FLOW, CloseReason.RESET)]


def test_syn_sent_rst_without_ack_is_ignored() -> None:
    c = syn_sent()
    send(c, TcpSegment(RPORT, LPORT, 0, 0, RST, 0), 0.1)
    assert c.state is State.SYN_SENT
    assert drain(c) == []


def test_simultaneous_open() -> None:
    c = syn_sent()
    send(c, TcpSegment(RPORT, LPORT, IRS, 0, SYN, PEER_WINDOW, b"", TcpOptions(mss=1460)), 0.1)
    assert c.state is State.SYN_RECEIVED
    assert recv(c, 0.1) == [replace(SYN_ACK_OUT)]
    send(c, TEMPLATE, 0.2)
    assert c.state is State.ESTABLISHED
    assert drain(c) == [Connected(FLOW)]


# ---------------------------------------------------------------- closing


def test_active_close_fin_wait_1_2_time_wait_closed() -> None:
    c = established()
    c.close()
    assert c.state is State.FIN_WAIT_1
    assert recv(c, 0.0) == [replace(REPLY, flags=FIN | ACK)]
    send(c, replace(TEMPLATE, ack=ISS + 2), 0.1)
    assert c.state is State.FIN_WAIT_2
    recv_nothing(c, 0.1)
    assert c.get_timer() == pytest.approx(60.1)  # fin_wait_2_timeout
    send(c, replace(TEMPLATE, ack=ISS + 2, flags=FIN | ACK), 0.5)
    assert c.state is State.TIME_WAIT
    assert recv(c, 0.5) == [replace(REPLY, seq=ISS + 2, ack=IRS + 2, window=WINDOW - 1)]
    assert drain(c) == [PeerFinished(FLOW)]
    assert c.get_timer() == pytest.approx(2.5)  # time_wait
    c.handle_timer(2.4)
    assert c.state is State.TIME_WAIT
    c.handle_timer(2.5)
    assert c.state is State.CLOSED
    assert drain(c) == [Closed(FLOW, CloseReason.FINISHED)]
    assert c.get_timer() is None


def test_passive_close_close_wait_last_ack_closed() -> None:
    c = established()
    send(c, replace(TEMPLATE, flags=FIN | ACK), 0.1)
    assert c.state is State.CLOSE_WAIT
    assert drain(c) == [PeerFinished(FLOW)]
    recv_nothing(c, 0.1)  # the FIN's ACK waits for the delayed-ACK time: our FIN carries it
    c.close()
    assert c.state is State.LAST_ACK
    assert recv(c, 0.12) == [replace(REPLY, ack=IRS + 2, flags=FIN | ACK, window=WINDOW - 1)]
    send(c, replace(TEMPLATE, seq=IRS + 2, ack=ISS + 2), 0.3)
    assert c.state is State.CLOSED
    assert drain(c) == [Closed(FLOW, CloseReason.FINISHED)]
    recv_nothing(c, 0.3)
    assert c.get_timer() is None


def test_a_fin_that_closes_first_is_acked_after_the_delayed_ack_time() -> None:
    # As Linux's tcp_fin (pingpong mode): our own FIN usually follows within a
    # round trip and carries the ACK; when it does not, the delayed ACK does
    # (RFC 9293 3.8.6.3), long before the peer's retransmission timeout.
    c = established()
    send(c, replace(TEMPLATE, flags=FIN | ACK), 0.1)
    recv_nothing(c, 0.1)
    at = deadline(c)
    assert at == pytest.approx(0.1 + c.config.delayed_ack)
    c.handle_timer(at)
    assert recv(c, at) == [replace(REPLY, ack=IRS + 2, window=WINDOW - 1)]
    assert c.state is State.CLOSE_WAIT


def test_simultaneous_close_through_closing() -> None:
    c = fin_wait_1()
    send(c, replace(TEMPLATE, flags=FIN | ACK), 0.1)  # the peer's FIN crosses ours
    assert c.state is State.CLOSING
    assert drain(c) == [PeerFinished(FLOW)]
    assert recv(c, 0.1) == [replace(REPLY, seq=ISS + 2, ack=IRS + 2, window=WINDOW - 1)]
    send(c, replace(TEMPLATE, seq=IRS + 2, ack=ISS + 2), 0.2)
    assert c.state is State.TIME_WAIT
    recv_nothing(c, 0.2)
    assert c.get_timer() == pytest.approx(2.2)
    c.handle_timer(2.2)
    assert drain(c) == [Closed(FLOW, CloseReason.FINISHED)]


def test_fin_wait_1_to_time_wait_on_fin_ack() -> None:
    c = fin_wait_1()
    send(c, replace(TEMPLATE, ack=ISS + 2, flags=FIN | ACK), 0.1)
    assert c.state is State.TIME_WAIT
    assert recv(c, 0.1) == [replace(REPLY, seq=ISS + 2, ack=IRS + 2, window=WINDOW - 1)]
    assert drain(c) == [PeerFinished(FLOW)]
    assert c.get_timer() == pytest.approx(2.1)


def test_fin_wait_2_timeout() -> None:
    c = fin_wait_2(config=TcpConfig(fin_wait_2_timeout=30.0))
    assert c.get_timer() == pytest.approx(30.0)
    c.handle_timer(29.9)
    assert c.state is State.FIN_WAIT_2
    c.handle_timer(30.0)
    assert c.state is State.CLOSED
    assert drain(c) == [Closed(FLOW, CloseReason.IDLE)]
    recv_nothing(c, 30.0)


def test_fin_wait_2_timer_restarts_while_the_peer_sends() -> None:
    # Half-close: the peer may keep sending after our FIN; the timer is an idle timer.
    c = fin_wait_2(config=TcpConfig(fin_wait_2_timeout=30.0))
    send(c, replace(TEMPLATE, ack=ISS + 2, payload=b"more"), 20.0)
    assert c.get_timer() == pytest.approx(20.04)  # the delayed ACK
    c.handle_timer(20.04)
    assert recv(c, 20.04) == [replace(REPLY, seq=ISS + 2, ack=IRS + 5, window=WINDOW - 4)]
    assert c.get_timer() == pytest.approx(50.0)
    c.handle_timer(30.0)
    assert c.state is State.FIN_WAIT_2
    assert drain(c) == [DataReceived(FLOW, b"more")]


def test_time_wait_acks_a_retransmitted_fin_and_restarts() -> None:
    c = time_wait()
    assert c.get_timer() == pytest.approx(2.0)
    send(c, replace(TEMPLATE, ack=ISS + 2, flags=FIN | ACK), 1.5)  # our last ACK was lost
    assert recv(c, 1.5) == [replace(REPLY, seq=ISS + 2, ack=IRS + 2, window=WINDOW - 1)]
    assert c.state is State.TIME_WAIT
    assert c.get_timer() == pytest.approx(3.5)  # RFC 9293 3.10.7.4: restart the 2 MSL timeout
    assert drain(c) == []


def test_time_wait_does_not_ack_an_ack() -> None:
    # Two TIME-WAIT ends answering each other's ACKs would ping-pong forever.
    c = time_wait()
    send(c, replace(TEMPLATE, seq=IRS + 2, ack=ISS + 2), 0.5)
    recv_nothing(c, 0.5)
    assert c.state is State.TIME_WAIT


def test_closing_retransmits_fin_on_rto() -> None:
    c = closing()
    assert c.get_timer() == pytest.approx(1.0)
    c.handle_timer(1.0)
    assert recv(c, 1.0) == [replace(REPLY, ack=IRS + 2, flags=FIN | ACK, window=WINDOW - 1)]


def test_last_ack_retransmits_fin_and_closes() -> None:
    c = last_ack()
    c.handle_timer(1.0)
    assert recv(c, 1.0) == [replace(REPLY, ack=IRS + 2, flags=FIN | ACK, window=WINDOW - 1)]
    send(c, replace(TEMPLATE, seq=IRS + 2, ack=ISS + 2), 1.1)
    assert c.state is State.CLOSED
    assert drain(c) == [Closed(FLOW, CloseReason.FINISHED)]


def test_send_after_close_raises() -> None:
    c = fin_wait_1()
    with pytest.raises(LocalProtocolError):
        c.send(b"x")


def test_abort_sends_rst() -> None:
    c = established()
    c.send(b"abc")
    assert recv(c, 0.0) == [replace(REPLY, flags=PSH | ACK, payload=b"abc")]
    c.abort()
    assert recv(c, 0.1) == [replace(REPLY, seq=ISS + 4, flags=RST | ACK, window=0)]
    assert drain(c) == [Closed(FLOW, CloseReason.ABORTED)]
    assert c.get_timer() is None


# ------------------------------------------------------------- close orders
#
# Our side has "response" (8 bytes) in flight in each; the peer has "request".


def test_close_order_client_first() -> None:
    c = established()
    c.send(b"response")
    assert recv(c, 0.0) == [replace(REPLY, flags=PSH | ACK, payload=b"response")]
    # The client's last data and its FIN, before it has seen our response.
    send(c, replace(TEMPLATE, flags=PSH | ACK, payload=b"request"), 0.1)
    send(c, replace(TEMPLATE, seq=IRS + 8, flags=FIN | ACK), 0.1)
    assert c.state is State.CLOSE_WAIT
    recv_nothing(c, 0.1)  # the ACK of both waits: our FIN carries it
    assert drain(c) == [DataReceived(FLOW, b"request"), PeerFinished(FLOW)]
    c.close()  # FIN goes out behind the unacknowledged response
    assert recv(c, 0.12) == [
        replace(REPLY, seq=ISS + 9, ack=IRS + 9, flags=FIN | ACK, window=WINDOW - 8)
    ]
    send(c, replace(TEMPLATE, seq=IRS + 9, ack=ISS + 9), 0.25)  # response acked
    assert c.state is State.LAST_ACK
    send(c, replace(TEMPLATE, seq=IRS + 9, ack=ISS + 10), 0.3)
    assert c.state is State.CLOSED
    assert drain(c) == [Closed(FLOW, CloseReason.FINISHED)]


def test_close_order_server_first() -> None:
    c = established()
    c.send(b"response")
    c.close()  # FIN rides on the last data segment
    assert recv(c, 0.0) == [replace(REPLY, flags=FIN | PSH | ACK, payload=b"response")]
    # The client's request was in flight; it acknowledges the data, not the FIN.
    send(c, replace(TEMPLATE, ack=ISS + 9, flags=PSH | ACK, payload=b"request"), 0.1)
    assert c.state is State.FIN_WAIT_1
    send(c, replace(TEMPLATE, seq=IRS + 8, ack=ISS + 10, flags=FIN | ACK), 0.2)
    assert c.state is State.TIME_WAIT
    assert recv(c, 0.2) == [replace(REPLY, seq=ISS + 10, ack=IRS + 9, window=WINDOW - 8)]
    assert drain(c) == [DataReceived(FLOW, b"request"), PeerFinished(FLOW)]
    c.handle_timer(2.2)
    assert drain(c) == [Closed(FLOW, CloseReason.FINISHED)]


def test_close_order_simultaneous() -> None:
    c = established()
    c.send(b"response")
    c.close()
    assert recv(c, 0.0) == [replace(REPLY, flags=FIN | PSH | ACK, payload=b"response")]
    # The client's data and FIN crossed ours: it acknowledges nothing of ours.
    send(c, replace(TEMPLATE, flags=FIN | PSH | ACK, payload=b"request"), 0.1)
    assert c.state is State.CLOSING
    assert recv(c, 0.1) == [replace(REPLY, seq=ISS + 10, ack=IRS + 9, window=WINDOW - 8)]
    assert drain(c) == [DataReceived(FLOW, b"request"), PeerFinished(FLOW)]
    send(c, replace(TEMPLATE, seq=IRS + 9, ack=ISS + 10), 0.2)
    assert c.state is State.TIME_WAIT
    recv_nothing(c, 0.2)
    c.handle_timer(2.2)
    assert c.state is State.CLOSED
    assert drain(c) == [Closed(FLOW, CloseReason.FINISHED)]


# ---------------------------------------------------------------- RST / SYN
#
# (builder, our snd_nxt - ISS, peer's rcv_nxt - IRS) for each synchronized state.
SYNCHRONIZED: list[tuple[Callable[..., TcpConnection], int, int]] = [
    (established, 1, 1),
    (fin_wait_1, 2, 1),
    (fin_wait_2, 2, 1),
    (closing, 2, 2),
    (time_wait, 2, 2),
    (close_wait, 1, 2),
    (last_ack, 2, 2),
]
IDS = [b.__name__ for b, _, _ in SYNCHRONIZED]


@pytest.mark.parametrize(("build", "snd", "rcv"), SYNCHRONIZED, ids=IDS)
def test_rst_exact_resets(build: Callable[..., TcpConnection], snd: int, rcv: int) -> None:
    c = build()
    send(c, replace(TEMPLATE, seq=IRS + rcv, ack=0, flags=RST), 0.5)
    assert c.state is State.CLOSED
    assert drain(c) == [ConnectionReset(FLOW), Closed(FLOW, CloseReason.RESET)]
    recv_nothing(c, 0.5)
    assert c.get_timer() is None


@pytest.mark.parametrize(("build", "snd", "rcv"), SYNCHRONIZED, ids=IDS)
def test_rst_in_window_inexact_gets_challenge_ack(
    build: Callable[..., TcpConnection], snd: int, rcv: int
) -> None:
    c = build()
    state = c.state
    send(c, replace(TEMPLATE, seq=IRS + rcv + 100, ack=0, flags=RST), 0.5)
    assert c.state is state
    assert recv(c, 0.5) == [
        replace(REPLY, seq=ISS + snd, ack=IRS + rcv, window=WINDOW + 1 - rcv)
    ]  # RFC 5961 3.2
    assert drain(c) == []


@pytest.mark.parametrize(("build", "snd", "rcv"), SYNCHRONIZED, ids=IDS)
def test_rst_out_of_window_is_dropped(
    build: Callable[..., TcpConnection], snd: int, rcv: int
) -> None:
    c = build()
    state = c.state
    timer = c.get_timer()
    for seq in (IRS + rcv - 1, IRS + rcv + WINDOW, IRS - 100_000):
        send(c, replace(TEMPLATE, seq=seq, ack=0, flags=RST | ACK), 0.5)
        recv_nothing(c, 0.5)
    assert c.state is state
    assert c.get_timer() == timer
    assert drain(c) == []


@pytest.mark.parametrize(("build", "snd", "rcv"), SYNCHRONIZED, ids=IDS)
def test_syn_in_synchronized_state_gets_challenge_ack(
    build: Callable[..., TcpConnection], snd: int, rcv: int
) -> None:
    c = build()
    state = c.state
    send(c, replace(TEMPLATE, seq=IRS + rcv + 5, ack=0, flags=SYN), 0.5)  # in window
    ack = replace(REPLY, seq=ISS + snd, ack=IRS + rcv, window=WINDOW + 1 - rcv)
    assert recv(c, 0.5) == [ack]  # RFC 5961 4.2
    send(c, replace(TEMPLATE, seq=IRS + rcv, ack=0, flags=SYN), 0.6)  # exactly rcv_nxt
    assert recv(c, 0.6) == [ack]
    assert c.state is state
    assert drain(c) == []


def test_challenge_acks_are_rate_limited() -> None:
    c = established(config=TcpConfig(challenge_ack_limit=3))
    bad_rst = replace(TEMPLATE, seq=IRS + 50, flags=RST)
    for _ in range(3):
        send(c, bad_rst, 4.2)
        assert recv(c, 4.2) == [REPLY]
    send(c, bad_rst, 4.9)
    recv_nothing(c, 4.9)
    send(c, replace(TEMPLATE, seq=IRS + 7, flags=SYN), 4.95)  # SYNs share the budget
    recv_nothing(c, 4.95)
    send(c, bad_rst, 5.0)  # a new second
    assert recv(c, 5.0) == [REPLY]
    assert c.state is State.ESTABLISHED


def test_rst_in_syn_received() -> None:
    c = syn_received()
    send(c, replace(TEMPLATE, seq=IRS + 1, ack=0, flags=RST), 0.2)
    assert c.state is State.CLOSED
    assert drain(c) == [Closed(FLOW, CloseReason.RESET)]
    recv_nothing(c, 0.2)
    assert c.get_timer() is None


def test_rst_in_syn_received_inexact_gets_challenge_ack() -> None:
    c = syn_received()
    send(c, replace(TEMPLATE, seq=IRS + 9, ack=0, flags=RST), 0.2)
    assert c.state is State.SYN_RECEIVED
    assert recv(c, 0.2) == [replace(REPLY, ack=IRS + 1)]


@pytest.mark.parametrize("seq", [IRS, IRS + 1])
def test_rst_for_undecided_listen_connection(seq: int) -> None:
    c = listen()
    send(c, TcpSegment(RPORT, LPORT, seq, 0, RST, 0), 0.5)
    assert c.state is State.CLOSED
    assert drain(c) == [Closed(FLOW, CloseReason.RESET)]
    recv_nothing(c, 0.5)
    with pytest.raises(LocalProtocolError):
        c.accept(isn=ISS)


def test_rst_with_wrong_seq_for_listen_connection_is_ignored() -> None:
    c = listen()
    send(c, TcpSegment(RPORT, LPORT, IRS + 1000, 0, RST, 0), 0.5)
    assert c.state is State.LISTEN
    assert drain(c) == []
