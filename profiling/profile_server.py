"""py-spy a page server while a communicator loads it: where does a server's time go?

Starts a LocalCluster (page servers as subprocesses) over a generated store, runs
--backends reader threads of one Communicator against it (random single-page reads),
and meanwhile records ONE server process with py-spy for --seconds. Writes a flame
graph (SVG) or collapsed stacks (--format raw) and prints the share of non-idle
samples per leaf function. Usage::

    python profiling/profile_server.py [--latency-ms 0.5] [--backends 16] [--seconds 5]
        [--shard 0] [--format flamegraph|raw|speedscope] [--out server.svg]

Found with it: with injected latency the server loop spun on ``poll(0)`` while a reply
was due in under a millisecond (52% of its non-idle samples); see docs/performance.md.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import comm  # noqa: E402
import shards  # noqa: E402


def _reader(c: comm.Communicator, rels: list, lsn: int, nblocks: int, seed: int,
            stop: threading.Event) -> None:
    rng = random.Random(seed)
    with c.backend() as be:
        while not stop.is_set():
            be.get_page(rels[rng.randrange(len(rels))], rng.randrange(nblocks), lsn)


def _leaf_shares(raw: Path) -> list[tuple[str, float]]:
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        counts[stack.split(";")[-1].split(" (")[0]] += int(n)
    total = sum(counts.values()) or 1
    return [(k, v / total) for k, v in counts.most_common(8)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency-ms", type=float, default=0.5)
    ap.add_argument("--backends", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--format", choices=("flamegraph", "raw", "speedscope"), default="raw")
    ap.add_argument("--gil", action="store_true",
                    help="sample only the thread holding the GIL: where the server's Python "
                    "time goes, without the time it waits in poll")
    ap.add_argument("--out", type=Path, default=Path("server-profile.txt"))
    a = ap.parse_args()
    if shutil.which("py-spy") is None:
        sys.exit("profile_server: py-spy is not on PATH (pip install py-spy)")
    nblocks = 4096
    with tempfile.TemporaryDirectory() as d:
        info = shards.generate_store(d, 4, rels=2, nblocks=nblocks)
        stop = threading.Event()
        with shards.LocalCluster(d, latency_ms=a.latency_ms) as cl, \
                comm.Communicator(cl.endpoints, stripe_size=cl.stripe_size) as c:
            readers = [threading.Thread(target=_reader, name=f"reader-{i}",
                                        args=(c, info["rels"], info["lsns"][-1], nblocks, i,
                                              stop)) for i in range(a.backends)]
            for t in readers:
                t.start()
            try:
                time.sleep(1.0)  # connections up, servers warm
                pid = cl.procs[a.shard].pid  # type: ignore[union-attr]
                cmd = ["py-spy", "record", "--pid", str(pid), "--duration",
                       str(int(a.seconds)), "--rate", "200", "--format", a.format,
                       "--output", str(a.out)] + (["--gil"] if a.gil else [])
                done = subprocess.run(cmd, capture_output=True, text=True)
            finally:
                stop.set()
                for t in readers:
                    t.join(30)
    if done.returncode != 0:
        sys.exit(f"profile_server: py-spy failed: {done.stderr.strip()}")
    print(f"wrote {a.out}")
    if a.format == "raw":
        for leaf, share in _leaf_shares(a.out):
            print(f"{share:6.1%}  {leaf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
