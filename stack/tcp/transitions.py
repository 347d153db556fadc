"""The TCP states, and the close-side transitions as tables (RFC 9293 3.3.2, figure 5).

Theory of operation: how a connection closes is data, not code spread over
the segment handlers. ``CLOSE_SIDE`` maps (state, event) to the next state
for the three events that move a connection toward CLOSED in order: the
application's ``close()``, a FIN received in sequence, and the ACK of our
FIN. A (state, event) pair missing from the table changes nothing: the event
is a repeat (a second ``close()``, a retransmitted FIN) or has no meaning in
that state. What entering a state requires besides the assignment (its
timers) is ``ConnectionCore._close_side``'s work.

Every other change of state -- the SYN exchange, and any state to CLOSED on a
reset, an abort or a timeout -- goes through ``ConnectionCore._set_state``,
the one place ``state`` is assigned, so ``ALLOWED`` lists every transition a
connection can make (tests/test_tcp_states.py checks that none other occurs).
"""

from __future__ import annotations

import enum

__all__ = [
    "ALLOWED",
    "CLOSE_SIDE",
    "LINGERING",
    "RECEIVING",
    "SYNCHRONIZED",
    "Close",
    "State",
]


class State(enum.Enum):
    CLOSED = "CLOSED"
    LISTEN = "LISTEN"  # a SYN arrived; the caller has not yet accepted or rejected it
    SYN_SENT = "SYN-SENT"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSING = "CLOSING"
    TIME_WAIT = "TIME-WAIT"
    CLOSE_WAIT = "CLOSE-WAIT"
    LAST_ACK = "LAST-ACK"

    # Members are singletons compared by identity, so the identity hash agrees
    # with equality. Enum's own __hash__ is Python code (hash of the name), and
    # ``state in RECEIVING`` runs on every segment: 103 ns against 18 here.
    __hash__ = object.__hash__


class Close(enum.Enum):
    """The events that move a connection along the close side of figure 5."""

    CALL = "close() called"  # RFC 9293 3.10.4
    FIN = "FIN received"  # RFC 9293 3.10.7.4, eighth step
    FIN_ACKED = "our FIN acknowledged"  # RFC 9293 3.10.7.4, fifth step

    __hash__ = object.__hash__  # as State's: identity, C-level


_S = State

CLOSE_SIDE: dict[tuple[State, Close], State] = {
    # The application closes (3.10.4). Before the handshake completes there is
    # nothing to finish: LISTEN and SYN-SENT close at once. In SYN-RECEIVED the
    # FIN is queued and the state stays; it is taken as ESTABLISHED's once the
    # handshake's ACK arrives (a FIN cannot precede our SYN's acknowledgment).
    (_S.LISTEN, Close.CALL): _S.CLOSED,
    (_S.SYN_SENT, Close.CALL): _S.CLOSED,
    (_S.SYN_RECEIVED, Close.CALL): _S.SYN_RECEIVED,
    (_S.ESTABLISHED, Close.CALL): _S.FIN_WAIT_1,
    (_S.CLOSE_WAIT, Close.CALL): _S.LAST_ACK,
    # A FIN arrives in sequence (3.10.7.4, eighth step). In FIN-WAIT-1 an ACK of
    # our FIN in the same segment was processed first (fifth step), so that case
    # is already FIN-WAIT-2 here and goes to TIME-WAIT.
    (_S.ESTABLISHED, Close.FIN): _S.CLOSE_WAIT,
    (_S.FIN_WAIT_1, Close.FIN): _S.CLOSING,
    (_S.FIN_WAIT_2, Close.FIN): _S.TIME_WAIT,
    # Our FIN is acknowledged (3.10.7.4, fifth step).
    (_S.FIN_WAIT_1, Close.FIN_ACKED): _S.FIN_WAIT_2,
    (_S.CLOSING, Close.FIN_ACKED): _S.TIME_WAIT,
    (_S.LAST_ACK, Close.FIN_ACKED): _S.CLOSED,
}

# The open side (3.10.7.2-3.10.7.4): the caller records a SYN (LISTEN), accepts
# it or connects, the peer's SYN or SYN-ACK and the handshake's ACK. A reset,
# an abort, a rejection or a timeout closes from any state.
_OPEN_SIDE = {
    (_S.CLOSED, _S.LISTEN),
    (_S.LISTEN, _S.SYN_RECEIVED),
    (_S.CLOSED, _S.SYN_SENT),
    (_S.SYN_SENT, _S.ESTABLISHED),
    (_S.SYN_SENT, _S.SYN_RECEIVED),  # simultaneous open
    (_S.SYN_RECEIVED, _S.ESTABLISHED),
}
ALLOWED: frozenset[tuple[State, State]] = frozenset(
    {(s, nxt) for (s, _), nxt in CLOSE_SIDE.items()}
    | _OPEN_SIDE
    | {(s, _S.CLOSED) for s in State if s is not _S.CLOSED}
)

SYNCHRONIZED = frozenset(
    {
        _S.ESTABLISHED,
        _S.FIN_WAIT_1,
        _S.FIN_WAIT_2,
        _S.CLOSE_WAIT,
        _S.CLOSING,
        _S.LAST_ACK,
        _S.TIME_WAIT,
    }
)
RECEIVING = frozenset({_S.ESTABLISHED, _S.FIN_WAIT_1, _S.FIN_WAIT_2})
LINGERING = frozenset({_S.ESTABLISHED, _S.CLOSE_WAIT})  # keepalive / idle timeout
