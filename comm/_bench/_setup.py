"""Bench setup: a synthetic store, page servers per latency, and the shared cell types.

Theory of operation
-------------------
One temporary store is generated once per run (deterministic pages, so every
design can verify what it reads). For each injected latency one LocalCluster is
started, and every design runs against those SAME server processes. A cell is one
(design, workload, backends, latency) measurement; every design's runner returns a
:class:`CellResult` built by :class:`Recorder` from per-thread tallies, so all
designs are measured the same way: pages and per-call latencies counted only
inside the timed window, CPU from getrusage (this process) and /proc (servers).
"""

from __future__ import annotations

import os
import random
import resource
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shards import LocalCluster, RelTag, synth_pages
from shards._shardmap import shard_for_unchecked
from shards._synth import generate_store

VERIFY_EVERY = 50  # full byte comparison of one page in this many
_CLK_TCK = os.sysconf("SC_CLK_TCK")

# copies of each page between the ZeroMQ frame and the bytes a backend gets, and how
# a cell's CPU is counted; reported in every pagecomm / proc cell
COPIES_PER_PAGE = {"proc": 3, "pagecomm": 1}
COPY_PATH = {
    "proc": "3 copies: (1) the shard worker's decoder copies each page out of the ZeroMQ "
            "reply frame (received without a copy) into a bytes object; (2) the worker "
            "writes it into the backend's shared-memory slot; (3) the backend process copies "
            "it out of the slot into the returned bytes",
    "pagecomm": "1 copy: the shard worker's decoder copies each page out of the ZeroMQ reply "
                "frame (received without a copy) into the bytes object handed to the backend",
}
CPU_METHOD = {
    "proc": "sum of the bench process (getrusage RUSAGE_SELF), the comm serve process and "
            "the backend processes (/proc/<pid>/stat utime+stime), each sampled at the start "
            "and end of the timed window",
    "pagecomm": "the bench process (getrusage RUSAGE_SELF): backend threads + communicator",
}


@dataclass(frozen=True)
class Params:
    """Knobs of one bench run (the CLI flags)."""

    shards: int = 4
    threads_per_shard: int = 1
    inflight: int = 64
    inflight_pages: int = 256
    duration: float = 3.0
    rels: int = 8
    pages_per_rel: int = 16384
    scan_batch: int = 32      # pages per foreground call in scans
    distance: int = 128       # prefetch distance (old design: the ring size)
    prefetch_pages: int = 0   # pagecomm's shared buffer; 0 = backends * (distance + batch)
    seed: int = 1
    scan_rate: float = 0.0    # pages/s per scanning backend; 0 = as fast as it can
    random_rate: float = 0.0  # reads/s per random reader; 0 = closed loop

    @property
    def paced(self) -> bool:
        return bool(self.scan_rate or self.random_rate)


class ExpectedPages:
    """What a page read at ``lsn`` must hold (the generator is deterministic)."""

    lsn: int

    def expected_many(self, rel: RelTag, blks: list[int]) -> list[bytes]:
        return synth_pages(rel, blks, self.lsn)


class Dataset(ExpectedPages):
    """The generated store: relations, the LSN and the expected bytes of any page."""

    def __init__(self, root: Path, p: Params, progress: bool) -> None:
        self.store = root / "store"
        desc = generate_store(self.store, p.shards, rels=p.rels, nblocks=p.pages_per_rel,
                              progress=progress)
        self.rels: list[RelTag] = list(desc["rels"])
        self.lsn: int = max(desc["lsns"])
        self.nblocks: int = desc["nblocks"]
        self.shards: int = p.shards
        self.stripe: int = desc["stripe_size"]


    def shard_of(self, rel: RelTag, blk: int) -> int:
        return shard_for_unchecked(rel, blk, self.shards, self.stripe)  # hot: per request

    def cluster(self, latency_ms: float) -> LocalCluster:
        """Page servers for this store, NOT started: ``with ds.cluster(lat) as c`` starts
        them (starting here as well would start a second set and leak the first)."""
        return LocalCluster(self.store, latency_ms=latency_ms)


def pid_cpu(pid: int) -> float:
    """CPU seconds (utime + stime) used so far by a live process; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def server_cpu(cluster: LocalCluster) -> float:
    """CPU seconds (user+system) used so far by the cluster's server processes."""
    return sum(pid_cpu(p.pid) for p in cluster.procs if p is not None)


