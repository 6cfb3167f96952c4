"""Synthetic pages and stores: determinism, valid checksums, identity, and that
generate_store puts every page on exactly its owner shard at every LSN."""

from __future__ import annotations

from pathlib import Path

import pytest

from shards.__main__ import main
from shards._checksum import verify_page_checksum
from shards._layout import open_shard_store, read_layout
from shards._shardmap import shard_for
from shards._synth import (
    SYNTH_DB,
    generate_store,
    synth_identity,
    synth_page,
    synth_pages,
    synth_rels,
    synth_slru,
)
from shards._types import BLCKSZ, RelTag

REL = RelTag(1663, 16384, 16397)


def test_page_layout_and_checksum() -> None:
    lsn = 0x1_2345_6789
    p = synth_page(REL, 7, lsn)
    assert len(p) == BLCKSZ and p == synth_page(REL, 7, lsn)
    assert int.from_bytes(p[0:4], "little") == 0x1 and int.from_bytes(p[4:8], "little") == \
        0x2345_6789
    assert verify_page_checksum(p, 7) and not verify_page_checksum(p, 8)
    assert synth_identity(p) == (REL, 7, lsn)
    assert synth_identity(bytes(BLCKSZ)) is None


def test_pages_differ_by_every_key_field() -> None:
    base = synth_page(REL, 7, 100)
    others = [synth_page(REL, 8, 100), synth_page(REL, 7, 101),
              synth_page(REL._replace(rel=16398), 7, 100),
              synth_page(REL._replace(fork=1), 7, 100), synth_page(REL._replace(db=1), 7, 100)]
    for o in others:
        assert o != base
        assert o[100:] != base[100:]  # the body differs too, not just the header


def test_batch_equals_singles() -> None:
    blocks = list(range(0, 600, 3))
    assert synth_pages(REL, blocks, 5) == [synth_page(REL, b, 5) for b in blocks]


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="blkno"):
        synth_page(REL, -1, 1)
    with pytest.raises(ValueError, match="lsn"):
        synth_page(REL, 1, -1)
    with pytest.raises(TypeError):
        synth_page((1, 2, 3, 0), 1, 1)  # type: ignore[arg-type]


def test_generate_store_routes_every_page(tmp_path: Path) -> None:
    lsns = (0x100, 0x200)
    desc = generate_store(tmp_path, 3, stripe_size=16, rels=2, nblocks=100, lsns=lsns)
    assert desc["rels"] == synth_rels(2) and desc["lsns"] == list(lsns)
    assert desc["pages"] == 2 * 100 * 2
    assert read_layout(tmp_path)["shard_count"] == 3
    stores = [open_shard_store(tmp_path, s, readonly=True) for s in range(3)]
    try:
        owners = set()
        for rel in desc["rels"]:
            for blk in range(100):
                owner = shard_for(rel, blk, 3, 16)
                owners.add(owner)
                for s, st in enumerate(stores):
                    got = [st.get_page(rel, blk, lsn) for lsn in (0xFF, 0x100, 0x1FF, 0x200, 0x999)]
                    if s == owner:
                        assert got == [None, synth_page(rel, blk, 0x100),
                                       synth_page(rel, blk, 0x100), synth_page(rel, blk, 0x200),
                                       synth_page(rel, blk, 0x200)]
                    else:
                        assert got == [None] * 5, (rel, blk, s)
            for st in stores:
                assert st.nblocks(rel, 0x100) == 100 and st.nblocks(rel, 0xFF) is None
        assert owners == {0, 1, 2}
        for s, st in enumerate(stores):
            assert st.last_lsn == 0x200
            assert st.meta()["shard"] == s
        assert stores[0].db_size(SYNTH_DB, 0x200) == 2 * 100 * BLCKSZ
        assert stores[0].get_slru(0, 0, 0x150) == synth_slru(0, 0, 0x100)
        assert stores[1].get_slru(0, 0, 0x150) is None
    finally:
        for st in stores:
            st.close()


def test_generate_rejects_bad_args(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shard_count"):
        generate_store(tmp_path, 0)
    with pytest.raises(ValueError, match="lsns"):
        generate_store(tmp_path, 1, lsns=())
    with pytest.raises(ValueError, match="rels"):
        generate_store(tmp_path, 1, rels=0)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["generate", "--store", str(tmp_path), "--shard-count", "2", "--stripe-size", "8",
               "--rels", "1", "--nblocks", "20", "--lsn", "0/500", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "20 pages" in out and "pages/s" in out and "0/500" in out
    rel = synth_rels(1)[0]
    with open_shard_store(tmp_path, shard_for(rel, 3, 2, 8), readonly=True) as st:
        assert st.get_page(rel, 3, 0x500) == synth_page(rel, 3, 0x500)
