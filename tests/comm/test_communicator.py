"""Communicator behaviour against in-process fake page servers (fast, deterministic).
Real page servers in subprocesses are exercised in tests/integration."""

from __future__ import annotations

import threading
import time

import pytest
import zmq
from fakeserver import FakeServer, fake_page

import comm
from comm import RelTag
from shards import shard_for
from shards.protocol import Status

REL = RelTag(1663, 5, 16384)
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def servers():
    with FakeServer() as a, FakeServer() as b:
        yield [a, b]


@pytest.fixture
def c(servers):
    with comm.Communicator([s.endpoint for s in servers], stripe_size=8,
                           config=comm.CommConfig(request_timeout=5)) as c:
        yield c


def test_get_page_and_batches_across_shards(c, servers):
    with c.backend() as be:
        assert be.get_page(REL, 7, lsn=100) == fake_page(REL, 7, 100)
        blocks = [90, 3, 45, 3, 17, 200, 64]  # any order, duplicates, both shards
        assert be.get_pages(REL, blocks, lsn=100) == [fake_page(REL, b, 100) for b in blocks]
        many = list(range(300))  # > 32 per shard: several wire requests per shard
        assert be.get_pages(REL, many, lsn=100) == [fake_page(REL, b, 100) for b in many]
    assert all(s.pages > 0 for s in servers)
    shards_used = {shard_for(REL, b, 2, 8) for b in blocks}
    assert shards_used == {0, 1}


def test_two_lsns_give_two_versions(c):
    with c.backend() as be:
        assert be.get_page(REL, 1, lsn=100) != be.get_page(REL, 1, lsn=200)
        assert be.get_page(REL, 1, lsn=200, not_modified_since=150) == fake_page(REL, 1, 200)


def test_metadata_requests(c):
    with c.backend() as be:
        assert be.nblocks(REL, 100) == 1000
        assert be.exists(REL, 100) is True
        assert be.exists(RelTag(1663, 5, 404), 100) is False
        with pytest.raises(comm.RelationNotFound):
            be.nblocks(RelTag(1663, 5, 404), 100)
        assert be.db_size(5, 100) == 12345 * 8192
        assert be.slru_segment(comm.SlruKind.CLOG, 0, 100) == b"\x07" * 8192


@pytest.mark.parametrize("status,exc", [
    (Status.NOT_FOUND, comm.PageNotFound), (Status.INVALID_REQUEST, comm.InvalidRequest),
    (Status.INTERNAL_ERROR, comm.ServerError),
])
def test_server_status_maps_to_exception(c, servers, status, exc):
    for s in servers:
        s.status = status
    with c.backend() as be, pytest.raises(exc):
        be.get_page(REL, 1, lsn=100)


def test_slow_down_is_retried_until_deadline(c, servers):
    for s in servers:
        s.status = Status.SLOW_DOWN
    with c.backend() as be:
        with pytest.raises(comm.ShardUnavailable):
            be.get_page(REL, 1, lsn=100, timeout=0.3)
    assert sum(sh["retries"] for sh in c.stats()["shards"]) > 0


def test_block_beyond_end_is_page_not_found(c):
    with c.backend() as be, pytest.raises(comm.PageNotFound):
        be.get_page(REL, 5000, lsn=100)


def test_frozen_shard_times_out_on_time_while_other_serves(c, servers):
    servers[0].frozen = True
    frozen_blk = next(b for b in range(100) if shard_for(REL, b, 2, 8) == 0)
    live_blk = next(b for b in range(100) if shard_for(REL, b, 2, 8) == 1)
    with c.backend() as be:
        t = time.monotonic()
        with pytest.raises(comm.RequestTimeout):
            be.get_page(REL, frozen_blk, lsn=100, timeout=0.3)
        waited = time.monotonic() - t
        assert 0.29 <= waited < 2.0
        assert be.get_page(REL, live_blk, lsn=100) == fake_page(REL, live_blk, 100)
        # the abandoned slot is reclaimed by the worker's deadline sweep
        deadline = time.monotonic() + 3
        while be.slots_in_use() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert be.slots_in_use() == 0


def test_mismatched_reply_is_never_delivered(c, servers):
    for s in servers:
        s.mangle = True  # answers with other blocks' pages
    with c.backend() as be, pytest.raises(comm.ShardUnavailable, match="blocks"):
        be.get_page(REL, 1, lsn=100, timeout=1)
    assert sum(sh["bad_replies"] for sh in c.stats()["shards"]) >= 1


