"""A bounded cache of relation sizes, reused under the same LSN rule as pages.

An answer obtained for [nms_a, lsn_a] (exists, nblocks) also holds for a later
question about [nms_b, lsn_b] iff the two ranges share an LSN (``ranges_overlap``):
the caller promises the relation did not change between its nms and lsn. Least
recently used entries are dropped past ``capacity``. Called from backend threads;
one lock guards the dictionary.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from ._buffer import ranges_overlap


class RelSizeCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # _lock guards: _entries, hits, misses
        self._lock = threading.Lock()
        self._entries: OrderedDict[Any, tuple[int, int, bool, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, rel: Any, lsn: int, nms: int) -> tuple[bool, int] | None:
        """(exists, nblocks) if a cached answer holds for [nms, lsn], else None."""
        with self._lock:
            e = self._entries.get(rel)
            if e is not None and ranges_overlap(e[0], e[1], nms, lsn):
                self._entries.move_to_end(rel)
                self.hits += 1
                return e[2], e[3]
            self.misses += 1
            return None

    def put(self, rel: Any, lsn: int, nms: int, exists: bool, nblocks: int) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._entries[rel] = (nms, lsn, exists, nblocks)
            self._entries.move_to_end(rel)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "cached": len(self._entries),
                    "capacity": self.capacity}
