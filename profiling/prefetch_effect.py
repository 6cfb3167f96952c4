"""What prefetch buys and what it costs, measured side by side against the same page
servers (separate processes, injected latency):

1. one sequential scan, page by page, with and without prefetch (distance 32);
2. random foreground reads, p50/p99, alone and beside a prefetch flood.

    python profiling/prefetch_effect.py --latency-ms 0.5
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import comm
from shards import LocalCluster, generate_store


def scan(c: comm.Communicator, rel: comm.RelTag, n: int, lsn: int, distance: int) -> float:
    with c.backend() as be:
        t = time.perf_counter()
        for b in range(n):
            if distance and b % 8 == 0:  # keep the window topped up, 8 pages at a time
                be.prefetch(rel, range(b, min(n, b + distance)), lsn)
            be.get_page(rel, b, lsn)
        return n / (time.perf_counter() - t)


def random_reads(c: comm.Communicator, rels: list, nblocks: int, lsn: int, readers: int,
                 seconds: float, flood: int) -> tuple[float, float, int]:
    lat: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()

    def reader(seed: int) -> None:
        rnd, mine = random.Random(seed), []
        with c.backend() as be:
            while not stop.is_set():
                t = time.perf_counter()
                be.get_page(rels[0], rnd.randrange(nblocks), lsn)
                mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)

    def flooder(seed: int) -> None:
        rnd = random.Random(seed)
        with c.backend() as be:
            while not stop.is_set():  # prefetch far more than anyone reads
                b = rnd.randrange(nblocks - 256)
                be.prefetch(rels[1], range(b, b + 256), lsn)
                time.sleep(0.001)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(readers)]
    threads += [threading.Thread(target=flooder, args=(100 + i,)) for i in range(flood)]
    try:
        for t in threads:
            t.start()
        time.sleep(seconds)
    finally:  # also on Ctrl-C: non-daemon threads would otherwise keep the process alive
        stop.set()
        for t in threads:
            if t.ident is not None:  # started
                t.join(30)
    lat.sort()
    return (statistics.median(lat) * 1e3, lat[int(len(lat) * 0.99)] * 1e3,
            c.stats()["prefetch"]["issued"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-ms", type=float, default=0.5)
    ap.add_argument("--pages", type=int, default=4096)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--flooders", type=int, default=8)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pagecomm-pf-"))
    try:  # the store is ~100 MB: never leave it behind, also not on Ctrl-C
        _measure(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _measure(args: argparse.Namespace, root: Path) -> None:
    desc = generate_store(root / "store", 4, 2048, rels=2, nblocks=args.pages)
    lsn, rels = max(desc["lsns"]), desc["rels"]
    with LocalCluster(root / "store", latency_ms=args.latency_ms) as cl:
        print(f"page servers: 4 processes, {args.latency_ms} ms injected latency")
        for distance in (0, 32):
            with comm.Communicator(cl.endpoints) as c:
                print(f"sequential scan of {args.pages} pages, prefetch distance {distance:2d}: "
                      f"{scan(c, rels[0], args.pages, lsn, distance):8.0f} pages/s")
        for flood in (0, args.flooders):
            with comm.Communicator(cl.endpoints) as c:
                p50, p99, issued = random_reads(c, rels, args.pages, lsn, args.readers,
                                                args.seconds, flood)
                print(f"random reads, {args.readers} readers, {flood} prefetch flooders: "
                      f"p50 {p50:6.3f} ms  p99 {p99:6.3f} ms  (prefetches issued {issued})")


if __name__ == "__main__":
    main()
