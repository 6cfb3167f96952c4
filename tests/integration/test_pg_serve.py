"""Real PostgreSQL pages served over the wire: import a pgbench cluster at two LSNs
into 4 shards, start 4 `python -m shards serve` subprocesses (LocalCluster) and read
every page of every relation file through a pipelined DEALER client, comparing
byte for byte with the files and checking every page's checksum."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq
from pgcluster import PgCluster, relation_pages

from shards._checksum import verify_page_checksums
from shards._cluster import LocalCluster
from shards._pgimport import import_pgdata
from shards._shardmap import shard_for
from shards._types import MAX_BLOCKS_PER_REQUEST, RelTag
from shards.protocol import (
    DbSizeRequest,
    GetPagesRequest,
    RelSizeRequest,
    Reply,
    Request,
    RequestClass,
    SlruKind,
    SlruSegmentRequest,
    Status,
    decode_reply,
    encode_request,
)

pytestmark = [pytest.mark.postgres, pytest.mark.servers, pytest.mark.timeout(300)]
SHARDS, STRIPE, WINDOW = 4, 64, 64

Files = dict[tuple[tuple[int, int, int, int], int], bytes]


@pytest.fixture(scope="module")
def imported(pg_cluster: PgCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A store with the cluster at lsn1, then after pgbench + TRUNCATE at lsn2."""
    store = tmp_path_factory.mktemp("pgserve") / "store"
    pg = pg_cluster.clone()
    try:
        lsn1, files1 = pg.checkpoint_lsn(), relation_pages(pg.pgdata)
        import_pgdata(pg.pgdata, store, shard_count=SHARDS, stripe_size=STRIPE)
        pg.start()
        old_node = int(pg.psql("SELECT pg_relation_filenode('pgbench_tellers');"))
        db = int(pg.psql("SELECT oid FROM pg_database WHERE datname = 'postgres';"))
        pg.pgbench("-t", "200", "-n")
        pg.psql("TRUNCATE pgbench_tellers;")
        pg.checkpoint()
        pg.stop()
        lsn2, files2 = pg.checkpoint_lsn(), relation_pages(pg.pgdata)
        import_pgdata(pg.pgdata, store, shard_count=SHARDS, stripe_size=STRIPE)
    finally:
        pg.cleanup()
    yield {"store": store, "lsn1": lsn1, "files1": files1, "lsn2": lsn2, "files2": files2,
           "old_rel": RelTag(1663, db, old_node, 0), "db": db}


@pytest.fixture(scope="module")
def cluster(imported: dict) -> Iterator[LocalCluster]:
    with LocalCluster(imported["store"]) as cl:
        yield cl


class Client:
    """A tiny pipelined DEALER client: one socket per shard, WINDOW requests in flight."""

    def __init__(self, endpoints: list[str]) -> None:
        self.ctx = zmq.Context()
        self.socks = []
        for ep in endpoints:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep)
            self.socks.append(s)
        self.next_id = 1

    def close(self) -> None:
        for s in self.socks:
            s.close(0)
        self.ctx.term()

    def run(self, shard: int, reqs: list[Request], timeout: float = 10.0) -> list[Reply]:
        """Send ``reqs`` to ``shard`` keeping WINDOW in flight; replies in request order."""
        sock, out, sent = self.socks[shard], {}, 0
        while len(out) < len(reqs):
            while sent < len(reqs) and sent - len(out) < WINDOW:
                sock.send_multipart(encode_request(reqs[sent]))
                sent += 1
            assert sock.poll(int(timeout * 1000)), f"shard {shard}: no reply in {timeout}s"
            rep = decode_reply(sock.recv_multipart())
            out[rep.id] = rep
        return [out[r.id] for r in reqs]

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id


