"""import-pgdata on a real PostgreSQL 15 cluster (initdb --data-checksums, pgbench):
every page lands byte-identical on exactly its owner shard with a valid checksum;
a re-import after pgbench traffic and a TRUNCATE writes only changed pages, keeps
the old versions readable at the old LSN and drops the old relfilenode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgcluster import PgCluster, relation_pages

from shards import PgImportError
from shards.__main__ import main
from shards._checksum import verify_page_checksums
from shards._layout import open_shard_store, read_layout
from shards._pgimport import import_pgdata
from shards._shardmap import shard_for
from shards._store import PageStore
from shards._types import RelTag

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(300)]
SHARDS, STRIPE = 4, 64  # a small stripe spreads even pgbench's tables over all shards


@contextlib.contextmanager
def open_all(store_dir: Path) -> Iterator[list[PageStore]]:
    """Every shard's store, read-only, closed on the way out."""
    stores = [open_shard_store(store_dir, s, readonly=True) for s in range(SHARDS)]
    try:
        yield stores
    finally:
        for st in stores:
            st.close()


def check_pages(stores: list[PageStore], files: dict, lsn: int) -> None:
    """Each page: byte-identical on its owner, absent elsewhere; every checksum valid."""
    owners: set[int] = set()
    by_shard: dict[int, dict[RelTag, list[tuple[int, bytes]]]] = {}
    for (tag, blk), page in files.items():
        rel = RelTag(*tag)
        owner = shard_for(rel, blk, SHARDS, STRIPE)
        owners.add(owner)
        by_shard.setdefault(owner, {}).setdefault(rel, []).append((blk, page))
    assert owners == set(range(SHARDS))
    for s, st in enumerate(stores):
        with st.reader() as r:
            for owner, rels in by_shard.items():
                for rel, pages in rels.items():
                    got = r.get_pages(rel, [b for b, _ in pages], lsn)
                    if owner == s:
                        assert got == [p for _, p in pages], (s, rel)
                    else:
                        assert got == [None] * len(pages), (s, rel)
    pages = list(files.values())
    ok = verify_page_checksums(pages, [blk for _, blk in files])
    bad = [k for k, good in zip(files, ok, strict=True) if not good]
    assert not bad, f"pages with bad checksums: {bad[:5]}"


def nblocks_of(files: dict) -> dict[RelTag, int]:
    out: dict[RelTag, int] = {}
    for tag, blk in files:
        out[RelTag(*tag)] = max(out.get(RelTag(*tag), 0), blk + 1)
    return out


def test_import_and_reimport(pg_cluster: PgCluster, tmp_path: Path) -> None:
    pg = pg_cluster.clone()
    try:
        _run_import_and_reimport(pg, tmp_path / "store")
    finally:
        pg.cleanup()


def _run_import_and_reimport(pg: PgCluster, store_dir: Path) -> None:
    lsn1, files1 = _first_import(pg, store_dir)
    old_rel = _traffic_and_truncate(pg)
    lsn2, files2 = _reimport(pg, store_dir, files1)
    assert lsn2 > lsn1
    with open_all(store_dir) as stores:
        check_pages(stores, files2, lsn2)
        check_pages(stores, files1, lsn1)  # the old versions are still there
        for st in stores:
            assert st.nblocks(old_rel, lsn1) == nblocks_of(files1)[old_rel]
            assert st.nblocks(old_rel, lsn2) is None
            assert old_rel in st.relations(lsn1) and old_rel not in st.relations(lsn2)
            assert st.get_page(old_rel, 0, lsn2) is None
            assert st.last_lsn == lsn2
        owner = shard_for(old_rel, 0, SHARDS, STRIPE)
        assert stores[owner].get_page(old_rel, 0, lsn1) == files1[(tuple(old_rel), 0)]

    # same data at a later LSN: nothing to write; an older LSN is refused
    r3 = import_pgdata(pg.pgdata, store_dir, shard_count=SHARDS, stripe_size=STRIPE,
                       lsn=lsn2 + 8)
    assert (r3.pages_written, r3.dropped, r3.changed_sizes) == (0, 0, 0)
    with pytest.raises(PgImportError, match="below"):
        import_pgdata(pg.pgdata, store_dir, shard_count=SHARDS, stripe_size=STRIPE, lsn=lsn1)
    with pytest.raises(PgImportError, match="shard"):
        import_pgdata(pg.pgdata, store_dir, shard_count=2, stripe_size=STRIPE)


