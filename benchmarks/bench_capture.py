"""What ``--capture-dir`` costs per byte, and why its writes go to a thread.

Run (no root): ``.venv/bin/python benchmarks/bench_capture.py [--mib N] [--dir DIR]``

1. The ``Capture`` analyzer alone, in one trio run: N MiB each way through its
   ``data`` hook in 64 KiB chunks, alternating directions (the pcap records
   built, the buffers filled, the files written from a thread into DIR): CPU
   seconds of this process per GiB relayed, and the wall time.
2. The writes themselves: the same volume appended to a file 256 KiB at a time
   (``DirectorySink.append``, as the thread does it), each timed: the median,
   p99 and worst write are how long the packet loop would stall, per flush, if
   it wrote synchronously. Page-cache writes are fast until the kernel's dirty
   limit throttles the writer; then they wait for the disk.
3. A ``trio.to_thread.run_sync`` round trip with nothing to do: what moving a
   write to a thread adds.
4. The two parts of 1 that no buffering removes: building the packets
   (``build_tcp_packet``, whose checksum reads every byte), CPU per GiB; and
   ``os.write`` of 1 MiB blocks, CPU per GiB written (capture writes each
   relayed byte twice).

Everything is bounded by ``--mib`` (default 256, at most 4096) and written to a
temporary directory under ``--dir`` (default: the system's), removed at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import trio

from relay.analysis.capture import Capture, DirectorySink
from relay.analysis.hooks import Direction, EndReason, FlowEnd, FlowInfo

CHUNK = 64 << 10
WRITE = 256 << 10


def bench_analyzer(path: str, mib: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) for ``mib`` MiB each way through ``Capture``."""
    sink = DirectorySink.open(path)
    capture = Capture(sink)
    info = FlowInfo("C" + "b" * 17, "tcp", "198.18.1.2", 40000, "198.18.2.2", 5201, 1.0, 4)
    chunk = os.urandom(CHUNK)
    rounds = (mib << 20) // CHUNK

    async def main() -> None:
        await capture.flow_start(info)
        for _ in range(rounds):
            await capture.data(info, Direction.CLIENT_TO_SERVER, chunk)
            await capture.data(info, Direction.SERVER_TO_CLIENT, chunk)
        await capture.flow_end(info, FlowEnd(EndReason.FIN, 0, 0, 1.0, history="ShADdFf"))

    cpu, wall = time.process_time(), time.perf_counter()
    try:
        trio.run(main)
    finally:
        sink.close()
    assert not capture.stopped, capture.stats
    return time.process_time() - cpu, time.perf_counter() - wall


def bench_writes(path: str, mib: int) -> list[float]:
    """Seconds per 256 KiB append, for ``mib`` MiB."""
    sink = DirectorySink.open(path)
    block = os.urandom(WRITE)
    times = []
    try:
        for _ in range((mib << 20) // WRITE):
            t = time.perf_counter()
            sink.append("writes.bin", [block])
            times.append(time.perf_counter() - t)
    finally:
        sink.close()
    return times


def bench_thread_hop(n: int = 2000) -> float:
    """Seconds per empty ``trio.to_thread.run_sync`` round trip."""

    async def main() -> float:
        t = time.perf_counter()
        for _ in range(n):
            await trio.to_thread.run_sync(int)
        return (time.perf_counter() - t) / n

    return trio.run(main)


def bench_parts(path: str, mib: int) -> tuple[float, float]:
    """(CPU s per GiB of packets built, CPU s per GiB written), over ``mib`` MiB."""
    from relay.analysis.pcapwriter import SEGMENT
    from stack.wire.tcp import ACK, build_tcp_packet

    payload = os.urandom(SEGMENT)
    n = (mib << 20) // SEGMENT
    cpu = time.process_time()
    for _ in range(n):
        build_tcp_packet(bytes(4), bytes(4), 1, 2, 3, 4, ACK, 5, b"", payload)
    build = (time.process_time() - cpu) * (1 << 30) / (n * SEGMENT)
    block = os.urandom(1 << 20)
    fd = os.open(os.path.join(path, "parts.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        cpu = time.process_time()
        for _ in range(mib):
            os.write(fd, block)
        write = (time.process_time() - cpu) * 1024 / mib
    finally:
        os.close(fd)
    return build, write


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mib", type=int, default=256, help="MiB each way (default 256)")
    parser.add_argument("--dir", default=None, help="where the temporary directory goes")
    args = parser.parse_args()
    if not 1 <= args.mib <= 4096:
        parser.error("--mib: 1..4096")
    with tempfile.TemporaryDirectory(prefix="bench-capture-", dir=args.dir) as tmp:
        cpu, wall = bench_analyzer(tmp, args.mib)
        total = sum(e.stat().st_size for e in os.scandir(tmp))
        gib = 2 * args.mib / 1024
        print(
            f"Capture analyzer: {2 * args.mib} MiB relayed, {total / 2**20:.0f} MiB written; "
            f"CPU {cpu / gib:.2f} s per GiB relayed ({8 * gib * 2**30 / cpu / 1e9:.1f} Gbit/s "
            f"of one core), wall {wall:.2f} s"
        )
        for e in os.scandir(tmp):
            os.unlink(e.path)
        times = bench_writes(tmp, 2 * args.mib)
        q = statistics.quantiles(times, n=100)
        print(
            f"256 KiB appends ({len(times)}): median {statistics.median(times) * 1e6:.0f} us, "
            f"p99 {q[98] * 1e6:.0f} us, worst {max(times) * 1e3:.1f} ms"
        )
        for e in os.scandir(tmp):
            os.unlink(e.path)
        build, write = bench_parts(tmp, 2 * args.mib)
        print(f"parts: packets built {build:.2f} s CPU per GiB; os.write {write:.2f} s per GiB")
    print(f"trio.to_thread round trip: {bench_thread_hop() * 1e6:.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
