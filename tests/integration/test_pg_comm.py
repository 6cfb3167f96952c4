"""End to end on a real PostgreSQL 15 cluster: import into 4 shards, start 4 page
servers, read every block of every relation through the communicator, rebuild the
data directory from those pages alone, and let `pg_checksums --check` judge it."""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from pathlib import Path

import pytest
from pgcluster import PgCluster, relation_pages

import comm
from shards import BLCKSZ, LocalCluster, import_pgdata
from shards._pgimport import relation_path

pytestmark = [pytest.mark.postgres, pytest.mark.servers, pytest.mark.timeout(300)]
SEGMENT = 131072


def test_rebuild_data_directory_through_the_communicator(pg_cluster: PgCluster,
                                                         tmp_path: Path) -> None:
    pg = pg_cluster.clone()
    try:
        lsn = pg.checkpoint_lsn()
        files = relation_pages(pg.pgdata)
        import_pgdata(pg.pgdata, tmp_path / "store", shard_count=4, stripe_size=16)
        sizes: dict[comm.RelTag, int] = defaultdict(int)
        for (tag, blk) in files:
            sizes[comm.RelTag(*tag)] = max(sizes[comm.RelTag(*tag)], blk + 1)
        # wipe every relation file: what pg_checksums sees next came through pagecomm
        for rel in sizes:
            for seg in range(0, max(1, (sizes[rel] + SEGMENT - 1) // SEGMENT)):
                with open(relation_path(pg.pgdata, rel, seg), "r+b") as f:
                    f.truncate(0)
        got = read_everything(tmp_path / "store", sizes, lsn)
        assert len(got) == len(files)
        wrong = [k for k, page in got.items() if page != files[k]]
        assert not wrong, f"{len(wrong)} pages differ, e.g. {wrong[:3]}"
        for (tag, blk), page in got.items():
            seg, off = divmod(blk, SEGMENT)
            with open(relation_path(pg.pgdata, comm.RelTag(*tag), seg), "r+b") as f:
                f.seek(off * BLCKSZ)
                f.write(page)
        out = pg.run("pg_checksums", "--check", "-D", str(pg.pgdata))
        assert "Bad checksums:  0" in out.stdout, out.stdout
        assert os.path.getsize(relation_path(pg.pgdata, next(iter(sizes)))) > 0
    finally:
        pg.cleanup()


def read_everything(store: Path, sizes: dict[comm.RelTag, int],
                    lsn: int) -> dict[tuple[tuple[int, int, int, int], int], bytes]:
    rels = sorted(sizes)
    got: dict = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def backend(part: list[comm.RelTag]) -> None:
        try:
            with c.backend() as be:
                for rel in part:
                    n = be.nblocks(rel, lsn)
                    assert n == sizes[rel], (rel, n, sizes[rel])
                    for start in range(0, n, 128):
                        blocks = range(start, min(n, start + 128))
                        pages = be.get_pages(rel, blocks, lsn)
                        with lock:
                            for b, page in zip(blocks, pages, strict=True):
                                got[(tuple(rel), b)] = page
        except BaseException as e:
            errors.append(e)

    with LocalCluster(store) as cluster, comm.Communicator(cluster.endpoints,
                                                           stripe_size=16) as c:
        threads = [threading.Thread(target=backend, args=(rels[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        assert c.stats()["slots_in_use"] == 0
    assert not errors, errors[:3]
    return got
