"""Prefetch machinery of pagecomm: the shared, LSN-aware, fair prefetch buffer and the
relation size cache."""

from ._buffer import HIT, INFLIGHT, JOINED, MISS, PrefetchBuffer, PrefetchCounters, ranges_overlap
from ._relsize import RelSizeCache

__all__ = ["HIT", "INFLIGHT", "JOINED", "MISS", "PrefetchBuffer", "PrefetchCounters",
           "RelSizeCache",
           "ranges_overlap"]
