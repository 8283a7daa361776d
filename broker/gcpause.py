"""A shard's garbage collector: freeze what start-up made, time every pause.

Python's full (generation 2) collection walks every tracked object. A
shard serving 2,500 connections paused 60-85 ms for one, and one that
fell inside a publishing window was the p99 of the whole run (W2 over the
backend stream: p99 7.6-40 ms, max 68-146 ms). What a shard builds before
it serves (modules, config, the shard and its engine) lives as long as the
process, so ``freeze`` moves it out of the collector's sight for good:
full collections then took 22-28 ms and none fell inside the window
(p99 1.9-2.4 ms, max 53 ms). Frozen objects are still freed by reference
counting; only a cycle among them would never be collected.

``GcPauses`` times every collection (``gc.callbacks``) into a histogram:
``broker_gc_pause_seconds`` in /metrics.
"""
from __future__ import annotations

import gc
import time
from typing import Any

from .metrics import PowerHistogram

__all__ = ["GcPauses", "freeze"]


def freeze() -> int:
    """Collect once, then freeze every object alive now; the count frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class GcPauses:
    """The pause of each collection, in microsecond power-of-two buckets."""

    def __init__(self) -> None:
        self.histogram = PowerHistogram(size=22, unit=1e-6)  # up to ~2 s
        self.full_collections = 0
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.histogram.observe(time.perf_counter() - self._started)
        if info["generation"] == 2:
            self.full_collections += 1

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
