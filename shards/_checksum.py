"""PostgreSQL's data-page checksum (src/include/storage/checksum_impl.h), in numpy.

Theory of operation
-------------------
PostgreSQL views an 8 KB page as 64 rows of 32 uint32 words (native byte order,
little-endian on every platform we run on) and keeps 32 independent FNV-1a-like
sums, one per column ("lane"), each seeded from a fixed base offset. One round is
``tmp = sum ^ value; sum = tmp * FNV_PRIME ^ (tmp >> 17)`` (mod 2**32). After the
64 rows, two rounds with value 0 mix further; the lanes are xor-folded, the
ABSOLUTE block number is xor-ed in, and the result is reduced to 1..65535 with
``% 65535 + 1`` (so 0 never appears). The pd_checksum field (bytes 8..9, the low
half of word 2) is treated as zero.

numpy holds the 32 lanes of MANY pages in one (pages, 32) uint32 array, so a batch
costs 66 vector steps regardless of its size; uint32 arithmetic wraps exactly as C
does. A single page goes through the same code as a batch of one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ._errors import InvalidArgument, InvalidArgumentType
from ._types import BLCKSZ

N_SUMS = 32
FNV_PRIME = np.uint32(16777619)
_ROWS = BLCKSZ // (4 * N_SUMS)  # 64
_CHECKSUM_OFFSET = 8  # pd_checksum: uint16 after the 8-byte pd_lsn

_BASE_OFFSETS = np.array([
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A,
    0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA,
    0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE,
    0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E,
    0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
], dtype=np.uint32)
_SHIFT = np.uint32(17)
_CHUNK = 256  # pages per vector pass: big enough to amortise, small enough for cache


def _check_page(page: object) -> bytes | bytearray | memoryview:
    if not isinstance(page, (bytes, bytearray, memoryview)):
        raise InvalidArgumentType(f"page must be bytes, got {type(page).__name__}")
    if len(page) != BLCKSZ:
        raise InvalidArgument(f"page must be exactly {BLCKSZ} bytes, got {len(page)}")
    return page


_ZERO_PAGE = bytes(BLCKSZ)


def _is_zero(page: bytes | bytearray | memoryview) -> bool:
    return page == _ZERO_PAGE  # a C memcmp, unlike any() over 8192 ints


def _check_blkno(blkno: object) -> int:
    if not isinstance(blkno, (int, np.integer)) or isinstance(blkno, bool):
        raise InvalidArgumentType(f"blkno must be an int, got {type(blkno).__name__}")
    if not 0 <= blkno <= 0xFFFFFFFF:
        raise InvalidArgument(f"blkno={blkno} is outside 0..{0xFFFFFFFF}")
    return int(blkno)


def _block_sums(words: np.ndarray) -> np.ndarray:
    """pg_checksum_block for each page of ``words`` (shape (64, n, 32), uint32,
    checksum field already zeroed) -> (n,) uint32."""
    sums = np.broadcast_to(_BASE_OFFSETS, (words.shape[1], N_SUMS)).copy()
    tmp = np.empty_like(sums)
    hi = np.empty_like(sums)
    for i in range(_ROWS + 2):  # 64 data rows, then two rounds of zeros
        if i < _ROWS:
            np.bitwise_xor(sums, words[i], out=tmp)
        else:
            tmp[...] = sums
        np.right_shift(tmp, _SHIFT, out=hi)
        np.multiply(tmp, FNV_PRIME, out=sums)
        np.bitwise_xor(sums, hi, out=sums)
    return np.bitwise_xor.reduce(sums, axis=1)


def pg_checksum_pages(pages: Sequence[bytes | bytearray | memoryview],
                      blknos: Iterable[int]) -> list[int]:
    """pg_checksum_page for many pages at once (vectorised across pages)."""
    blocks = [_check_blkno(b) for b in blknos]
    if len(blocks) != len(pages):
        raise InvalidArgument(f"got {len(pages)} pages but {len(blocks)} block numbers")
    out: list[int] = []
    for i in range(0, len(pages), _CHUNK):
        out.extend(_checksum_chunk(pages[i:i + _CHUNK], blocks[i:i + _CHUNK]))
    return out


def _checksum_chunk(pages: Sequence[bytes | bytearray | memoryview],
                    blocks: list[int]) -> list[int]:
    buf = b"".join(_check_page(p) for p in pages)
    # row-major (64, pages, 32) copy: each round reads one contiguous block
    words = np.array(np.frombuffer(buf, dtype="<u4").reshape(len(pages), _ROWS, N_SUMS)
                     .transpose(1, 0, 2), order="C")
    # pd_checksum is the low half of word 2 (little-endian): treat it as zero
    words[0, :, _CHECKSUM_OFFSET // 4] &= np.uint32(0xFFFF0000)
    sums = _block_sums(words).astype(np.uint64)
    res = (sums ^ np.array(blocks, dtype=np.uint64)) % 65535 + 1
    return [int(x) for x in res]


def pg_checksum_page(page: bytes | bytearray | memoryview, blkno: int) -> int:
    """PostgreSQL's checksum (1..65535) of ``page`` stored at absolute block ``blkno``."""
    return pg_checksum_pages([page], [blkno])[0]


def stored_checksum(page: bytes | bytearray | memoryview) -> int:
    """The pd_checksum field of ``page``."""
    _check_page(page)
    return int.from_bytes(page[_CHECKSUM_OFFSET:_CHECKSUM_OFFSET + 2], "little")


def set_page_checksum(page: bytearray, blkno: int) -> None:
    """Compute and store pd_checksum in ``page`` in place."""
    page[_CHECKSUM_OFFSET:_CHECKSUM_OFFSET + 2] = pg_checksum_page(page, blkno).to_bytes(
        2, "little")


def verify_page_checksum(page: bytes | bytearray | memoryview, blkno: int) -> bool:
    """True if ``page`` carries a valid checksum for block ``blkno``, or is all zeros
    (PostgreSQL writes no checksum on a new, all-zero page)."""
    _check_page(page)
    if _is_zero(page):
        return True
    return stored_checksum(page) == pg_checksum_page(page, blkno)


def verify_page_checksums(pages: Sequence[bytes | bytearray | memoryview],
                          blknos: Iterable[int]) -> list[bool]:
    """verify_page_checksum for many pages at once."""
    sums = pg_checksum_pages(pages, blknos)
    return [_is_zero(p) or stored_checksum(p) == s for p, s in zip(pages, sums, strict=True)]
