"""Design (c), pagecomm: one Communicator; each backend thread gets ``c.backend()``.

Random reads are ``be.get_page``. A scan keeps ``be.prefetch`` issued up to
``distance`` pages ahead of its position (in steps of at least ``scan_batch`` pages,
so the communicator can send 32-block wire requests) and reads ``scan_batch``
pages per foreground call with ``be.get_pages``, which takes them from the shared
prefetch buffer or joins the prefetch still in flight.
"""

from __future__ import annotations

from typing import Any

from shards import RelTag

from .. import Backend, CommConfig, Communicator, ProcBackend
from ._setup import Dataset, Params


def prefetch_buffer_pages(p: Params, backends: int) -> int:
    """The shared prefetch buffer of a cell (the proc design uses the same size)."""
    # room for every backend's lookahead (what a tuner would set); no more, so that
    # re-reads of consumed pages (a cache effect) stay rare: see _workloads.py
    return p.prefetch_pages or max(CommConfig.prefetch_pages,
                                   backends * (p.distance + p.scan_batch))


class PagecommDesign:
    """One Communicator per cell, so its counters are the cell's."""

    name = "pagecomm"

    def __init__(self, ds: Dataset, p: Params, endpoints: list[str], backends: int) -> None:
        self.ds, self.p = ds, p
        buffer = prefetch_buffer_pages(p, backends)
        cfg = CommConfig(shards=tuple(endpoints), stripe_size=ds.stripe,
                         threads_per_shard=p.threads_per_shard, inflight_per_conn=p.inflight,
                         inflight_pages_per_conn=p.inflight_pages,
                         prefetch_pages=buffer)
        self.comm = Communicator(config=cfg)

    def backend(self, i: int) -> PagecommBackend:
        return PagecommBackend(self, self.comm.backend())

    def snapshot(self) -> dict[str, Any]:
        return {"connections": self.comm.stats()["connections"]}

    def prefetch(self) -> dict[str, Any]:
        pf = self.comm.stats()["prefetch"]
        # a read served by a prefetch counts as a hit whether it was buffered or in flight
        return {"hits": pf["hits"] + pf["joins"], "waste": pf["wasted"],
                "issued": pf["issued"], "detail": pf}

    def close(self) -> None:
        self.comm.close()


class PagecommBackend:
    """One backend thread's handle and scan position (owner thread only)."""

    def __init__(self, design: PagecommDesign, be: Backend | ProcBackend) -> None:
        self.be = be
        self.lsn = design.ds.lsn
        self.nblocks = design.ds.nblocks
        self.distance, self.batch = design.p.distance, design.p.scan_batch
        self.rel: RelTag | None = None
        self.ahead = 0  # prefetch issued up to here (exclusive)

    def get_page(self, rel: RelTag, blk: int) -> bytes:
        return self.be.get_page(rel, blk, self.lsn)

    def start_scan(self, rel: RelTag, pos: int) -> None:
        self.rel, self.ahead = rel, pos

    def scan(self, rel: RelTag, pos: int, k: int) -> list[bytes]:
        if rel != self.rel or self.ahead < pos:
            self.start_scan(rel, pos)
        end = min(pos + k + self.distance, self.nblocks)
        if end - self.ahead >= self.batch or (end == self.nblocks and end > self.ahead):
            self.be.prefetch(rel, range(self.ahead, end), self.lsn)
            self.ahead = end
        return self.be.get_pages(rel, range(pos, pos + k), self.lsn)

    def close(self) -> None:
        self.be.close()
