"""``python -m comm demo``: the main job, end to end on one machine.

Starts an embedded cluster of page servers (separate processes on loopback),
loads it from a real PostgreSQL cluster (initdb --data-checksums + pgbench -i)
when the binaries are installed, or from generated pages otherwise, then reads
every page back through ONE communicator from many backend threads scanning
with prefetch, verifies every page (bytes and PostgreSQL checksum), and prints
a short report. Everything it started is stopped and removed, also on Ctrl-C or
SIGTERM: every temporary directory (the PostgreSQL cluster's too) is created and its
removal armed in one step (``temp_dir``), so no interrupt falls between the two.

Tuning comes from the ``COMM_*`` variables (docs/tuning.md), read and checked before
anything starts (a bad value: one-line error, exit 2), except those that describe
page servers: the demo starts its own (``NOT_APPLIED``; a note names any that are set).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from shards import (
    BLCKSZ,
    MAX_BLOCKNO,
    LocalCluster,
    RelTag,
    import_pgdata,
    open_shard_store,
    read_layout,
)
from shards._checksum import verify_page_checksums
from shards._cli import deferred_interrupts
from shards._pgimport import relation_path
from shards._synth import MAX_RELS, MAX_SHARD_COUNT, generate_store, synth_pages

from ._communicator import Communicator
from ._config import CommConfig, env_settings
from ._errors import CommClosed, CommError, ConfigError

Expected = Callable[[RelTag, int, int], bytes]  # (rel, start, end) -> the blocks' bytes
SEGMENT_BLOCKS = 131072
MAX_SHARDS = MAX_SHARD_COUNT  # shards.check_shard_params and COMM_SHARDS: 1..255
PROG = "python -m comm demo"
# the COMM_* variables the demo reads but does not apply: they describe page servers,
# and it starts its own (its store's stripe size, no CURVE keys)
NOT_APPLIED = ("COMM_SHARDS", "COMM_STRIPE_SIZE", "COMM_CURVE_SECRET", "COMM_CURVE_SERVER_KEY")
ENV_HELP = ("Tuning: the COMM_* variables of docs/tuning.md (threads per shard, in-flight "
            "windows, slots, prefetch buffer, timeouts, checksums, metrics), checked before "
            "anything starts; not applied: " + ", ".join(NOT_APPLIED) + " (the demo starts "
            "its own page servers). --prefetch is the scans' distance, not "
            "COMM_PREFETCH_PAGES.")


def int_arg(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in lo..hi (no upper limit if hi is None).
    argparse prefixes the message with the flag: "argument --shards: must be ..."."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            limit = f"in {lo}..{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be an integer {limit}, got {text!r}")
        return v
    return parse


def add_cli(sub: Any) -> None:
    p = sub.add_parser("demo", help="embedded cluster + real or generated data, verified reads",
                       epilog=ENV_HELP)
    p.add_argument("--source", choices=("auto", "pg", "synth"), default="auto",
                   help="auto: PostgreSQL if its binaries are installed, else generated pages")
    p.add_argument("--shards", type=int_arg(1, MAX_SHARDS), default=4)
    p.add_argument("--backends", type=int_arg(1), default=16)
    p.add_argument("--scale", type=int_arg(1), default=4, help="pgbench scale (source pg)")
    p.add_argument("--rels", type=int_arg(1, MAX_RELS), default=8,
                   help="relations (source synth)")
    p.add_argument("--nblocks", type=int_arg(1, MAX_BLOCKNO + 1), default=4096,
                   help="blocks per relation (synth)")
    p.add_argument("--prefetch", type=int_arg(0), default=32,
                   help="prefetch distance in pages (0: no prefetch)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:  # before anything starts
        env = env_config(PROG, NOT_APPLIED, "the demo starts its own page servers")
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    # the clean-ups, run last-armed first on any exit; Ctrl-C and SIGTERM propagate to
    # main(), which exits 130 or 143 once they have run
    with contextlib.ExitStack() as stack:
        try:
            work = temp_dir(stack, "pagecomm-demo-")
            expected, label = _load(args, work, stack)
            layout = read_layout(work / "store")
            lsn, rels = _relations(work / "store")
            total = sum(n for _, n in rels)
            print(f"source: {label}; {len(rels)} relation forks, {total} pages, "
                  f"{layout['shard_count']} shards (stripe {layout['stripe_size']})")
            with LocalCluster(work / "store") as cluster:
                print("page servers:", ", ".join(cluster.endpoints))
                cfg = env.replace(shards=tuple(cluster.endpoints),
                                  stripe_size=layout["stripe_size"],
                                  curve_secret=None, curve_server_key=None)
                report = _read_all(args, cfg, lsn, rels, expected, total)
        except KeyboardInterrupt:
            print("\nstopping: cleaning up", file=sys.stderr)
            raise
    _print_report(report)
    return 0 if report["wrong"] == 0 and report["errors"] == 0 else 1


def env_config(prog: str, not_applied: Collection[str] | None, why: str) -> CommConfig:
    """``CommConfig.from_env()`` for a command, called before it starts anything: a bad
    ``COMM_*`` value raises ConfigError naming the variable. A note on stderr names the
    variables that are set but that the command does not apply (None: it applies none)."""
    cfg = CommConfig.from_env()
    unused = [v for v in env_settings() if not_applied is None or v in not_applied]
    if unused:
        print(f"{prog}: not applying {', '.join(unused)} ({why})", file=sys.stderr)
    return cfg


def temp_dir(stack: contextlib.ExitStack, prefix: str) -> Path:
    """A new temporary directory whose removal ``stack`` runs, armed as it is created."""
    with deferred_interrupts():
        path = Path(tempfile.mkdtemp(prefix=prefix))
        stack.callback(shutil.rmtree, path, ignore_errors=True)
    return path


def _load(args: argparse.Namespace, work: Path,
          stack: contextlib.ExitStack) -> tuple[Expected, str]:
    """Fill ``work/store``; returns (expected-page function, label). A PostgreSQL
    cluster's clean-up goes on ``stack``."""
    from shards import _pgcluster

    use_pg = args.source == "pg" or (args.source == "auto"
                                     and _pgcluster.find_pg_bin() is not None)
    if not use_pg:
        desc = generate_store(work / "store", args.shards, rels=args.rels,
                              nblocks=args.nblocks, progress=not args.no_progress)
        lsn = max(desc["lsns"])
        return lambda rel, a, b: b"".join(synth_pages(rel, range(a, b), lsn)), \
            "generated pages"
    print(f"creating a PostgreSQL cluster (initdb --data-checksums, pgbench -i -s {args.scale})")
    # its own directory (postgres-owned when we are root) inside one of ours, whose
    # removal is armed first: an interrupt may come before make_pgbench_cluster returns
    # the cluster (it stops its server itself then) or before pg.cleanup is armed
    pgroot = temp_dir(stack, "pagecomm-demo-pg-")
    pgroot.chmod(0o711)  # as root, PostgreSQL runs as 'postgres': it must reach its dir
    pg = _pgcluster.make_pgbench_cluster(scale=args.scale, base_dir=pgroot)
    stack.callback(pg.cleanup)  # stops the server (if running) and removes its directory
    res = import_pgdata(pg.pgdata, work / "store", shard_count=args.shards,
                        progress=not args.no_progress)
    print(f"imported {res.pages_written} pages at LSN {res.lsn >> 32:X}/{res.lsn & 0xFFFFFFFF:X}")
    return _file_reader(Path(pg.pgdata)), f"PostgreSQL 15 pgbench scale {args.scale}"


