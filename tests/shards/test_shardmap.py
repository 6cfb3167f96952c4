"""Tests of the key -> shard map (shards/_shardmap.py), which must match Neon's pageserver.

Pinned values come from Neon's own tests (libs/pageserver_api/src/shard.rs: `murmur_hash`
and `shard_mapping`) and from an independent uint32 re-implementation of PostgreSQL's
hashfn.h (numpy, wrapping arithmetic) computed when these tests were written.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shards._errors import InvalidArgument, InvalidArgumentType, ShardsError
from shards._shardmap import (
    DEFAULT_STRIPE_SIZE,
    check_shard_params,
    hash_combine,
    murmurhash32,
    shard_for,
    shard_for_unchecked,
)
from shards._types import (
    FSM_FORKNUM,
    INIT_FORKNUM,
    MAIN_FORKNUM,
    MAX_BLOCKNO,
    VISIBILITYMAP_FORKNUM,
    RelTag,
)

NEON_DEFAULT_STRIPE_SIZE_OLD = 256 * 1024 // 8  # 32768 pages: the default when Neon pinned it


def test_neon_murmur_hash_values():
    # Neon shard.rs `murmur_hash` test.
    assert murmurhash32(0) == 0
    assert hash_combine(0xB1FF3B40, 0) == 0xFB7923C9


def test_neon_shard_mapping_value():
    # Neon shard.rs `shard_mapping` test: Key{field2: 0x67f (spc), field3: 0x5 (db),
    # field4: 0x400c (rel), field5: 0 (fork), field6: 0x7d06 (blkno)}, ShardCount(10),
    # DEFAULT_STRIPE_SIZE (32768 at the time) -> ShardNumber(8).
    rel = RelTag(0x67F, 0x5, 0x400C, MAIN_FORKNUM)
    assert shard_for(rel, 0x7D06, 10, NEON_DEFAULT_STRIPE_SIZE_OLD) == 8


@pytest.mark.parametrize("x,expected", [
    (1, 0x514E28B7), (2, 0x30F4C306), (0x4000, 0x53085746), (0x400C, 0xCB776F3E),
    (0xFFFFFFFF, 0x81F16F39), (0xB1FF3B40, 0x756624C6),
])
def test_murmurhash32_pinned(x, expected):
    assert murmurhash32(x) == expected


@pytest.mark.parametrize("a,b,expected", [
    (0, 0, 0x9E3779B9), (1, 2, 0x9E3779FA), (0xFFFFFFFF, 0xFFFFFFFF, 0x21C88688),
    (0x12345678, 0x9ABCDEF0, 0xD8A35A3F),
])
def test_hash_combine_pinned(a, b, expected):
    assert hash_combine(a, b) == expected


@pytest.mark.parametrize("rel,blkno,count,stripe,expected", [
    (16384, 0, 4, 2048, 0),
    (16384, 2048, 4, 2048, 3),
    (16384, 4096, 8, 2048, 6),
    (1259, 0, 8, 2048, 2),
    (24576, 123456, 16, 2048, 9),
])
def test_shard_for_pinned(rel, blkno, count, stripe, expected):
    assert shard_for(RelTag(1663, 5, rel, MAIN_FORKNUM), blkno, count, stripe) == expected


def test_default_stripe_size():
    assert DEFAULT_STRIPE_SIZE == 2048  # 16 MiB of 8 KB pages


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
@settings(max_examples=300, deadline=None)
def test_hashes_stay_in_uint32(a, b):
    assert 0 <= murmurhash32(a) <= 0xFFFFFFFF
    assert 0 <= hash_combine(a, b) <= 0xFFFFFFFF


def test_init_fork_and_unsharded_go_to_shard_0():
    for blkno in (0, 1, 2048, 10**6, 0xFFFFFFFE):
        for rel in (1, 16384, 0x400C, 0xFFFFFFFF):
            assert shard_for(RelTag(1663, 5, rel, INIT_FORKNUM), blkno, 8) == 0
            assert shard_for(RelTag(1663, 5, rel, MAIN_FORKNUM), blkno, 1) == 0
            # (shard_count 0 is refused: test_shard_for_checks_its_arguments)


def test_other_forks_are_sharded_like_main():
    # The fork is not part of the hash: fsm/vm blocks follow the main fork's placement.
    seen = set()
    for blkno in range(0, 64 * 2048, 2048):
        s = shard_for(RelTag(1663, 5, 16384, MAIN_FORKNUM), blkno, 8)
        for fork in (FSM_FORKNUM, VISIBILITYMAP_FORKNUM):
            assert shard_for(RelTag(1663, 5, 16384, fork), blkno, 8) == s
        seen.add(s)
    assert len(seen) > 1


def test_spc_and_db_do_not_matter():
    for blkno in (0, 5000, 99999):
        expected = shard_for(RelTag(1663, 5, 16384), blkno, 8)
        assert shard_for(RelTag(1664, 0, 16384), blkno, 8) == expected
        assert shard_for(RelTag(0xFFFFFFFF, 12345, 16384), blkno, 8) == expected


@pytest.mark.parametrize("stripe", [1, 8, 2048, 32768])
def test_stripes_stay_on_one_shard(stripe):
    for rel in (16384, 24576, 0x400C):
        for stripe_no in (0, 1, 7, 1000):
            first = stripe_no * stripe
            blocks = {first, first + stripe - 1, first + stripe // 2}
            shards = {shard_for(RelTag(1663, 5, rel), b, 8, stripe) for b in blocks}
            assert len(shards) == 1


def test_results_in_range():
    for count in (2, 3, 4, 8, 10, 255):
        for blkno in range(0, 200 * 2048, 2048):
            assert 0 <= shard_for(RelTag(1663, 5, 16384), blkno, count) < count


@pytest.mark.parametrize("count", [4, 8])
def test_distribution_roughly_uniform(count):
    # 100 relations x 200 stripes = 20000 stripes; each shard should get about 1/count.
    hits = Counter(shard_for(RelTag(1663, 5, 16384 + r), s * 2048, count)
                   for r in range(100) for s in range(200))
    expected = 20000 / count
    assert set(hits) == set(range(count))
    for n in hits.values():
        assert abs(n - expected) < 0.1 * expected, hits


@pytest.mark.parametrize("count,stripe", [(0, 2048), (256, 2048), (True, 2048), (2.0, 2048),
                                          (2, 0), (2, -1), (2, 1.5), (2, False)])
def test_check_shard_params_rejects(count, stripe):
    with pytest.raises(ValueError):
        check_shard_params(count, stripe)


def test_check_shard_params_accepts():
    check_shard_params(1, 1)
    check_shard_params(255, DEFAULT_STRIPE_SIZE)


R = RelTag(1663, 5, 16384)


@pytest.mark.parametrize("args,err,name", [
    ((R, 0, 2, 0), InvalidArgument, "stripe_size"),
    ((R, 0, 2, -1), InvalidArgument, "stripe_size"),
    ((R, 0, 2, 1.5), InvalidArgumentType, "stripe_size"),
    ((R, 0, 2, True), InvalidArgumentType, "stripe_size"),
    (("x", 0, 2, 8), InvalidArgumentType, "rel"),
    (((1663, 5, 16384, 0), 0, 2, 8), InvalidArgumentType, "rel"),
    ((RelTag(1663, 5, -1), 0, 2, 8), InvalidArgument, "RelTag.rel"),
    ((RelTag(1663, 5, 16384, 9), 0, 2, 8), InvalidArgument, "fork"),
    ((R, -1, 2, 8), InvalidArgument, "blkno"),
    ((R, MAX_BLOCKNO + 1, 2, 8), InvalidArgument, "blkno"),
    ((R, 2**32, 2, 8), InvalidArgument, "blkno"),
    ((R, 1.0, 2, 8), InvalidArgumentType, "blkno"),
    ((R, 0, 0, 8), InvalidArgument, "shard_count"),
    ((R, 0, 256, 8), InvalidArgument, "shard_count"),
    ((R, 0, 2.0, 8), InvalidArgumentType, "shard_count"),
    ((R, 0, False, 8), InvalidArgumentType, "shard_count"),
])
def test_shard_for_checks_its_arguments(args, err, name):
    with pytest.raises(err, match=name) as ei:
        shard_for(*args)
    assert isinstance(ei.value, ShardsError)
    assert isinstance(ei.value, ValueError if err is InvalidArgument else TypeError)


def test_shard_for_limits_accepted():
    assert shard_for(R, MAX_BLOCKNO, 255, 1) in range(255)
    assert shard_for(R, 0, 1, 1) == 0
    assert shard_for(R, 0, 255) in range(255)


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, MAX_BLOCKNO), st.integers(1, 255),
       st.integers(1, 1 << 20), st.integers(0, 3))
@settings(max_examples=300, deadline=None)
def test_unchecked_is_the_same_hash(rel, blkno, count, stripe, fork):
    tag = RelTag(1663, 5, rel, fork)
    assert shard_for_unchecked(tag, blkno, count, stripe) == shard_for(tag, blkno, count, stripe)
