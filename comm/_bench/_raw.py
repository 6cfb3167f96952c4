"""Design (a), the ceiling: raw pipelined pyzmq round trips, no communicator logic.

One thread, one DEALER per shard, ``inflight`` GetPages outstanding on each;
every reply is decoded, counted, and immediately replaced by a new request to
the same shard. Requests are 1 page (random reads) or ``scan_batch`` consecutive
pages within one stripe (scans). Latency is per request, send to receive.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import zmq

from shards import RelTag
from shards.protocol import (
    GetPagesReply,
    RequestClass,
    Status,
    decode_get_pages_reply_fast,
    decode_reply,
    encode_get_pages,
)

from ._setup import Dataset, Params, Recorder

_NORMAL = int(RequestClass.NORMAL)


def _targets(ds: Dataset, rec: Recorder, per_request: int) -> list[list[tuple[RelTag, int]]]:
    """Per shard, (rel, first block) request starts that lie wholly on that shard."""
    out: list[list[tuple[RelTag, int]]] = [[] for _ in range(ds.shards)]
    rng = rec.rng(-1)
    for rel in ds.rels:
        for start in range(0, ds.nblocks - per_request + 1, per_request):
            out[ds.shard_of(rel, start)].append((rel, start))
    for lst in out:
        rng.shuffle(lst)
    return out


def raw_thread(rec: Recorder, ds: Dataset, p: Params, endpoints: list[str],
               per_request: int) -> None:
    """Thread body: the raw client loop (see module docstring)."""
    t = rec.tally("raw")
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []
    try:
        targets = _targets(ds, rec, per_request)
        poller = zmq.Poller()
        for ep in endpoints:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep)
            socks.append(s)
            poller.register(s, zmq.POLLIN)
        index = {s: i for i, s in enumerate(socks)}
        pending: dict[int, tuple[float, RelTag, int]] = {}
        nxt = [0] * len(socks)
        rid = 0

        def send(shard: int) -> None:
            nonlocal rid
            lst = targets[shard]
            rel, start = lst[nxt[shard] % len(lst)]
            nxt[shard] += 1
            rid += 1
            pending[rid] = (time.perf_counter(), rel, start)
            socks[shard].send(encode_get_pages(rid, 0, _NORMAL, ds.lsn, ds.lsn, rel,
                                               range(start, start + per_request)))

        rec.barrier.wait(timeout=60)
        for shard in range(len(socks)):
            if targets[shard]:
                for _ in range(p.inflight):
                    send(shard)
        _loop(rec, t, poller, index, pending, send)
    except Exception:
        t.errors += 1
        rec.barrier.abort()
        raise
    finally:
        for s in socks:
            s.close(0)
        ctx.term()
        rec.verify(t)


def _loop(rec: Recorder, t: Any, poller: zmq.Poller, index: dict[zmq.Socket, int],
          pending: dict[int, tuple[float, RelTag, int]], send: Any) -> None:
    stop, lat, pc = rec.stop, t.lat, time.perf_counter
    while not stop.is_set():
        for sock, _ in poller.poll(100):
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                fast = decode_get_pages_reply_fast(frames)  # the codec pagecomm uses
                pages: Sequence[bytes] | None
                if fast is not None:
                    rid, pages = fast[0], fast[6]
                else:
                    r = decode_reply(frames)
                    rid = r.id
                    pages = r.pages if isinstance(r, GetPagesReply) and r.status == Status.OK \
                        else None
                sent, rel, start = pending.pop(rid)
                if stop.is_set():
                    return
                lat.append(pc() - sent)
                t.calls += 1
                if pages is None:
                    t.errors += 1
                else:
                    for j, page in enumerate(pages):
                        rec.check(t, rel, start + j, page)
                send(index[sock])
