"""Memory per idle TCP flow that a stream analyzer adds
(``python benchmarks/bench_stream_memory.py [N]``).

Opens N flows (default 2,000) through an ``AnalyzerChain`` with one stream
analyzer, lets every stream task start and wait for bytes, and reports what
``tracemalloc`` saw allocated per flow: the flow's ``FlowHooks``, the
adapter's per-flow state (two ``FlowStream``s, a cancel scope, an event) and
the task with its frames. No root, no network.
"""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.analysis.hooks import AnalyzerChain, FlowHooks, FlowInfo
from relay.analysis.streams import adapt_stream_analyzers


class OneTask:
    """Reads the client's bytes in the stream task itself."""

    async def stream(
        self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
    ) -> None:
        async for _ in c2s:
            pass


class ThreeTasks:
    """Reads both directions in a nursery of two tasks."""

    async def stream(
        self, flow: FlowInfo, c2s: trio.abc.ReceiveStream, s2c: trio.abc.ReceiveStream
    ) -> None:
        async with trio.open_nursery() as nursery:
            for side in (c2s, s2c):
                nursery.start_soon(self.read, side)

    async def read(self, side: trio.abc.ReceiveStream) -> None:
        async for _ in side:
            pass


async def per_flow(analyzer: object, n: int) -> float:
    wrapped, (adapter,) = adapt_stream_analyzers([analyzer])
    chain = AnalyzerChain(wrapped)
    async with trio.open_nursery() as nursery:
        adapter.nursery = nursery
        await trio.sleep(0.1)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        flows: list[FlowHooks] = []
        for i in range(n):
            info = FlowInfo(f"C{i}", "tcp", "198.18.0.2", i, "198.19.0.80", 80, 0.0, 4)
            flows.append(chain.open(info))
            await flows[-1].start()
        await trio.sleep(0.1)  # every stream task waits in receive_some
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        assert adapter.active_flows == n
        nursery.cancel_scope.cancel()
    return used / n


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    for cls in (OneTask, ThreeTasks):
        print(f"{cls.__name__}: {trio.run(per_flow, cls(), n) / 1024:.1f} KiB per idle flow")


if __name__ == "__main__":
    main()
