"""Deterministic synthetic pages and stores, for tests, the demo and benchmarks.

Theory of operation
-------------------
A synthetic page is a function of (rel, blkno, lsn) alone, so any reader can
recompute what it should have received and detect a page that was misrouted,
mixed up between relations/blocks, or served at the wrong version::

    0   pd_lsn      two little-endian uint32 (hi, lo) of lsn
    8   pd_checksum PostgreSQL's checksum for blkno (valid: verify_page_checksum passes)
    10  pd_flags=0, pd_lower=24, pd_upper=8192, pd_special=8192, pd_pagesize_version
    24  MAGIC, spc, db, rel, fork, blkno, lsn   (the identity, readable by synth_identity)
    56  an 8-byte pattern, a hash of the identity, repeated to the end of the page

Building one is a few bytes operations; the checksum dominates, so the bulk path
(:func:`synth_pages`) checksums whole batches at once with numpy.

:func:`generate_store` writes a sharded store in which every page of every
relation has a version at EACH generated LSN; a read at lsn L therefore returns
``synth_page(rel, blkno, L')`` with L' the largest generated LSN <= L.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import struct
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ._checksum import pg_checksum_pages
from ._errors import InvalidArgument, ShardsError, StoreError
from ._layout import LAYOUT_FILE, open_shard_store, read_layout, write_layout
from ._protocol import SLRU_PAGES_PER_SEGMENT
from ._shardmap import DEFAULT_STRIPE_SIZE, check_shard_params, shard_for_unchecked
from ._types import (
    BLCKSZ,
    MAIN_FORKNUM,
    MAX_BLOCKNO,
    MAX_LSN,
    MAX_UINT32,
    RelTag,
    check_reltag,
)

log = logging.getLogger(__name__)

SYNTH_SPC = 1663
SYNTH_DB = 16384
SYNTH_FIRST_REL = 16384
DEFAULT_LSNS = (0x1000000,)
MAGIC = 0x53594E54  # "SYNT"
BATCH_PAGES = 4096  # pages per LMDB write transaction and shard
MAX_SHARD_COUNT = 255  # check_shard_params; shard directories stop at shard-0254
MAX_STRIPE_SIZE = 1 << 31  # COMM_STRIPE_SIZE's bound: no communicator reads a wider stripe
MAX_RELS = MAX_UINT32 - SYNTH_FIRST_REL + 1  # relfilenodes are uint32
MAX_NBLOCKS = MAX_BLOCKNO + 1  # a relation's size as the store records it


class WriteFailed(StoreError):
    """The store failed while pages were being written (a full disk, an LMDB map
    full): unlike a refusal, something may have been written."""


class GenerateError(ShardsError, ValueError):
    """generate_store's arguments are invalid or do not fit the store it would write
    into. A ValueError too, as argument errors always were."""

_HEADER = struct.Struct("<IIHHHHHHI")  # lsn hi, lo, checksum, flags, lower, upper, special,
#                                        pagesize_version, prune_xid
_IDENT = struct.Struct("<IIIIIIQ")  # magic, spc, db, rel, fork, blkno, lsn
_BODY_OFFSET = _HEADER.size + _IDENT.size  # 56
_REPEATS = (BLCKSZ - _BODY_OFFSET) // 8  # 1017 eight-byte words fill the page exactly


def _check(rel: RelTag, blkno: int, lsn: int) -> None:
    check_reltag(rel)
    if not isinstance(blkno, int) or not 0 <= blkno <= MAX_BLOCKNO:
        raise InvalidArgument(f"blkno={blkno!r} is not a block number (0..{MAX_BLOCKNO})")
    if not isinstance(lsn, int) or not 0 <= lsn <= MAX_LSN:
        raise InvalidArgument(f"lsn={lsn!r} is outside 0..{MAX_LSN}")


def _unsummed(rel: RelTag, blkno: int, lsn: int) -> bytes:
    """The page with pd_checksum = 0."""
    ident = _IDENT.pack(MAGIC, rel.spc, rel.db, rel.rel, rel.fork, blkno, lsn)
    pattern = hashlib.blake2b(ident, digest_size=8).digest()
    header = _HEADER.pack(lsn >> 32, lsn & 0xFFFFFFFF, 0, 0, 24, BLCKSZ, BLCKSZ,
                          BLCKSZ | 4, 0)
    return header + ident + pattern * _REPEATS


def _with_checksum(page: bytes, checksum: int) -> bytes:
    return page[:8] + checksum.to_bytes(2, "little") + page[10:]


def synth_page(rel: RelTag, blkno: int, lsn: int) -> bytes:
    """The synthetic 8192-byte page of ``rel`` block ``blkno`` at ``lsn`` (deterministic)."""
    _check(rel, blkno, lsn)
    page = _unsummed(rel, blkno, lsn)
    return _with_checksum(page, pg_checksum_pages([page], [blkno])[0])


def synth_pages(rel: RelTag, blknos: Sequence[int], lsn: int) -> list[bytes]:
    """``[synth_page(rel, b, lsn) for b in blknos]``, checksummed in one vector pass."""
    for b in blknos:
        _check(rel, b, lsn)
    raw = [_unsummed(rel, b, lsn) for b in blknos]
    return [_with_checksum(p, c) for p, c in zip(raw, pg_checksum_pages(raw, blknos),
                                                    strict=True)]


def synth_identity(page: bytes | bytearray | memoryview) -> tuple[RelTag, int, int] | None:
    """(rel, blkno, lsn) a synthetic page was made for, or None if it is not one."""
    if len(page) != BLCKSZ:
        return None
    magic, spc, db, rel, fork, blkno, lsn = _IDENT.unpack_from(page, _HEADER.size)
    if magic != MAGIC:
        return None
    return RelTag(spc, db, rel, fork), blkno, lsn


def synth_slru(kind: int, segno: int, lsn: int) -> bytes:
    """A deterministic full SLRU segment (32 pages) for (kind, segno, lsn)."""
    seed = struct.pack("<IIIQ", MAGIC, kind, segno, lsn)
    pattern = hashlib.blake2b(seed, digest_size=8).digest()
    return (seed + pattern * ((SLRU_PAGES_PER_SEGMENT * BLCKSZ - len(seed)) // 8)
            + bytes((SLRU_PAGES_PER_SEGMENT * BLCKSZ - len(seed)) % 8))


def synth_rels(count: int) -> list[RelTag]:
    """The relations generate_store creates: main forks of consecutive relfilenodes."""
    return [RelTag(SYNTH_SPC, SYNTH_DB, SYNTH_FIRST_REL + i, MAIN_FORKNUM) for i in range(count)]


def _check_lsns(lsns: Iterable[int]) -> list[int]:
    try:
        out = sorted(set(lsns))
    except TypeError:  # not iterable, or values that do not compare
        out = []
    if not out or any(not isinstance(x, int) or not 1 <= x <= MAX_LSN for x in out):
        raise GenerateError(f"lsns must be a non-empty collection of ints in 1..{MAX_LSN}, "
                            f"got {lsns!r}")
    return out


def _is_int(v: object, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _prepare_layout(store_dir: Any, shard_count: int, stripe_size: int) -> None:
    """Write ``store_dir``'s layout, or check an existing one against the arguments:
    pages sharded for another layout would land where no reader looks for them."""
    if (Path(store_dir) / LAYOUT_FILE).exists():
        layout = read_layout(store_dir)  # StoreError if unreadable: never overwrite it
        if (layout["shard_count"], layout["stripe_size"]) != (shard_count, stripe_size):
            raise GenerateError(
                f"{store_dir} holds {layout['shard_count']} shard(s) with stripe size "
                f"{layout['stripe_size']}, not {shard_count} with {stripe_size}: generate "
                f"into a new store directory, or with the store's own layout")
        return
    try:
        write_layout(store_dir, shard_count, stripe_size)
    except OSError as e:
        raise StoreError(f"cannot create store at {store_dir}: {e}") from None


def generate_store(store_dir: Any, shard_count: int, stripe_size: int = DEFAULT_STRIPE_SIZE, *,
                   rels: int = 4, nblocks: int = 1024, lsns: Iterable[int] = DEFAULT_LSNS,
                   progress: bool = False) -> dict[str, Any]:
    """Write a sharded synthetic store (see module docstring) and describe it.

    Pages go only to the shard that owns them (:func:`shard_for`); every shard keeps
    the relation sizes (for its bounds checks) and last_lsn; shard 0 also keeps the
    database size and one CLOG segment (kind 0, segno 0) per LSN.

    An existing store must have the same shard count and stripe size
    (GenerateError otherwise, and the store is left as it was); one that cannot be
    created raises StoreError.

    Versions only move forward, as with import_pgdata: GenerateError (the store
    left as it was) if the newest of ``lsns`` is below the store's last_lsn, or if
    any of ``lsns`` below it is not one this store was already generated at.
    Re-running at LSNs already generated rewrites the same pages, and is fine.
    """
    try:
        check_shard_params(shard_count, stripe_size)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    if not _is_int(rels, 1, MAX_RELS) or not _is_int(nblocks, 0, MAX_NBLOCKS):
        raise GenerateError(f"rels must be an int in 1..{MAX_RELS} and nblocks in "
                            f"0..{MAX_NBLOCKS}, got rels={rels!r} nblocks={nblocks!r}")
    lsn_list = _check_lsns(lsns)
    tags = synth_rels(rels)
    _prepare_layout(store_dir, shard_count, stripe_size)
    stores: list[Any] = []
    try:
        for s in range(shard_count):
            stores.append(open_shard_store(store_dir, s))
    except StoreError as e:
        for st in stores:
            st.close()
        raise StoreError(f"cannot create store at {store_dir}: {e}") from None
    t0 = time.monotonic()
    written = 0
    try:
        _check_forward(stores, lsn_list, store_dir)
        bar = _progress(progress, rels * nblocks * len(lsn_list))
        try:
            for lsn in lsn_list:
                for rel in tags:
                    written += _write_rel(stores, rel, nblocks, lsn, stripe_size, bar)
                _write_metadata(stores, tags, nblocks, lsn, stripe_size)
        except StoreError as e:  # after writing began: not a usage error (see _cli)
            raise WriteFailed(str(e)) from None
        if bar is not None:
            bar.close()
    finally:
        for st in stores:
            st.close()
    secs = time.monotonic() - t0
    log.debug("generated %d pages into %d shard(s) at %s in %.1fs", written, shard_count,
             store_dir, secs)
    return {"rels": tags, "lsns": lsn_list, "nblocks": nblocks, "shard_count": shard_count,
            "stripe_size": stripe_size, "db": SYNTH_DB, "pages": written, "seconds": secs}


def _check_forward(stores: list[Any], lsns: list[int], store_dir: Any) -> None:
    """GenerateError unless writing at the sorted ``lsns`` keeps versions moving forward
    (see generate_store): an LSN below the store's newest is allowed only where
    a generation already wrote shard 0's CLOG segment, i.e. for a re-run."""
    newest = max(st.last_lsn for st in stores)
    if lsns[-1] < newest:
        raise GenerateError(f"lsn {format_lsn(lsns[-1])} is below {format_lsn(newest)}, the "
                            f"newest version in {store_dir}: versions only move forward "
                            f"(generate at {format_lsn(newest)} or above, or into a new store)")
    for lsn in lsns:
        if lsn >= newest:
            break
        if stores[0].get_slru(0, 0, lsn) != synth_slru(0, 0, lsn):  # not generated at lsn
            raise GenerateError(f"lsn {format_lsn(lsn)} is below {format_lsn(newest)}, the "
                                f"newest version in {store_dir}, and was never generated "
                                f"there: versions only move forward")


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="page", desc="generate", smoothing=0.1)