def _first_import(pg: PgCluster, store_dir: Path) -> tuple[int, dict]:
    """Import the stopped cluster; every page, size, SLRU and db size is there."""
    lsn1 = pg.checkpoint_lsn()
    files1 = relation_pages(pg.pgdata)
    r1 = import_pgdata(pg.pgdata, store_dir, shard_count=SHARDS, stripe_size=STRIPE)
    assert r1.lsn == lsn1
    assert r1.pages_seen == r1.pages_written == len(files1)
    assert read_layout(store_dir)["shard_count"] == SHARDS
    with open_all(store_dir) as stores:
        check_pages(stores, files1, lsn1)
        for rel, n in nblocks_of(files1).items():
            assert all(st.nblocks(rel, lsn1) == n for st in stores), rel
        assert all(st.last_lsn == lsn1 for st in stores)
        assert stores[0].get_slru(0, 0, lsn1) is not None  # pg_xact/0000
        dbs = [int(d.name) for d in (pg.pgdata / "base").iterdir() if d.name.isdigit()]
        assert all(stores[0].db_size(db, lsn1) > 0 for db in dbs)
    return lsn1, files1


def _traffic_and_truncate(pg: PgCluster) -> RelTag:
    """pgbench traffic, and a TRUNCATE that moves pgbench_tellers (and its index) to
    new files; returns the table's old relation."""
    pg.start()
    old_node = int(pg.psql("SELECT pg_relation_filenode('pgbench_tellers');"))
    pg.pgbench("-t", "200", "-n")
    pg.psql("TRUNCATE pgbench_tellers;")
    new_node = int(pg.psql("SELECT pg_relation_filenode('pgbench_tellers');"))
    db = int(pg.psql("SELECT oid FROM pg_database WHERE datname = 'postgres';"))
    pg.checkpoint()
    pg.stop()
    assert new_node != old_node
    return RelTag(1663, db, old_node, 0)


def _reimport(pg: PgCluster, store_dir: Path, files1: dict) -> tuple[int, dict]:
    """Import again: only the changed pages are written, the old files are dropped."""
    lsn2 = pg.checkpoint_lsn()
    files2 = relation_pages(pg.pgdata)
    changed = sum(1 for k, p in files2.items() if files1.get(k) != p)
    assert 0 < changed < len(files2)
    r2 = import_pgdata(pg.pgdata, store_dir, shard_count=SHARDS, stripe_size=STRIPE)
    assert (r2.lsn, r2.pages_seen, r2.pages_written) == (lsn2, len(files2), changed)
    assert r2.dropped >= 2  # the table's and its index's old relfilenodes
    return lsn2, files2


