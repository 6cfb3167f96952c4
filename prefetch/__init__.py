"""Prefetch machinery of pagecomm: the shared, LSN-aware, fair prefetch buffer."""

from ._buffer import HIT, JOINED, MISS, PrefetchBuffer, PrefetchCounters, ranges_overlap

__all__ = ["HIT", "JOINED", "MISS", "PrefetchBuffer", "PrefetchCounters", "ranges_overlap"]
