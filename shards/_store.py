"""The versioned page store: every page, relation size, database size and SLRU
segment kept at every LSN it was written at, in one LMDB environment.

Theory of operation
-------------------
LMDB is a copy-on-write B+tree: a write transaction either commits wholly or not at
all, and a reader sees one consistent snapshot, so the store survives ``kill -9``
without any recovery step, and a server can serve a whole batch from one snapshot.

Each kind of record lives in its own named database. Keys are big-endian so that
byte order is numeric order, and end with ``2**64-1-lsn`` so that, for one object,
the NEWEST version sorts FIRST. "The newest version at or below lsn" is then one
``set_range(prefix + inv(lsn))`` followed by a prefix check::

    pages    spc db rel fork blkno inv(lsn) -> 8192-byte page
    relsize  spc db rel fork       inv(lsn) -> exists(u8) nblocks(u32)  (drop: exists=0)
    drops    spc db rel fork       inv(lsn) -> b""    (to hide pages older than a drop)
    dbsize   db                    inv(lsn) -> size(u64)
    slru     kind segno            inv(lsn) -> segment bytes
    meta     b"last_lsn" -> u64;  b"meta" -> JSON

A page version written before the newest drop of its relation (at or below the
read LSN) is invisible, so a dropped-and-recreated relation never shows stale pages.

``last_lsn`` is raised automatically by every write (and by ``set_last_lsn``); it
never goes down. A sharded store (a directory of these, one per shard) is in
_layout.py.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from ._errors import InvalidArgument, InvalidArgumentType, StoreError
from ._protocol import MAX_SLRU_SEGMENT_BYTES
from ._types import BLCKSZ, MAX_BLOCKNO, MAX_LSN, MAX_UINT32, RelTag, check_reltag

DEFAULT_MAP_SIZE = 64 << 30

_REL = struct.Struct(">IIIB")
_PAGE_KEY = struct.Struct(">IIIBIQ")
_REL_KEY = struct.Struct(">IIIBQ")
_DB_KEY = struct.Struct(">IQ")
_SLRU_KEY = struct.Struct(">BIQ")
_RELSIZE_VAL = struct.Struct("<BI")
_U64 = struct.Struct("<Q")
_DB_NAMES = (b"pages", b"relsize", b"drops", b"dbsize", b"slru", b"meta")
_LAST_LSN = b"last_lsn"
_META = b"meta"

F = TypeVar("F", bound=Callable[..., Any])


def _translate(fn: F) -> F:
    """The one boundary where lmdb.Error becomes StoreError."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except lmdb.Error as e:
            raise StoreError(f"{fn.__name__}: LMDB error: {e}") from e
    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------- argument checks

