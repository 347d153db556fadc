"""A connection's timers: one absolute deadline per timer, in one place.

Each timer has its own field (seconds, or None when it is not running) and
its own ``set_*``/``clear_*`` pair, so every place that arms or stops a timer
can be found by name, and no field stands for two timers. ``earliest()`` is
the connection's ``get_timer()``. What happens when a deadline passes is
``TcpSender.handle_timer``'s work.

* ``rto``: retransmission (RFC 6298); also the SYN and SYN-ACK resend.
* ``tlp``: tail loss probe (RFC 8985 7), armed only to fire before ``rto``.
* ``ack``: delayed ACK (RFC 9293 3.8.6.3, RFC 5681 4.2).
* ``persist``: zero-window probe and SWS override (RFC 9293 3.8.6.1, 3.8.6.2.1).
* ``keepalive``: keepalive probe (RFC 9293 3.8.4, RFC 1122 4.2.3.6).
* ``idle``: the idle timeout, counted from the last segment heard; in
  SYN-RECEIVED, the bound on the handshake (``TcpConfig.synrecv_timeout``).
* ``time_wait``: the end of TIME-WAIT (2 MSL, RFC 9293 3.10.7.4).
* ``fin_wait_2``: the FIN-WAIT-2 timeout, counted from the last data received
  (RFC 9293 3.10.7.4 leaves it to the implementation; Linux's tcp_fin_timeout).

The keepalive and the idle timeout re-arm lazily: input records the time of
the last segment with one store, and a timer that finds the peer heard since
it was armed moves itself forward instead of acting.
"""

from __future__ import annotations

__all__ = ["Timers"]


class Timers:
    """The deadlines of one connection (absolute seconds; None: not running)."""

    __slots__ = ("ack", "fin_wait_2", "idle", "keepalive", "persist", "rto", "time_wait", "tlp")

    def __init__(self) -> None:
        self.rto: float | None = None
        self.tlp: float | None = None
        self.ack: float | None = None
        self.persist: float | None = None
        self.keepalive: float | None = None
        self.idle: float | None = None
        self.time_wait: float | None = None
        self.fin_wait_2: float | None = None

    def earliest(self) -> float | None:
        """The earliest deadline, or None when no timer runs.

        Unrolled: it runs for every connection a packet-loop pass touched, and a
        loop over a tuple of the fields costs a third more.
        """
        best = self.rto
        d = self.tlp
        if d is not None and (best is None or d < best):
            best = d
        d = self.ack
        if d is not None and (best is None or d < best):
            best = d
        d = self.persist
        if d is not None and (best is None or d < best):
            best = d
        d = self.keepalive
        if d is not None and (best is None or d < best):
            best = d
        d = self.idle
        if d is not None and (best is None or d < best):
            best = d
        d = self.time_wait
        if d is not None and (best is None or d < best):
            best = d
        d = self.fin_wait_2
        if d is not None and (best is None or d < best):
            best = d
        return best

    def clear_all(self) -> None:
        """Stop every timer (the connection is closed)."""
        self.rto = self.tlp = self.ack = self.persist = None
        self.keepalive = self.idle = self.time_wait = self.fin_wait_2 = None

    def set_rto(self, at: float) -> None:
        self.rto = at

    def clear_rto(self) -> None:
        self.rto = None

    def set_tlp(self, at: float) -> None:
        self.tlp = at

    def clear_tlp(self) -> None:
        self.tlp = None

    def set_ack(self, at: float) -> None:
        self.ack = at

    def clear_ack(self) -> None:
        self.ack = None

    def set_persist(self, at: float) -> None:
        self.persist = at

    def clear_persist(self) -> None:
        self.persist = None

    def set_keepalive(self, at: float) -> None:
        self.keepalive = at

    def clear_keepalive(self) -> None:
        self.keepalive = None

    def set_idle(self, at: float) -> None:
        self.idle = at

    def clear_idle(self) -> None:
        self.idle = None

    def set_time_wait(self, at: float) -> None:
        self.time_wait = at

    def clear_time_wait(self) -> None:
        self.time_wait = None

    def set_fin_wait_2(self, at: float) -> None:
        self.fin_wait_2 = at

    def clear_fin_wait_2(self) -> None:
        self.fin_wait_2 = None

    def __repr__(self) -> str:
        running = [(n, getattr(self, n)) for n in self.__slots__]
        return "Timers(" + ", ".join(f"{n}={at}" for n, at in running if at is not None) + ")"
