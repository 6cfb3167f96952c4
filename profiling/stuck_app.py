"""An application with a stuck page read, for profiling/dump_stuck.sh.

Starts a 2-shard LocalCluster, a Communicator and two backend threads, freezes
shard 1 (SIGSTOP), and lets one backend read a block of shard 1: that call
blocks until its deadline. Creates /tmp/pagecomm-stuck-<pid> once it is stuck,
then waits for /tmp/pagecomm-stuck-<pid>.done (or 60 s), prints what the
communicator itself says about the stuck request, and cleans everything up.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from comm import CommClosed, Communicator, RequestTimeout  # noqa: E402
from shards import LocalCluster, shard_for  # noqa: E402
from shards._synth import generate_store  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="pagecomm-stuck-") as tmp:
        desc = generate_store(Path(tmp) / "store", 2, rels=1, nblocks=8192)
        rel, lsn = desc["rels"][0], max(desc["lsns"])
        stuck_blk = next(b for b in range(0, 8192, 2048) if shard_for(rel, b, 2, 2048) == 1)
        with LocalCluster(Path(tmp) / "store") as cluster, \
                Communicator(cluster.endpoints) as c:
            with c.backend() as warm:  # connect to shard 1 first, so the stuck request
                warm.get_page(rel, stuck_blk, lsn)  # is ON THE WIRE (not queued) when frozen
            cluster.freeze(1)

            def reader() -> None:  # a backend stuck on the frozen shard
                with c.backend() as be:
                    try:
                        be.get_page(rel, stuck_blk + 1, lsn, timeout=60)
                    except (RequestTimeout, CommClosed) as e:  # closed: interrupted
                        print(f"reader: {e}")

            th = threading.Thread(target=reader, name="backend-stuck-reader", daemon=True)
            th.start()
            time.sleep(0.5)
            flag = Path(f"/tmp/pagecomm-stuck-{os.getpid()}")
            done = Path(f"{flag}.done")
            flag.touch()
            try:
                deadline = time.monotonic() + 60
                while not done.exists() and time.monotonic() < deadline:
                    time.sleep(0.1)
            finally:
                flag.unlink(missing_ok=True)
                done.unlink(missing_ok=True)
            print("=== Communicator.dump_inflight(older_than=0.1) ===")
            for req in c.dump_inflight(older_than=0.1):
                print(req)
            print("=== Communicator.stats()['shards'] ===")
            for s in c.stats()["shards"]:
                print(s)
            cluster.thaw(1)  # the reply now arrives; the reader finishes
            th.join(10)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the with blocks then stop (and thaw) the page servers


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