def _file_reader(pgdata: Path) -> Expected:
    """Expected bytes of a block range, read straight from the (stopped) data directory."""
    def expected(rel: RelTag, start: int, end: int) -> bytes:
        out, blk = [], start
        while blk < end:  # one read per 1 GiB segment file touched
            seg, off = divmod(blk, SEGMENT_BLOCKS)
            n = min(end - blk, SEGMENT_BLOCKS - off)
            with open(relation_path(pgdata, rel, seg), "rb") as f:
                f.seek(off * BLCKSZ)
                out.append(f.read(n * BLCKSZ))
            blk += n
        return b"".join(out)

    return expected


def _relations(store_dir: Path) -> tuple[int, list[tuple[RelTag, int]]]:
    """The store's newest LSN and every non-empty relation fork with its size there."""
    with open_shard_store(store_dir, 0, readonly=True) as st:
        lsn = st.last_lsn
        out = [(rel, st.nblocks(rel, lsn) or 0) for rel in sorted(st.relations(lsn))]
    return lsn, [(rel, n) for rel, n in out if n > 0]


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="page", desc="verified", smoothing=0.1)
        self._lock = threading.Lock()  # guards: bar

    def add(self, n: int) -> None:
        if self.bar is not None:
            with self._lock:
                self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _read_all(args: argparse.Namespace, cfg: CommConfig, lsn: int,
              rels: list[tuple[RelTag, int]], expected: Expected, total: int) -> dict[str, Any]:
    work = _split(rels, args.backends)
    results: list[dict[str, Any]] = []
    with Communicator(config=cfg) as c:
        if c.metrics_port is not None:  # COMM_METRICS_PORT
            host = f"[{cfg.metrics_addr}]" if ":" in cfg.metrics_addr else cfg.metrics_addr
            print(f"metrics: http://{host}:{c.metrics_port}/metrics")
        bar = _Progress(total, not args.no_progress)
        threads = [threading.Thread(target=_scan, name=f"demo-backend{i}",
                                    args=(c, part, lsn, args.prefetch, expected, bar, results))
                   for i, part in enumerate(work)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            c.close()  # pending calls fail with CommClosed; the scans stop
            raise
        secs = time.monotonic() - t0
        stats = c.stats()
    bar.close()
    lat = sorted(x for r in results for x in r["lat"])
    return {"pages": sum(r["ok"] for r in results), "wrong": sum(r["wrong"] for r in results),
            "errors": sum(r["errors"] for r in results), "seconds": secs,
            "p50": lat[len(lat) // 2] if lat else 0.0,
            "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0.0,
            "backends": len(work), "stats": stats}


def _split(rels: list[tuple[RelTag, int]], n: int) -> list[list[tuple[RelTag, int, int]]]:
    """Cut all (rel, block range) pieces into ``n`` nearly equal scan lists."""
    pieces = [(rel, b, min(b + 256, nb)) for rel, nb in rels for b in range(0, nb, 256)]
    return [p for p in (pieces[i::n] for i in range(n)) if p]


def _scan(c: Communicator, part: list[tuple[RelTag, int, int]], lsn: int, distance: int,
          expected: Expected, bar: _Progress, results: list[dict[str, Any]]) -> None:
    r: dict[str, Any] = {"ok": 0, "wrong": 0, "errors": 0, "lat": []}
    try:
        with c.backend() as be:
            for rel, start, end in part:
                _scan_range(be, rel, start, end, lsn, distance, expected, r, bar)
    except CommClosed:  # interrupted: run() closed the communicator; it says so once
        r["errors"] += 1
    except CommError as e:
        r["errors"] += 1
        print(f"backend error: {e}", file=sys.stderr)
    results.append(r)


def _scan_range(be: Any, rel: RelTag, start: int, end: int, lsn: int, distance: int,
                expected: Expected, r: dict[str, Any], bar: _Progress) -> None:
    """Read [start, end) page by page with prefetch ``distance`` ahead, then verify
    the range in one go (bytes against the source, checksums batched with numpy)."""
    pages, ahead = [], start
    for blk in range(start, end):
        if ahead < min(end, blk + distance):
            be.prefetch(rel, range(ahead, min(end, blk + distance)), lsn)
            ahead = min(end, blk + distance)
        t = time.perf_counter()
        pages.append(be.get_page(rel, blk, lsn))
        r["lat"].append(time.perf_counter() - t)
    want = expected(rel, start, end)
    sums = verify_page_checksums(pages, list(range(start, end)))
    for i, (page, ok_sum) in enumerate(zip(pages, sums, strict=True)):
        good = ok_sum and page == want[i * BLCKSZ:(i + 1) * BLCKSZ]
        r["ok" if good else "wrong"] += 1
        if not good:
            print(f"WRONG PAGE: {rel} block {start + i}", file=sys.stderr)
    bar.add(end - start)


def _print_report(r: dict[str, Any]) -> None:
    st = r["stats"]
    pf = st["prefetch"]
    reads = r["pages"] + r["wrong"]
    print()
    print("pagecomm demo report")
    print(f"  pages verified     {r['pages']} (wrong: {r['wrong']}, errors: {r['errors']})")
    print(f"  throughput         {reads / r['seconds']:,.0f} pages/s over {r['seconds']:.2f} s "
          f"with {r['backends']} backend threads")
    print(f"  get_page latency   p50 {r['p50'] * 1e3:.3f} ms, p99 {r['p99'] * 1e3:.3f} ms")
    print(f"  connections        {st['connections']} to {len(st['shards'])} page servers "
          f"(one per worker thread)")
    print(f"  prefetch           issued {pf['issued']}, hits {pf['hits']}, joins {pf['joins']}, "
          f"wasted {pf['wasted']}, dropped {pf['dropped']}")
    hit = (pf["hits"] + pf["joins"]) / reads if reads else 0.0
    print(f"  served by prefetch {hit:.1%} of reads")
