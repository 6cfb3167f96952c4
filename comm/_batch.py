"""Coalescing: foreground page reads of one relation, taken together by a worker.

Theory of operation
-------------------
A worker takes its whole inbox per wakeup. Under load that is several single-page
reads, often of the same relation at the same LSNs (an index and its heap, or
simply a hot table). Each would be one wire request: one send, one server
request, one reply, one receive, each with its fixed costs (and pyzmq releases
the GIL in every socket call). A ``Batch`` puts them in ONE GetPages request of
up to 32 distinct blocks and completes each member with its own pages.

A batch has the worker's job interface, so queueing, the windows, retries on
SLOW_DOWN and on a lost connection, deadlines and the reply checks all apply
to it unchanged. Its deadline is its latest member's: every backend enforces its
own deadline itself, so an earlier member still times out on time (its slot
stays out of the backend's ring until the batch is answered or expires). A
status that may concern only some blocks (NOT_FOUND for a block, INVALID_REQUEST
such as a block another shard owns after a split) is never given to all members:
the worker splits the batch and sends each member on its own, so each gets its
own answer. Statuses that concern the whole request (a missing relation, an
overloaded or failing server) go to every member. With checksum verification, a
bad page fails only the members that asked for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shards import MAX_BLOCKS_PER_REQUEST
from shards.protocol import Kind, RequestClass

from ._slot import settle

_NORMAL, _GET_PAGES = int(RequestClass.NORMAL), int(Kind.GET_PAGES)


class Batch:
    """Members sharing kind GET_PAGES, class NORMAL, rel, lsn and nms."""

    __slots__ = ("kind", "cls", "rel", "blocks", "lsn", "nms", "deadline", "attempt", "extra",
                 "shard", "qkey", "sent", "members", "singles", "_index")

    def __init__(self, members: list[Any]) -> None:
        first = members[0]
        index: dict[int, int] = {}
        for m in members:
            for b in m.blocks:
                index.setdefault(b, len(index))  # a block two members want is asked once
        self.kind, self.cls, self.rel = first.kind, first.cls, first.rel
        self.lsn, self.nms, self.shard = first.lsn, first.nms, first.shard
        self.blocks = tuple(index)
        self.deadline = max(m.deadline for m in members)
        self.attempt, self.extra, self.qkey, self.sent = 0, None, None, False
        self.members = members
        self.singles = all(len(m.blocks) == 1 for m in members)  # random reads, not a scan
        self._index = index

    def is_live(self) -> bool:
        return any(m.is_live() for m in self.members)

    def complete(self, pages: Sequence[bytes]) -> bool:
        idx = self._index
        for m in self.members:
            settle(m.complete, [pages[idx[b]] for b in m.blocks])
        return True

    def fail(self, error: BaseException) -> bool:
        for m in self.members:
            settle(m.fail, error)
        return True

    def complete_except(self, pages: Sequence[bytes], bad: set[int],
                        error: BaseException) -> None:
        """Fail the members that asked for a block in ``bad``; complete the others."""
        idx = self._index
        for m in self.members:
            if bad.intersection(m.blocks):
                settle(m.fail, error)
            else:
                settle(m.complete, [pages[idx[b]] for b in m.blocks])

    def describe(self) -> dict[str, Any]:
        d = self.members[0].describe()
        d.update(blocks=list(self.blocks), batched=len(self.members))
        return d


def coalesce(jobs: list[Any]) -> list[Any]:
    """``jobs`` with the batchable reads of one (rel, lsn, nms) merged into Batches of
    at most 32 distinct blocks, in the order of each group's first job."""
    open_groups: dict[tuple[Any, int, int], tuple[list[Any], set[int]]] = {}
    out: list[Any] = []  # jobs, and (members, blocks) groups standing for batches
    for job in jobs:
        if not getattr(job, "batchable", False) or job.cls != _NORMAL or job.kind != _GET_PAGES:
            out.append(job)
            continue
        key = (job.rel, job.lsn, job.nms)
        g = open_groups.get(key)
        if g is None or len(g[1].union(job.blocks)) > MAX_BLOCKS_PER_REQUEST:
            g = open_groups[key] = ([], set())
            out.append(g)
        g[0].append(job)
        g[1].update(job.blocks)
    return [x if type(x) is not tuple else (x[0][0] if len(x[0]) == 1 else Batch(x[0]))
            for x in out]


def is_bulk(job: Any) -> bool:
    """Scan-like work: a multi-page request that is not a batch of single-page reads.
    Everything else (single pages, their batches, metadata) is a small request."""
    return len(job.blocks) > 1 and (type(job) is not Batch or not job.singles)
