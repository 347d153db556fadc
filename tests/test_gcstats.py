"""``relay.service.gcstats``: collections are counted and timed through ``gc.callbacks``."""

from __future__ import annotations

import gc
import itertools

from relay.service.gcstats import GcWatch


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_full_and_young_collections_are_counted_and_timed() -> None:
    watch = GcWatch()
    watch.install()
    watch.install()  # once only
    try:
        nodes = [Node() for _ in range(20_000)]
        for a, b in itertools.pairwise(nodes):
            a.other, b.other = b, a  # cycles: only the collector frees them
        del nodes, a, b
        gc.collect(0)
        gc.collect(2)
    finally:
        watch.remove()
    s = watch.stats
    assert s.young_collections >= 1
    assert s.full_collections >= 1
    assert 0.0 < s.full_pause_max_ms <= s.pause_total_ms
    assert "full_collections=" in str(s)
    gc.collect(2)  # after remove(): no longer counted
    assert watch.stats.full_collections == s.full_collections
