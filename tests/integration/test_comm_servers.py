"""The communicator against real page servers in subprocesses, over a generated store
(synthetic pages carry valid PostgreSQL checksums and identify themselves)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import comm
from shards import LocalCluster, generate_store, shard_for, synth_page, verify_page_checksum

pytestmark = [pytest.mark.servers, pytest.mark.timeout(120)]
SHARDS, STRIPE, NBLOCKS = 4, 16, 512
LSN1, LSN2 = 0x1000000, 0x2000000


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("comm") / "store"
    desc = generate_store(d, SHARDS, STRIPE, rels=3, nblocks=NBLOCKS, lsns=(LSN1, LSN2))
    return d, desc


@pytest.fixture(scope="module")
def cluster(store) -> Iterator[LocalCluster]:
    with LocalCluster(store[0]) as cl:
        yield cl


@pytest.fixture
def c(cluster) -> Iterator[comm.Communicator]:
    with comm.Communicator(cluster.endpoints, stripe_size=STRIPE,
                           config=comm.CommConfig(request_timeout=20)) as c:
        yield c


def test_64_backends_random_reads_all_verified(c, store):
    rels = store[1]["rels"]
    counts = {"ok": 0, "wrong": 0}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def backend(seed: int) -> None:
        rnd = random.Random(seed)
        ok = wrong = 0
        try:
            with c.backend() as be:
                for _ in range(60):
                    rel, blk = rnd.choice(rels), rnd.randrange(NBLOCKS)
                    lsn = rnd.choice((LSN1, LSN2))
                    page = be.get_page(rel, blk, lsn)
                    good = page == synth_page(rel, blk, lsn) and verify_page_checksum(page, blk)
                    ok, wrong = ok + good, wrong + (not good)
        except BaseException as e:
            errors.append(e)
        with lock:
            counts["ok"] += ok
            counts["wrong"] += wrong

    threads = [threading.Thread(target=backend, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors[:3]
    assert counts == {"ok": 64 * 60, "wrong": 0}
    st = c.stats()
    assert st["slots_in_use"] == 0
    assert all(s["completed"] > 0 for s in st["shards"])  # every shard served


def test_cross_shard_batches_in_request_order(c, store):
    rel = store[1]["rels"][0]
    blocks = [500, 3, 17, 3, 250, 64, 65, 66] + list(range(100, 180)) + [300, 301, 400, 450]
    assert len({shard_for(rel, b, SHARDS, STRIPE) for b in blocks}) == SHARDS
    with c.backend() as be:
        pages = be.get_pages(rel, blocks, LSN2)
    assert pages == [synth_page(rel, b, LSN2) for b in blocks]


def test_reads_at_two_lsns_return_their_versions(c, store):
    rel = store[1]["rels"][1]
    with c.backend() as be:
        assert be.get_page(rel, 9, LSN1) == synth_page(rel, 9, LSN1)
        assert be.get_page(rel, 9, LSN2) == synth_page(rel, 9, LSN2)
        assert be.get_page(rel, 9, LSN2 - 1) == synth_page(rel, 9, LSN1)  # newest <= lsn


def test_metadata(c, store):
    rel = store[1]["rels"][0]
    with c.backend() as be:
        assert be.nblocks(rel, LSN2) == NBLOCKS
        assert be.exists(rel, LSN2)
        missing = comm.RelTag(rel.spc, rel.db, 999999)
        assert not be.exists(missing, LSN2)
        with pytest.raises(comm.RelationNotFound):
            be.nblocks(missing, LSN2)
        assert be.db_size(store[1]["db"], LSN2) > 0
        assert len(be.slru_segment(comm.SlruKind.CLOG, 0, LSN2)) % 8192 == 0


def test_server_errors_map_to_exceptions(c, store):
    rel = store[1]["rels"][0]
    with c.backend() as be:
        with pytest.raises(comm.PageNotFound):
            be.get_page(rel, NBLOCKS + 5, LSN2)
        with pytest.raises(comm.RelationNotFound):
            be.get_page(comm.RelTag(rel.spc, rel.db, 424242), 0, LSN2)
        with pytest.raises(comm.NotFound):
            be.db_size(4242, LSN2)


def test_prefetch_scan_hits(c, store):
    rel = store[1]["rels"][2]
    with c.backend() as be:
        for start in range(0, 256, 32):
            be.prefetch(rel, range(start, start + 32), LSN2)
            for b in range(start, start + 32):
                assert be.get_page(rel, b, LSN2) == synth_page(rel, b, LSN2)
    pf = c.stats()["prefetch"]
    assert pf["hits"] + pf["joins"] >= 200


def test_frozen_server_times_out_while_others_serve(cluster, store):
    rel = store[1]["rels"][0]
    frozen = next(b for b in range(NBLOCKS) if shard_for(rel, b, SHARDS, STRIPE) == 1)
    live = [b for b in range(NBLOCKS) if shard_for(rel, b, SHARDS, STRIPE) != 1][:40]
    with comm.Communicator(cluster.endpoints, stripe_size=STRIPE) as c, c.backend() as be:
        be.get_page(rel, frozen, LSN2)  # connected and warm
        cluster.freeze(1)
        try:
            t = time.monotonic()
            with pytest.raises(comm.RequestTimeout):
                be.get_page(rel, frozen, LSN2, timeout=0.5)
            assert 0.49 <= time.monotonic() - t < 2.5
            for b in live:  # other shards keep serving meanwhile
                assert be.get_page(rel, b, LSN2, timeout=5) == synth_page(rel, b, LSN2)
        finally:
            cluster.thaw(1)
        assert be.get_page(rel, frozen, LSN2, timeout=10) == synth_page(rel, frozen, LSN2)
        deadline = time.monotonic() + 5
        while c.stats()["slots_in_use"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.stats()["slots_in_use"] == 0


def test_close_leaves_no_threads_or_sockets(cluster, store):
    before = {t.name for t in threading.enumerate()}
    c = comm.Communicator(cluster.endpoints, stripe_size=STRIPE,
                          config=comm.CommConfig(threads_per_shard=2))
    with c.backend() as be:
        be.get_pages(store[1]["rels"][0], range(64), LSN2)
    ctx = c._ctx
    c.close()
    c.close()
    assert ctx.closed
    assert {t.name for t in threading.enumerate()} - before == set()


def test_relsize_cache_against_real_servers(c, store):
    rel = store[1]["rels"][0]
    with c.backend() as be:
        before = c.stats()["shards"][0]["completed"]
        assert be.nblocks(rel, LSN2, not_modified_since=LSN1) == NBLOCKS
        assert be.nblocks(rel, LSN2) == NBLOCKS            # overlaps: cached
        assert be.exists(rel, LSN1 + 5, not_modified_since=LSN1)  # overlaps: cached
        assert c.stats()["shards"][0]["completed"] == before + 1
        assert not be.exists(rel, LSN1 - 10)  # before LSN1, outside the cached range: asks
        assert c.stats()["shards"][0]["completed"] == before + 2