def test_cli_and_refusals(pg_cluster: PgCluster, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    assert main(["import-pgdata", str(pg_cluster.pgdata), "--store", str(store),
                 "--shard-count", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "pages/s" in out and "written" in out
    with open_shard_store(store, 0, readonly=True) as st:
        assert st.last_lsn == pg_cluster.checkpoint_lsn()

    with pytest.raises(PgImportError, match="not a directory"):
        import_pgdata(tmp_path / "nope", tmp_path / "s2")
    with pytest.raises(PgImportError, match="not a PostgreSQL data directory"):
        import_pgdata(tmp_path, tmp_path / "s2")
    pg = pg_cluster.clone()
    try:
        pg.start()
        with pytest.raises(PgImportError, match="postmaster.pid"):
            import_pgdata(pg.pgdata, tmp_path / "s3")
    finally:
        pg.cleanup()
    # a refusal is a usage error: status 2 and one line, like every other command
    capsys.readouterr()
    for argv, why in (([str(tmp_path), "--store", str(tmp_path / "s4")],
                       "not a PostgreSQL data directory"),
                      ([str(tmp_path / "nope"), "--store", str(tmp_path / "s4")],
                       "not a directory"),
                      ([str(pg_cluster.pgdata), "--store", str(store), "--shard-count", "3",
                        "--no-progress"], "holds 2 shard")):
        assert main(["import-pgdata", *argv]) == 2, why
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and why in err, err


def test_cli_failure_while_writing_exits_1(pg_cluster: PgCluster, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """An unexpected failure during the import (the store failing while written) is
    status 1, one line; a refusal is 2 (test_cli_and_refusals)."""
    import shards._pgimport as mod
    from shards import StoreError

    def failing_flush(self: mod._Importer) -> None:
        raise StoreError("write transaction failed: MDB_MAP_FULL (simulated)")

    monkeypatch.setattr(mod._Importer, "flush", failing_flush)
    assert main(["import-pgdata", str(pg_cluster.pgdata), "--store", str(tmp_path / "s"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: import failed: ") and err.count("\n") == 1, err
    assert "MDB_MAP_FULL" in err


def test_import_below_a_generated_stores_lsn_is_refused(pg_cluster: PgCluster,
                                                       tmp_path: Path) -> None:
    """A store written by generate_store has no imported_lsn: its last_lsn is its newest
    version, and an import below it is refused with the store left as it was."""
    from shards import generate_store
    store = tmp_path / "gen"
    lsn = pg_cluster.checkpoint_lsn()
    generate_store(store, SHARDS, STRIPE, rels=1, nblocks=8, lsns=[lsn + 0x1000])
    with open_all(store) as stores:
        before = [(st.last_lsn, st.meta()) for st in stores]
    with pytest.raises(PgImportError, match="below .* the newest version"):
        import_pgdata(pg_cluster.pgdata, store, shard_count=SHARDS, stripe_size=STRIPE, lsn=lsn)
    with open_all(store) as stores:
        assert [(st.last_lsn, st.meta()) for st in stores] == before


def test_interrupted_import_is_rerun_safely(pg_cluster: PgCluster, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """An import that dies after a few committed batches leaves readable stores, no
    imported_lsn, and a re-run writes exactly the pages still missing."""
    import shards._pgimport as mod

    store = tmp_path / "store"
    monkeypatch.setattr(mod, "BATCH_PAGES", 256)
    real_flush, calls = mod._Importer.flush, []

    def dying_flush(self: mod._Importer) -> None:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated kill")
        real_flush(self)

    monkeypatch.setattr(mod._Importer, "flush", dying_flush)
    with pytest.raises(KeyboardInterrupt):
        import_pgdata(pg_cluster.pgdata, store, shard_count=SHARDS, stripe_size=STRIPE)
    monkeypatch.setattr(mod._Importer, "flush", real_flush)
    with open_all(store) as stores:
        assert all("imported_lsn" not in st.meta() for st in stores)
        lsn = pg_cluster.checkpoint_lsn()
        partial = sum(len(st.relations(lsn)) for st in stores)
        assert partial == 0  # sizes come last: the half-import is not visible as relations
    files = relation_pages(pg_cluster.pgdata)
    r = import_pgdata(pg_cluster.pgdata, store, shard_count=SHARDS, stripe_size=STRIPE)
    assert 0 < r.pages_written < len(files) == r.pages_seen
    with open_all(store) as stores:
        check_pages(stores, files, lsn)
        assert all(st.meta()["imported_lsn"] == lsn for st in stores)
