"""Prefetch through the communicator against page servers that count what they serve
(in-process PageServers over a generated store, so their counters are readable)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import wait_for

import comm
from shards import PageServer, generate_store, open_shard_store, synth_page
from shards._synth import synth_pages

pytestmark = [pytest.mark.servers, pytest.mark.timeout(120)]
SHARDS, STRIPE, NBLOCKS = 2, 64, 1024
LSN = 0x1000000


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[comm.RelTag]]:
    d = tmp_path_factory.mktemp("pf") / "store"
    desc = generate_store(d, SHARDS, STRIPE, rels=3, nblocks=NBLOCKS, lsns=(LSN,))
    return d, desc["rels"]


def servers(store_dir: Path, latency: float = 0.0) -> list[PageServer]:
    out = []
    for i in range(SHARDS):
        st = open_shard_store(store_dir, i, readonly=True)
        out.append(PageServer(st, shard=i, shard_count=SHARDS, stripe_size=STRIPE,
                              latency=latency).start())
    return out


@pytest.fixture
def fast(store) -> Iterator[list[PageServer]]:
    srv = servers(store[0])
    yield srv
    for s in srv:
        s.stop()
        s.store.close()


def served(srv: list[PageServer]) -> int:
    return sum(s.stats()["pages_served"] for s in srv)


def test_64_backends_same_1000_pages_cost_1000_server_reads(fast, store):
    rel = store[1][0]
    cfg = comm.CommConfig(prefetch_pages=2048, request_timeout=30)
    with comm.Communicator([s.endpoint for s in fast], stripe_size=STRIPE, config=cfg) as c:
        start = threading.Barrier(64)
        errors: list[BaseException] = []
        want = synth_pages(rel, range(1000), LSN)

        def backend() -> None:
            try:
                with c.backend() as be:
                    start.wait()
                    be.prefetch(rel, range(1000), LSN)
                    for b in range(1000):
                        assert be.get_page(rel, b, LSN) == want[b]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=backend) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        assert not errors, errors[:3]
        pf = c.stats()["prefetch"]
    # a server folds its counters in after sending an iteration's replies
    wait_for(lambda: served(fast) >= 1000, timeout=5.0)
    assert served(fast) == 1000, pf
    assert pf["issued"] == 1000 and pf["deduplicated"] == 63 * 1000
    assert pf["hits"] + pf["joins"] == 64 * 1000


def test_foreground_read_promotes_a_deeply_queued_prefetch(store):
    srv = servers(store[0], latency=0.05)  # 50 ms per round trip
    try:
        rel = store[1][1]
        cfg = comm.CommConfig(prefetch_pages=4096, inflight_per_conn=4)
        with comm.Communicator([s.endpoint for s in srv], stripe_size=STRIPE,
                               config=cfg) as c, c.backend() as flood, c.backend() as reader:
            # 1024 pages = 16 requests of 32 per shard; 3 on the wire, 13 queued per shard
            flood.prefetch(rel, range(NBLOCKS), LSN)
            time.sleep(0.01)
            t = time.monotonic()
            page = reader.get_page(rel, NBLOCKS - 1, LSN)  # the very last one queued
            took = time.monotonic() - t
            pending = c.stats()["prefetch"]["pending"]
            assert page == synth_page(rel, NBLOCKS - 1, LSN)
            assert reader.stats()["joins"] == 1
            assert c.stats()["prefetch"]["promotions"] == 1
            # it did not wait behind the queue: most of the flood was still pending
            assert pending >= NBLOCKS // 2, (pending, took)
            other = store[1][2]
            t = time.monotonic()
            assert reader.get_page(other, 5, LSN) == synth_page(other, 5, LSN)
            assert c.stats()["prefetch"]["pending"] > 0  # ... and a plain read too
    finally:
        for s in srv:
            s.stop()
            s.store.close()


def test_two_scans_share_a_small_buffer_fairly(store):
    """The seed's example: `sum(sin(x))` (slow) beside `sum(x)` (fast). The buffer holds
    48 pages, less than the two prefetch windows (2 x 32); both keep >= 90% hits."""
    srv = servers(store[0], latency=0.002)
    try:
        cfg = comm.CommConfig(prefetch_pages=48)
        rates = {}
        with comm.Communicator([s.endpoint for s in srv], stripe_size=STRIPE,
                               config=cfg) as c:
            def scan(name: str, rel: comm.RelTag, n: int, think: float) -> None:
                with c.backend() as be:
                    for b in range(n):
                        be.prefetch(rel, range(b, min(n, b + 32)), LSN)
                        assert be.get_page(rel, b, LSN) == synth_page(rel, b, LSN)
                        if think:
                            time.sleep(think)
                    st = be.stats()
                    rates[name] = (st["hits"] + st["joins"]) / st["reads"]

            slow = threading.Thread(target=scan, args=("slow", store[1][0], 200, 0.002))
            fastscan = threading.Thread(target=scan, args=("fast", store[1][1], NBLOCKS, 0))
            slow.start()
            fastscan.start()
            slow.join(60)
            fastscan.join(60)
            pf = c.stats()["prefetch"]
        assert rates["slow"] >= 0.9 and rates["fast"] >= 0.9, (rates, pf)
    finally:
        for s in srv:
            s.stop()
            s.store.close()


def test_unread_prefetches_are_counted_as_waste(fast, store):
    rel = store[1][2]
    cfg = comm.CommConfig(prefetch_pages=64)
    with comm.Communicator([s.endpoint for s in fast], stripe_size=STRIPE,
                           config=cfg) as c, c.backend() as be:
        be.prefetch(rel, range(64), LSN)
        deadline = time.monotonic() + 10
        while c.stats()["prefetch"]["pending"] and time.monotonic() < deadline:
            time.sleep(0.01)
        be.prefetch(rel, range(64, 128), LSN)  # pushes out 64 never-read pages
        pf = c.stats()["prefetch"]
    assert pf["wasted"] == 64, pf