def test_garbage_reply_is_an_error_not_data(c, servers):
    for s in servers:
        s.garbage = True
    with c.backend() as be, pytest.raises(comm.ShardUnavailable):
        be.get_page(REL, 1, lsn=100, timeout=1)


def test_cancel_from_another_thread(c, servers):
    for s in servers:
        s.frozen = True
    with c.backend() as be:
        threading.Timer(0.1, be.cancel).start()
        t = time.monotonic()
        with pytest.raises(comm.Cancelled):
            be.get_page(REL, 1, lsn=100, timeout=10)
        assert time.monotonic() - t < 2


def test_close_fails_pending_calls(servers):
    for s in servers:
        s.frozen = True
    c = comm.Communicator([s.endpoint for s in servers])
    be = c.backend()
    errors = []

    def reader():
        try:
            be.get_page(REL, 1, lsn=100, timeout=30)
        except comm.CommError as e:
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.2)
    c.close()
    t.join(5)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], comm.CommClosed)
    c.close()  # twice is fine
    with pytest.raises(comm.CommClosed):
        c.backend()


def test_backend_belongs_to_one_thread(c):
    be = c.backend()
    be.get_page(REL, 1, lsn=100)
    out = []
    t = threading.Thread(target=lambda: out.append(pytest.raises(comm.InvalidRequest,
                                                                   be.get_page, REL, 1, 100)))
    t.start()
    t.join()
    assert out
    be.close()
    be.close()
    with pytest.raises(comm.CommClosed):
        be.get_page(REL, 1, lsn=100)


@pytest.mark.parametrize("call,match", [
    (lambda be: be.get_page(REL, -1, lsn=1), "blkno"),
    (lambda be: be.get_page(REL, 2**32 - 1, lsn=1), "blkno"),
    (lambda be: be.get_page(REL, "7", lsn=1), "blkno"),
    (lambda be: be.get_page(REL, 1.5, lsn=1), "blkno"),
    (lambda be: be.get_page((1663, 5, 1, 0), 1, lsn=1), "RelTag"),
    (lambda be: be.get_page(RelTag(1663, 5, 1, 9), 1, lsn=1), "fork"),
    (lambda be: be.get_page(RelTag(-1, 5, 1), 1, lsn=1), "spc"),
    (lambda be: be.get_page(REL, 1, lsn=-1), "lsn"),
    (lambda be: be.get_page(REL, 1, lsn=2**64), "lsn"),
    (lambda be: be.get_page(REL, 1, lsn=10, not_modified_since=11), "not_modified_since"),
    (lambda be: be.get_page(REL, 1, lsn=10, timeout=0), "timeout"),
    (lambda be: be.get_page(REL, 1, lsn=10, timeout=float("nan")), "timeout"),
    (lambda be: be.get_page(REL, 1, lsn=10, timeout=1e12), "timeout"),
    (lambda be: be.get_pages(REL, [1, -2], lsn=10), r"blocks\[1\]"),
    (lambda be: be.get_pages(REL, 5, lsn=10), "blocks"),
    (lambda be: be.get_pages(REL, range(10000), lsn=10), "slots"),
    (lambda be: be.prefetch(REL, [None], lsn=10), "blocks"),
    (lambda be: be.db_size(-4, lsn=10), "db"),
    (lambda be: be.slru_segment(9, 0, lsn=10), "SLRU kind"),
    (lambda be: be.slru_segment(0, -1, lsn=10), "segno"),
])
def test_bad_arguments_are_rejected_locally(c, servers, call, match):
    before = sum(s.requests for s in servers)
    with c.backend() as be, pytest.raises(comm.InvalidRequest, match=match):
        call(be)
    assert sum(s.requests for s in servers) == before  # nothing was sent


def test_worker_threads_are_named_and_stats_and_repr(c):
    names = {t.name for t in threading.enumerate()}
    assert {"comm-shard0-w0", "comm-shard1-w0"} <= names
    with c.backend() as be:
        be.get_pages(REL, range(40), lsn=100)
    st = c.stats()
    assert st["connections"] == 2 and len(st["shards"]) == 2
    assert sum(s["completed"] for s in st["shards"]) >= 2
    assert {"queued", "inflight", "completed", "errors"} <= set(st["shards"][0])
    assert "shard0" in repr(c) and "completed=" in repr(c)


def test_many_backends_concurrently(c):
    errors = []

    def run(seed):
        try:
            with c.backend() as be:
                for i in range(200):
                    b = (seed * 7919 + i * 31) % 1000
                    assert be.get_page(REL, b, lsn=100) == fake_page(REL, b, 100)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(32)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not errors
    assert c.stats()["slots_in_use"] == 0