def _write_rel(stores: list[Any], rel: RelTag, nblocks: int, lsn: int, stripe_size: int,
               bar: Any) -> int:
    """All pages of ``rel`` at ``lsn``, each into its owner's store, in bounded batches."""
    shard_count = len(stores)
    pending: list[list[int]] = [[] for _ in stores]

    def flush(shard: int) -> None:
        blocks = pending[shard]
        with stores[shard].batch() as b:
            for i in range(0, len(blocks), 256):
                chunk = blocks[i:i + 256]
                for blk, page in zip(chunk, synth_pages(rel, chunk, lsn), strict=True):
                    b.put_page(rel, blk, lsn, page)
        if bar is not None:
            bar.update(len(blocks))
        pending[shard] = []

    for start in range(0, nblocks, stripe_size):  # one shard per stripe
        shard = shard_for_unchecked(rel, start, shard_count, stripe_size)
        pending[shard].extend(range(start, min(start + stripe_size, nblocks)))
        if len(pending[shard]) >= BATCH_PAGES:
            flush(shard)
    for shard in range(shard_count):
        if pending[shard]:
            flush(shard)
    return nblocks


def _write_metadata(stores: list[Any], tags: list[RelTag], nblocks: int, lsn: int,
                    stripe_size: int) -> None:
    for shard, st in enumerate(stores):
        with st.batch() as b:
            for rel in tags:
                b.set_nblocks(rel, lsn, nblocks)
            if shard == 0:
                b.set_db_size(SYNTH_DB, lsn, len(tags) * nblocks * BLCKSZ)
                b.put_slru(0, 0, lsn, synth_slru(0, 0, lsn))
            b.set_meta({"shard": shard, "shard_count": len(stores),
                        "stripe_size": stripe_size, "source": "synth"})
            b.set_last_lsn(lsn)


