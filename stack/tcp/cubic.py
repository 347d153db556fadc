"""CUBIC congestion control (RFC 9438).

Theory of operation: after a congestion event the window follows a cubic
function of the time since the current congestion-avoidance stage began,

    W_cubic(t) = C * (t - K)**3 + W_max                       (RFC 9438 eq. 1)
    K = cbrt((W_max - cwnd_epoch) / C)                        (eq. 2)

in segments, with t in seconds: concave up to W_max (the window at the last
congestion event), flat around it, convex beyond. On each ACK in congestion
avoidance the window moves toward ``target = W_cubic(t + RTT)``, clamped to
[cwnd, 1.5 * cwnd] (4.2); where Reno would have done better (W_cubic(t) <
W_est, the Reno-friendly region, 4.3) it follows Reno's estimate instead.
A loss multiplies the window by beta = 0.7 (4.6) and, with fast convergence,
lowers W_max further when the flow is losing ground (4.7). Slow start is the
standard one (RFC 5681); HyStart++ (RFC 9406) is not implemented.

The window is kept in bytes (the interface's unit); the formulas run in
segments of ``mss`` bytes. Increments are scaled by the bytes an ACK covers
(RFC 3465 byte counting, as Linux and the RFC's note for byte-based
implementations do), so delayed ACKs do not halve the growth rate.
"""

from __future__ import annotations

from stack.tcp.congestion import CongestionControl, NewReno

C = 0.4  # RFC 9438 5.1: aggressiveness of the cubic function, segments / s**3
BETA = 0.7  # RFC 9438 4.6: multiplicative decrease factor
ALPHA = 3 * (1 - BETA) / (1 + BETA)  # RFC 9438 4.3: Reno-friendly additive increase


def cbrt(x: float) -> float:
    """The real cube root (negative for negative ``x``)."""
    root: float = abs(x) ** (1 / 3)
    return root if x >= 0 else -root


