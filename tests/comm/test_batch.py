"""Coalescing foreground reads of one relation into one wire request."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from fakeserver import FakeServer, fake_page
from waiting import wait_for

import comm
from comm import RelTag
from comm._batch import Batch, coalesce

REL = RelTag(1663, 5, 16384)
OTHER = RelTag(1663, 5, 16385)
pytestmark = pytest.mark.timeout(60)


class Job:
    """A stand-in with the worker's job interface."""

    batchable = True

    def __init__(self, rel: Any, blocks: tuple[int, ...], lsn: int = 10, nms: int = 10,
                 cls: int = 0, kind: int = 1, deadline: float = 1.0) -> None:
        self.rel, self.blocks, self.lsn, self.nms = rel, blocks, lsn, nms
        self.cls, self.kind, self.deadline, self.shard = cls, kind, deadline, 0
        self.got: Any = None
        self.live = True

    def is_live(self) -> bool:
        return self.live

    def complete(self, pages: Any) -> bool:
        self.got = list(pages)
        return True

    def fail(self, error: BaseException) -> bool:
        self.got = error
        return True

    def describe(self) -> dict[str, Any]:
        return {"blocks": list(self.blocks)}


def test_coalesce_groups_by_relation_and_lsns_in_order():
    a, b, c = Job(REL, (1,)), Job(OTHER, (2,)), Job(REL, (3,))
    d, e = Job(REL, (4,), lsn=11), Job(REL, (5,), cls=1)  # another LSN; a prefetch
    f = Job(REL, (6,), kind=2)  # not GetPages
    out = coalesce([a, b, c, d, e, f])
    assert isinstance(out[0], Batch) and out[0].members == [a, c] and out[0].blocks == (1, 3)
    assert out[1:] == [b, d, e, f]


def test_coalesce_leaves_unbatchable_jobs_and_caps_at_32_blocks():
    class Plain(Job):
        batchable = False

    jobs = [Job(REL, (i,)) for i in range(40)] + [Plain(REL, (99,))]
    out = coalesce(jobs)
    assert [len(x.blocks) for x in out] == [32, 8, 1] and out[2] is jobs[-1]
    assert max(x.deadline for x in out[:2]) == 1.0


def test_batch_asks_a_shared_block_once_and_completes_each_member():
    a, b = Job(REL, (7,), deadline=2.0), Job(REL, (7, 9), deadline=5.0)
    batch = Batch([a, b])
    assert batch.blocks == (7, 9) and batch.deadline == 5.0
    batch.complete([b"p7", b"p9"])
    assert a.got == [b"p7"] and b.got == [b"p7", b"p9"]
    a.live = False
    assert batch.is_live()
    b.live = False
    assert not batch.is_live()
    err = RuntimeError("x")
    batch.fail(err)
    assert a.got is err and b.got is err
    assert batch.describe()["batched"] == 2


def _one_round(c: comm.Communicator, srv: FakeServer) -> dict[int, Any]:
    results: dict[int, Any] = {}

    def read(blk: int) -> None:
        with c.backend() as be:
            try:
                results[blk] = be.get_page(REL, blk, lsn=100)
            except comm.CommError as e:
                results[blk] = e

    first = threading.Thread(target=read, args=(1,))
    first.start()
    time.sleep(0.1)  # block 1 holds the one-request window for srv.delay seconds
    rest = [threading.Thread(target=read, args=(b,)) for b in (5, 6, 5000)]
    for t in rest:
        t.start()
    for t in [first, *rest]:
        t.join(10)
    return results


def test_reads_taken_together_share_a_request_and_errors_stay_their_own():
    cfg = comm.CommConfig(inflight_per_conn=1, request_timeout=5)
    with FakeServer(nblocks=1000) as srv, comm.Communicator([srv.endpoint], config=cfg) as c:
        with c.backend() as be:  # connect first
            be.get_page(REL, 0, lsn=100)
        srv.delay = 0.3
        # the three reads that wait behind block 1 are usually taken in one wakeup of
        # the worker (it may also wake for its 20 ms sweep between them): a few rounds
        for _ in range(5):
            results = _one_round(c, srv)
            assert results[1] == fake_page(REL, 1, 100)
            assert results[5] == fake_page(REL, 5, 100)
            assert results[6] == fake_page(REL, 6, 100)
            assert isinstance(results[5000], comm.PageNotFound) and "5000" in str(results[5000])
            if c.stats()["shards"][0]["splits"]:
                break
        shard = c.stats()["shards"][0]
        assert shard["coalesced"] >= 1 and shard["splits"] >= 1
        # a batch that held block 5000 failed as a whole, then went out one by one
        batched = [blocks for blocks in srv.log if 5000 in blocks and len(blocks) > 1]
        assert batched and all((b,) in srv.log for b in batched[0])


