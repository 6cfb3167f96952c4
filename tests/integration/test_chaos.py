"""Chaos: 32 backends read verified pages from 4 shards while a fault loop kills
(-9), restarts, freezes and thaws page servers. Every call must either return the
right bytes or raise a typed error within its deadline; nothing wrong, nothing hung."""

from __future__ import annotations

import collections
import random
import threading
import time
from pathlib import Path

import pytest

import comm
from shards import LocalCluster, generate_store
from shards._synth import synth_pages

pytestmark = [pytest.mark.servers, pytest.mark.timeout(90)]
SHARDS, STRIPE, NBLOCKS, LSN = 4, 8, 256, 0x1000000
BACKENDS, RUN_SECONDS, CALL_TIMEOUT = 32, 12.0, 1.5


def test_chaos(tmp_path: Path) -> None:
    desc = generate_store(tmp_path / "store", SHARDS, STRIPE, rels=2, nblocks=NBLOCKS,
                          lsns=(LSN,))
    want = {rel: synth_pages(rel, range(NBLOCKS), LSN) for rel in desc["rels"]}
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    stop = threading.Event()

    with LocalCluster(tmp_path / "store") as cluster:
        cfg = comm.CommConfig(request_timeout=CALL_TIMEOUT, attempt_timeout=0.5)
        with comm.Communicator(cluster.endpoints, stripe_size=STRIPE, config=cfg) as c:
            def backend(seed: int) -> None:
                rnd = random.Random(seed)
                local: collections.Counter[str] = collections.Counter()
                with c.backend() as be:
                    while not stop.is_set():
                        rel = rnd.choice(desc["rels"])
                        blocks = [rnd.randrange(NBLOCKS) for _ in range(rnd.choice((1, 1, 5)))]
                        t = time.monotonic()
                        try:
                            pages = be.get_pages(rel, blocks, LSN)
                            ok = all(p == want[rel][b] for p, b in zip(pages, blocks,
                                                                       strict=True))
                            local["ok" if ok else "WRONG"] += 1
                        except comm.CommError as e:
                            local[type(e).__name__] += 1
                        except BaseException as e:  # an untyped error is a failure
                            local[f"UNTYPED {type(e).__name__}"] += 1
                        if time.monotonic() - t > CALL_TIMEOUT + 1.0:
                            local["HUNG"] += 1
                        local["calls"] += 1
                with lock:
                    counts.update(local)

            threads = [threading.Thread(target=backend, args=(i,)) for i in range(BACKENDS)]
            for t in threads:
                t.start()
            faults = fault_loop(cluster, RUN_SECONDS)
            stop.set()
            for t in threads:
                t.join(30)
            assert not any(t.is_alive() for t in threads)
            st = c.stats()
    print(f"\nchaos: {dict(counts)} faults={faults} "
          f"retries={sum(s['retries'] for s in st['shards'])} "
          f"resets={sum(s['resets'] for s in st['shards'])}")
    assert counts["WRONG"] == 0 and counts["HUNG"] == 0
    assert not [k for k in counts if k.startswith("UNTYPED")], counts
    assert counts["ok"] > counts["calls"] // 4  # it kept serving through the faults
    assert st["slots_in_use"] == 0


def fault_loop(cluster: LocalCluster, seconds: float) -> collections.Counter[str]:
    """Bounded: stops by itself after ``seconds``; leaves every server running."""
    rnd = random.Random(7)
    done: collections.Counter[str] = collections.Counter()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        i = rnd.randrange(SHARDS)
        action = rnd.choice(("kill", "freeze"))
        if action == "kill":
            cluster.kill(i)
            time.sleep(rnd.uniform(0.1, 0.5))
            cluster.restart(i)
        else:
            cluster.freeze(i)
            time.sleep(rnd.uniform(0.2, 1.0))
            cluster.thaw(i)
        done[action] += 1
        time.sleep(rnd.uniform(0.3, 0.8))
    return done
