"""The workloads, and one cell = one (design, workload, backends) measurement.

Theory of operation
-------------------
Backends are threads of this process for every design but proc. Each thread opens its
design's backend handle (connections, pipes), does one warm-up read, waits at the
cell's barrier, then loops until the stop flag, recording per-call latency and
pages (only inside the timed window). Roles:

* ``random``: one random page of a random relation per call (``get_page``);
* ``scan``: a sequential scan of a relation from a random stripe-aligned start,
  ``scan_batch`` pages per call, with prefetch ``distance`` pages ahead; at the
  end of a relation it moves on to the next one;
* ``samescan``: every backend starts at block 0 of relation 0 and scans on through
  the relations in the same order (they can share pagecomm's prefetches).

The data set (default 8 x 16384 pages, 1 GiB) is several times pagecomm's prefetch
buffer, and scans move on to the next relation, so a page read again later is not
still buffered: the bench measures prefetching, not a cache. Random readers in
``mixed`` may still find a page a scanner fetched moments ago (a real effect of a
shared buffer, bounded by buffer size / data set size).

Workload ``mixed`` runs two phases: the random half alone, then the same random
half while the other half scans; it reports the random readers' p99 in both.
``--scan-rate`` and ``--random-rate`` pace scanners and random readers (a pause after
each recorded call): a load below what the machine can do, so that the mixed
workload can show the communicator's priorities rather than the CPU's share.

Design (a), raw, is a single pipelined client thread (see _raw.py). Design (d),
proc, runs these same loops in backend PROCESSES attached to one ``python -m comm
serve`` (see _proc.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from shards import LocalCluster

from ._olddesign import OldDesign
from ._pagecomm import PagecommDesign
from ._raw import raw_thread
from ._setup import (
    COPIES_PER_PAGE,
    COPY_PATH,
    CPU_METHOD,
    Dataset,
    Params,
    Recorder,
    Tally,
    summarize,
)

DESIGNS: dict[str, Any] = {"old": OldDesign, "pagecomm": PagecommDesign}
WORKLOADS = ("random", "scan", "mixed", "samescan")
_MAX_ERRORS = 100


def run_cell(design: str, workload: str, backends: int, ds: Dataset, cluster: LocalCluster,
             p: Params) -> dict[str, Any]:
    """Measure one cell; returns its metrics (see summarize) plus design counters."""
    if design == "raw":
        return _raw_cell(workload, ds, cluster, p)
    if workload == "mixed":
        nr, ns = max(1, backends // 2), max(1, backends - backends // 2)
        alone = _phase(design, ["random"] * nr, ds, cluster, p)
        res = _phase(design, ["random"] * nr + ["scan"] * ns, ds, cluster, p)
        res["random_p99_alone_ms"] = alone["roles"]["random"]["p99_ms"]
        res["random_p99_mixed_ms"] = res["roles"]["random"]["p99_ms"]
        res["random_pages_per_s_alone"] = alone["roles"]["random"]["pages_per_s"]
        res["wrong"] += alone["wrong"]
        res["errors"] += alone["errors"]
        return res
    return _phase(design, [workload] * backends, ds, cluster, p)


def _raw_cell(workload: str, ds: Dataset, cluster: LocalCluster, p: Params) -> dict[str, Any]:
    per_request = 1 if workload == "random" else p.scan_batch
    rec = Recorder(ds, 1, p.seed)
    th = threading.Thread(target=raw_thread, name="bench-raw",
                          args=(rec, ds, p, list(cluster.endpoints), per_request), daemon=True)
    th.start()
    raw = rec.measure(p.duration, cluster)
    th.join(30)
    if th.is_alive():
        raise RuntimeError("bench: the raw client did not stop")
    res = summarize(rec.tallies, raw)
    res.update(backends=0, connections=len(cluster.endpoints), pages_per_request=per_request,
               prefetch={"hits": 0, "waste": 0, "issued": 0},
               requests_per_s=round(res["calls"] / raw["elapsed"], 1))
    return res


def _phase(design: str, roles: list[str], ds: Dataset, cluster: LocalCluster,
           p: Params) -> dict[str, Any]:
    if design == "proc":  # backends are processes: see _proc.py
        from ._proc import proc_phase

        return proc_phase(roles, ds, cluster, p)
    d = DESIGNS[design](ds, p, list(cluster.endpoints), len(roles))
    rec = Recorder(ds, len(roles), p.seed)
    threads = [threading.Thread(target=_backend_main, args=(d, rec, i, role, p),
                                name=f"bench-{design}-{i}", daemon=True)
               for i, role in enumerate(roles)]
    try:
        for th in threads:
            th.start()
        try:
            raw = rec.measure(p.duration, cluster, d.snapshot)
        except threading.BrokenBarrierError:
            rec.stop.set()
            raise RuntimeError(f"bench: a {design} backend failed to start: "
                               f"{rec.failure or 'unknown error'}") from None
        deadline = time.monotonic() + 60
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
        if any(th.is_alive() for th in threads):
            raise RuntimeError(f"bench: {design} backends did not stop within 60 s")
    finally:
        rec.stop.set()
        d.close()
    res = summarize(rec.tallies, raw)
    res["roles"] = {r: _strip(summarize(rec.tallies, raw, r)) for r in sorted(set(roles))}
    res.update(backends=len(roles), connections=raw["connections"], prefetch=d.prefetch())
    if design in COPIES_PER_PAGE:
        res.update(cpu_method=CPU_METHOD[design], copies_per_page=COPIES_PER_PAGE[design],
                   copy_path=COPY_PATH[design])
    return res


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    d.pop("cdf", None)
    return d


def _backend_main(d: Any, rec: Recorder, i: int, role: str, p: Params) -> None:
    t = rec.tally(role)
    try:
        reader = d.backend(i)
    except Exception as e:
        t.errors += 1
        rec.failure = rec.failure or f"{type(e).__name__}: {e}"
        rec.barrier.abort()
        raise
    try:
        reader.get_page(rec.ds.rels[0], 0)  # warm-up: connections, pipes
        rec.barrier.wait(timeout=60)
        if role == "random":
            _random(reader, rec, t, i, p.random_rate)
        else:
            _scan(reader, rec, t, i, p, role == "samescan")
    except threading.BrokenBarrierError:
        pass
    except Exception as e:
        rec.failure = rec.failure or f"{type(e).__name__}: {e}"
        rec.barrier.abort()
        raise
    finally:
        reader.close()
        rec.verify(t)


class _Pacer:
    """Holds a loop to ``rate`` units per second (0: no limit). The pause comes after a
    call has been recorded, so a paced call's latency is the call's alone; a loop that
    fell behind does not make up for it in a burst."""

    def __init__(self, rate: float, stop: threading.Event,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.stop, self.clock = rate, stop, clock
        self.next = clock()

    def pause(self, units: int) -> None:
        if not self.rate:
            return
        now = self.clock()
        # the next call is due one interval after the last one was due (so the
        # interval includes the call's own time); a loop that fell behind starts
        # again from now instead of making up for it
        self.next = max(self.next + units / self.rate, now)
        if self.next > now:
            self.stop.wait(self.next - now)


def _random(reader: Any, rec: Recorder, t: Tally, i: int, rate: float = 0.0) -> None:
    rng, rels, n = rec.rng(i), rec.ds.rels, rec.ds.nblocks
    stop, lat, pc = rec.stop, t.lat, time.perf_counter
    pacer = _Pacer(rate, stop)
    while not stop.is_set():
        rel, blk = rels[rng.randrange(len(rels))], rng.randrange(n)
        t0 = pc()
        try:
            page = reader.get_page(rel, blk)
        except Exception:
            t.errors += 1
            if t.errors > _MAX_ERRORS:
                raise
            pacer.pause(1)  # a failed call is paced like any other
            continue
        dt = pc() - t0
        if stop.is_set():
            return
        lat.append(dt)
        t.calls += 1
        rec.check(t, rel, blk, page)
        pacer.pause(1)


def _scan(reader: Any, rec: Recorder, t: Tally, i: int, p: Params, same: bool) -> None:
    rng, rels, n = rec.rng(i), rec.ds.rels, rec.ds.nblocks
    stop, lat, pc = rec.stop, t.lat, time.perf_counter
    r = 0 if same else rng.randrange(len(rels))
    pos = 0 if same else rng.randrange(max(1, n // p.scan_batch)) * p.scan_batch
    reader.start_scan(rels[r], pos)
    pacer = _Pacer(p.scan_rate, stop)
    while not stop.is_set():
        k = min(p.scan_batch, n - pos)
        t0 = pc()
        try:
            pages = reader.scan(rels[r], pos, k)
        except Exception:
            t.errors += 1
            if t.errors > _MAX_ERRORS:
                raise
            reader.start_scan(rels[r], pos)
            pacer.pause(k)
            continue
        dt = pc() - t0
        if stop.is_set():
            return
        lat.append(dt)
        t.calls += 1
        for j, page in enumerate(pages):
            rec.check(t, rels[r], pos + j, page)
        pacer.pause(k)
        pos += k
        if pos >= n:
            r = (r + 1) % len(rels)
            pos = 0
            reader.start_scan(rels[r], 0)