def read_all(client: Client, files: Files, lsn: int) -> Files:
    """Read every page of ``files`` at ``lsn`` through the wire, batched <= 32 blocks,
    each batch to the shard owning its stripe."""
    groups: dict[tuple[int, RelTag, int], list[int]] = {}
    for tag, blk in sorted(files):
        rel = RelTag(*tag)
        groups.setdefault((shard_for(rel, blk, SHARDS, STRIPE), rel, blk // STRIPE),
                          []).append(blk)
    per_shard: dict[int, list[GetPagesRequest]] = {}
    for (shard, rel, _), blocks in groups.items():
        for i in range(0, len(blocks), MAX_BLOCKS_PER_REQUEST):
            per_shard.setdefault(shard, []).append(GetPagesRequest(
                client.new_id(), 0, RequestClass.NORMAL, lsn, lsn, rel,
                tuple(blocks[i:i + MAX_BLOCKS_PER_REQUEST])))
    assert set(per_shard) == set(range(SHARDS))
    got: Files = {}
    for shard, reqs in per_shard.items():
        for req, rep in zip(reqs, client.run(shard, reqs), strict=True):
            assert rep.status == Status.OK, (shard, req.rel, req.blocks, rep.reason)
            assert (rep.rel, rep.blocks, rep.lsn) == (req.rel, req.blocks, req.lsn)
            for blk, page in zip(req.blocks, rep.pages, strict=True):
                got[(tuple(req.rel), blk)] = bytes(page)
    return got


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    c = Client(cluster.endpoints)
    try:
        yield c
    finally:
        c.close()


@pytest.mark.parametrize("which", ["1", "2"])
def test_every_page_over_the_wire(imported: dict, client: Client, which: str) -> None:
    files, lsn = imported["files" + which], imported["lsn" + which]
    got = read_all(client, files, lsn)
    assert got.keys() == files.keys()
    diff = [k for k in files if got[k] != files[k]]
    assert not diff, f"{len(diff)} pages differ, e.g. {diff[:3]}"
    keys = list(got)
    ok = verify_page_checksums([got[k] for k in keys], [blk for _, blk in keys])
    assert all(ok), [k for k, good in zip(keys, ok, strict=True) if not good][:5]


def test_sizes_and_truncated_relation(imported: dict, client: Client) -> None:
    old, lsn1, lsn2 = imported["old_rel"], imported["lsn1"], imported["lsn2"]
    n_old = 1 + max(b for (t, b) in imported["files1"] if t == tuple(old))
    ids = [client.new_id() for _ in range(6)]
    reqs: list[Request] = [
        RelSizeRequest(ids[0], 0, RequestClass.NORMAL, lsn1, lsn1, old, False),
        RelSizeRequest(ids[1], 0, RequestClass.NORMAL, lsn2, lsn2, old, True),
        RelSizeRequest(ids[2], 0, RequestClass.NORMAL, lsn2, lsn2, old, False),
        DbSizeRequest(ids[3], 0, RequestClass.NORMAL, lsn2, lsn2, imported["db"]),
        SlruSegmentRequest(ids[4], 0, RequestClass.NORMAL, lsn2, lsn2, SlruKind.CLOG, 0),
        GetPagesRequest(ids[5], 0, RequestClass.NORMAL, lsn2, lsn2, old, (0,)),
    ]
    r = client.run(0, reqs[:5])
    assert (r[0].status, r[0].exists, r[0].nblocks) == (Status.OK, True, n_old)
    assert (r[1].status, r[1].exists) == (Status.OK, False)
    assert r[2].status == Status.NOT_FOUND
    assert r[3].status == Status.OK and r[3].size > 0
    assert r[4].status == Status.OK and len(r[4].segment) % 8192 == 0
    owner = shard_for(old, 0, SHARDS, STRIPE)
    (gone,) = client.run(owner, reqs[5:])
    assert gone.status == Status.NOT_FOUND
    old_req = GetPagesRequest(client.new_id(), 0, RequestClass.NORMAL, lsn1, lsn1, old, (0,))
    (then,) = client.run(owner, [old_req])
    assert then.status == Status.OK
    assert then.pages[0] == imported["files1"][(tuple(old), 0)]
