"""Requests of backend PROCESSES, as the communicator process executes them.

Theory of operation
-------------------
A ``ProcRequest`` is the cross-process twin of a join Slot: it owns the slot's
region of the backend's shared memory and completes when all its parts are done.
Its parts are pages served from the prefetch buffer (written at once), pages
joined from a prefetch in flight (the buffer calls ``deliver_part``), and wire
requests (``WireJob``, one per shard, handed to the shard workers like any job).
Every part writes its pages straight into the slot buffer the backend named, so
a page is copied once from the reply into shared memory and once out of it by the
backend. When the last part is done, the thread that completed it rings the
backend (the slot's event: see _attached.Attached.ring) and posts the request to
the front thread, which forgets it (or, for a backend without a completion FIFO,
sends the completion message).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from shards import BLCKSZ
from shards.protocol import Kind

from ._errors import CommClosed, WrongShard


class ProcRequest:
    __slots__ = ("owner", "slot", "use", "kind", "buf", "post", "parts", "error", "exists",
                 "count", "value", "abandoned", "rung", "redo", "t0", "t1", "_lock")

    def __init__(self, owner: Any, slot: int, use: int, kind: int, buf: memoryview,
                 post: Callable[[ProcRequest], None]) -> None:
        self.owner, self.slot, self.use, self.kind = owner, slot, use, kind
        self.buf, self.post = buf, post
        self.error: BaseException | None = None
        self.exists, self.count, self.value = False, 0, 0
        self.abandoned = False  # the backend gave up or died: finish, send nothing useful
        self.rung = False  # completed through the backend's FIFO (see _attached.Attached)
        self.t0 = time.monotonic()  # taken in by the front; t1: completed (for metrics)
        self.t1 = 0.0
        # GET_PAGES: the front's hook to read again positions whose part failed on its
        # own terms (a joined prefetch that failed, a shard that moved); True if taken
        # (request, positions, error, map generation of the failed part or -1)
        self.redo: Callable[[ProcRequest, list[int], BaseException, int], bool] | None = None
        # _lock guards: parts, error
        self._lock = threading.Lock()
        self.parts = 1  # the seal: released by seal() once every part has been added

    def add_part(self) -> None:
        with self._lock:
            self.parts += 1

    def seal(self) -> None:
        self.part_done()

    def write(self, i: int, page: bytes) -> None:
        """Write the page for request position ``i`` into the slot buffer."""
        if not self.abandoned:
            try:
                self.buf[i * BLCKSZ:(i + 1) * BLCKSZ] = page
            except ValueError:  # released: the backend died meanwhile
                self.abandoned = True

    # the prefetch buffer's waiter interface (see prefetch.PrefetchBuffer.lookup)
    def deliver_part(self, i: int, page: bytes) -> None:
        if i >= 0:
            self.write(i, page)
        self.part_done()

    def add_parts(self, n: int) -> None:
        with self._lock:
            self.parts += n

    def deliver_parts(self, items: list[tuple[int, bytes]], unused: int = 0) -> None:
        """Write several parts, and give back ``unused`` ones, completing at most once."""
        for i, page in items:
            self.write(i, page)
        with self._lock:
            self.parts -= len(items) + unused
            last = self.parts == 0
        if last:
            self.post(self)

    def fail_part(self, i: int, error: BaseException) -> None:
        """A joined prefetch failed. On its own terms (its deadline, a lost server, a
        split), the page is read again within this request's deadline, as a thread
        backend does; otherwise the request fails."""
        if not (i >= 0 and self.redo is not None and self.redo(self, [i], error, -1)):
            self.fail(error)
        self.part_done()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error

    def part_done(self) -> None:
        with self._lock:
            self.parts -= 1
            last = self.parts == 0
        if last:
            self.post(self)


class WireJob:
    """A wire request for some positions of a ProcRequest (the worker job interface)."""

    __slots__ = ("kind", "cls", "rel", "blocks", "lsn", "nms", "deadline", "attempt", "extra",
                 "shard", "qkey", "sent", "preq", "positions", "on_result", "gen")

    def __init__(self, preq: ProcRequest, kind: int, cls: int, rel: Any,
                 blocks: tuple[int, ...], positions: list[int], lsn: int, nms: int,
                 deadline: float, shard: int, extra: Any = None,
                 on_result: Callable[[Any], None] | None = None) -> None:
        self.preq, self.kind, self.cls, self.rel, self.blocks = preq, kind, cls, rel, blocks
        self.positions, self.lsn, self.nms, self.deadline = positions, lsn, nms, deadline
        self.shard, self.extra, self.on_result = shard, extra, on_result
        self.attempt, self.qkey, self.sent = 0, None, False
        self.gen = -1  # the shard map it was routed on (GET_PAGES): a WrongShard after a
        # split is read again on the new map

    batchable = True  # a worker may put it in one wire request with others (_batch.py)

    def is_live(self) -> bool:
        return not self.preq.abandoned

    def complete(self, result: Any) -> bool:
        p = self.preq
        if self.kind == Kind.GET_PAGES:
            for i, page in zip(self.positions, result, strict=True):
                p.write(i, page)
        elif self.kind == Kind.SLRU_SEGMENT:
            n = len(result) // BLCKSZ
            if not p.abandoned:
                try:
                    p.buf[:len(result)] = result
                except ValueError:  # released: the backend died meanwhile
                    p.abandoned = True
            p.count, p.value = n, len(result)
        elif self.kind == Kind.REL_SIZE:
            p.exists, p.value = result
        else:
            p.value = result
        if self.on_result is not None:
            self.on_result(result)
        p.part_done()
        return True

    def fail(self, error: BaseException) -> bool:
        p = self.preq
        if not (self.kind == Kind.GET_PAGES and isinstance(error, WrongShard)
                and p.redo is not None and p.redo(p, self.positions, error, self.gen)):
            p.fail(error)
        p.part_done()
        return True

    def describe(self) -> dict[str, Any]:
        return {"owner": getattr(self.preq.owner, "name", "?"), "state": "PROCESS",
                "kind": self.kind, "shard": self.shard, "rel": str(self.rel),
                "blocks": list(self.blocks), "lsn": self.lsn, "nms": self.nms,
                "attempt": self.attempt}


CLOSED = CommClosed("the communicator process is shutting down")
