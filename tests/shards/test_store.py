"""PageStore: versions, relation sizes per LSN, db sizes, SLRU, batches, reopen,
argument checks, and crash safety under SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shards._errors import InvalidArgument, InvalidArgumentType, ShardsError, StoreError
from shards._layout import open_shard_store, read_layout, shard_store_path, write_layout
from shards._store import PageStore
from shards._types import BLCKSZ, MAX_BLOCKNO, MAX_LSN, RelTag

REL = RelTag(1663, 16384, 16397)
REL2 = RelTag(1663, 16384, 16400, 1)
SMALL_MAP = 1 << 28


def page(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (BLCKSZ // 4)


@pytest.fixture
def store(tmp_path: Path):
    with PageStore(tmp_path / "s", map_size=SMALL_MAP) as s:
        yield s


def test_page_versions(store: PageStore) -> None:
    assert store.get_page(REL, 0, MAX_LSN) is None
    store.put_page(REL, 0, 100, page(1))
    store.put_page(REL, 0, 200, page(2))
    store.put_page(REL, 1, 150, page(3))
    assert store.get_page(REL, 0, 99) is None
    assert store.get_page(REL, 0, 100) == page(1)
    assert store.get_page(REL, 0, 199) == page(1)
    assert store.get_page(REL, 0, 200) == page(2)
    assert store.get_page(REL, 0, MAX_LSN) == page(2)
    assert store.get_page(REL, 2, MAX_LSN) is None
    assert store.get_page(REL2, 0, MAX_LSN) is None
    assert store.get_pages(REL, [1, 0, 2, 0], 160) == [page(3), page(1), None, page(1)]
    store.put_page(REL, 0, 200, page(9))  # same LSN replaces
    assert store.get_page(REL, 0, 200) == page(9)
    store.put_page(REL, MAX_BLOCKNO, 0, page(4))
    assert store.get_page(REL, MAX_BLOCKNO, 0) == page(4)
    assert store.last_lsn == 200


def test_reader_one_snapshot(store: PageStore) -> None:
    store.put_page(REL, 0, 10, page(1))
    store.set_nblocks(REL, 10, 1)
    with store.reader() as r:
        store.put_page(REL, 0, 20, page(2))  # committed after the snapshot began
        assert r.get_page(REL, 0, 30) == page(1)
        assert r.get_pages(REL, [0], 30) == [page(1)]
        assert r.nblocks(REL, 30) == 1
        assert r.last_lsn == 10
    assert store.get_page(REL, 0, 30) == page(2)


def test_relation_sizes(store: PageStore) -> None:
    assert store.nblocks(REL, 5) is None
    store.set_nblocks(REL, 10, 0)      # create
    store.set_nblocks(REL, 20, 5)      # extend
    store.set_nblocks(REL, 30, 2)      # truncate
    store.drop_relation(REL, 40)       # drop
    store.set_nblocks(REL, 50, 1)      # re-create
    store.set_nblocks(REL2, 25, 7)
    expect = {9: None, 10: 0, 19: 0, 20: 5, 30: 2, 39: 2, 40: None, 49: None, 50: 1, MAX_LSN: 1}
    for lsn, n in expect.items():
        assert store.nblocks(REL, lsn) == n, lsn
    assert store.relations(9) == set()
    assert store.relations(25) == {REL, REL2}
    assert store.relations(45) == {REL2}
    assert store.relations(50) == {REL, REL2}
    store.drop_relation(REL2, 60)
    assert store.relations(60) == {REL}


def test_drop_hides_old_pages(store: PageStore) -> None:
    store.set_nblocks(REL, 10, 2)
    store.put_page(REL, 0, 10, page(1))
    store.put_page(REL, 1, 10, page(2))
    store.drop_relation(REL, 20)
    store.set_nblocks(REL, 30, 2)
    store.put_page(REL, 0, 30, page(3))
    assert store.get_page(REL, 1, 15) == page(2)   # before the drop: still visible
    assert store.get_page(REL, 1, 35) is None      # old relation's page is gone
    assert store.get_pages(REL, [0, 1], 35) == [page(3), None]


def test_put_page_at_a_drops_lsn_keeps_the_old_pages_hidden(store: PageStore) -> None:
    """A page put at the very LSN of a drop starts the new relation: the dropped
    relation's pages must not come back (its drop marker stays)."""
    for b in range(10):
        store.put_page(REL, b, 50, page(b))
    store.drop_relation(REL, 100)
    store.put_page(REL, 0, 100, page(99))
    assert store.nblocks(REL, 100) == 1 and store.get_page(REL, 0, 100) == page(99)
    assert store.get_page(REL, 5, 100) is None
    store.set_nblocks(REL, 200, 10)
    assert store.get_page(REL, 5, 200) is None  # never the page from before the drop
    assert store.get_page(REL, 5, 60) == page(5)  # still there at the old LSN


