"""The out-of-order queue against a byte-map reference (hypothesis), its
accounting and caps, and its cost."""

from __future__ import annotations

import sys
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from stack.tcp.reassembly import RUN_OVERHEAD, Reassembly, _Run

STREAM = bytes(range(256)) * 8  # 2048 distinct-enough bytes
M = 0xFFFFFFFF

segments = st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 120)), min_size=1, max_size=40)


def _runs(held: dict[int, int]) -> list[list[int]]:
    """Maximal runs of held offsets, in order."""
    want: list[list[int]] = []
    for o in sorted(held):
        if want and want[-1][1] == o:
            want[-1][1] = o + 1
        else:
            want.append([o, o + 1])
    return want


@given(segments, st.integers(0, 2**32 - 1), st.integers(50, 4000), st.integers(1, 8))
@settings(max_examples=300, deadline=None)
def test_matches_a_byte_map(
    segs: list[tuple[int, int]], base: int, limit: int, max_runs: int
) -> None:
    # Offsets are relative to rcv_nxt = base (any 32-bit value: wraps included);
    # offset 0 stays a hole until the end, as when the first segment is lost.
    q = Reassembly(limit, max_runs)
    held: dict[int, int] = {}
    dropped = 0
    for off, n in segs:
        off = max(off, 1)
        data = STREAM[off : off + n]
        new = {o: STREAM[o] for o in range(off, off + len(data)) if o not in held}
        after = _runs(held | new)
        charged = len(held) + len(new) + RUN_OVERHEAD * len(after)
        fits = not new or (charged <= limit and len(after) <= max_runs)
        dropped += not fits
        assert q.insert(base, (base + off) & M, data) is fits
        if fits:
            held |= new
        assert q.size == len(held)
        assert q.charged == len(held) + RUN_OVERHEAD * len(_runs(held)) <= max(limit, 0)
        assert len(q) <= max_runs and q.dropped == dropped
        runs = _runs(held)
        want = [((base + a) & M, (base + b) & M) for a, b in runs]
        assert q.blocks() == want
        assert q.top_blocks(3) == want[::-1][:3]
        for o in (off - 1, off, off + n - 1, off + n):
            block = next((want[i] for i, (a, b) in enumerate(runs) if a <= o < b), None)
            assert q.block_at((base + o) & M) == block
    # Fill the hole: everything contiguous from offset 0 comes out, byte-exact.
    assert q.pop_ready(base) is None
    if 1 in held:
        got = q.pop_ready((base + 1) & M)
        assert got is not None
        n = 0
        while n + 1 in held:
            n += 1
        assert got == STREAM[1 : 1 + n]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.integers(0, 1500), st.integers(1, 300)),
        st.tuples(st.just("deliver"), st.integers(0, 300), st.just(0)),
    ),
    max_size=60,
)


@given(ops, st.integers(0, 2**32 - 1))
@settings(max_examples=300, deadline=None)
def test_inserts_and_deliveries_match_a_byte_map(
    script: list[tuple[str, int, int]], base: int
) -> None:
    # As the connection uses it: out-of-order inserts beyond rcv_nxt, and
    # in-order deliveries (of n bytes, possibly covering held data) followed by
    # pop_ready until it returns None; the stream comes out byte-exact.
    q = Reassembly(1 << 20, 64)
    held: dict[int, int] = {}  # absolute stream offset -> byte
    rcv = 0  # stream offset of rcv_nxt
    out = bytearray()
    for op, a, n in script:
        if op == "insert":
            off = rcv + 1 + a
            data = STREAM[off % 1024 : off % 1024 + n]
            if q.insert((base + rcv) & M, (base + off) & M, data):
                for i, b in enumerate(data):
                    held.setdefault(off + i, b)
        else:
            chunk = bytes(STREAM[(rcv + i) % 1024] for i in range(a))
            out += chunk
            rcv += a
            while (more := q.pop_ready((base + rcv) & M)) is not None:
                out += more
                rcv += len(more)
            for o in [o for o in held if o < rcv]:
                del held[o]
        assert q.size == len(held)
        assert len(q) == len(_runs(held))
    assert out == bytes(STREAM[i % 1024] for i in range(len(out)))


