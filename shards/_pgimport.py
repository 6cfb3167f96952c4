"""Import a stopped PostgreSQL 15 data directory into a sharded page store.

Theory of operation
-------------------
The data directory is a snapshot as of its latest checkpoint (a cleanly stopped
cluster has no WAL to replay), so every page found is stored as a version at the
checkpoint LSN (``pg_controldata``; or ``lsn=``). Relation files live in
``global/`` (spc 1664, db 0), ``base/<db>/`` (spc 1663) and
``pg_tblspc/<spc>/PG_15_*/<db>/``; a file ``<relfilenode>[_fsm|_vm|_init][.segno]``
holds blocks ``segno*131072 ...``. Each page goes only to the store of the shard
that owns it (``shard_for``); every shard keeps every relation's size (the
server's bounds check), shard 0 also database sizes and SLRU segments.

A re-import at a later LSN writes only what changed: a page whose bytes equal the
newest stored version is skipped (content, not pd_lsn, decides: some changes do
not move pd_lsn), sizes are written only when they differ, and a relation present
at the previous import but missing now (DROP, TRUNCATE's new relfilenode) is
recorded as dropped at the new LSN.

Pages are written in bounded transactions (``BATCH_PAGES`` pages buffered over all
shards), so memory stays flat and a kill leaves every store consistent (LMDB
commits are atomic). Relation sizes, drops, SLRUs and the ``imported_lsn`` meta
record go in each shard's LAST transaction: until ``meta()["imported_lsn"]``
reaches an LSN, that LSN's import is incomplete, and re-running it is safe.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import PgImportError, ShardsError, StoreError
from ._layout import LAYOUT_FILE, open_shard_store, read_layout, write_layout
from ._shardmap import DEFAULT_STRIPE_SIZE, check_shard_params, shard_for_unchecked
from ._store import PageStore
from ._synth import MAX_SHARD_COUNT, MAX_STRIPE_SIZE, _parse_lsn, check_flag, format_lsn
from ._types import BLCKSZ, FORK_SUFFIXES, MAX_LSN, RelTag

log = logging.getLogger(__name__)

PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin",)
RELSEG_BLOCKS = 131072  # blocks per 1 GiB segment file
GLOBAL_SPC, DEFAULT_SPC = 1664, 1663
BATCH_PAGES = 4096  # pages buffered (over all shards) before a commit: ~32 MiB
READ_PAGES = 1024  # pages read from a file at a time
SLRU_DIRS = {"pg_xact": 0, "pg_multixact/members": 1, "pg_multixact/offsets": 2}
_FORKS = {None: 0, "fsm": 1, "vm": 2, "init": 3}
_REL_FILE = re.compile(r"^(\d+)(?:_(fsm|vm|init))?(?:\.(\d+))?$")
_SLRU_FILE = re.compile(r"^[0-9A-F]{4,6}$")


@dataclass
class ImportResult:
    """What one import did."""

    lsn: int
    pages_seen: int = 0
    pages_written: int = 0
    relations: int = 0
    dropped: int = 0
    bytes: int = 0
    seconds: float = 0.0
    changed_sizes: int = 0
    slru_written: int = 0

    @property
    def pages_per_second(self) -> float:
        return self.pages_seen / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Scan:
    """Everything found in a data directory."""

    segments: dict[RelTag, list[tuple[int, Path, int]]] = field(default_factory=dict)
    db_sizes: dict[int, int] = field(default_factory=dict)
    slru: list[tuple[int, int, Path]] = field(default_factory=list)


# ---------------------------------------------------------------- the data directory

def relation_path(pgdata: str | os.PathLike[str], rel: RelTag, segno: int = 0) -> Path:
    """The file holding segment ``segno`` (1 GiB, 131072 blocks) of ``rel`` in ``pgdata``."""
    root = Path(pgdata)
    name = f"{rel.rel}{FORK_SUFFIXES[rel.fork]}" + (f".{segno}" if segno else "")
    if rel.spc == 1664:
        return root / "global" / name
    if rel.spc == 1663:
        return root / "base" / str(rel.db) / name
    found = sorted((root / "pg_tblspc" / str(rel.spc)).glob("PG_15_*"))
    if not found:
        raise PgImportError(f"tablespace {rel.spc} has no PG_15_* directory in {root}")
    return found[0] / str(rel.db) / name


def check_pgdata(pgdata: str | os.PathLike[str]) -> Path:
    """``pgdata`` as a Path if it is a stopped PostgreSQL data directory, else PgImportError."""
    d = Path(pgdata)
    if not d.is_dir():
        raise PgImportError(f"{d} is not a directory")
    pid = d / "postmaster.pid"
    if pid.exists():
        raise PgImportError(f"{pid} exists: the cluster is running (or crashed); stop it "
                            "cleanly before importing")
    for need in ("PG_VERSION", "global/pg_control", "base"):
        if not (d / need).exists():
            raise PgImportError(f"{d} is not a PostgreSQL data directory ({need} missing)")
    return d


def _pg_controldata() -> str | None:
    for d in PG_BIN_DIRS:
        exe = Path(d) / "pg_controldata"
        if exe.is_file():
            return str(exe)
    return shutil.which("pg_controldata")


def read_checkpoint_lsn(pgdata: str | os.PathLike[str]) -> int:
    """"Latest checkpoint location" of a stopped cluster (refuses an unclean one)."""
    exe = _pg_controldata()
    if exe is None:
        raise PgImportError("pg_controldata not found (in /usr/lib/postgresql/15/bin or "
                            "PATH); pass lsn= explicitly")
    try:
        proc = subprocess.run([exe, "-D", str(pgdata)], capture_output=True, text=True,
                              timeout=60, env={**os.environ, "LC_ALL": "C"})
    except (OSError, subprocess.SubprocessError) as e:
        raise PgImportError(f"cannot run {exe}: {e}") from e
    if proc.returncode != 0:
        raise PgImportError(f"{exe} -D {pgdata} failed: {proc.stderr.strip()}")
    fields = {k.strip(): v.strip() for k, _, v in
              (line.partition(":") for line in proc.stdout.splitlines())}
    state = fields.get("Database cluster state", "")
    if not state.startswith("shut down"):
        raise PgImportError(f"{pgdata}: cluster state is {state!r}, not shut down; its files "
                            "may not match its checkpoint")
    loc = fields.get("Latest checkpoint location", "")
    try:
        return _parse_lsn(loc)
    except argparse.ArgumentTypeError:
        raise PgImportError(f"cannot parse 'Latest checkpoint location' {loc!r}") from None


def _scan_db_dir(scan: _Scan, spc: int, db: int, d: Path) -> None:
    total = 0
    for entry in os.scandir(d):
        if not entry.is_file(follow_symlinks=False):
            continue
        size = entry.stat(follow_symlinks=False).st_size
        total += size
        m = _REL_FILE.match(entry.name)
        if m is None:
            continue
        rel = RelTag(spc, db, int(m[1]), _FORKS[m[2]])
        scan.segments.setdefault(rel, []).append((int(m[3] or 0), Path(entry.path), size))
    if db:
        scan.db_sizes[db] = scan.db_sizes.get(db, 0) + total


def scan_pgdata(pgdata: Path) -> _Scan:
    """Find every relation segment file, database size and SLRU segment."""
    scan = _Scan()
    major = (pgdata / "PG_VERSION").read_text().strip()
    _scan_db_dir(scan, GLOBAL_SPC, 0, pgdata / "global")
    for e in os.scandir(pgdata / "base"):
        if e.name.isdigit() and e.is_dir():
            _scan_db_dir(scan, DEFAULT_SPC, int(e.name), Path(e.path))
    tblspc = pgdata / "pg_tblspc"
    if tblspc.is_dir():
        for t in os.scandir(tblspc):
            if not t.name.isdigit():
                continue
            for ver in Path(t.path).glob(f"PG_{major}_*"):
                for e in os.scandir(ver):
                    if e.name.isdigit() and e.is_dir():
                        _scan_db_dir(scan, int(t.name), int(e.name), Path(e.path))
    for sub, kind in SLRU_DIRS.items():
        d = pgdata / sub
        if d.is_dir():
            for e in os.scandir(d):
                if _SLRU_FILE.match(e.name) and e.is_file():
                    scan.slru.append((kind, int(e.name, 16), Path(e.path)))
    for segs in scan.segments.values():
        segs.sort()
    return scan


def _nblocks(segs: list[tuple[int, Path, int]]) -> int:
    return max((segno * RELSEG_BLOCKS + size // BLCKSZ for segno, _, size in segs), default=0)


# ---------------------------------------------------------------- the import

class _Importer:
    """One import run: stores open, pending page writes, counters."""

    def __init__(self, stores: list[PageStore], stripe_size: int, lsn: int,
                 result: ImportResult, bar: Any) -> None:
        self.stores = stores
        self.stripe_size = stripe_size
        self.lsn = lsn
        self.result = result
        self.bar = bar
        metas = [st.meta() for st in stores]
        # compare against what the last COMPLETE import left; -1: nothing yet
        self.prev = [int(m.get("imported_lsn", -1)) for m in metas]
        self.fresh = [st.last_lsn == 0 and p < 0 for st, p in zip(stores, self.prev,
                                                                   strict=True)]
        self.pending: list[dict[RelTag, list[tuple[int, bytes]]]] = [{} for _ in stores]
        self.npending = 0

    def import_relation(self, rel: RelTag, segs: list[tuple[int, Path, int]]) -> None:
        count = len(self.stores)
        for segno, path, size in segs:
            if size % BLCKSZ:
                log.warning("%s: size %d is not a multiple of %d; ignoring the tail",
                            path, size, BLCKSZ)
            base = segno * RELSEG_BLOCKS
            try:
                f = open(path, "rb")  # closed by the with below
            except OSError as e:
                raise PgImportError(f"cannot read {path}: {e}") from e
            with f:
                first = 0
                while chunk := f.read(READ_PAGES * BLCKSZ):
                    n = len(chunk) // BLCKSZ
                    view = memoryview(chunk)
                    for i in range(n):
                        blk = base + first + i
                        shard = shard_for_unchecked(rel, blk, count, self.stripe_size)
                        page = bytes(view[i * BLCKSZ:(i + 1) * BLCKSZ])
                        self.pending[shard].setdefault(rel, []).append((blk, page))
                    first += n
                    self.npending += n
                    self.result.pages_seen += n
                    self.result.bytes += len(chunk)
                    if self.bar is not None:
                        self.bar.update(n)
                    if self.npending >= BATCH_PAGES:
                        self.flush()

    def flush(self) -> None:
        """Write the pending pages that differ from their newest stored version."""
        for shard, by_rel in enumerate(self.pending):
            if not by_rel:
                continue
            changed = self._changed(shard, by_rel)
            if changed:
                with self.stores[shard].batch() as b:
                    for rel, blk, page in changed:
                        b.put_page(rel, blk, self.lsn, page)
                self.result.pages_written += len(changed)
            self.pending[shard] = {}
        self.npending = 0

    def _changed(self, shard: int, by_rel: dict[RelTag, list[tuple[int, bytes]]]
                 ) -> list[tuple[RelTag, int, bytes]]:
        if self.fresh[shard]:
            return [(rel, blk, page) for rel, pages in by_rel.items() for blk, page in pages]
        out: list[tuple[RelTag, int, bytes]] = []
        with self.stores[shard].reader() as r:
            for rel, pages in by_rel.items():
                old = r.get_pages(rel, [blk for blk, _ in pages], self.lsn)
                out.extend((rel, blk, page) for (blk, page), o in zip(pages, old, strict=True)
                           if o != page)
        return out

    def finish(self, scan: _Scan, meta: dict[str, Any]) -> None:
        """Sizes, drops, db sizes, SLRUs, last_lsn and meta: each shard's last transaction."""
        self.flush()
        nblocks = {rel: _nblocks(segs) for rel, segs in scan.segments.items()}
        dropped: set[RelTag] = set()
        for shard, st in enumerate(self.stores):
            before = st.relations(self.prev[shard]) if self.prev[shard] >= 0 else set()
            gone = before - nblocks.keys()
            dropped |= gone
            with st.reader() as r:
                sizes = {rel: n for rel, n in nblocks.items() if r.nblocks(rel, self.lsn) != n}
                dbs = {db: s for db, s in scan.db_sizes.items()
                       if shard == 0 and r.db_size(db, self.lsn) != s}
                slru = self._changed_slru(r, scan) if shard == 0 else []
            with st.batch() as b:
                for rel, n in sizes.items():
                    b.set_nblocks(rel, self.lsn, n)
                for rel in gone:
                    b.drop_relation(rel, self.lsn)
                for db, s in dbs.items():
                    b.set_db_size(db, self.lsn, s)
                for kind, segno, data in slru:
                    b.put_slru(kind, segno, self.lsn, data)
                b.set_meta({**meta, "shard": shard, "imported_lsn": self.lsn})
                b.set_last_lsn(self.lsn)
            if shard == 0:
                self.result.changed_sizes = len(sizes)
                self.result.slru_written = len(slru)
        self.result.relations = len(nblocks)
        self.result.dropped = len(dropped)

    def _changed_slru(self, r: Any, scan: _Scan) -> list[tuple[int, int, bytes]]:
        out: list[tuple[int, int, bytes]] = []
        for kind, segno, path in scan.slru:
            data = path.read_bytes()
            if not data or len(data) % BLCKSZ or len(data) > 32 * BLCKSZ:
                log.warning("%s: %d bytes is not 1..32 whole pages; skipped", path, len(data))
                continue
            if r.get_slru(kind, segno, self.lsn) != data:
                out.append((kind, segno, data))
        return out


