"""The shared prefetch buffer: pages fetched ahead of need, for any backend.

Theory of operation
-------------------
Entries are keyed by (rel, block) and remember the LSN range they were fetched
for, ``[nms, lsn]``. A page fetched for [nms_a, lsn_a] may serve a read for
[nms_b, lsn_b] iff nms_b <= lsn_a and nms_a <= lsn_b: both ranges then contain a
common LSN at which the page did not change, so both readers would get the same
version. An entry is PENDING from ``reserve()`` until the worker ``fill()``s it
(READY) or ``discard()``s it (failed fetch). A read that hits a READY entry takes
the page in the caller's thread, with no thread hop and no network request, and
the entry is marked consumed (first to go when space is needed).

Fairness: every backend that owns entries gets an equal share of the capacity.
To make room, the buffer drops a consumed entry first, then the oldest entry of
the backend most over its share, and a backend may not reserve past its share
when others are waiting on theirs (back-pressure: the prefetch is dropped and
counted). One fast scan therefore cannot flush a slow scan's unread pages.

One lock guards everything; the critical sections are dictionary operations.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

PENDING = 0
READY = 1


HIT = 1     # lookup(): the page is here
JOINED = 2  # lookup(): the page is on its way; the waiter will be completed with it
MISS = 0    # lookup(): not here, not coming
INFLIGHT = 3  # lookup() without a waiter: on its way; ask again with one to join


class _Entry:
    __slots__ = ("state", "lsn", "nms", "page", "owner", "consumed", "job", "waiters")

    def __init__(self, owner: int, lsn: int, nms: int) -> None:
        self.state = PENDING
        self.lsn, self.nms = lsn, nms
        self.page: bytes | None = None
        self.owner = owner
        self.consumed = False
        self.job: Any = None  # the request fetching it (for promotion)
        self.waiters: list[Any] = []  # foreground reads that joined it


def ranges_overlap(nms_a: int, lsn_a: int, nms_b: int, lsn_b: int) -> bool:
    """Whether a page read for [nms_a, lsn_a] is also right for [nms_b, lsn_b]."""
    return nms_b <= lsn_a and nms_a <= lsn_b


@dataclass
class PrefetchCounters:
    issued: int = 0        # pages reserved and sent to a page server
    deduplicated: int = 0  # prefetch asks for a page already buffered or in flight
    hits: int = 0          # reads served from the buffer
    wasted: int = 0        # evicted or invalidated before anyone read them
    dropped: int = 0       # refused for lack of room (back-pressure)
    late: int = 0          # arrived after the page had been read in the foreground
    joins: int = 0         # foreground reads that joined a prefetch in flight
    promotions: int = 0    # queued prefetches promoted to foreground priority
    failed: int = 0        # the page server could not deliver


class PrefetchBuffer:
    """Bounded, shared, LSN-aware page buffer with per-backend fair shares."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # _lock guards: _entries, _by_owner (unread entries per backend), _consumed (read
        # and READY entries, oldest first), counters
        self._lock = threading.Lock()
        self._entries: dict[tuple[Any, int], _Entry] = {}
        self._by_owner: dict[int, OrderedDict[tuple[Any, int], None]] = {}
        self._consumed: OrderedDict[tuple[Any, int], None] = OrderedDict()
        self.counters = PrefetchCounters()

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------ readers
    def lookup(self, rel: Any, blk: int, lsn: int, nms: int, waiter: Any) -> tuple[int, Any]:
        """Serve a foreground read: (HIT, page), (JOINED, job) after registering
        ``waiter`` to be completed with the page, or (MISS, None). Runs in the reader's
        thread; with ``waiter=None`` a page in flight gives (INFLIGHT, job)."""
        key = (rel, blk)
        with self._lock:
            e = self._entries.get(key)
            if e is None or not ranges_overlap(e.nms, e.lsn, nms, lsn):
                return MISS, None
            if e.state == READY:
                self.counters.hits += 1
                self._consume(key, e)
                return HIT, e.page
            if waiter is None:
                return INFLIGHT, e.job
            self.counters.joins += 1
            e.waiters.append(waiter)
            self._consume(key, e)
            return JOINED, e.job

    def lookup_many(self, rel: Any, blocks: list[int], lsn: int, nms: int, join: Any,
                    out: list[Any]) -> tuple[list[int], int, list[Any]]:
        """``lookup`` for many blocks of one relation under ONE lock acquisition (the
        buffer lock is contended by every backend and worker: one hold per call, not
        per page). Hits go to ``out[i]``; pages in flight are joined as ``(join, i)``.
        Returns (positions missing, number joined, the distinct jobs joined)."""
        missing: list[int] = []
        jobs: dict[int, Any] = {}
        joined = 0
        entries, c = self._entries, self.counters
        with self._lock:
            for i, blk in enumerate(blocks):
                key = (rel, blk)
                e = entries.get(key)
                if e is None or not (nms <= e.lsn and e.nms <= lsn):  # ranges_overlap
                    missing.append(i)
                    continue
                if e.state == READY:
                    c.hits += 1
                    out[i] = e.page
                else:
                    c.joins += 1
                    joined += 1
                    e.waiters.append((join, i))
                    jobs[id(e.job)] = e.job
                self._consume(key, e)
        return missing, joined, list(jobs.values())

    def take(self, rel: Any, blk: int, lsn: int, nms: int) -> bytes | None:
        """The buffered page for this read, or None (never joins)."""
        kind, page = self.lookup(rel, blk, lsn, nms, None)
        return page if kind == HIT else None

    def attach(self, rel: Any, blocks: tuple[int, ...], lsn: int, job: Any) -> None:
        """Remember which request fetches the reserved ``blocks`` (for promotion)."""
        with self._lock:
            for blk in blocks:
                e = self._entries.get((rel, blk))
                if e is not None and e.state == PENDING and e.lsn == lsn:
                    e.job = job

    def note_promotion(self) -> None:
        with self._lock:
            self.counters.promotions += 1

    def note_foreground(self, rel: Any, blk: int, lsn: int, nms: int) -> None:
        """A foreground read went to the server: a prefetch for it arriving later is late."""
        key = (rel, blk)
        if key not in self._entries:  # racy peek: the common case needs no lock
            return
        with self._lock:
            e = self._entries.get(key)
            if e is not None and e.state == PENDING and ranges_overlap(e.nms, e.lsn, nms, lsn):
                self._consume(key, e)

    # ------------------------------------------------------------ prefetchers
    def reserve(self, owner: int, rel: Any, blocks: list[int], lsn: int, nms: int) -> list[int]:
        """Reserve PENDING entries for ``blocks``; returns the blocks to fetch now."""
        out = []
        # Once there is no room for this owner, there is none for the rest of the call
        # either (nothing else changes under the lock, except an entry removed below):
        # without this, a long prefetch into a full buffer scanned the owner's entries
        # once per block, holding the lock that every reader needs (seconds for 20k).
        full = False
        with self._lock:
            c = self.counters
            for blk in blocks:
                key = (rel, blk)
                e = self._entries.get(key)
                if e is not None:
                    if ranges_overlap(e.nms, e.lsn, nms, lsn):
                        c.deduplicated += 1
                        continue
                    if e.state == PENDING:  # another LSN's fetch in flight: leave it be
                        c.dropped += 1
                        continue
                    self._remove(key, e)
                    full = False
                if full or self._at_share(owner) or not self._make_room(owner):
                    full = True
                    c.dropped += 1
                    continue
                self._entries[key] = _Entry(owner, lsn, nms)
                self._by_owner.setdefault(owner, OrderedDict())[key] = None
                c.issued += 1
                out.append(blk)
        return out

    def fill(self, rel: Any, blk: int, lsn: int, page: bytes) -> list[Any]:
        """A prefetched page arrived (worker thread). Returns the joined waiters, to
        be completed by the caller outside the lock."""
        return [(slot, i) for slot, i, _ in self.fill_many(rel, (blk,), lsn, (page,))]

    def fill_many(self, rel: Any, blocks: tuple[int, ...], lsn: int,
                  pages: Any) -> list[tuple[Any, int, bytes]]:
        """``fill`` for every page of one reply under one lock acquisition. Returns
        (waiter slot, position, page) for the joined readers, to complete outside it."""
        out: list[tuple[Any, int, bytes]] = []
        entries = self._entries
        with self._lock:
            for blk, page in zip(blocks, pages, strict=True):
                key = (rel, blk)
                e = entries.get(key)
                if e is None or e.state != PENDING or e.lsn != lsn:
                    continue
                e.state, e.page, e.job = READY, page, None
                waiters, e.waiters = e.waiters, []
                if e.consumed:
                    self._consumed[key] = None  # already read: first to make room
                    if not waiters:  # read in the foreground meanwhile
                        self.counters.late += 1
                for slot, i in waiters:
                    out.append((slot, i, page))
        return out

    def discard_many(self, rel: Any, blocks: tuple[int, ...], lsn: int) -> list[Any]:
        """``discard`` for every block of a failed request; returns the joined waiters."""
        out: list[Any] = []
        with self._lock:
            for blk in blocks:
                key = (rel, blk)
                e = self._entries.get(key)
                if e is None or e.state != PENDING or e.lsn != lsn:
                    continue
                self.counters.failed += 1
                self._remove(key, e)
                out += e.waiters
        return out

    def discard(self, rel: Any, blk: int, lsn: int) -> list[Any]:
        """A prefetch failed: forget the reservation; returns the joined waiters."""
        return self.discard_many(rel, (blk,), lsn)

    def forget_owner(self, owner: int) -> None:
        """A backend left: its unread pages stay (others may read them) but count for
        nobody's share; they are evicted first."""
        with self._lock:
            keys = self._by_owner.pop(owner, None)
            if keys:
                orphan = self._by_owner.setdefault(-1, OrderedDict())
                for k in keys:
                    self._entries[k].owner = -1
                    orphan[k] = None

    def clear(self) -> list[Any]:
        """Drop everything; returns the waiters of entries still in flight."""
        waiters: list[Any] = []
        with self._lock:
            for key, e in list(self._entries.items()):
                waiters += e.waiters
                self._remove(key, e)
        return waiters

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            d = dict(vars(self.counters))
            d["buffered"] = len(self._entries)
            d["pending"] = sum(1 for e in self._entries.values() if e.state == PENDING)
            d["capacity"] = self.capacity
            d["owners"] = sum(1 for o in self._by_owner.values() if o)
            return d

    # ------------------------------------------------------------ eviction (under _lock)
    def _remove(self, key: tuple[Any, int], e: _Entry) -> None:
        del self._entries[key]
        if e.consumed:
            self._consumed.pop(key, None)
            return
        if e.state == READY:
            self.counters.wasted += 1
        self._disown(key, e)

    def _disown(self, key: tuple[Any, int], e: _Entry) -> None:
        owned = self._by_owner.get(e.owner)
        if owned is not None:
            owned.pop(key, None)
            if not owned:
                del self._by_owner[e.owner]

    def _consume(self, key: tuple[Any, int], e: _Entry) -> None:
        if not e.consumed:
            e.consumed = True
            self._disown(key, e)
            if e.state == READY:  # in flight: fill() files it once it lands
                self._consumed[key] = None

    def _at_share(self, owner: int) -> bool:
        """Whether ``owner`` already holds its fair share of unread (ready or in-flight)
        pages while other backends hold some too. In-flight pages cannot be evicted,
        so the share must be enforced when reserving, not only when evicting."""
        mine = self._by_owner.get(owner)
        if not mine:
            return False
        # _by_owner holds only non-empty maps (see _disown); -1 holds departed backends'
        others = len(self._by_owner) - 1 - (-1 in self._by_owner)
        return others > 0 and len(mine) >= self.capacity // (others + 1)

    def _make_room(self, owner: int) -> bool:
        if self.capacity <= 0:
            return False
        if len(self._entries) < self.capacity:
            return True
        if self._consumed:  # pages already read go first (only READY ones are listed)
            key = next(iter(self._consumed))
            self._remove(key, self._entries[key])
            return True
        if -1 in self._by_owner:  # pages of backends that left
            return self._evict_oldest(-1)
        active = [o for o, keys in self._by_owner.items() if keys]
        if not active:  # everything is in flight and already read (joined): wait
            return False
        share = self.capacity // max(1, len(active) + (owner not in self._by_owner))
        victim = max(active, key=lambda o: len(self._by_owner[o]))
        if len(self._by_owner[victim]) <= share and victim != owner:
            return False  # nobody is over their share: back-pressure on the asker
        if victim != owner and len(self._by_owner.get(owner, ())) >= share:
            return False  # the asker is at its share already
        return self._evict_oldest(victim)

    def _evict_oldest(self, owner: int) -> bool:
        keys = self._by_owner[owner]
        for key in keys:
            e = self._entries[key]
            if e.state == READY:
                self._remove(key, e)
                return True
        return False  # only in-flight entries: cannot evict those