def test_a_long_run_behind_a_hole_is_linear() -> None:
    # 4 MiB held behind one hole: each arrival appends a chunk (no re-copying).
    q = Reassembly(8 << 20)
    seg = bytes(1448)
    for i in range(1, 2900):
        assert q.insert(0, i * 1448, seg)
    assert len(q) == 1 and len(q._runs[0].chunks) == 2899
    assert q.pop_ready(1448) == bytes(1448 * 2899)
    assert q.size == q.charged == 0


def test_one_byte_segments_are_joined_into_few_chunks() -> None:
    # A run of one-byte segments, arriving up or down, keeps chunks of >= 512
    # bytes (not one 34-byte object per byte held).
    for order in (range(1, 4001), range(4000, 0, -1)):
        q = Reassembly(1 << 20)
        for i in order:
            assert q.insert(0, i, STREAM[i % 2048 : i % 2048 + 1])
        assert len(q) == 1 and len(q._runs[0].chunks) <= 2 * 4000 // 512 + 1
        assert q.pop_ready(1) == bytes(STREAM[i % 2048] for i in range(1, 4001))


def test_run_overhead_covers_the_objects() -> None:
    # What one one-byte run costs in Python objects (CPython): the _Run, its
    # chunk list, the chunk, its two offsets and its slots in _runs and _starts.
    run = _Run(10**6, 10**6 + 1, [b"x"])
    cost = (
        sys.getsizeof(run)
        + sys.getsizeof(run.chunks)
        + sys.getsizeof(run.chunks[0])
        + sys.getsizeof(run.start)
        + sys.getsizeof(run.end)
        + 2 * 8
    )
    assert cost <= RUN_OVERHEAD < 2 * cost


def _flood(q: Reassembly, n: int) -> float:
    t0 = time.process_time()
    for i in range(1, n + 1):
        q.insert(0, 2 * i, b"x")  # one-byte runs, a one-byte hole between each
    return time.process_time() - t0


def test_a_flood_of_runs_is_capped_and_cheap() -> None:
    q = Reassembly(64 << 20, 1024)
    cpu = _flood(q, 32_000)
    assert len(q) == 1024 and q.dropped == 32_000 - 1024
    assert q.charged == 1024 * (1 + RUN_OVERHEAD) <= q.limit
    assert cpu < 0.5
    # Filling holes below the top merges runs: still a bisect and a few runs each.
    t0 = time.process_time()
    for i in range(1, 1024):
        assert q.insert(0, 2 * i + 1, b"y")
    assert time.process_time() - t0 < 0.5
    assert len(q) == 1 and q.charged == 2047 + RUN_OVERHEAD


def test_the_charge_stays_within_the_receive_buffers_room() -> None:
    # room: what the receive buffer has left beside delivered, unconsumed bytes.
    q = Reassembly(1 << 20)
    assert q.insert(0, 10, b"x", room=2 * RUN_OVERHEAD)
    assert not q.insert(0, 20, b"y", room=2 * RUN_OVERHEAD)  # a second run: over
    assert q.insert(0, 11, b"z", room=2 * RUN_OVERHEAD)  # extends the first: fits
    assert q.insert(0, 20, b"y") and q.dropped == 1


def test_holding_nothing_shares_the_empty_lists_and_gives_them_back() -> None:
    # Memory per idle connection: no list of its own until a segment is held,
    # none kept once the hole is filled; a write to the shared empty would raise.
    a, b = Reassembly(1 << 20), Reassembly(1 << 20)
    assert a._runs is b._runs and a._starts is b._starts
    assert a.insert(1000, 1100, b"y" * 100)
    assert a._runs is not b._runs and not b and len(a) == 1
    assert b.pop_ready(1000) is None
    assert a.pop_ready(1000) is None  # still a hole below
    assert a.insert(1000, 1000, b"x" * 100)  # fills the hole: one run
    assert a.pop_ready(1000) == b"x" * 100 + b"y" * 100
    assert not a and a._runs is b._runs and a._starts is b._starts
    assert a.insert(1200, 1300, b"z")  # and usable again
    assert a.block_at(1300) == (1300, 1301)
