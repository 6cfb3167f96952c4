"""The communicator's view of the shard map: endpoints, stripe size, and the worker
pool of each shard, as one immutable object swapped atomically on a split.

A call reads ``comm._map`` once and uses that object throughout (routing and the
worker it hands the request to), so a concurrent ``update_shards()`` can never
route a request with one map and deliver it to another map's workers.
"""

from __future__ import annotations

from typing import Any

from shards import INIT_FORKNUM, RelTag
from shards._shardmap import shard_for_unchecked as shard_for


class ShardMap:
    __slots__ = ("endpoints", "stripe", "count", "workers", "generation", "_cache")

    def __init__(self, endpoints: tuple[str, ...], stripe: int, workers: list[list[Any]],
                 generation: int) -> None:
        self.endpoints, self.stripe, self.count = endpoints, stripe, len(endpoints)
        self.workers = workers
        self.generation = generation
        self._cache: dict[tuple[int, int], int] = {}  # (relnode, stripe no) -> shard

    def shard_of(self, rel: RelTag, blkno: int) -> int:
        if self.count < 2:
            return 0
        key = (rel.rel if rel.fork != INIT_FORKNUM else -1, blkno // self.stripe)
        shard = self._cache.get(key)
        if shard is None:
            shard = shard_for(rel, blkno, self.count, self.stripe)
            if len(self._cache) > 1 << 16:
                self._cache.clear()
            self._cache[key] = shard
        return shard

    def worker_for(self, shard: int, bid: int) -> Any:
        """The worker of ``shard`` that backend ``bid`` uses (stable per backend, so a
        backend's requests to one shard keep their order)."""
        ws = self.workers[shard]
        return ws[bid % len(ws)]
