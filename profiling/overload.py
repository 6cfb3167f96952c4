"""Overload soak: many more backends than the page servers can serve, with a small
server queue, for a bounded time. Prints the memory (RSS) of the communicator's
process and of each page server every second, the SLOW_DOWN retries, and the
outcome of every call. Memory must stay flat: every queue in the path is bounded.

    python profiling/overload.py --backends 512 --seconds 20 --max-queue 32
"""

from __future__ import annotations

import argparse
import collections
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import comm
from shards import LocalCluster, generate_store


def rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", type=int, default=512)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-queue", type=int, default=32)
    ap.add_argument("--latency-ms", type=float, default=1.0)
    ap.add_argument("--prefetch", type=float, default=0.3,
                    help="share of calls that also prefetch (0: every read hits a server)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pagecomm-overload-"))
    try:  # the store is tens of MB: never leave it behind, also not on Ctrl-C
        _soak(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _soak(args: argparse.Namespace, work: Path) -> None:
    desc = generate_store(work / "store", 2, 64, rels=2, nblocks=2048)
    lsn = max(desc["lsns"])
    outcome: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()
    with LocalCluster(work / "store", latency_ms=args.latency_ms,
                      extra_args=("--max-queue", str(args.max_queue))) as cl, \
            comm.Communicator(cl.endpoints, stripe_size=64,
                              config=comm.CommConfig(request_timeout=5.0)) as c:
        def backend(seed: int) -> None:
            rnd = random.Random(seed)
            local: collections.Counter[str] = collections.Counter()
            with c.backend() as be:
                while not stop.is_set():
                    rel = rnd.choice(desc["rels"])
                    try:
                        if rnd.random() < args.prefetch:
                            be.prefetch(rel, range(b := rnd.randrange(2000), b + 32), lsn)
                        be.get_page(rel, rnd.randrange(2048), lsn)
                        local["ok"] += 1
                    except comm.CommError as e:
                        local[type(e).__name__] += 1
            with lock:
                outcome.update(local)

        threads = [threading.Thread(target=backend, args=(i,), daemon=True)
                   for i in range(args.backends)]
        for t in threads:
            t.start()
        base = rss_kib()
        print(f"{'t':>4} {'comm RSS MiB':>12} {'servers RSS MiB':>16} {'queued':>7} "
              f"{'retries':>8} {'completed':>10}")
        end = time.monotonic() + args.seconds
        peak = base
        try:
            while time.monotonic() < end:
                time.sleep(1.0)
                st = c.stats()
                peak = max(peak, rss_kib())
                servers = " ".join(f"{rss_kib(p.pid) / 1024:.1f}" for p in cl.procs
                                   if p is not None)
                print(f"{args.seconds - (end - time.monotonic()):4.0f} {rss_kib() / 1024:12.1f} "
                      f"{servers:>16} "
                      f"{sum(s['queued'] for s in st['shards']):7d} "
                      f"{sum(s['retries'] for s in st['shards']):8d} "
                      f"{sum(s['completed'] for s in st['shards']):10d}")
        finally:  # also on Ctrl-C: stop the backends before the communicator closes
            stop.set()
        for t in threads:
            t.join(30)
    print(f"calls: {dict(outcome)}")
    print(f"communicator RSS: start {base / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB")


if __name__ == "__main__":
    main()
