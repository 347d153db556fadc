"""The out-of-order queue against a byte-map reference (hypothesis), and its cost."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from stack.tcp.reassembly import Reassembly

STREAM = bytes(range(256)) * 4  # 1024 distinct-enough bytes

segments = st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 120)), min_size=1, max_size=40)


@given(segments, st.integers(0, 2**32 - 1), st.integers(50, 2000))
@settings(max_examples=300, deadline=None)
def test_matches_a_byte_map(segs: list[tuple[int, int]], base: int, limit: int) -> None:
    # Offsets are relative to rcv_nxt = base (any 32-bit value: wraps included);
    # offset 0 stays a hole until the end, as when the first segment is lost.
    q = Reassembly(limit)
    held: dict[int, int] = {}
    for off, n in segs:
        off = max(off, 1)
        data = STREAM[off : off + n]
        new = [o for o in range(off, off + len(data)) if o not in held]
        fits = len(held) + len(new) <= limit
        assert q.insert(base, (base + off) & 0xFFFFFFFF, data) is (fits or not new)
        if fits:
            for o in new:
                held[o] = STREAM[o]
        assert q.size == len(held)
        # The SACK view: maximal runs of held offsets, in order.
        want, run = [], None
        for o in sorted(held):
            if run and run[1] == o:
                run[1] = o + 1
            else:
                run = [o, o + 1]
                want.append(run)
        assert q.blocks() == [((base + a) & 0xFFFFFFFF, (base + b) & 0xFFFFFFFF) for a, b in want]
    # Fill the hole: everything contiguous from offset 0 comes out, byte-exact.
    assert q.pop_ready(base) is None
    if 1 in held:
        got = q.pop_ready((base + 1) & 0xFFFFFFFF)
        assert got is not None
        n = 0
        while n + 1 in held:
            n += 1
        assert got == STREAM[1 : 1 + n]


def test_a_long_run_behind_a_hole_is_linear() -> None:
    # 4 MiB held behind one hole: each arrival appends a chunk (no re-copying).
    q = Reassembly(8 << 20)
    seg = bytes(1448)
    for i in range(1, 2900):
        assert q.insert(0, i * 1448, seg)
    assert len(q._runs) == 1 and len(q._runs[0].chunks) == 2899
    assert q.pop_ready(1448) == bytes(1448 * 2899)
    assert q.size == 0
