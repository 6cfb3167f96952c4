"""Live shard split: the shard map changes from 2 to 4 shards under a running read
load (new page servers on a re-import with 4 shards) with zero errors and zero wrong
pages; a request answered "not my shard" is retried on the new map."""

from __future__ import annotations

import collections
import random
import threading
import time

import pytest

import comm
from shards import LocalCluster, PageServer, generate_store, open_shard_store, shard_for
from shards._synth import synth_pages

pytestmark = [pytest.mark.servers, pytest.mark.timeout(120)]
STRIPE, NBLOCKS, LSN = 8, 256, 0x1000000


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("split")
    d2 = generate_store(base / "s2", 2, STRIPE, rels=2, nblocks=NBLOCKS, lsns=(LSN,))
    generate_store(base / "s4", 4, STRIPE, rels=2, nblocks=NBLOCKS, lsns=(LSN,))
    return {"s2": base / "s2", "s4": base / "s4", "rels": d2["rels"]}


def test_live_split_2_to_4_under_load(stores: dict) -> None:
    want = {rel: synth_pages(rel, range(NBLOCKS), LSN) for rel in stores["rels"]}
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()
    with LocalCluster(stores["s2"]) as old, LocalCluster(stores["s4"]) as new:
        with comm.Communicator(old.endpoints, stripe_size=STRIPE) as c:
            def backend(seed: int) -> None:
                rnd = random.Random(seed)
                local: collections.Counter[str] = collections.Counter()
                with c.backend() as be:
                    while not stop.is_set():
                        rel = rnd.choice(stores["rels"])
                        blocks = [rnd.randrange(NBLOCKS) for _ in range(rnd.choice((1, 9)))]
                        try:
                            pages = be.get_pages(rel, blocks, LSN, timeout=10)
                            ok = all(p == want[rel][b] for p, b in zip(pages, blocks,
                                                                       strict=True))
                            local["ok" if ok else "wrong"] += 1
                        except comm.CommError as e:
                            local[type(e).__name__] += 1
                with lock:
                    counts.update(local)

            threads = [threading.Thread(target=backend, args=(i,)) for i in range(16)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            before = dict(counts)
            c.update_shards(new.endpoints, stripe_size=STRIPE)
            assert c.stats()["map_generation"] == 1 and len(c.stats()["shards"]) == 4
            time.sleep(1.5)
            stop.set()
            for t in threads:
                t.join(30)
            per_shard = [s["completed"] for s in c.stats()["shards"]]
    assert set(counts) == {"ok"}, counts
    assert counts["ok"] > 100 and before is not None
    assert all(n > 0 for n in per_shard), per_shard  # the new map served on 4 shards


def test_not_my_shard_is_retried_on_the_new_map(stores: dict) -> None:
    """Servers that already know they are shard i of 4, behind a communicator still on
    a 2-shard map: a misrouted read is answered "not my shard" after the map changed
    and is retried on the new map, not failed."""
    servers = [PageServer(open_shard_store(stores["s4"], i, readonly=True), shard=i,
                          shard_count=4, stripe_size=STRIPE, latency=0.3).start()
               for i in range(4)]
    try:
        eps = [s.endpoint for s in servers]
        rel = stores["rels"][0]
        blk = next(b for b in range(NBLOCKS)
                   if shard_for(rel, b, 4, STRIPE) != shard_for(rel, b, 2, STRIPE))
        with comm.Communicator(eps[:2], stripe_size=STRIPE) as c, c.backend() as be:
            with pytest.raises(comm.InvalidRequest, match="not on shard"):
                be.get_page(rel, blk, LSN)  # map unchanged: a genuine error
            timer = threading.Timer(0.1, c.update_shards, args=(eps,))
            timer.start()
            assert be.get_page(rel, blk, LSN, timeout=10) == synth_pages(rel, [blk], LSN)[0]
            timer.join()
            with pytest.raises(comm.ConfigError, match="stripe_size"):
                c.update_shards(eps, stripe_size=STRIPE * 2)
    finally:
        for s in servers:
            s.stop()
            s.store.close()