def test_no_sockets_leak_after_close(servers):
    c = comm.Communicator([s.endpoint for s in servers],
                          config=comm.CommConfig(threads_per_shard=2))
    ctx = c._ctx
    with c.backend() as be:
        be.get_pages(REL, range(64), lsn=100)
    c.close()
    assert ctx.closed  # term() returned: every socket of the context was closed
    with pytest.raises(zmq.ZMQError):
        ctx.socket(zmq.PUSH)


def test_a_worker_that_cannot_start_fails_the_constructor_without_a_hang_or_a_leak(
        servers, caplog):
    # too few sockets for 8 workers: the ones already running must be stopped, the
    # context must terminate (no socket left open), and the error must say what to raise
    cfg = comm.CommConfig(shards=tuple(s.endpoint for s in servers), threads_per_shard=8,
                          max_sockets=12)
    before = set(threading.enumerate())
    with pytest.raises(comm.CommClosed, match="too many sockets"):
        comm.Communicator(config=cfg)
    assert {th for th in threading.enumerate() if th.name.startswith("comm-")} <= before


def test_prefetch_then_read_hits_buffer(c, servers):
    with c.backend() as be:
        assert be.prefetch(REL, range(100, 164), lsn=100) == 64
        deadline = time.monotonic() + 5
        while c.stats()["prefetch"]["pending"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sent = sum(s.pages for s in servers)
        assert be.get_pages(REL, range(100, 164), lsn=100) == [
            fake_page(REL, b, 100) for b in range(100, 164)]
        assert sum(s.pages for s in servers) == sent  # all served from the buffer
        assert c.stats()["prefetch"]["hits"] == 64
        assert be.prefetch(REL, range(100, 164), lsn=100) == 0  # deduplicated


def test_relsize_cache_reuses_answers_only_within_the_lsn_rule(c, servers):
    def sent() -> int:
        return sum(s.requests for s in servers)

    with c.backend() as be:
        assert be.nblocks(REL, 100, not_modified_since=80) == 1000
        n = sent()
        assert be.nblocks(REL, 100) == 1000            # same range
        assert be.exists(REL, 90, not_modified_since=85)  # inside [80, 100]
        assert be.nblocks(REL, 150, not_modified_since=100) == 1000  # touches at 100
        assert sent() == n
        assert be.nblocks(REL, 300, not_modified_since=200) == 1000  # after: ask again
        assert sent() == n + 1
    rc = c.stats()["relsize_cache"]
    assert rc["hits"] == 3 and rc["misses"] == 2


def test_a_read_that_joined_a_failed_prefetch_reads_the_page_itself(servers):
    for s in servers:
        s.frozen = True
    cfg = comm.CommConfig(attempt_timeout=0.2)
    with comm.Communicator([s.endpoint for s in servers], stripe_size=8, config=cfg) as c, \
            c.backend() as be:
        be.prefetch(REL, [3], lsn=100, timeout=0.3)  # will time out on its own deadline
        threading.Timer(0.6, lambda: [setattr(s, "frozen", False) for s in servers]).start()
        assert be.get_page(REL, 3, lsn=100, timeout=10) == fake_page(REL, 3, 100)
        assert be.stats()["joins"] == 1


def test_lsn_zero_and_huge_block_lists_are_refused_at_once(servers) -> None:
    import itertools
    import time as _time

    from comm._validate import MAX_BLOCKS_PER_CALL

    rel = comm.RelTag(1663, 5, 16384)
    with comm.Communicator([s.endpoint for s in servers]) as c, c.backend() as be:
        with pytest.raises(comm.InvalidRequest, match="InvalidXLogRecPtr"):
            be.get_page(rel, 1, lsn=0)
        with pytest.raises(comm.InvalidRequest, match="InvalidXLogRecPtr"):
            be.exists(rel, lsn=0)
        t0 = _time.monotonic()
        for blocks in (range(0, 2**32 - 1), range(0, 2**32 - 1, 2),
                       itertools.count(), range(MAX_BLOCKS_PER_CALL + 1)):
            for call in (be.get_pages, be.prefetch):
                with pytest.raises(comm.InvalidRequest, match="blocks in one call"):
                    call(rel, blocks, lsn=100)
        assert _time.monotonic() - t0 < 30  # no 2**32-element list was made
        assert be.slots_in_use() == 0