def own_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass
class Tally:
    """One thread's counts; written only by that thread."""

    role: str = "main"
    pages: int = 0
    calls: int = 0
    lat: array = field(default_factory=lambda: array("d"))
    checked: int = 0
    wrong: int = 0
    errors: int = 0
    # pages kept for verification after the timed window (their check is not timed)
    samples: list[tuple[RelTag, int, bytes]] = field(default_factory=list)
    hits: int = 0
    waste: int = 0
    issued: int = 0


class Recorder:
    """Shared timing state of one cell: a start barrier, a stop flag, the tallies."""

    def __init__(self, ds: Dataset, threads: int, seed: int) -> None:
        self.ds = ds
        self.stop = threading.Event()
        self.barrier = threading.Barrier(threads + 1)
        self.tallies: list[Tally] = []
        self._lock = threading.Lock()  # guards tallies
        self.failure: str | None = None  # first backend error (a racy write is fine)
        self._seed = seed

    def tally(self, role: str) -> Tally:
        t = Tally(role)
        with self._lock:
            self.tallies.append(t)
        return t

    def rng(self, i: int) -> random.Random:
        return random.Random(self._seed * 7919 + i)

    def check(self, t: Tally, rel: RelTag, blk: int, page: bytes) -> None:
        """Count a page; keep each thread's first page and one in VERIFY_EVERY after
        for ``verify()``, which compares them byte for byte once the cell's timed
        window is over (making the expected page costs more than reading one)."""
        t.pages += 1
        if t.pages % VERIFY_EVERY == 1:
            t.samples.append((rel, blk, page))

    def verify(self, t: Tally) -> None:
        """Compare ``t``'s kept pages with the expected ones (after the timed window)."""
        samples, t.samples = t.samples, []
        by_rel: dict[RelTag, list[tuple[int, bytes]]] = {}
        for rel, blk, page in samples:
            by_rel.setdefault(rel, []).append((blk, page))
        for rel, got in by_rel.items():
            want = self.ds.expected_many(rel, [b for b, _ in got])
            t.checked += len(got)
            t.wrong += sum(1 for (_, page), exp in zip(got, want, strict=True) if page != exp)

    def measure(self, duration: float, cluster: LocalCluster,
                extra: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """Release the threads, time ``duration`` seconds, stop them; the raw numbers."""
        self.barrier.wait(timeout=60)
        cpu0, scpu0, t0 = own_cpu(), server_cpu(cluster), time.perf_counter()
        time.sleep(duration)
        self.stop.set()
        elapsed = time.perf_counter() - t0
        cpu, scpu = own_cpu() - cpu0, server_cpu(cluster) - scpu0
        return {"elapsed": elapsed, "cpu": cpu, "server_cpu": scpu,
                **(extra() if extra else {})}


def summarize(tallies: list[Tally], raw: dict[str, Any], role: str | None = None) -> dict[str, Any]:
    """pages/s, latency percentiles (ms), CPU per 1000 pages, checks; for one role or all."""
    ts = [t for t in tallies if role is None or t.role == role]
    pages = sum(t.pages for t in ts)
    lat = sorted(x for t in ts for x in t.lat)
    elapsed = raw["elapsed"]

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e3, 4) if lat else None

    per_k = 1000.0 / pages if pages else 0.0
    return {
        "pages": pages, "calls": sum(t.calls for t in ts),
        "pages_per_s": round(pages / elapsed, 1) if elapsed > 0 else 0.0,
        "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "p999_ms": pct(0.999),
        "cpu_s_per_1k_pages": round(raw["cpu"] * per_k, 5) if pages else None,
        "server_cpu_s_per_1k_pages": round(raw["server_cpu"] * per_k, 5) if pages else None,
        "verified": sum(t.checked for t in ts), "wrong": sum(t.wrong for t in ts),
        "errors": sum(t.errors for t in ts),
        "cdf": _cdf(lat),
    }


def _cdf(lat: list[float], points: int = 200) -> list[float]:
    """``points`` evenly spaced quantiles (ms) of a sorted sample, for the CDF plot."""
    if not lat:
        return []
    n = len(lat)
    return [round(lat[min(n - 1, int(i * n / points))] * 1e3, 4) for i in range(points)]
