"""Where a request/response exchange through the Stack goes, by part.

cProfile of ``bench_stack.run_pingpong`` (64-byte ping-pong, N exchanges);
each function's self time and calls per exchange, summed into the groups
below by substrings of ``file:function``. cProfile charges every call its own
overhead, so many small calls weigh more than they would without it: use it
for the shape, and callgrind's instruction counts for the totals
(benchmarks/README.md).

Run: ``PYTHONPATH=. python benchmarks/profile_pingpong.py [N]``
"""

from __future__ import annotations

import cProfile
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_stack

GROUPS: list[tuple[str, tuple[str, ...]]] = [
    ("the benchmark's own packets", ("bench_stack", "build_tcp_packet", "encode_options",
                                     "perf_counter")),
    ("parse and checksum in", ("parse_ip", "parse_tcp", "verify", "ones_sum", "from_bytes",
                               "pseudo_sum", "unpack_from", "_parse_options")),
    ("ACK path", ("_predicted", "_on_new_ack", "_update_window", "rtt.py", "timestamps.py:update",
                  "timestamps.py:rtt", "on_segment", "cubic", "congestion", "on_ack", "__bool__",
                  "_deliver", "_delivered", "consumed")),
    ("output", ("segments_to_send", "_send_data", "_sent", "_options", "_advertise",
                "_window_increase", "_free", "emit.py", "partial_csum", "offload_packet",
                "_segment", "_ack_sent", "__new__", "pack", "_tcp_options", "_sack_len", "_edge",
                "join", "connection.py:send", "timestamps.py:clock", "memoryview")),
    ("timers", ("_file_timer", "_tcp_timer", "get_timer", "handle_timer", "_arm_probe",
                "earliest", "heap", "expire", "_after_output", "_quiet", "set_", "clear_")),
    ("events", ("flush_data", "next_event", "_emit", "popleft", "events.py", "<string>:__init__")),
    ("FlowId hash and flow lookups", ("__hash__", "dict' objects", "stack.py:send",
                                      "stack.py:consumed")),
    ("Stack.receive, end_batch, packets_to_send", ("stack.py:receive", "end_batch",
                                                   "packets_to_send", "_after_segment", "_build")),
    ("sequence arithmetic", ("seq.py",)),
]  # fmt: skip


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    profile = cProfile.Profile()
    profile.enable()
    bench_stack.run_pingpong(n)
    profile.disable()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    totals: dict[str, list[float]] = {name: [0.0, 0.0] for name, _ in GROUPS}
    totals["other"] = [0.0, 0.0]
    all_time = all_calls = 0.0
    for (file, _, function), (_, calls, self_time, _, _) in stats.items():
        key = f"{file.rsplit('/', 1)[-1]}:{function}"
        group = next((name for name, pats in GROUPS if any(p in key for p in pats)), "other")
        totals[group][0] += self_time
        totals[group][1] += calls / n
        all_time += self_time
        all_calls += calls / n
    print(f"{all_calls:.0f} calls per exchange")
    print("| part | share of self time | calls per exchange |")
    for name, (t, c) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
        print(f"| {name} | {100 * t / all_time:.0f} % | {c:.0f} |")


if __name__ == "__main__":
    main()