def test_a_bad_checksum_fails_only_the_readers_of_that_page():
    a, b, c = Job(REL, (7,)), Job(REL, (8,)), Job(REL, (7, 9))
    batch = Batch([a, b, c])
    err = RuntimeError("bad checksum")
    batch.complete_except([b"p7", b"p8", b"p9"], {7}, err)
    assert a.got is err and c.got is err and b.got == [b"p8"]


def test_whole_request_errors_are_not_split():
    from comm._outcome import per_block as _per_block
    from shards.protocol import GetPagesReply, Status

    def rep(status: Status, reason: str) -> GetPagesReply:
        return GetPagesReply(1, 0, status, 10, 10, REL, (1, 2), (), reason)

    assert _per_block(rep(Status.NOT_FOUND, "block 2 of rel is beyond its size"))
    assert _per_block(rep(Status.INVALID_REQUEST, "block 2 belongs to shard 1"))
    assert not _per_block(rep(Status.NOT_FOUND, "relation 1663/5/16384 does not exist"))
    assert not _per_block(rep(Status.INTERNAL_ERROR, "store at LSN 5 has not reached 10"))
    assert not _per_block(rep(Status.SLOW_DOWN, "queue full"))


def test_a_failed_promotion_does_not_lose_the_join_slot():
    cfg = comm.CommConfig(request_timeout=1.0)
    with FakeServer() as srv, comm.Communicator([srv.endpoint], config=cfg) as c:
        srv.frozen = True  # the prefetch stays in flight until its deadline
        with c.backend() as be:
            assert be.prefetch(REL, range(0, 4), lsn=100) == 4

            def refuse(job: Any, submit: Any) -> None:
                raise comm.CommClosed("closed while promoting")

            c._promote = refuse  # type: ignore[method-assign]
            with pytest.raises(comm.CommClosed):
                be.get_pages(REL, range(0, 4), lsn=100)
            with pytest.raises(comm.CommClosed):
                be.get_page(REL, 1, lsn=100)
            # the prefetch fails at its deadline; the joined slots come back to the ring
            assert wait_for(lambda: be.slots_in_use() == 0, timeout=5)
            srv.frozen = False
            assert be.get_page(REL, 1, lsn=100) == fake_page(REL, 1, 100)


def test_get_pages_reads_itself_what_a_failed_prefetch_was_bringing():
    with FakeServer() as srv, comm.Communicator([srv.endpoint]) as c:
        with c.backend() as be:
            srv.frozen = True  # the prefetch is lost on the way: it fails at its deadline
            assert be.prefetch(REL, range(10, 14), lsn=100, timeout=0.5) == 4
            time.sleep(0.1)
            srv.frozen = False
            got = be.get_pages(REL, [9, 10, 11, 12, 13], lsn=100, timeout=5)
            assert got == [fake_page(REL, b, 100) for b in (9, 10, 11, 12, 13)]
            assert be.stats()["joins"] == 4 and c.stats()["prefetch"]["failed"] == 4


def test_a_wrong_shard_error_says_what_to_fix():
    """A page server that disowns a block names itself; the error then says whether the
    endpoints are out of order or the layout (stripe, shard count) does not match."""
    import types

    from comm import WrongShard
    from comm._outcome import error_for
    from shards.protocol import Status

    job = types.SimpleNamespace(kind=1, shard=0, rel=REL, blocks=(0,), lsn=10)

    def rep(reason: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(status=Status.INVALID_REQUEST, reason=reason)

    e = error_for(job, rep(f"block 0 of {REL} belongs to shard 0, this is shard 3"))
    assert isinstance(e, WrongShard) and "says it is shard 3" in str(e)
    assert "COMM_SHARDS" in str(e)
    e = error_for(job, rep(f"block 0 of {REL} belongs to shard 1, this is shard 0"))
    assert isinstance(e, WrongShard) and "COMM_STRIPE_SIZE" in str(e)


def test_an_lsn_beyond_the_page_servers_says_so() -> None:
    import types

    from comm import ServerError
    from comm._outcome import error_for
    from shards.protocol import Status

    job = types.SimpleNamespace(kind=1, shard=2, rel=REL, blocks=(0,), lsn=0x3000, nms=0x3000)
    rep = types.SimpleNamespace(status=Status.INTERNAL_ERROR, reason=(
        "store at LSN 8192 has not reached not_modified_since 12288 after waiting 1s"))
    e = error_for(job, rep)
    assert isinstance(e, ServerError)
    assert "holds no data up to lsn 0x3000 yet" in str(e) and "last_lsn" in str(e)