# ---------------------------------------------------------------- CLI

def _parse_lsn(text: str) -> int:
    """An LSN as PostgreSQL prints it (``16/B374D848``) or as an integer (``0x1000000``)."""
    try:
        if "/" in text:
            hi, lo = (int(part, 16) for part in text.split("/"))
            if not (0 <= hi <= MAX_UINT32 and 0 <= lo <= MAX_UINT32):
                raise ValueError  # each half is 32 bits: no silent overlap
            return (hi << 32) | lo
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an LSN: {text!r} (use X/Y or an integer)") from None


def format_lsn(lsn: int) -> str:
    """An LSN as PostgreSQL prints it: ``hi/lo`` in hex."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("generate", help="write a synthetic sharded page store",
                              description="Write deterministic synthetic pages (valid "
                              "checksums) into a sharded page store.")
    p.add_argument("--store", required=True, help="store directory (created)")
    p.add_argument("--shard-count", type=int, required=True)
    p.add_argument("--stripe-size", type=int, default=None,
                   help=f"blocks per stripe (default: the store's layout, or "
                   f"{DEFAULT_STRIPE_SIZE})")
    p.add_argument("--rels", type=int, default=4, help="number of relations (default 4)")
    p.add_argument("--nblocks", type=int, default=1024, help="blocks per relation")
    p.add_argument("--lsn", type=_parse_lsn, action="append", dest="lsns",
                   help="LSN to write a version at (repeatable; default 0/1000000)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=_cli)


def check_flag(flag: str, value: int | None, lo: int, hi: int) -> None:
    """ShardsError naming ``flag`` unless ``value`` (None: not given) is in lo..hi, so a
    CLI rejects a bad number before it touches any store."""
    if value is not None and not lo <= value <= hi:
        raise ShardsError(f"{flag} must be in {lo}..{hi}, got {value}")


def _cli(args: argparse.Namespace) -> int:
    import sys

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        check_flag("--shard-count", args.shard_count, 1, MAX_SHARD_COUNT)
        check_flag("--stripe-size", args.stripe_size, 1, MAX_STRIPE_SIZE)
        check_flag("--rels", args.rels, 1, MAX_RELS)
        check_flag("--nblocks", args.nblocks, 0, MAX_NBLOCKS)
        for lsn in args.lsns or ():
            check_flag("--lsn", lsn, 1, MAX_LSN)
        stripe_size = args.stripe_size
        if stripe_size is None:  # like import-pgdata: an existing store's own stripe
            exists = (Path(args.store) / LAYOUT_FILE).exists()
            stripe_size = read_layout(args.store)["stripe_size"] if exists else DEFAULT_STRIPE_SIZE
        desc = generate_store(args.store, args.shard_count, stripe_size, rels=args.rels,
                              nblocks=args.nblocks, lsns=args.lsns or DEFAULT_LSNS,
                              progress=progress)
    except WriteFailed as e:  # failed while writing: unexpected, status 1 (as import-pgdata)
        print(f"error: generate failed: {e}", file=sys.stderr)
        return 1
    except ShardsError as e:  # a refusal (GenerateError, a store it cannot create): 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    rate = desc["pages"] / desc["seconds"] if desc["seconds"] > 0 else float("inf")
    print(f"generated {desc['pages']} pages ({len(desc['rels'])} relations x "
          f"{desc['nblocks']} blocks x {len(desc['lsns'])} LSNs) into {args.store} "
          f"({desc['shard_count']} shards) in {desc['seconds']:.2f}s, {rate:,.0f} pages/s; "
          f"last LSN {format_lsn(desc['lsns'][-1])}")
    return 0
