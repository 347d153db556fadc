"""Pauses of CPython's cyclic garbage collector, as relay counters.

The packet loop stops for as long as a collection runs, and a full one
(generation 2) scans every tracked object: about 55 per relayed TCP flow,
roughly 260 ms at 10,000 flows on the project machine. CPython starts one
when the objects that survived into the oldest generation grew by a quarter
and enough younger collections went by (``relay.service.run.relay_queue`` sets
that to 1,000 of generation 1, from 10). These counters make the pauses
visible in the exit and stats lines.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["GcStats", "GcWatch"]


@dataclass(slots=True)
class GcStats:
    """Collections since ``GcWatch.install``; pauses in milliseconds."""

    young_collections: int = 0  # generations 0 and 1
    full_collections: int = 0  # generation 2
    full_pause_max_ms: float = 0.0
    pause_total_ms: float = 0.0  # all generations

    def __str__(self) -> str:
        return (
            f"GcStats(young_collections={self.young_collections}, "
            f"full_collections={self.full_collections}, "
            f"full_pause_max_ms={self.full_pause_max_ms:.1f}, "
            f"pause_total_ms={self.pause_total_ms:.1f})"
        )


class GcWatch:
    """Times every collection of this process through ``gc.callbacks``."""

    def __init__(self) -> None:
        self.stats = GcStats()
        self._started = 0.0

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def remove(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._started) * 1e3
        stats = self.stats
        stats.pause_total_ms += ms
        if info.get("generation") == 2:
            stats.full_collections += 1
            stats.full_pause_max_ms = max(stats.full_pause_max_ms, ms)
        else:
            stats.young_collections += 1
