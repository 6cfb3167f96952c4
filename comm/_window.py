"""A shard worker's windows: what it may put on the wire, and what is there.

Theory of operation
-------------------
A worker keeps its requests in flight in ``inflight`` (request id -> (job, sent
at)) and three limits on them:

* the request window (``COMM_INFLIGHT_PER_CONN``): requests in flight;
* its prefetch share, 3/4 of it: a foreground read always finds a place on the
  wire without waiting behind prefetches;
* the page window (``COMM_INFLIGHT_PAGES_PER_CONN``): pages of bulk requests
  (see _batch.is_bulk) in flight while small requests are about (one in flight,
  or one sent in the last ``SMALL_HOLD`` seconds), so a random read never queues
  at the server behind more than about a page window of scan pages. With no small
  request about, bulk may fill the request window. Prefetches get 3/4 of the page
  window too.

Bulk is told by a request's size and type only, never by its class: a promotion
changes the class of a request in flight, and the counts must come back to zero.
Touched only by the worker thread; no lock.
"""

from __future__ import annotations

import time
from typing import Any

from ._batch import is_bulk

SMALL_HOLD = 0.05  # small requests sent this recently keep the page window closed
_NORMAL = 0  # RequestClass.NORMAL


class Windows:
    """The in-flight table of one worker and the limits on it (worker thread only)."""

    __slots__ = ("window", "prefetch_window", "page_window", "prefetch_pages", "inflight",
                 "pages", "small", "small_sent")

    def __init__(self, window: int, page_window: int) -> None:
        self.window = window
        self.prefetch_window = max(1, window - max(1, window // 4))
        self.page_window = page_window
        self.prefetch_pages = page_window - max(1, page_window // 4)
        self.inflight: dict[int, tuple[Any, float]] = {}  # request id -> (job, sent at)
        self.pages = 0  # pages of bulk requests in flight
        self.small = 0  # other requests in flight
        self.small_sent = -1e9  # when the last small one was sent

    def room(self, job: Any) -> bool:
        """Whether ``job`` may be sent now. A small request needs only a request slot;
        a bulk one also needs room in the page window while small ones are about (or
        no bulk in flight at all, so any request can go)."""
        if job.cls == _NORMAL:
            if len(self.inflight) >= self.window:
                return False
            limit = self.page_window
        else:
            if len(self.inflight) >= self.prefetch_window:
                return False
            limit = self.prefetch_pages
        pages = self.pages
        if not pages or not is_bulk(job):
            return True
        if not self.small and time.monotonic() - self.small_sent > SMALL_HOLD:
            return True  # no small requests about: nobody to wait behind the bulk
        return pages + len(job.blocks) <= limit

    def track(self, rid: int, job: Any, now: float) -> None:
        """``job`` went on the wire as request ``rid`` at ``now``."""
        self.inflight[rid] = (job, now)
        if is_bulk(job):
            self.pages += len(job.blocks)
        else:
            self.small += 1
            self.small_sent = now

    def untrack(self, rid: int) -> tuple[Any, float] | None:
        """Take request ``rid`` off the in-flight table (None if it is not there)."""
        entry = self.inflight.pop(rid, None)
        if entry is not None:
            job = entry[0]
            if is_bulk(job):
                self.pages -= len(job.blocks)
            else:
                self.small -= 1
        return entry

    def clear(self) -> list[Any]:
        """Forget everything in flight (a reset, a shutdown); returns those jobs."""
        jobs = [job for job, _ in self.inflight.values()]
        self.inflight.clear()
        self.pages = self.small = 0
        return jobs