class Cubic(CongestionControl):
    """RFC 9438 CUBIC with fast convergence and the Reno-friendly region."""

    __slots__ = (
        "_frac",
        "_timed_out",
        "cwnd_epoch",
        "cwnd_prior",
        "fast_convergence",
        "k",
        "t_epoch",
        "w_est",
        "w_max",
    )

    def __init__(self, mss: int, *, fast_convergence: bool = True) -> None:
        super().__init__(mss)
        self.cwnd = 10 * mss  # RFC 6928 initial window
        self.fast_convergence = fast_convergence  # RFC 9438 4.7
        self.w_max = 0.0  # segments: the window just before the last reduction (4.7 may lower it)
        self.k = 0.0  # seconds the cubic function takes to return to w_max
        self.t_epoch: float | None = None  # start of the current congestion-avoidance stage
        self.cwnd_epoch = 0.0  # segments: cwnd when that stage began
        self.w_est = 0.0  # segments: Reno's window estimate (4.3)
        self.cwnd_prior = 0.0  # segments: cwnd before the last reduction (4.3's alpha switch)
        self._timed_out = False  # the next stage follows an RTO (4.8: K = 0)
        self._frac = 0.0  # bytes of growth not yet added to the integer cwnd

    def copy(self) -> Cubic:
        clone = Cubic(self.mss, fast_convergence=self.fast_convergence)
        clone.cwnd, clone.ssthresh = self.cwnd, self.ssthresh
        clone.w_max, clone.k, clone.t_epoch = self.w_max, self.k, self.t_epoch
        clone.cwnd_epoch, clone.w_est, clone.cwnd_prior = (
            self.cwnd_epoch,
            self.w_est,
            self.cwnd_prior,
        )
        clone._timed_out, clone._frac = self._timed_out, self._frac
        return clone

    def w_cubic(self, t: float) -> float:
        """RFC 9438 eq. 1: the cubic window, in segments, ``t`` seconds into the stage."""
        d = t - self.k
        return C * d * d * d + self.w_max

    def _start_epoch(self, now: float) -> None:
        self.t_epoch = now
        self.cwnd_epoch = self.cwnd / self.mss
        self.w_est = self.cwnd_epoch  # RFC 9438 4.3: W_est = cwnd_epoch at the stage start
        if self._timed_out or self.w_max <= self.cwnd_epoch:
            # RFC 9438 4.8 (after an RTO), and leaving slow start with no congestion
            # event yet: W_max is the window the stage starts with, K = 0.
            self.w_max = self.cwnd_epoch
            self.k = 0.0
        else:
            self.k = cbrt((self.w_max - self.cwnd_epoch) / C)  # RFC 9438 eq. 2
        self._timed_out = False
        self._frac = 0.0

    def on_ack(self, acked: int, flight: int, now: float, srtt: float, acks: int = 1) -> None:
        mss = self.mss
        if self.cwnd < self.ssthresh:
            if 2 * flight <= self.cwnd:
                return  # RFC 7661: not using half the window (Linux's slow-start test)
            # RFC 5681 3.1 slow start, with RFC 3465's L = 2*SMSS so that delayed
            # ACKs (each covering two segments) still double cwnd per RTT.
            self.cwnd += min(acked, 2 * mss * acks)
            return
        if flight + mss < self.cwnd:
            return  # RFC 9438 4.2 / RFC 7661: no growth while application-limited
        if self.t_epoch is None:
            self._start_epoch(now)
        t = now - (self.t_epoch or 0.0)
        cwnd = self.cwnd / mss
        segments = acked / mss
        # RFC 9438 4.3: W_est grows like Reno's window from the same starting point;
        # alpha becomes 1 once W_est has reached the window before the reduction.
        alpha = 1.0 if self.w_est >= self.cwnd_prior else ALPHA
        self.w_est += alpha * segments / cwnd
        if self.w_cubic(t) < self.w_est:
            new = self.w_est * mss  # the Reno-friendly region: cwnd = W_est
        else:
            # RFC 9438 4.4 / 4.5: toward W_cubic(t + RTT), clamped to [cwnd, 1.5 cwnd].
            target = min(max(self.w_cubic(t + srtt), cwnd), 1.5 * cwnd)
            new = self.cwnd + self._frac + (target - cwnd) / cwnd * segments * mss
        if new > self.cwnd:
            whole = int(new)
            self._frac = new - whole
            self.cwnd = whole

    def on_loss(self, flight: int, now: float) -> None:
        cwnd = self.cwnd / self.mss
        # RFC 9438 4.7 fast convergence: a window that peaked below the last W_max
        # means the share is shrinking; release more by lowering W_max further.
        if self.fast_convergence and cwnd < self.w_max:
            self.w_max = cwnd * (1 + BETA) / 2
        else:
            self.w_max = cwnd
        self.cwnd_prior = cwnd
        # RFC 9438 4.6: ssthresh = beta * cwnd (cwnd in place of flight_size, which
        # the RFC allows when cwnd cannot outgrow the data in flight -- on_ack's
        # application-limited test), never below 2 segments; cwnd = ssthresh.
        self.ssthresh = max(int(self.cwnd * BETA), 2 * self.mss)
        self.cwnd = self.ssthresh
        self.t_epoch = None  # the next stage starts at the first ACK after recovery
        self._frac = 0.0

    def on_timeout(self, flight: int, now: float) -> None:
        # RFC 9438 4.8: ssthresh as in 4.6, cwnd to one segment (RFC 5681), and the
        # next congestion-avoidance stage starts with K = 0, W_max = its first cwnd.
        self.cwnd_prior = self.cwnd / self.mss
        self.ssthresh = max(int(self.cwnd * BETA), 2 * self.mss)
        self.cwnd = self.mss
        self.t_epoch = None
        self._timed_out = True
        self._frac = 0.0


def make(name: str, mss: int) -> CongestionControl:
    """The congestion controller named by ``TcpConfig.congestion``."""
    return NewReno(mss) if name == "newreno" else Cubic(mss)
