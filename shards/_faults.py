"""Fault injection for page servers (tests and benchmarks): drop, garbage, forced
status, wrong block, corrupted page. Read per request; mutate it while a server runs."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from ._protocol import GetPagesReply, Reply, Request, Status, error_reply
from ._store import StoreReader
from ._types import BLCKSZ, MAX_BLOCKNO

_ZERO_PAGE = bytes(BLCKSZ)


@dataclass
class ServerFaults:
    """Fault injection, read per request (mutate it while the server runs).

    Rates are probabilities in 0..1. ``error_status`` (if set, not OK) is forced on
    a fraction ``error_rate`` of requests, with the reason "injected fault".
    """

    drop_rate: float = 0.0        # never answer
    corrupt_rate: float = 0.0     # flip bytes in the pages of an OK GetPages reply
    wrong_block_rate: float = 0.0  # answer one block with ANOTHER block (echo and page)
    error_status: Status | None = None
    error_rate: float = 1.0
    garbage_rate: float = 0.0     # send random frames instead of the reply
    seed: int | None = None


def inject(f: ServerFaults, rng: random.Random, r: StoreReader | None, req: Request,
       reply: Reply, counts: Counter[str]) -> Reply | list[bytes] | None:
    """Apply the fault hooks: None = drop, list = raw frames, else a (new) reply."""
    rnd = rng.random
    if f.drop_rate and rnd() < f.drop_rate:
        counts["faults.dropped"] += 1
        return None
    if f.garbage_rate and rnd() < f.garbage_rate:
        counts["faults.garbage"] += 1
        return [rng.randbytes(rng.randint(0, 64))
                for _ in range(rng.randint(1, 3))]
    if f.error_status is not None and f.error_status != Status.OK and rnd() < f.error_rate:
        counts["faults.error_status"] += 1
        return error_reply(req, Status(f.error_status), "injected fault")
    if not isinstance(reply, GetPagesReply) or reply.status != Status.OK:
        return reply
    blocks, pages = list(reply.blocks), list(reply.pages)
    if f.wrong_block_rate and rnd() < f.wrong_block_rate and r is not None:
        counts["faults.wrong_block"] += 1
        i = rng.randrange(len(blocks))
        b = blocks[i] + 1 if blocks[i] < MAX_BLOCKNO else blocks[i] - 1
        blocks[i] = b
        pages[i] = r._get_pages(reply.rel, [b], reply.lsn)[0] or _ZERO_PAGE
    if f.corrupt_rate and rnd() < f.corrupt_rate:
        counts["faults.corrupt"] += 1
        i = rng.randrange(len(pages))
        buf = bytearray(pages[i])
        for _ in range(4):
            buf[rng.randrange(BLCKSZ)] ^= 0xFF
        pages[i] = bytes(buf)
    return GetPagesReply(reply.id, reply.attempt, reply.status, reply.lsn, reply.nms,
                         reply.rel, tuple(blocks), tuple(pages))
