"""Page-server throughput: pages/s for 1-page and 32-page GetPages against LMDB.

One server process (`shards serve`, no injected latency) over a generated one-shard
store; one pipelined DEALER client in this process keeps --inflight requests
outstanding. Usage::

    python profiling/server_rate.py [--pages 16384] [--seconds 3] [--inflight 64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shards._layout import open_shard_store, write_layout  # noqa: E402
from shards._protocol import RequestClass, Status, decode_reply, encode_get_pages  # noqa: E402
from shards._types import BLCKSZ, RelTag  # noqa: E402

REL = RelTag(1663, 5, 4242)
LSN = 1000
# the serve sub-command alone, so this runs whatever state the other sub-commands are in
_SERVE = ("import argparse, sys; from shards import _serve_cli; p = argparse.ArgumentParser(); "
          "_serve_cli.add_cli(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); "
          "sys.exit(a.func(a))")


def build_store(d: Path, npages: int) -> None:
    write_layout(d, 1, 2048)
    with open_shard_store(d, 0) as s, s.batch() as b:
        b.set_nblocks(REL, LSN, npages)
        for i in range(npages):
            b.put_page(REL, i, LSN, i.to_bytes(4, "little") * (BLCKSZ // 4))


def run(endpoint: str, npages: int, nblocks: int, seconds: float, inflight: int) -> dict:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    rng = random.Random(1)
    sent = done = pages = 0

    def send() -> None:
        nonlocal sent
        start = rng.randrange(npages - nblocks)
        sock.send(encode_get_pages(sent, 0, RequestClass.NORMAL, LSN, LSN, REL,
                                   range(start, start + nblocks)))
        sent += 1

    for _ in range(inflight):
        send()
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    while time.perf_counter() - t0 < seconds:
        r = decode_reply(sock.recv_multipart())
        assert r.status == Status.OK, r.reason
        done += 1
        pages += len(r.pages)
        send()
    elapsed = time.perf_counter() - t0
    client_cpu = time.process_time() - cpu0
    sock.close(0)
    ctx.term()
    return {"blocks_per_request": nblocks, "inflight": inflight, "seconds": round(elapsed, 2),
            "requests_per_s": round(done / elapsed), "pages_per_s": round(pages / elapsed),
            "MB_per_s": round(pages * BLCKSZ / elapsed / 1e6, 1),
            "client_cpu_s": round(client_cpu, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=16384)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--inflight", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "store"
        build_store(d, args.pages)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([sys.executable, "-c", _SERVE, "serve", "--store", str(d),
                                 "--shard", "0"], stdout=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().split()
            assert line and line[0] == "READY", line
            for nblocks in (1, 32):
                print(json.dumps(run(line[1], args.pages, nblocks, args.seconds,
                                     args.inflight)), flush=True)
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
