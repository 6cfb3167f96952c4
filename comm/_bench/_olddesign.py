"""Design (b), the old design: one connection per backend per shard, synchronous.

Theory of operation
-------------------
Modelled on Neon's original page-server client: every backend (here a thread) has
its own DEALER to every shard, sends one single-page GetPages and blocks for the
answer. Sequential scans use a per-backend readahead ring of up to ``ring``
outstanding single-page requests (Neon's readahead_buffer_size = 128), pipelined
on the backend's own connections; the scan consumes the ring head in order and
refills it as it goes. Ring requests are sent as NORMAL: that protocol had no
request classes. Replies on one connection come back in order, but any reply is
stashed by id so a synchronous read behind the ring still finds its page.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import zmq

from shards import RelTag
from shards.protocol import (
    RequestClass,
    Status,
    decode_get_pages_reply_fast,
    decode_reply,
    encode_get_pages,
)

from ._setup import Dataset, Params

_NORMAL = int(RequestClass.NORMAL)


class OldDesign:
    """Shared state of one cell: a ZeroMQ Context and the socket count."""

    name = "old"

    def __init__(self, ds: Dataset, p: Params, endpoints: list[str], backends: int) -> None:
        self.ds, self.p, self.endpoints = ds, p, list(endpoints)
        self.ctx = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, max(1024, 4 * backends * len(endpoints) + 64))
        self._lock = threading.Lock()  # guards _sockets, _hits, _waste, _issued
        self._sockets = 0
        self._hits = self._waste = self._issued = 0

    def backend(self, i: int) -> OldBackend:
        be = OldBackend(self, i)
        with self._lock:
            self._sockets += len(be.socks)
        return be

    def _account(self, hits: int, waste: int, issued: int) -> None:
        with self._lock:
            self._hits += hits
            self._waste += waste
            self._issued += issued

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"connections": self._sockets}

    def prefetch(self) -> dict[str, Any]:
        with self._lock:
            return {"hits": self._hits, "waste": self._waste, "issued": self._issued}

    def close(self) -> None:
        self.ctx.term()


class OldBackend:
    """One backend thread's connections and readahead ring (owner thread only)."""

    def __init__(self, design: OldDesign, i: int) -> None:
        self.d = design
        self.ds = design.ds
        self.lsn = design.ds.lsn
        self.ring_size = design.p.distance
        self.socks: list[zmq.Socket] = []
        for ep in design.endpoints:
            s = design.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep)
            self.socks.append(s)
        self.rid = 0
        self.got: dict[int, bytes] = {}  # replies that arrived before they were wanted
        self.ring: deque[tuple[int, int, int]] = deque()  # (rid, shard, blkno), in order
        self.ring_rel: RelTag | None = None
        self.ring_next = 0  # next block to put in the ring
        self.hits = self.issued = 0

    def _send(self, rel: RelTag, blk: int) -> tuple[int, int]:
        self.rid += 1
        shard = self.ds.shard_of(rel, blk)
        self.socks[shard].send(encode_get_pages(self.rid, 0, _NORMAL, self.lsn, self.lsn,
                                                rel, (blk,)))
        return self.rid, shard

    def _recv(self, shard: int, rid: int) -> bytes:
        got, sock = self.got, self.socks[shard]
        while rid not in got:
            frames = sock.recv_multipart(copy=False)
            fast = decode_get_pages_reply_fast(frames)  # the codec pagecomm uses
            if fast is not None:
                got[fast[0]] = fast[6][0]
                continue
            r = decode_reply(frames)
            if r.status != Status.OK:
                raise RuntimeError(f"old design: shard {shard} answered {r.status.name}: "
                                   f"{r.reason}")
            got[r.id] = r.pages[0]  # type: ignore[union-attr]
        return got.pop(rid)

    def get_page(self, rel: RelTag, blk: int) -> bytes:
        rid, shard = self._send(rel, blk)
        return self._recv(shard, rid)

    def start_scan(self, rel: RelTag, pos: int) -> None:
        self._drop_ring()
        self.ring_rel, self.ring_next = rel, pos

    def scan(self, rel: RelTag, pos: int, k: int) -> list[bytes]:
        """``k`` pages from ``pos``, taken from the ring head (refilled as consumed)."""
        head = self.ring[0][2] if self.ring else self.ring_next
        if rel != self.ring_rel or head != pos:  # not where the ring is: start over
            self.start_scan(rel, pos)
        out = []
        self._fill()
        for _ in range(k):
            rid, shard, _blk = self.ring.popleft()
            out.append(self._recv(shard, rid))
            self.hits += 1
            self._fill()
        return out

    def _fill(self) -> None:
        rel, n, ring = self.ring_rel, self.ds.nblocks, self.ring
        assert rel is not None
        while len(ring) < self.ring_size and self.ring_next < n:
            rid, shard = self._send(rel, self.ring_next)
            ring.append((rid, shard, self.ring_next))
            self.ring_next += 1
            self.issued += 1

    def _drop_ring(self) -> None:
        """Wait out and discard what is still in the ring (wasted readahead)."""
        waste = len(self.ring)
        while self.ring:
            rid, shard, _ = self.ring.popleft()
            self._recv(shard, rid)
        self.d._account(0, waste, 0)

    def close(self) -> None:
        """Close the connections; whatever is still in the ring was wasted."""
        self.d._account(self.hits, len(self.ring), self.issued)
        self.hits = self.issued = 0
        self.ring.clear()
        for s in self.socks:
            s.close(0)
        self.socks = []