def test_put_page_extends_the_relation(store: PageStore) -> None:
    """PageStore.put_page (one page, its own transaction) makes the relation at least
    blkno+1 blocks long at its LSN; a batch's put_page leaves sizes to set_nblocks."""
    for b in range(4):
        store.put_page(REL, b, 100, page(b))
    assert store.nblocks(REL, 99) is None
    assert store.nblocks(REL, 100) == 4
    assert store.relations(100) == {REL}
    store.put_page(REL, 1, 200, page(9))        # inside the relation: size unchanged
    assert store.nblocks(REL, 200) == 4
    store.set_nblocks(REL, 300, 10)
    store.put_page(REL, 20, 250, page(20))      # extends at 250, not the later size
    assert [store.nblocks(REL, x) for x in (249, 250, 299, 300)] == [4, 21, 21, 10]
    store.put_page(REL, 2, 300, page(2))
    assert store.nblocks(REL, 300) == 10
    store.drop_relation(REL, 400)
    store.put_page(REL, 0, 500, page(5))        # after a drop: created anew
    assert store.nblocks(REL, 450) is None and store.nblocks(REL, 500) == 1
    assert store.get_pages(REL, [0, 1], 500) == [page(5), None]
    store.drop_relation(REL2, 600)
    store.put_page(REL2, 2, 600, page(6))       # at the drop's own LSN: re-created
    assert store.nblocks(REL2, 600) == 3 and store.get_page(REL2, 2, 600) == page(6)
    store.put_page(REL, MAX_BLOCKNO, 700, page(7))
    assert store.nblocks(REL, 700) == MAX_BLOCKNO + 1
    with store.batch() as b:
        b.put_page(REL2, 7, 800, page(8))
    assert store.nblocks(REL2, 800) == 3         # batches set sizes explicitly
    with pytest.raises(ValueError, match="page"):
        store.put_page(RelTag(1, 1, 1), 5, 900, b"short")
    assert store.nblocks(RelTag(1, 1, 1), 900) is None  # a refused write changes nothing


def test_db_size_and_slru(store: PageStore) -> None:
    assert store.db_size(5, MAX_LSN) is None
    store.set_db_size(5, 10, 1000)
    store.set_db_size(5, 20, 2000)
    assert [store.db_size(5, x) for x in (9, 10, 19, 20)] == [None, 1000, 1000, 2000]
    assert store.db_size(6, 20) is None
    seg1, seg2 = page(1) * 32, page(2) * 3
    store.put_slru(0, 7, 10, seg1)
    store.put_slru(0, 7, 20, seg2)
    store.put_slru(1, 7, 20, b"")
    assert store.get_slru(0, 7, 9) is None
    assert store.get_slru(0, 7, 15) == seg1
    assert store.get_slru(0, 7, 25) == seg2
    assert store.get_slru(1, 7, 25) == b""
    assert store.get_slru(2, 7, 25) is None


def test_batch_commits_or_aborts(store: PageStore) -> None:
    with store.batch() as b:
        for i in range(10):
            b.put_page(REL, i, 5, page(i))
        b.set_nblocks(REL, 5, 10)
        b.set_db_size(1, 5, 80)
        b.put_slru(0, 0, 5, page(0))
    assert store.get_pages(REL, range(10), 5) == [page(i) for i in range(10)]
    with pytest.raises(RuntimeError):
        with store.batch() as b:
            b.put_page(REL, 0, 9, page(99))
            b.set_nblocks(REL, 9, 1)
            raise RuntimeError("boom")
    assert store.get_page(REL, 0, 9) == page(0)
    assert store.nblocks(REL, 9) == 10
    assert store.last_lsn == 5


