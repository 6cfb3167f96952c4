"""Backend: one thread's handle on the communicator.

Theory of operation
-------------------
A Backend owns a fixed ring of Slots and one ZeroMQ PUSH socket per shard,
created lazily in the thread that first calls it (ZeroMQ sockets belong to one
thread). A call validates its arguments, takes a free slot from the ring (a plain
list used as a stack: only the owner thread touches it, so no lock is shared with
other backends), arms it, registers it in the communicator's job table and pushes
its 8-byte key into the pipe of the shard that owns the block. It then waits on
the slot; the shard worker completes it and the caller wakes with the page, or
with a typed error raised here, in the caller's thread.

Slots whose caller stopped waiting (timeout, cancel) are "orphans" until the
worker lets go of them; the ring reclaims them as soon as they turn FREE.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prefetch import HIT, INFLIGHT, JOINED, MISS
from shards import MAX_BLOCKNO, MAX_BLOCKS_PER_REQUEST, RelTag
from shards.protocol import Kind, RequestClass, SlruKind

from ._doorbell import Doorbells, hand_over, must_ring
from ._errors import (
    Cancelled,
    CommClosed,
    InvalidRequest,
    RelationNotFound,
    RequestTimeout,
    ShardUnavailable,
    WrongShard,
)
from ._metrics import LatencyRecorder
from ._slot import Slot, SlotState
from ._validate import (
    FORKS,
    check_block,
    check_blocks,
    check_lsns,
    check_owner,
    check_rel,
    check_timeout,
    check_u32,
    forked_error,
)

if TYPE_CHECKING:
    from ._communicator import Communicator

_NORMAL = int(RequestClass.NORMAL)
_GET_PAGES = int(Kind.GET_PAGES)
_PREFETCH = int(RequestClass.PREFETCH)


class Backend:
    """A per-thread handle: ``get_page``, ``get_pages``, ``prefetch``, ``nblocks``,
    ``exists``, ``db_size``, ``slru_segment``. Use from one thread; ``cancel()`` and
    ``close()`` may come from any thread."""

    def __init__(self, comm: Communicator, bid: int, nslots: int) -> None:
        self._comm = comm
        self.id = bid
        self.name = f"backend-{bid}"
        self._slots = [Slot(i, (bid << 16) | i, self.name) for i in range(nslots)]
        self._free = list(range(nslots - 1, -1, -1))  # owner thread only
        self._orphans: list[Slot] = []  # owner thread only
        self._owner: int | None = None
        self._counts = {"reads": 0, "hits": 0, "joins": 0}  # pages; owner thread only
        self._latency = LatencyRecorder()  # call latencies; owner thread only
        self._timeout = comm.config.request_timeout
        self._buffer = comm._buffer
        # _lock guards: _bells (the sockets) and _closed; held while sending so that a
        # close() from another thread never closes a socket in use
        self._lock = threading.Lock()
        self._bells = Doorbells(comm._open_pipe)
        self._closed = False

    # ------------------------------------------------------------ public API
    def get_page(self, rel: RelTag, blkno: int, lsn: int, *,
                 not_modified_since: int | None = None, timeout: float | None = None) -> bytes:
        """The 8192-byte page ``blkno`` of ``rel``, newest version at or below ``lsn``."""
        t0 = time.monotonic()
        page = self._get_page(rel, blkno, lsn, not_modified_since, timeout, t0)
        self._latency.observe(_GET_PAGES, _NORMAL, time.monotonic() - t0)
        return page

    def _get_page(self, rel: RelTag, blkno: int, lsn: int, not_modified_since: int | None,
                  timeout: float | None, t0: float) -> bytes:
        self._enter()
        lsn, nms = check_lsns(lsn, not_modified_since)
        check_rel(rel)  # every call: see check_rel
        blkno = blkno if type(blkno) is int and 0 <= blkno <= MAX_BLOCKNO else check_block(blkno)
        deadline = t0 + check_timeout(timeout, self._timeout)
        counts = self._counts
        counts["reads"] += 1
        kind = MISS
        if self._buffer._entries:  # racy peek: an empty buffer needs no lock
            kind, val = self._buffer.lookup(rel, blkno, lsn, nms, None)
            if kind == HIT:  # served in this thread: no slot, no hop, no network
                counts["hits"] += 1
                return val
        slot = self._take_slot(deadline)
        if kind == INFLIGHT:  # join the prefetch on its way (it may land meanwhile)
            slot.arm_join(rel, lsn, nms, deadline)
            slot.add_part()
            kind, val = self._buffer.lookup(rel, blkno, lsn, nms, (slot, 0))
            if kind == JOINED:
                counts["joins"] += 1
                try:
                    self._promote(val)
                except BaseException:  # e.g. closed meanwhile: the slot must not be lost
                    slot.seal()
                    self._give_up(slot)
                    raise
                slot.seal()
                try:
                    return self._wait(slot, deadline)[0]
                except (ShardUnavailable, WrongShard):
                    # the prefetch failed on its own terms (its deadline, a split, a
                    # lost server): within our deadline, read the page ourselves
                    if time.monotonic() >= deadline:
                        raise
                slot = self._take_slot(deadline)
                kind = MISS
            else:
                slot.disarm()
            if kind == HIT:
                counts["hits"] += 1
                self._free.append(slot.index)
                return val
        while True:
            m = self._comm._map
            shard = m.shard_of(rel, blkno)
            slot.arm(Kind.GET_PAGES, _NORMAL, rel, (blkno,), lsn, nms, deadline, shard)
            self._submit_slot(slot, m.worker_for(shard, self.id))
            try:
                return self._wait(slot, deadline)[0]
            except WrongShard:
                if self._comm._map is m:
                    raise
                slot = self._take_slot(deadline)  # the map changed (a split): route again

    def get_pages(self, rel: RelTag, blocks: Iterable[int], lsn: int, *,
                  not_modified_since: int | None = None,
                  timeout: float | None = None) -> list[bytes]:
        """Pages of any blocks of one relation, in request order, from any shards."""
        t0 = time.monotonic()
        out = self._get_pages(rel, blocks, lsn, not_modified_since, timeout, t0)
        self._latency.observe(_GET_PAGES, _NORMAL, time.monotonic() - t0)
        return out

    def _get_pages(self, rel: RelTag, blocks: Iterable[int], lsn: int,
                   not_modified_since: int | None, timeout: float | None,
                   t0: float) -> list[bytes]:
        self._enter()
        lsn, nms = check_lsns(lsn, not_modified_since)
        rel = check_rel(rel)
        blks = check_blocks(blocks)
        deadline = t0 + check_timeout(timeout, self._timeout)
        out: list[Any] = [None] * len(blks)
        self._counts["reads"] += len(blks)
        join, missing = self._join_buffered(rel, blks, lsn, nms, deadline, out)
        if self._fetch(rel, blks, missing, lsn, nms, deadline, out, join):
            return out
        raise InvalidRequest(f"get_pages needs more wire requests than this backend's "
                             f"{len(self._slots)} slots (COMM_SLOTS_PER_BACKEND); ask for "
                             f"fewer blocks per call")

    def _fetch(self, rel: RelTag, blks: list[int], idxs: list[int], lsn: int, nms: int,
               deadline: float, out: list[Any], join: Slot | None = None) -> bool:
        """Fetch positions ``idxs`` of ``blks`` into ``out``: one wire request per shard
        per 32 blocks, routed with one shard map; blocks a server disowns after a split
        are fetched again on the new map. False if the ring is too small."""
        m = self._comm._map
        chunks = self._chunks(m, rel, blks, idxs)
        if len(chunks) > len(self._slots) - (join is not None):
            if join is not None:
                self._gather([], deadline, out, join)
            return False
        slots: list[tuple[Slot, list[int]]] = []
        try:
            for shard, pos in chunks:
                slot = self._take_slot(deadline)
                slot.arm(Kind.GET_PAGES, _NORMAL, rel, tuple(blks[i] for i in pos), lsn, nms,
                         deadline, shard)
                slots.append((slot, pos))
                self._submit(slot, m.worker_for(shard, self.id))
        except BaseException:  # no slot may be left behind: give up on the ones sent
            for slot, _ in slots:
                self._give_up(slot)
            if join is not None:
                self._give_up(join)
            raise
        moved = self._gather(slots, deadline, out, join, m)
        if moved and not self._fetch(rel, blks, moved, lsn, nms, deadline, out):
            raise InvalidRequest(f"{len(moved)} blocks to read again (their shard moved, or "
                                 f"the prefetch they joined failed); too many for the ring")
        return True

    def _join_buffered(self, rel: RelTag, blks: list[int], lsn: int, nms: int,
                       deadline: float, out: list[Any]) -> tuple[Slot | None, list[int]]:
        """Fill ``out`` from the prefetch buffer and join prefetches in flight (one
        join slot collects those). Returns the join slot and the positions to fetch."""
        if not self._buffer._entries or len(self._chunks(
                self._comm._map, rel, blks, range(len(blks)))) >= len(self._slots):
            return None, list(range(len(blks)))
        join = self._take_slot(deadline)
        join.arm_join(rel, lsn, nms, deadline)
        n = len(blks)
        join.add_parts(n)  # before the lookup: a part may be delivered as soon as it joins
        missing, joined, jobs = self._buffer.lookup_many(rel, blks, lsn, nms, join, out)
        self._counts["joins"] += joined
        self._counts["hits"] += n - joined - len(missing)
        try:
            for job in jobs:
                self._promote(job)
        except BaseException:  # e.g. closed meanwhile: the slot must not be lost
            join.deliver_parts([], n - joined + 1)
            self._give_up(join)
            raise
        join.deliver_parts([], n - joined + 1)  # give back the parts not joined + the seal
        return join, missing

    def _promote(self, job: Any) -> None:
        self._comm._promote(job, self._submit)

    def prefetch(self, rel: RelTag, blocks: Iterable[int], lsn: int, *,
                 not_modified_since: int | None = None, timeout: float | None = None) -> int:
        """Ask for pages ahead of need; returns at once with the number of pages newly
        queued. Never raises for server errors (a failed prefetch is just not there)."""
        self._enter()
        lsn, nms = check_lsns(lsn, not_modified_since)
        rel = check_rel(rel)
        blks = check_blocks(blocks)
        deadline = time.monotonic() + check_timeout(timeout, self._timeout)
        return self._comm._prefetch(self, rel, blks, lsn, nms, deadline)

    def nblocks(self, rel: RelTag, lsn: int, *, not_modified_since: int | None = None,
                timeout: float | None = None) -> int:
        """Number of blocks of ``rel`` at ``lsn``; RelationNotFound if it does not exist."""
        return self._relsize(rel, lsn, not_modified_since, timeout, False)[1]

    def exists(self, rel: RelTag, lsn: int, *, not_modified_since: int | None = None,
               timeout: float | None = None) -> bool:
        return self._relsize(rel, lsn, not_modified_since, timeout, True)[0]

    def db_size(self, db: int, lsn: int, *, not_modified_since: int | None = None,
                timeout: float | None = None) -> int:
        """Total size in bytes of database ``db`` at ``lsn``."""
        self._enter()
        lsn, nms = check_lsns(lsn, not_modified_since)
        db = check_u32(db, "db")
        return self._call(Kind.DB_SIZE, None, lsn, nms, timeout, db)

    def slru_segment(self, kind: int, segno: int, lsn: int, *,
                     not_modified_since: int | None = None,
                     timeout: float | None = None) -> bytes:
        """One SLRU segment (CLOG, multixact members/offsets) at ``lsn``."""
        self._enter()
        lsn, nms = check_lsns(lsn, not_modified_since)
        try:
            sk = SlruKind(kind)
        except ValueError:
            known = ", ".join(f"{k.value}={k.name}" for k in SlruKind)
            raise InvalidRequest(f"kind={kind!r} is not an SLRU kind ({known})") from None
        segno = check_u32(segno, "segno")
        return self._call(Kind.SLRU_SEGMENT, None, lsn, nms, timeout, (sk, segno))

    def cancel(self) -> int:
        """Make this backend's waiting call raise Cancelled now (any thread). Returns
        the number of requests cancelled."""
        n = 0
        for slot in self._slots:
            if slot.state == SlotState.PENDING:
                n += slot.cancel(Cancelled(f"{self.name}: request cancelled"))
        return n

    def stats(self) -> dict[str, int]:
        """This backend's pages read, and how many came from the prefetch buffer
        (``hits``) or from a prefetch already in flight (``joins``)."""
        return {**self._counts, "slots": len(self._slots), "slots_in_use": self.slots_in_use()}

    def slots_in_use(self) -> int:
        return sum(1 for s in self._slots if s.state != SlotState.FREE)

    def close(self) -> None:
        """Release this backend's sockets and slots. Safe to call twice, from any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._bells.close()
        for slot in self._slots:
            slot.cancel(CommClosed(f"{self.name} is closed"))
        self._comm._forget_backend(self)

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"<Backend {self.name} {state} slots={len(self._slots)} "
                f"in_use={self.slots_in_use()}>")

    # ------------------------------------------------------------ internals
    def _enter(self) -> None:
        if self._closed or self._comm._closed or self._comm._forks != FORKS[0]:
            if self._comm._forks != FORKS[0]:
                raise forked_error(f"{self.name} (its Communicator)")
            raise CommClosed(f"{self.name} is closed" if self._closed
                             else "the communicator is closed")
        self._owner = check_owner(self._owner, self.name,
                                  "create one backend per thread with Communicator.backend()")

    def _relsize(self, rel: Any, lsn: Any, nms: Any, timeout: Any,
                 allow_missing: bool) -> tuple[bool, int]:
        """(exists, nblocks), from the relation size cache when its answer holds."""
        self._enter()
        lsn, nms = check_lsns(lsn, nms)
        rel = check_rel(rel)
        cache = self._comm._relsizes
        ans = cache.get(rel, lsn, nms)
        if ans is None:
            ans = self._call(Kind.REL_SIZE, rel, lsn, nms, timeout, True)
            cache.put(rel, lsn, nms, *ans)
        if not ans[0] and not allow_missing:
            raise RelationNotFound(f"{rel} does not exist at lsn {lsn:#x}")
        return ans

    def _call(self, kind: int, rel: Any, lsn: int, nms: int, timeout: Any, extra: Any) -> Any:
        """One metadata request; these are served by shard 0."""
        t0 = time.monotonic()
        deadline = t0 + check_timeout(timeout, self._timeout)
        while True:
            slot = self._take_slot(deadline)
            m = self._comm._map
            slot.arm(kind, _NORMAL, rel, (), lsn, nms, deadline, 0, extra)
            self._submit_slot(slot, m.worker_for(0, self.id))
            try:
                result = self._wait(slot, deadline)
                break
            except WrongShard:
                if self._comm._map is m:
                    raise  # the map it was sent on holds: a real error
        self._latency.observe(kind, _NORMAL, time.monotonic() - t0)
        return result

    @staticmethod
    def _chunks(m: Any, rel: RelTag, blks: list[int],
                idxs: Iterable[int]) -> list[tuple[int, list[int]]]:
        """Group request positions by shard, at most 32 blocks per wire request."""
        by_shard: dict[int, list[int]] = {}
        for i in idxs:
            by_shard.setdefault(m.shard_of(rel, blks[i]), []).append(i)
        out = []
        for shard, pos in by_shard.items():
            for k in range(0, len(pos), MAX_BLOCKS_PER_REQUEST):
                out.append((shard, pos[k:k + MAX_BLOCKS_PER_REQUEST]))
        return out

    def _take_slot(self, deadline: float) -> Slot:
        while True:
            if self._free:
                return self._slots[self._free.pop()]
            if self._orphans:
                still: list[Slot] = []
                for s in self._orphans:  # one read of each state: a worker may free it
                    if s.state == SlotState.FREE:
                        self._free.append(s.index)
                    else:
                        still.append(s)
                self._orphans = still
                if self._free:
                    continue
            if time.monotonic() >= deadline:
                raise RequestTimeout(f"{self.name}: all {len(self._slots)} slots are held by "
                                     f"abandoned requests")
            if self._closed or self._comm._closed:
                raise CommClosed(f"{self.name} is closed")
            time.sleep(0.001)  # rare: only after timeouts/cancels; the worker frees them

    def _submit(self, job: Any, w: Any) -> None:
        """Hand a job to worker ``w``: append to its inbox, and ring its doorbell only
        if it may be sleeping (see comm/_worker.py)."""
        if not hand_over(w, job):
            return  # the worker had stopped: the job has failed (WrongShard or CommClosed)
        if must_ring(w, job) and not self._ring(w):
            if self._closed or self._comm._closed:
                raise CommClosed(f"{self.name} is closed; cannot reach the shard workers")
            raise ShardUnavailable(f"{self.name}: cannot wake {w.name} (its pipe refused "
                                   f"the doorbell)")

    def _submit_slot(self, slot: Slot, w: Any) -> None:
        """``_submit`` an armed slot; if that fails, the slot is given up, not lost."""
        try:
            self._submit(slot, w)
        except BaseException:
            self._give_up(slot)
            raise

    def _ring(self, w: Any) -> bool:
        with self._lock:
            return not self._closed and self._bells.ring(w)

    def _give_up(self, slot: Slot) -> None:
        """Stop waiting for ``slot`` without losing it: orphaned until the worker lets
        go, or back in the ring at once if it already completed."""
        if slot.abandon():
            self._orphans.append(slot)
            return
        try:
            slot.take()
        except BaseException:  # its outcome no longer matters
            pass
        finally:
            self._free.append(slot.index)

    def _wait(self, slot: Slot, deadline: float) -> Any:
        try:
            done = slot.wait(deadline - time.monotonic())
        except BaseException:  # e.g. KeyboardInterrupt: the slot comes back when let go
            self._give_up(slot)
            raise
        if not done and slot.abandon():
            self._orphans.append(slot)
            if slot.shard < 0:  # a join slot: pages of prefetches already in flight
                raise RequestTimeout(f"{self.name}: the prefetch this read joined ({slot.rel} "
                                     f"at lsn {slot.lsn:#x}) did not arrive within the "
                                     f"deadline")
            raise RequestTimeout(f"{self.name}: no reply from shard {slot.shard} within the "
                                 f"deadline for {Kind(slot.kind).name} {slot.rel} "
                                 f"{list(slot.blocks)} at lsn {slot.lsn:#x}"
                                 f"{self._comm._shard_trouble(slot.shard)}")
        state = slot.state
        if state == SlotState.DONE or state == SlotState.FAILED:
            self._free.append(slot.index)
            return slot.take()
        err = slot.error  # cancelled or closed from another thread
        if state == SlotState.FREE:
            self._free.append(slot.index)
        else:
            self._orphans.append(slot)
        raise err if err is not None else Cancelled(f"{self.name}: request cancelled")

    def _gather(self, slots: list[tuple[Slot, list[int]]], deadline: float, out: list[Any],
                join: Slot | None = None, m: Any = None) -> list[int]:
        """Wait for every slot (each must come back), fill ``out``; returns the positions
        to fetch again: their shard map changed under them, or the prefetches they
        joined failed on their own terms (as in get_page: read them ourselves)."""
        first: BaseException | None = None
        moved: list[int] = []
        for k, (slot, idxs) in enumerate(slots):
            try:
                pages = self._wait(slot, deadline)
            except WrongShard as e:
                if self._comm._map is m:
                    first = first or e
                else:
                    moved += idxs
                continue
            except Exception as e:  # keep collecting: every slot must come back
                first = first or e
                continue
            except BaseException:  # KeyboardInterrupt: stop now, the others come back later
                for rest, _ in slots[k + 1:]:
                    self._give_up(rest)
                if join is not None:
                    self._give_up(join)
                raise
            for i, page in zip(idxs, pages, strict=True):
                out[i] = page
        if join is not None:
            try:
                for i, page in self._wait(join, deadline).items():
                    out[i] = page
            except (ShardUnavailable, WrongShard) as e:
                # the prefetch's deadline, a split, a lost server: within ours, the
                # joined positions (all still empty) are fetched again
                if first is None and time.monotonic() < deadline:
                    moved += [i for i, page in enumerate(out) if page is None
                              and i not in moved]
                else:
                    first = first or e
            except Exception as e:  # (a KeyboardInterrupt goes at once: the slot is given up)
                first = first or e
        if first is not None:
            raise first
        return moved
