"""What the packet-loop histogram costs per pass (``relay/datapath/looptime.py``).

The engine times each pass with ``trio.current_time()`` (the pass's ``now`` is
already read) and ``LoopLatency.observe``; this measures that line alone, and the
clock read alone, inside a trio run. No root needed:

    python benchmarks/bench_looptime.py
"""

from __future__ import annotations

import timeit

import trio

from relay.datapath.looptime import LoopLatency

N = 1_000_000


async def main() -> None:
    lat = LoopLatency()
    now = trio.current_time()
    for _ in range(3):
        base = timeit.timeit(lambda: None, number=N)
        clock = timeit.timeit(trio.current_time, number=N)
        line = timeit.timeit(lambda: lat.observe(trio.current_time() - now), number=N)
        print(
            f"trio.current_time(): {(clock - base) / N * 1e9:.0f} ns; "
            f"latency.observe(trio.current_time() - now): {(line - base) / N * 1e9:.0f} ns per pass"
        )


if __name__ == "__main__":
    trio.run(main)
