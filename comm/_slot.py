"""A request slot: a small future shared by one backend and one shard worker.

Theory of operation
-------------------
Each backend owns a fixed ring of slots. A slot is FREE in the backend's hands;
``arm()`` fills in a request and makes it PENDING, and from then on the
communicator owns it until a worker calls ``complete()`` or ``fail()`` exactly
once (a second completion is an InvalidStateError: it would mean a reply was
delivered twice). The waiter blocks on ``_done``, a plain lock used as a one-shot
event: it is held while the slot is armed and released by the completer. A bare
lock is CPython's cheapest blocking primitive (threading.Event adds a Condition
and a second lock), and wakeups dominate this design's cost.

A caller that stops waiting (timeout, cancel, backend closed) ``abandon()``s the
slot: it stays out of the ring until the worker finishes with it (late reply,
worker-side deadline, shutdown), which turns it FREE again; the backend then
reclaims it. So a slot is never written by a worker while a backend reuses it.
"""

from __future__ import annotations

import logging
import threading
from enum import IntEnum
from typing import Any

from ._errors import InvalidStateError

log = logging.getLogger(__name__)


class SlotState(IntEnum):
    FREE = 0
    PENDING = 1
    DONE = 2
    FAILED = 3
    ABANDONED = 4


class Slot:
    """One request in flight. Fields other than the lock-guarded ones are written by
    the backend before ``arm()`` and only read by the worker after."""

    __slots__ = ("index", "key", "owner", "kind", "cls", "rel", "blocks", "lsn", "nms",
                 "deadline", "attempt", "extra", "shard", "qkey", "sent", "state", "result",
                 "error", "parts", "_lock", "_done")

    batchable = True  # a worker may put it in one wire request with others (_batch.py)

    def __init__(self, index: int, key: int, owner: str) -> None:
        self.index = index
        self.key = key
        self.owner = owner  # backend name, for diagnostics
        self.kind = 0
        self.cls = 0
        self.rel: Any = None
        self.blocks: tuple[int, ...] = ()
        self.lsn = 0
        self.nms = 0
        self.deadline = 0.0
        self.attempt = 0
        self.extra: Any = None  # allow_missing / db / (slru_kind, segno)
        self.shard = 0
        self.qkey: Any = None  # the worker's queue entry while queued (worker thread only)
        self.sent = False  # put on the wire at least once (worker thread only)
        # _lock guards: state, result, error (and the release of _done)
        self._lock = threading.Lock()
        self.state = SlotState.FREE
        self.result: Any = None
        self.error: BaseException | None = None
        self.parts = 0  # join slots: parts still to come, plus one until sealed
        self._done = threading.Lock()
        self._done.acquire()  # held while no completion is pending

    def arm(self, kind: int, cls: int, rel: Any, blocks: tuple[int, ...], lsn: int, nms: int,
            deadline: float, shard: int, extra: Any = None) -> None:
        if self.state != SlotState.FREE:
            raise InvalidStateError(f"slot {self.key:#x} armed while {self.state.name}")
        self.kind, self.cls, self.rel, self.blocks = kind, cls, rel, blocks
        self.lsn, self.nms, self.deadline, self.shard = lsn, nms, deadline, shard
        self.extra = extra
        self.attempt = 0
        self.qkey, self.sent = None, False
        self.result = self.error = None
        self.state = SlotState.PENDING

    def disarm(self) -> None:
        """Undo ``arm()`` of a slot that was never handed to anyone. A cancel() from
        another thread may have released ``_done`` meanwhile: take it back, so the
        slot's next use waits for its own completion."""
        with self._lock:
            if self.state == SlotState.ABANDONED:
                self._done.acquire(False)
            self.state, self.rel, self.result, self.error = SlotState.FREE, None, None, None

    # A join slot collects pages that prefetches already in flight will deliver:
    # ``arm_join()`` it, add parts BEFORE the pages can be joined (``add_part()`` per
    # page, or ``add_parts(n)`` for a whole lookup), give back the parts that did not
    # join and the seal (``deliver_parts([], unused + 1)``, or ``seal()``). It
    # completes when every part has been delivered or failed (the seal counts as one
    # part, so an early delivery cannot complete it while parts are still added).
    def arm_join(self, rel: Any, lsn: int, nms: int, deadline: float) -> None:
        self.arm(1, 0, rel, (), lsn, nms, deadline, -1)
        self.result, self.parts = {}, 1

    def add_part(self) -> None:
        with self._lock:
            self.parts += 1

    def seal(self) -> None:
        self.deliver_part(-1, None)

    def add_parts(self, n: int) -> None:
        with self._lock:
            self.parts += n

    def deliver_parts(self, items: list[tuple[int, Any]], unused: int = 0) -> None:
        """Deliver several parts, and give back ``unused`` ones, under one lock hold."""
        with self._lock:
            if self.state == SlotState.PENDING:
                result = self.result
                for i, page in items:
                    result[i] = page
            self.parts -= len(items) + unused - 1
            self._part_done()

    def deliver_part(self, i: int, page: Any) -> None:
        with self._lock:
            if self.state == SlotState.PENDING and i >= 0:
                self.result[i] = page
            self._part_done()

    def fail_part(self, i: int, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
            self._part_done()

    def _part_done(self) -> None:  # under _lock
        self.parts -= 1
        if self.parts:
            return
        if self.state == SlotState.PENDING:
            self.state = SlotState.DONE if self.error is None else SlotState.FAILED
            self._done.release()
        elif self.state == SlotState.ABANDONED:
            self.state = SlotState.FREE

    def is_live(self) -> bool:
        return self.state == SlotState.PENDING

    def complete(self, result: Any) -> bool:
        """Deliver a result; False if nobody waits any more (the slot is reclaimed)."""
        return self._finish(SlotState.DONE, result, None)

    def fail(self, error: BaseException) -> bool:
        return self._finish(SlotState.FAILED, None, error)

    def _finish(self, state: SlotState, result: Any, error: BaseException | None) -> bool:
        with self._lock:
            if self.state == SlotState.PENDING:
                self.state, self.result, self.error = state, result, error
                self._done.release()
                return True
            if self.state == SlotState.ABANDONED:
                self.state = SlotState.FREE  # the backend reclaims it from its orphan list
                return False
            raise InvalidStateError(f"slot {self.key:#x} completed twice (state "
                                    f"{self.state.name})")

    def wait(self, timeout: float) -> bool:
        """Block until completion or ``timeout`` seconds; True if completed."""
        return self._done.acquire(True, max(timeout, 0.0))

    def abandon(self) -> bool:
        """Give up waiting. True if abandoned: the backend keeps it as an orphan until
        the worker lets go (it turns FREE). False if it completed meanwhile (then its
        result is ready and ``_done`` has been re-taken)."""
        with self._lock:
            if self.state == SlotState.PENDING:
                self.state = SlotState.ABANDONED
                return True
            if self.state == SlotState.ABANDONED or self.state == SlotState.FREE:
                # cancel() got here first (and released _done, which nobody has waited
                # for): take that back; ABANDONED is still the worker's, FREE is let go
                self._done.acquire(False)
                return True
        # released by the completer under _lock, so it is free now, unless an interrupt
        # (KeyboardInterrupt) hit the waiter just after its acquire had taken it
        self._done.acquire(False)
        return False

    def cancel(self, error: BaseException) -> bool:
        """Wake the waiter with ``error`` (from another thread). The slot stays
        ABANDONED until the worker lets go of it."""
        with self._lock:
            if self.state != SlotState.PENDING:
                return False
            self.state, self.error = SlotState.ABANDONED, error
            self._done.release()
            return True

    def take(self) -> Any:
        """Hand the outcome to the backend and make the slot FREE again. A slot without
        an outcome is left as it is (InvalidStateError): a worker may still own it."""
        state, result, error = self.state, self.result, self.error
        if state != SlotState.DONE and state != SlotState.FAILED:
            raise InvalidStateError(f"slot {self.key:#x} taken while {state.name}")
        self.result = self.error = None
        self.rel = None
        self.state = SlotState.FREE
        if state == SlotState.DONE:
            return result
        assert error is not None
        raise error

    def describe(self) -> dict[str, Any]:
        return {"owner": self.owner, "slot": self.index, "state": self.state.name,
                "kind": self.kind, "shard": self.shard, "rel": str(self.rel),
                "blocks": list(self.blocks), "lsn": self.lsn, "nms": self.nms,
                "attempt": self.attempt}


def settle(finish: Any, arg: Any) -> None:
    """``job.complete(result)`` or ``job.fail(error)`` where an exception would cost
    more than that job: the rest of a completion burst, a batch's other members, or
    the worker itself. One is a bug (InvalidStateError: completed twice), logged."""
    try:
        finish(arg)
    except Exception:
        log.exception("completing a request failed")