def _int(name: str, v: object, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise InvalidArgumentType(f"{name} must be an int, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise InvalidArgument(f"{name}={v} is outside {lo}..{hi}")
    return v


def _lsn(v: object) -> int:
    return _int("lsn", v, 0, MAX_LSN)


def _blkno(v: object) -> int:
    return _int("blkno", v, 0, MAX_BLOCKNO)


def _page(page: object) -> bytes:
    if not isinstance(page, (bytes, bytearray, memoryview)):
        raise InvalidArgumentType(f"page must be bytes, got {type(page).__name__}")
    if len(page) != BLCKSZ:
        raise InvalidArgument(f"page must be exactly {BLCKSZ} bytes, got {len(page)}")
    return bytes(page)


def _inv(lsn: int) -> int:
    return MAX_LSN - lsn


def _newest(cur: lmdb.Cursor, prefix: bytes, lsn: int) -> tuple[bytes, int] | None:
    """(value, version lsn) of the newest record under ``prefix`` at or below ``lsn``."""
    if not cur.set_range(prefix + _U64BE.pack(_inv(lsn))):
        return None
    key = cur.key()
    if key[:len(prefix)] != prefix:
        return None
    return cur.value(), MAX_LSN - _U64BE.unpack_from(key, len(prefix))[0]


_U64BE = struct.Struct(">Q")


# ---------------------------------------------------------------- reading

class StoreReader:
    """Reads inside ONE read transaction (one consistent snapshot). Obtain it from
    :meth:`PageStore.reader`; valid only inside that ``with`` block."""

    def __init__(self, store: PageStore, txn: lmdb.Transaction) -> None:
        self._txn = txn
        self._dbs = store._dbs
        self._pages = txn.cursor(store._dbs[b"pages"])

    @_translate
    def get_page(self, rel: RelTag, blkno: int, lsn: int) -> bytes | None:
        """Newest version of the page at or below ``lsn``, or None."""
        check_reltag(rel)
        return self._get_pages(rel, (_blkno(blkno),), _lsn(lsn))[0]

    @_translate
    def get_pages(self, rel: RelTag, blocks: Iterable[int], lsn: int) -> list[bytes | None]:
        """Newest versions at or below ``lsn`` of ``blocks``, in order (None where absent)."""
        check_reltag(rel)
        return self._get_pages(rel, [_blkno(b) for b in blocks], _lsn(lsn))

    def _get_pages(self, rel: RelTag, blocks: Sequence[int], lsn: int) -> list[bytes | None]:
        relkey = _REL.pack(*rel)
        dropped = _newest(self._txn.cursor(self._dbs[b"drops"]), relkey, lsn)
        floor = dropped[1] if dropped is not None else -1
        inv = _inv(lsn)
        cur = self._pages
        out: list[bytes | None] = []
        for b in blocks:
            prefix = relkey + b.to_bytes(4, "big")
            page = None
            if cur.set_range(prefix + inv.to_bytes(8, "big")):
                key = cur.key()
                # a version written before the newest drop belongs to the old relation
                if key[:17] == prefix and MAX_LSN - int.from_bytes(key[17:], "big") >= floor:
                    page = cur.value()
            out.append(page)
        return out

    @_translate
    def nblocks(self, rel: RelTag, lsn: int) -> int | None:
        """Size of ``rel`` in blocks at ``lsn``; None if absent (never created, or dropped)."""
        check_reltag(rel)
        found = _newest(self._txn.cursor(self._dbs[b"relsize"]), _REL.pack(*rel), _lsn(lsn))
        if found is None:
            return None
        exists, n = _RELSIZE_VAL.unpack(found[0])
        return n if exists else None

    @_translate
    def relations(self, lsn: int) -> set[RelTag]:
        """Every relation that exists at ``lsn``."""
        _lsn(lsn)
        cur = self._txn.cursor(self._dbs[b"relsize"])
        out: set[RelTag] = set()
        relkey = b""
        while cur.set_range(relkey):
            relkey = bytes(cur.key()[:_REL.size])
            found = _newest(cur, relkey, lsn)
            if found is not None and found[0][0]:
                out.add(RelTag(*_REL.unpack(relkey)))
            nxt = int.from_bytes(relkey, "big") + 1  # skip to the next relation
            if nxt >> (8 * _REL.size):
                break
            relkey = nxt.to_bytes(_REL.size, "big")
        return out

    @_translate
    def db_size(self, db: int, lsn: int) -> int | None:
        """Size in bytes of database ``db`` at ``lsn``, or None if unknown."""
        prefix = _int("db", db, 0, MAX_UINT32).to_bytes(4, "big")
        found = _newest(self._txn.cursor(self._dbs[b"dbsize"]), prefix, _lsn(lsn))
        return None if found is None else _U64.unpack(found[0])[0]

    @_translate
    def get_slru(self, kind: int, segno: int, lsn: int) -> bytes | None:
        """Newest version of an SLRU segment at or below ``lsn``, or None."""
        prefix = bytes([_int("kind", kind, 0, 255)]) + _int(
            "segno", segno, 0, MAX_UINT32).to_bytes(4, "big")
        found = _newest(self._txn.cursor(self._dbs[b"slru"]), prefix, _lsn(lsn))
        return None if found is None else bytes(found[0])

    @property
    @_translate
    def last_lsn(self) -> int:
        raw = self._txn.get(_LAST_LSN, db=self._dbs[b"meta"])
        return 0 if raw is None else _U64.unpack(raw)[0]


# ---------------------------------------------------------------- writing

class StoreBatch:
    """Writes inside ONE write transaction, committed when the ``with`` block of
    :meth:`PageStore.batch` exits normally (aborted on an exception)."""

    def __init__(self, store: PageStore, txn: lmdb.Transaction) -> None:
        self._txn = txn
        self._dbs = store._dbs
        self.max_lsn = 0  # newest LSN written in this batch; raises last_lsn at commit

    def _bump(self, lsn: int) -> int:
        _lsn(lsn)
        if lsn > self.max_lsn:
            self.max_lsn = lsn
        return lsn

    @_translate
    def put_page(self, rel: RelTag, blkno: int, lsn: int, page: bytes) -> None:
        """Store a new version of one page at ``lsn`` (replaces one at the same lsn).

        Unlike :meth:`PageStore.put_page`, this leaves the relation's size alone:
        a batch sets sizes explicitly (``set_nblocks``)."""
        check_reltag(rel)
        key = _PAGE_KEY.pack(*rel, _blkno(blkno), _inv(self._bump(lsn)))
        self._txn.put(key, _page(page), db=self._dbs[b"pages"])

    @_translate
    def set_nblocks(self, rel: RelTag, lsn: int, n: int) -> None:
        """``rel`` exists from ``lsn`` on with ``n`` blocks (create, extend or truncate)."""
        check_reltag(rel)
        key = _REL_KEY.pack(*rel, _inv(self._bump(lsn)))
        self._txn.put(key, _RELSIZE_VAL.pack(1, _int("n", n, 0, MAX_BLOCKNO + 1)),
                      db=self._dbs[b"relsize"])
        self._txn.delete(key, db=self._dbs[b"drops"])  # re-created at the drop's LSN

    @_translate
    def _extend_nblocks(self, rel: RelTag, lsn: int, n: int) -> None:
        """Size of ``rel`` at ``lsn`` becomes max(its size at lsn, ``n``) (absent: 0)."""
        found = _newest(self._txn.cursor(self._dbs[b"relsize"]), _REL.pack(*rel), lsn)
        if found is not None:
            exists, cur = _RELSIZE_VAL.unpack(found[0])
            if exists and cur >= n:
                return
            if not exists and found[1] == lsn:
                # dropped at this very LSN: the size is written, the drop marker kept, so
                # the pages of the relation before the drop stay hidden (set_nblocks
                # would delete the marker: an explicit re-creation)
                key = _REL_KEY.pack(*rel, _inv(self._bump(lsn)))
                self._txn.put(key, _RELSIZE_VAL.pack(1, n), db=self._dbs[b"relsize"])
                return
        self.set_nblocks(rel, lsn, n)

    @_translate
    def drop_relation(self, rel: RelTag, lsn: int) -> None:
        """``rel`` does not exist from ``lsn`` on; its older pages become invisible."""
        check_reltag(rel)
        key = _REL_KEY.pack(*rel, _inv(self._bump(lsn)))
        self._txn.put(key, _RELSIZE_VAL.pack(0, 0), db=self._dbs[b"relsize"])
        self._txn.put(key, b"", db=self._dbs[b"drops"])

    @_translate
    def set_db_size(self, db: int, lsn: int, size: int) -> None:
        key = _DB_KEY.pack(_int("db", db, 0, MAX_UINT32), _inv(self._bump(lsn)))
        self._txn.put(key, _U64.pack(_int("size", size, 0, MAX_LSN)), db=self._dbs[b"dbsize"])

    @_translate
    def put_slru(self, kind: int, segno: int, lsn: int, data: bytes) -> None:
        """Store a version of an SLRU segment (whole pages, at most 32 of them)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidArgumentType(f"data must be bytes, got {type(data).__name__}")
        if len(data) % BLCKSZ or len(data) > MAX_SLRU_SEGMENT_BYTES:
            raise InvalidArgument(f"data must be whole {BLCKSZ}-byte pages up to "
                                  f"{MAX_SLRU_SEGMENT_BYTES} bytes, got {len(data)}")
        key = _SLRU_KEY.pack(_int("kind", kind, 0, 255), _int("segno", segno, 0, MAX_UINT32),
                             _inv(self._bump(lsn)))
        self._txn.put(key, bytes(data), db=self._dbs[b"slru"])

    @_translate
    def set_last_lsn(self, lsn: int) -> None:
        """Declare the store complete up to ``lsn`` (last_lsn never goes down)."""
        self._bump(lsn)

    @_translate
    def set_meta(self, meta: dict[str, Any]) -> None:
        """Store a small JSON-able record (e.g. shard, shard_count, stripe_size)."""
        if not isinstance(meta, dict):
            raise InvalidArgumentType(f"meta must be a dict, got {type(meta).__name__}")
        try:
            raw = json.dumps(meta, sort_keys=True).encode()
        except (TypeError, ValueError) as e:
            raise InvalidArgument(f"meta is not JSON-serialisable: {e}") from None
        self._txn.put(_META, raw, db=self._dbs[b"meta"])

    def _commit_last_lsn(self) -> None:
        meta = self._dbs[b"meta"]
        raw = self._txn.get(_LAST_LSN, db=meta)
        if raw is None or _U64.unpack(raw)[0] < self.max_lsn:
            self._txn.put(_LAST_LSN, _U64.pack(self.max_lsn), db=meta)


# ---------------------------------------------------------------- the store

class PageStore:
    """A versioned page store in one LMDB environment at ``path`` (a directory).

    Safe to share between threads (LMDB readers do not block each other or the
    writer); several processes may open the same store, one of them writing.
    Writable, it creates the directory if need be; never inside the root of a
    sharded store (a directory with layout.json): StoreError.
    """

    def __init__(self, path: str | os.PathLike[str], *, map_size: int = DEFAULT_MAP_SIZE,
                 readonly: bool = False, sync: bool = True) -> None:
        self.path = Path(path)
        self.readonly = bool(readonly)
        _int("map_size", map_size, 1 << 20, 1 << 46)
        if (self.path / "layout.json").exists():  # _layout.LAYOUT_FILE
            raise StoreError(f"{self.path} is a sharded page store (it holds layout.json), "
                             f"not one shard's store: open a shard with "
                             f"open_shard_store({str(self.path)!r}, shard)")
        if readonly and not (self.path / "data.mdb").exists():
            raise StoreError(f"no page store at {self.path}")
        try:
            if not readonly:
                self.path.mkdir(parents=True, exist_ok=True)
            # readahead off: page reads are random, and the store may exceed RAM
            self._env: lmdb.Environment | None = lmdb.open(
                str(self.path), map_size=map_size, max_dbs=len(_DB_NAMES), readonly=readonly,
                sync=sync, readahead=False, max_readers=512, lock=True)
            self._dbs = {name: self._env.open_db(name, create=not readonly)
                         for name in _DB_NAMES}
        except lmdb.Error as e:
            self._env = None
            raise StoreError(f"cannot open page store at {self.path}: {e}") from e
        except OSError as e:
            self._env = None
            raise StoreError(f"cannot open page store at {self.path}: {e}") from e

    def __repr__(self) -> str:
        return f"PageStore({str(self.path)!r}, readonly={self.readonly})"

    def __enter__(self) -> PageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the environment (idempotent). Readers/batches must have finished."""
        env, self._env = self._env, None
        if env is not None:
            env.close()

    @property
    def closed(self) -> bool:
        return self._env is None

    def _live_env(self) -> lmdb.Environment:
        if self._env is None:
            raise StoreError(f"page store at {self.path} is closed")
        return self._env

    # -- transactions

    @contextmanager
    def reader(self) -> Iterator[StoreReader]:
        """One read snapshot: ``with store.reader() as r: r.get_pages(...)``."""
        try:
            txn = self._live_env().begin(buffers=False)
        except lmdb.Error as e:
            raise StoreError(f"cannot begin a read transaction: {e}") from e
        try:
            yield StoreReader(self, txn)
        finally:
            txn.abort()

    @contextmanager
    def batch(self) -> Iterator[StoreBatch]:
        """One write transaction: committed at exit, aborted if the block raises."""
        if self.readonly:
            raise StoreError(f"page store at {self.path} is read-only")
        try:
            txn = self._live_env().begin(write=True)
        except lmdb.Error as e:
            raise StoreError(f"cannot begin a write transaction: {e}") from e
        b = StoreBatch(self, txn)
        try:
            yield b
            b._commit_last_lsn()
            txn.commit()
        except lmdb.Error as e:
            txn.abort()
            raise StoreError(f"write transaction failed: {e}") from e
        except BaseException:
            txn.abort()
            raise

    # -- single operations (each its own transaction)

    def get_page(self, rel: RelTag, blkno: int, lsn: int) -> bytes | None:
        with self.reader() as r:
            return r.get_page(rel, blkno, lsn)

    def get_pages(self, rel: RelTag, blocks: Iterable[int], lsn: int) -> list[bytes | None]:
        with self.reader() as r:
            return r.get_pages(rel, blocks, lsn)

    def nblocks(self, rel: RelTag, lsn: int) -> int | None:
        with self.reader() as r:
            return r.nblocks(rel, lsn)

    def relations(self, lsn: int) -> set[RelTag]:
        with self.reader() as r:
            return r.relations(lsn)

    def db_size(self, db: int, lsn: int) -> int | None:
        with self.reader() as r:
            return r.db_size(db, lsn)

    def get_slru(self, kind: int, segno: int, lsn: int) -> bytes | None:
        with self.reader() as r:
            return r.get_slru(kind, segno, lsn)

    @property
    def last_lsn(self) -> int:
        """Newest LSN the store holds data for (0 if empty)."""
        with self.reader() as r:
            return r.last_lsn

    @_translate
    def meta(self) -> dict[str, Any]:
        """The record stored by :meth:`set_meta` ({} if none)."""
        with self.reader() as r:
            raw = r._txn.get(_META, db=self._dbs[b"meta"])
        if raw is None:
            return {}
        try:
            out = json.loads(raw)
        except ValueError as e:
            raise StoreError(f"corrupt meta record in {self.path}: {e}") from None
        if not isinstance(out, dict):
            raise StoreError(f"corrupt meta record in {self.path}: not an object")
        return out

    def put_page(self, rel: RelTag, blkno: int, lsn: int, page: bytes) -> None:
        """Store a new version of one page at ``lsn`` (replaces one at the same lsn),
        and make the relation at least ``blkno + 1`` blocks long from ``lsn`` on: its
        size at ``lsn`` becomes max(size at lsn, blkno + 1), in the same transaction
        (a relation absent at ``lsn``, never created or dropped, counts as size 0,
        so it is created). Sizes recorded at later LSNs are left as they are.

        :meth:`StoreBatch.put_page` does NOT touch sizes: bulk writers (the
        importer, the generator) set them explicitly with ``set_nblocks``."""
        with self.batch() as b:
            b.put_page(rel, blkno, lsn, page)
            b._extend_nblocks(rel, lsn, blkno + 1)

    def set_nblocks(self, rel: RelTag, lsn: int, n: int) -> None:
        with self.batch() as b:
            b.set_nblocks(rel, lsn, n)

    def drop_relation(self, rel: RelTag, lsn: int) -> None:
        with self.batch() as b:
            b.drop_relation(rel, lsn)

    def set_db_size(self, db: int, lsn: int, size: int) -> None:
        with self.batch() as b:
            b.set_db_size(db, lsn, size)

    def put_slru(self, kind: int, segno: int, lsn: int, data: bytes) -> None:
        with self.batch() as b:
            b.put_slru(kind, segno, lsn, data)

    def set_last_lsn(self, lsn: int) -> None:
        with self.batch() as b:
            b.set_last_lsn(lsn)

    def set_meta(self, meta: dict[str, Any]) -> None:
        with self.batch() as b:
            b.set_meta(meta)
