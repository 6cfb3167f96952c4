"""Prefetch machinery of pagecomm: the shared, LSN-aware, fair prefetch buffer."""

from ._buffer import PrefetchBuffer, PrefetchCounters, ranges_overlap

__all__ = ["PrefetchBuffer", "PrefetchCounters", "ranges_overlap"]