def test_last_lsn_and_meta(store: PageStore) -> None:
    assert store.last_lsn == 0
    assert store.meta() == {}
    store.set_last_lsn(50)
    store.put_page(REL, 0, 40, page(1))
    assert store.last_lsn == 50           # never goes down
    store.set_meta({"shard": 1, "shard_count": 4, "stripe_size": 2048})
    assert store.meta() == {"shard": 1, "shard_count": 4, "stripe_size": 2048}


def test_reopen_and_readonly(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with pytest.raises(StoreError, match="no page store"):
        PageStore(path, readonly=True)
    with PageStore(path, map_size=SMALL_MAP) as s:
        s.put_page(REL, 3, 7, page(3))
        s.set_nblocks(REL, 7, 4)
    with PageStore(path, readonly=True, map_size=SMALL_MAP) as s:
        assert s.get_page(REL, 3, 7) == page(3)
        assert s.nblocks(REL, 7) == 4
        assert s.last_lsn == 7
        with pytest.raises(StoreError, match="read-only"):
            s.put_page(REL, 3, 8, page(4))
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.get_page(REL, 3, 7)


@pytest.mark.parametrize("call, exc, match", [
    (lambda s: s.put_page((1, 2, 3, 0), 0, 1, page(0)), TypeError, "rel"),
    (lambda s: s.put_page(RelTag(1, 2, 3, 9), 0, 1, page(0)), ValueError, "fork"),
    (lambda s: s.put_page(REL, -1, 1, page(0)), ValueError, "blkno"),
    (lambda s: s.put_page(REL, MAX_BLOCKNO + 1, 1, page(0)), ValueError, "blkno"),
    (lambda s: s.put_page(REL, 1.0, 1, page(0)), TypeError, "blkno"),
    (lambda s: s.put_page(REL, 0, -1, page(0)), ValueError, "lsn"),
    (lambda s: s.put_page(REL, 0, MAX_LSN + 1, page(0)), ValueError, "lsn"),
    (lambda s: s.put_page(REL, 0, 1, b"x" * 100), ValueError, "page"),
    (lambda s: s.put_page(REL, 0, 1, "x" * BLCKSZ), TypeError, "page"),
    (lambda s: s.get_page(REL, 0, None), TypeError, "lsn"),
    (lambda s: s.get_pages(REL, [0, -2], 1), ValueError, "blkno"),
    (lambda s: s.set_nblocks(REL, 1, -1), ValueError, "n"),
    (lambda s: s.set_db_size(-1, 1, 0), ValueError, "db"),
    (lambda s: s.put_slru(0, 0, 1, b"x"), ValueError, "data"),
    (lambda s: s.put_slru(0, 0, 1, page(0) * 33), ValueError, "data"),
    (lambda s: s.set_meta([1]), TypeError, "meta"),
])
def test_bad_arguments(store: PageStore, call, exc, match) -> None:
    with pytest.raises(exc, match=match) as ei:
        call(store)
    # typed: in shards' tree, and still the ValueError/TypeError callers catch
    assert isinstance(ei.value, ShardsError)
    assert isinstance(ei.value, InvalidArgument if exc is ValueError else InvalidArgumentType)


def test_trial_argument_errors_are_typed(store: PageStore) -> None:
    with pytest.raises(InvalidArgumentType, match="rel must be a RelTag, got str"):
        store.get_page("x", 1, 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="page must be exactly 8192 bytes, got 3"):
        store.put_page(RelTag(1, 1, 1, 0), 1, 5, b"abc")
    assert store.last_lsn == 0  # nothing written


def test_sharded_layout(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="layout.json"):
        read_layout(tmp_path)
    write_layout(tmp_path, 3, 256)
    assert read_layout(tmp_path) == {"shard_count": 3, "stripe_size": 256, "version": 1}
    assert shard_store_path(tmp_path, 2) == tmp_path / "shard-0002"
    with open_shard_store(tmp_path, 2, map_size=SMALL_MAP) as s:
        s.put_page(REL, 0, 1, page(1))
    with open_shard_store(tmp_path, 2, readonly=True, map_size=SMALL_MAP) as s:
        assert s.get_page(REL, 0, 1) == page(1)
    with pytest.raises(ValueError, match="shard"):
        open_shard_store(tmp_path, 3)
    with pytest.raises(InvalidArgument, match=r"shard=5 is outside 0\.\.2"):
        open_shard_store(tmp_path, 5)
    with pytest.raises(InvalidArgumentType, match="shard must be an int"):
        open_shard_store(tmp_path, "0")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shard_count"):
        write_layout(tmp_path, 0, 256)
    (tmp_path / "layout.json").write_text("{broken")
    with pytest.raises(StoreError, match="layout.json"):
        read_layout(tmp_path)


def test_a_path_that_is_not_a_sharded_store_is_never_created(tmp_path: Path) -> None:
    """A mistyped store path is reported (as LocalCluster and serve report it), not
    silently made an empty store, read-only or not."""
    missing = tmp_path / "no" / "such" / "store"
    empty = tmp_path / "empty"
    empty.mkdir()
    for where in (missing, empty):
        for readonly in (False, True):
            with pytest.raises(StoreError, match="is not a sharded page store"):
                open_shard_store(where, 0, readonly=readonly)
    assert not (tmp_path / "no").exists()
    assert list(empty.iterdir()) == []


def test_a_sharded_store_root_is_not_a_page_store(tmp_path: Path) -> None:
    write_layout(tmp_path, 2, 16)
    for readonly in (False, True):
        with pytest.raises(StoreError, match="sharded page store .*open_shard_store"):
            PageStore(tmp_path, readonly=readonly, map_size=SMALL_MAP)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layout.json"]  # no data.mdb
    with open_shard_store(tmp_path, 1, map_size=SMALL_MAP) as s:  # its shards still open
        s.put_page(REL, 0, 1, page(1))
    with open_shard_store(tmp_path, 1, readonly=True, map_size=SMALL_MAP) as s:
        assert s.last_lsn == 1


# ---------------------------------------------------------------- crash safety

PAGES_PER_BATCH = 64
_LOADER = textwrap.dedent("""
    import sys
    from shards._store import PageStore
    from shards._types import BLCKSZ, RelTag
    rel = RelTag(1663, 1, 1)
    with PageStore(sys.argv[1], map_size=1 << 30) as s:
        k = s.last_lsn  # continue after an earlier, killed run
        while True:
            k += 1
            with s.batch() as b:
                for i in range({n}):
                    b.put_page(rel, i, k, k.to_bytes(4, "little") * (BLCKSZ // 4))
                b.set_db_size(1, k, k)   # the marker: batch k committed
            print(k, flush=True)
""").format(n=PAGES_PER_BATCH)


@pytest.mark.timeout(60)
def test_sigkill_mid_load_is_all_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / "crash"
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rel = RelTag(1663, 1, 1)
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _LOADER, str(path)], env=env,
                                stdout=subprocess.PIPE, text=True)
        try:
            for _ in range(3 + round_):
                assert proc.stdout is not None and proc.stdout.readline()
            time.sleep(0.003 * (round_ + 1))  # land somewhere inside a batch
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            proc.kill()
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
        with PageStore(path, map_size=1 << 30) as s:
            last = s.db_size(1, 2**63)
            assert last is not None and last >= 3
            assert s.last_lsn == last
            for k in range(1, last + 2):
                pages = s.get_pages(rel, range(PAGES_PER_BATCH), k)
                marker = s.db_size(1, k)
                if k <= last:       # committed batch: every page has version k
                    assert marker == k
                    assert all(p == k.to_bytes(4, "little") * (BLCKSZ // 4) for p in pages)
                else:               # the batch being written when killed: nothing of it
                    assert all(p == (k - 1).to_bytes(4, "little") * (BLCKSZ // 4)
                               for p in pages)
