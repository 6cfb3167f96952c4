"""LocalCluster: real `python -m shards serve` subprocesses over a small sharded store."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from waiting import wait_for

from shards._cluster import LocalCluster, _all_threads_stopped
from shards._errors import ShardsError
from shards._layout import open_shard_store, write_layout
from shards._protocol import (
    GetPagesRequest,
    RelSizeRequest,
    RequestClass,
    Status,
    decode_reply,
    encode_request,
)
from shards._shardmap import shard_for
from shards._types import BLCKSZ, RelTag

pytestmark = [pytest.mark.servers, pytest.mark.timeout(60)]
REL = RelTag(1663, 5, 1234)
SHARDS, STRIPE, NBLOCKS, LSN = 2, 4, 16, 100


def page(blkno: int) -> bytes:
    return blkno.to_bytes(4, "little") * (BLCKSZ // 4)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cluster") / "store"
    write_layout(d, SHARDS, STRIPE)
    for s in range(SHARDS):
        with open_shard_store(d, s, map_size=1 << 26) as st, st.batch() as b:
            b.set_nblocks(REL, LSN, NBLOCKS)
            for blk in range(NBLOCKS):
                if shard_for(REL, blk, SHARDS, STRIPE) == s:
                    b.put_page(REL, blk, LSN, page(blk))
    return d


@pytest.fixture
def dealer() -> Iterator:
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []

    def connect(endpoint: str) -> zmq.Socket:
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        socks.append(s)
        return s

    yield connect
    for s in socks:
        s.close(0)
    ctx.term()


def ask(sock: zmq.Socket, blk: int, rid: int, timeout: float = 5.0):
    sock.send_multipart(encode_request(
        GetPagesRequest(rid, 0, RequestClass.NORMAL, LSN, LSN, REL, (blk,))))
    if not sock.poll(int(timeout * 1000)):
        return None
    return decode_reply(sock.recv_multipart())


def test_cluster_serves_kills_freezes_restarts(store_dir: Path, dealer) -> None:
    with LocalCluster(store_dir, latency_ms=1.0) as cl:
        assert len(cl.endpoints) == SHARDS and len(set(cl.endpoints)) == SHARDS
        socks = [dealer(ep) for ep in cl.endpoints]
        for blk in range(NBLOCKS):
            s = shard_for(REL, blk, SHARDS, STRIPE)
            r = ask(socks[s], blk, blk)
            assert r.status == Status.OK and r.pages == (page(blk),)
        socks[0].send_multipart(encode_request(
            RelSizeRequest(99, 0, RequestClass.NORMAL, LSN, 0, REL, False)))
        assert decode_reply(socks[0].recv_multipart()).nblocks == NBLOCKS

        blk1 = next(b for b in range(NBLOCKS) if shard_for(REL, b, SHARDS, STRIPE) == 1)
        cl.freeze(1)
        assert ask(socks[1], blk1, 200, timeout=0.3) is None
        cl.thaw(1)
        got = {socks[1].poll(3000) and decode_reply(socks[1].recv_multipart()).id}
        got.add(ask(socks[1], blk1, 201).id)
        assert got == {200, 201}

        old = cl.endpoints[1]
        cl.kill(1)
        assert cl.procs[1].returncode == -9
        assert ask(socks[1], blk1, 300, timeout=0.3) is None
        assert cl.restart(1) == old and cl.endpoints[1] == old
        # the DEALER reconnects by itself; it may also deliver 300, queued while down
        r = ask(socks[1], blk1, 301)
        if r is not None and r.id == 300:
            r = decode_reply(socks[1].recv_multipart()) if socks[1].poll(5000) else None
        assert r is not None and r.id == 301 and r.pages == (page(blk1),)
        cl.freeze(0)
        procs = list(cl.procs)
    cl.stop()  # idempotent, and a frozen child was still stopped
    assert all(p.returncode is not None for p in procs)


def test_cluster_start_failure_reports_stderr(store_dir: Path) -> None:
    with pytest.raises(ValueError, match="shard_count=3"):
        LocalCluster(store_dir, shard_count=3)
    with pytest.raises(ShardsError, match="does not match"):
        LocalCluster(store_dir, extra_args=["--stripe-size", "7"]).start()
    with pytest.raises(ShardsError, match="exited with status"):
        LocalCluster(store_dir, extra_args=["--no-such-flag"]).start()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_stop_detection_sees_a_stopped_and_a_running_process() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not _all_threads_stopped(p.pid)
        p.send_signal(signal.SIGSTOP)
        assert wait_for(lambda: _all_threads_stopped(p.pid), timeout=5.0)
        p.send_signal(signal.SIGCONT)
        assert wait_for(lambda: not _all_threads_stopped(p.pid), timeout=5.0)
    finally:
        p.kill()
        p.wait()