def _open_stores(store_dir: Path, shard_count: int, stripe_size: int) -> list[PageStore]:
    if (store_dir / LAYOUT_FILE).exists():
        layout = read_layout(store_dir)
        if (layout["shard_count"], layout["stripe_size"]) != (shard_count, stripe_size):
            raise PgImportError(
                f"{store_dir} holds {layout['shard_count']} shard(s) with stripe size "
                f"{layout['stripe_size']}, not {shard_count} with {stripe_size}")
    else:
        write_layout(store_dir, shard_count, stripe_size)
    stores: list[PageStore] = []
    try:
        for s in range(shard_count):
            stores.append(open_shard_store(store_dir, s))
    except BaseException:
        for st in stores:
            st.close()
        raise
    return stores


def import_pgdata(pgdata: str | os.PathLike[str], store_dir: str | os.PathLike[str], *,
                  shard_count: int = 1, stripe_size: int = DEFAULT_STRIPE_SIZE,
                  lsn: int | None = None, progress: bool = False) -> ImportResult:
    """Import (or re-import, writing only changes) a stopped cluster at ``lsn``
    (default: its latest checkpoint). See the module docstring."""
    t0 = time.monotonic()
    try:
        check_shard_params(shard_count, stripe_size)
    except ValueError as e:
        raise PgImportError(str(e)) from None
    src = check_pgdata(pgdata)
    if lsn is None:
        lsn = read_checkpoint_lsn(src)
    if not isinstance(lsn, int) or not 1 <= lsn <= MAX_LSN:
        raise PgImportError(f"lsn={lsn!r} is outside 1..{MAX_LSN}")
    scan = scan_pgdata(src)
    result = ImportResult(lsn=lsn)
    try:
        stores = _open_stores(Path(store_dir), shard_count, stripe_size)
    except (StoreError, OSError) as e:  # OSError: write_layout could not create the store
        raise PgImportError(f"cannot open page store {store_dir}: {e}") from e
    bar = None
    try:
        # a store's newest version is its last import's LSN or, for a store written by
        # `shards generate` (or anything else), its last_lsn
        newest = max(max(int(st.meta().get("imported_lsn", 0)), st.last_lsn) for st in stores)
        if lsn < newest:
            raise PgImportError(f"lsn {format_lsn(lsn)} is below {format_lsn(newest)}, the "
                                f"newest version in {store_dir}: versions only move forward")
        if progress:
            from tqdm import tqdm
            total = sum(sz for segs in scan.segments.values() for _, _, sz in segs) // BLCKSZ
            bar = tqdm(total=total, unit="page", desc="import", smoothing=0.1)
        imp = _Importer(stores, stripe_size, lsn, result, bar)
        for rel in sorted(scan.segments):
            imp.import_relation(rel, scan.segments[rel])
        imp.finish(scan, {"shard_count": shard_count, "stripe_size": stripe_size,
                          "source": "pgdata", "pgdata": str(src.resolve())})
    finally:
        if bar is not None:
            bar.close()
        for st in stores:
            st.close()
    result.seconds = time.monotonic() - t0
    log.debug("imported %s at %s: %d pages seen, %d written, %d relations, %d dropped, "
             "%.1fs (%.0f pages/s)", src, format_lsn(lsn), result.pages_seen,
             result.pages_written, result.relations, result.dropped, result.seconds,
             result.pages_per_second)
    return result


