"""Chaos: backends read verified pages while a fault loop kills (-9), restarts,
freezes and thaws page servers. Used by the CI chaos test (short) and by
``python -m comm bench --chaos SECONDS`` (a longer soak). Every call must return
the right bytes or raise a typed CommError within its deadline."""

from __future__ import annotations

import collections
import random
import threading
import time
from pathlib import Path
from typing import Any

import comm
from shards import LocalCluster, generate_store
from shards._synth import synth_pages


def run_chaos(root: Path, *, shards: int = 4, backends: int = 32, seconds: float = 12.0,
              call_timeout: float = 1.5, nblocks: int = 256, stripe: int = 8,
              seed: int = 7) -> dict[str, Any]:
    """Run the soak for ``seconds`` (bounded) and return the counts."""
    lsn = 0x1000000
    desc = generate_store(root / "store", shards, stripe, rels=2, nblocks=nblocks, lsns=(lsn,))
    want = {rel: synth_pages(rel, range(nblocks), lsn) for rel in desc["rels"]}
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()
    with LocalCluster(root / "store") as cluster:
        cfg = comm.CommConfig(request_timeout=call_timeout,
                              attempt_timeout=max(0.1, call_timeout / 3))
        with comm.Communicator(cluster.endpoints, stripe_size=stripe, config=cfg) as c:
            def backend(i: int) -> None:
                local = _reader(c, random.Random(seed * 1000 + i), desc["rels"], want, lsn,
                                call_timeout, stop)
                with lock:
                    counts.update(local)

            threads = [threading.Thread(target=backend, args=(i,)) for i in range(backends)]
            for t in threads:
                t.start()
            faults = fault_loop(cluster, seconds, random.Random(seed))
            stop.set()
            for t in threads:
                t.join(call_timeout * 4 + 10)
            alive = sum(t.is_alive() for t in threads)
            st = c.stats()
    return {"calls": dict(counts), "faults": dict(faults), "threads_left": alive,
            "retries": sum(s["retries"] for s in st["shards"]),
            "resets": sum(s["resets"] for s in st["shards"]),
            "reconnects": sum(s["reconnects"] for s in st["shards"]),
            "slots_in_use": st["slots_in_use"]}


def _reader(c: comm.Communicator, rnd: random.Random, rels: list[Any],
            want: dict[Any, list[bytes]], lsn: int, call_timeout: float,
            stop: threading.Event) -> collections.Counter[str]:
    local: collections.Counter[str] = collections.Counter()
    nblocks = len(next(iter(want.values())))
    with c.backend() as be:
        while not stop.is_set():
            rel = rnd.choice(rels)
            blocks = [rnd.randrange(nblocks) for _ in range(rnd.choice((1, 1, 5)))]
            t = time.monotonic()
            try:
                pages = be.get_pages(rel, blocks, lsn)
                ok = all(p == want[rel][b] for p, b in zip(pages, blocks, strict=True))
                local["ok" if ok else "WRONG"] += 1
            except comm.CommError as e:
                local[type(e).__name__] += 1
            except Exception as e:  # an untyped error is a failure of the library
                local[f"UNTYPED {type(e).__name__}"] += 1
            if time.monotonic() - t > call_timeout + 1.0:
                local["HUNG"] += 1
            local["calls"] += 1
    return local


def fault_loop(cluster: LocalCluster, seconds: float,
               rnd: random.Random) -> collections.Counter[str]:
    """Bounded: stops by itself after ``seconds``; leaves every server running."""
    done: collections.Counter[str] = collections.Counter()
    end = time.monotonic() + seconds
    n = len(cluster.endpoints)
    while time.monotonic() < end:
        i = rnd.randrange(n)
        if rnd.random() < 0.5:
            cluster.kill(i)
            time.sleep(rnd.uniform(0.1, 0.5))
            cluster.restart(i)
            done["kill"] += 1
        else:
            cluster.freeze(i)
            time.sleep(rnd.uniform(0.2, 1.0))
            cluster.thaw(i)
            done["freeze"] += 1
        time.sleep(rnd.uniform(0.3, 0.8))
    return done
