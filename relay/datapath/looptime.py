"""How long the packet loop's passes take: a fixed-bucket histogram.

One pass (drain, feed the stack, timers, events, write) is timed with the
clock trio already read for it plus one more read at its end; the bucket is
found by ``bisect`` over a dozen bounds. Measured 0.9-1.6 us per pass on a
loaded 2-core host (``benchmarks/bench_looptime.py``; half of it the clock
read), per pass and not per packet: a busy pass carries up to ``max_batch``
packets.
"""

from __future__ import annotations

from bisect import bisect_left

__all__ = ["LOOP_BUCKETS", "LoopLatency"]

# Upper bounds in seconds (Prometheus ``le``): 10 us .. 1 s; a pass beyond the
# last lands in the implicit +Inf bucket.
LOOP_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1.0,
)  # fmt: skip


class LoopLatency:
    """Counts of passes per bucket (not cumulative; the last is +Inf), and their sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LOOP_BUCKETS) + 1)
        self.total = 0.0  # seconds

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LOOP_BUCKETS, seconds)] += 1
        self.total += seconds