# ---------------------------------------------------------------- CLI

def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "import-pgdata", help="import a stopped PostgreSQL data directory",
        description="Import (or re-import, writing only changed pages) a stopped "
        "PostgreSQL 15 data directory into a sharded page store.",
        epilog="Exit status: 0 imported; 2 refused (a bad option, not a stopped PostgreSQL "
        "data directory, a store of another layout or at a newer LSN), one line on "
        "stderr; 1 the import failed while running (a store or I/O error).")
    p.add_argument("pgdata", help="the data directory (the cluster must be stopped)")
    p.add_argument("--store", required=True, help="store directory (created if missing)")
    p.add_argument("--shard-count", type=int, default=None,
                   help="shards (default: the store's layout, or 1)")
    p.add_argument("--stripe-size", type=int, default=None,
                   help=f"blocks per stripe (default: the store's layout, or "
                   f"{DEFAULT_STRIPE_SIZE})")
    p.add_argument("--lsn", type=_parse_lsn, default=None,
                   help="LSN of the versions (X/Y; default: latest checkpoint)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    layout: dict[str, int] = {}
    try:
        check_flag("--shard-count", args.shard_count, 1, MAX_SHARD_COUNT)
        check_flag("--stripe-size", args.stripe_size, 1, MAX_STRIPE_SIZE)
        check_flag("--lsn", args.lsn, 1, MAX_LSN)
        if (Path(args.store) / LAYOUT_FILE).exists():
            layout = read_layout(args.store)
    except ShardsError as e:  # a bad flag or an unreadable layout.json: one line, like serve
        print(f"error: {e}", file=sys.stderr)
        return 2
    # "is None", not "or": an explicit 0 was rejected above, never replaced by a default
    shard_count = layout.get("shard_count", 1) if args.shard_count is None else args.shard_count
    stripe_size = (layout.get("stripe_size", DEFAULT_STRIPE_SIZE) if args.stripe_size is None
                   else args.stripe_size)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        r = import_pgdata(args.pgdata, args.store, shard_count=shard_count,
                          stripe_size=stripe_size, lsn=args.lsn, progress=progress)
    except PgImportError as e:  # not a (stopped) data directory, a layout mismatch, ...:
        print(f"error: {e}", file=sys.stderr)  # a usage error, status 2 like every command
        return 2
    except (StoreError, OSError) as e:  # failed while writing: unexpected, status 1
        log.debug("import failed", exc_info=True)
        print(f"error: import failed: {e}", file=sys.stderr)
        return 1
    print(f"imported {args.pgdata} at LSN {format_lsn(r.lsn)} into {args.store} "
          f"({shard_count} shards, stripe {stripe_size}): {r.pages_seen} pages seen, "
          f"{r.pages_written} written, {r.relations} relations, {r.dropped} dropped, "
          f"{r.bytes / 2**20:.1f} MiB in {r.seconds:.2f}s = {r.pages_per_second:,.0f} pages/s")
    return 0
