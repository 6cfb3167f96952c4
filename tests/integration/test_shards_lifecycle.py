"""Lifecycle edges of the page service as processes: LocalCluster started twice or
misused, two ``shards serve`` on one ipc path, and ``python -m shards generate``
stopped by Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from waiting import wait_for

from shards import (
    InvalidArgument,
    InvalidArgumentType,
    LocalCluster,
    ShardsError,
    generate_store,
    open_shard_store,
)

pytestmark = [pytest.mark.servers, pytest.mark.timeout(120)]
LSN = 0x1000000


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("lifecycle") / "store"
    generate_store(d, 2, 4, rels=1, nblocks=16, lsns=(LSN,))
    return d


def _alive(p: subprocess.Popen[bytes]) -> bool:
    return p.poll() is None


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else set()


def test_a_second_start_raises_and_orphans_nothing(store: Path) -> None:
    cl = LocalCluster(store)
    procs: list[subprocess.Popen[bytes] | None] = []
    try:
        cl.start()
        procs, endpoints = list(cl.procs), list(cl.endpoints)
        with pytest.raises(ShardsError, match="cannot start: it is already running"):
            cl.start()
        with pytest.raises(ShardsError, match="already running"):
            cl.__enter__()
        assert cl.procs == procs and cl.endpoints == endpoints  # the same children
        assert all(p is not None and _alive(p) for p in procs)
    finally:
        cl.stop()
        for p in procs:  # the first start's children, even if a second start lost them
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    assert all(p is not None and p.returncode is not None for p in procs)
    with pytest.raises(ShardsError, match="cannot start: it is stopped"):
        cl.start()
    assert all(p is None or p.returncode is not None for p in cl.procs)  # none spawned


def test_cluster_argument_errors_are_typed(store: Path) -> None:
    with pytest.raises(InvalidArgument, match="shard_count=3 does not match 2"):
        LocalCluster(store, shard_count=3)
    with pytest.raises(InvalidArgument, match="latency_ms must be milliseconds"):
        LocalCluster(store, latency_ms="x")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="latency_ms"):
        LocalCluster(store, latency_ms=-1)
    with pytest.raises(InvalidArgument, match="start_timeout"):
        LocalCluster(store, start_timeout=0)
    with pytest.raises(InvalidArgumentType, match="extra_args"):
        LocalCluster(store, extra_args="--insecure")
    fds = _open_fds()
    with pytest.raises(ShardsError, match="/nonexistent/python: No such file"):
        LocalCluster(store, python="/nonexistent/python").start()
    assert _open_fds() <= fds  # its stderr file was closed, not leaked
    with LocalCluster(store) as cl:
        with pytest.raises(InvalidArgument, match="shard 99 is outside 0..1"):
            cl.kill(99)
        with pytest.raises(InvalidArgument, match="shard -1"):
            cl.restart(-1)
        with pytest.raises(InvalidArgumentType, match="shard must be an int, got str"):
            cl.freeze("a")  # type: ignore[arg-type]
        assert all(p is not None and _alive(p) for p in cl.procs)


# ---------------------------------------------------------------- serve on an ipc path

def _serve(store: Path, bind: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "shards", "serve", "--store", str(store),
                             "--shard", "0", "--bind", bind],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=10)


def test_second_serve_on_a_live_ipc_path_is_refused(store: Path, tmp_path: Path,
                                                    procs: list) -> None:
    sock_file = tmp_path / "shard0.sock"
    ep = f"ipc://{sock_file}"
    first = _serve(store, ep)
    procs.append(first)
    assert first.stdout is not None
    assert first.stdout.readline().decode().strip() == f"READY {ep}"
    second = _serve(store, ep)
    procs.append(second)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 2, err.decode()
    lines = [ln for ln in err.decode().splitlines() if ln.strip()]
    assert lines == [f"error: cannot bind {ep}: Address already in use (a live server "
                     f"listens on its socket file)"], err.decode()
    assert out == b""
    assert _alive(first) and sock_file.is_socket()  # the first one still owns it
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=30)
    assert first.returncode == 0
    assert not sock_file.exists()  # removed on stop: clients learn at once
    third = _serve(store, ep)  # and the address is free again
    procs.append(third)
    assert third.stdout is not None
    assert third.stdout.readline().decode().strip() == f"READY {ep}"


# ---------------------------------------------------------------- Ctrl-C, SIGTERM

@pytest.mark.parametrize("sig, status, line", [
    (signal.SIGINT, 130, "interrupted"),
    (signal.SIGTERM, 143, "terminated"),
])
def test_generate_stopped_by_a_signal_is_one_line(tmp_path: Path, sig: int, status: int,
                                                  line: str, procs: list) -> None:
    store = tmp_path / "big"
    p = subprocess.Popen([sys.executable, "-m", "shards", "generate", "--store", str(store),
                          "--shard-count", "1", "--rels", "64", "--nblocks", "100000",
                          "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    procs.append(p)
    # writing has begun: the store exists and holds a page or more
    assert wait_for(lambda: (store / "shard-0000" / "data.mdb").exists()
                    or p.poll() is not None, timeout=60)
    time.sleep(0.5)
    assert p.poll() is None, "generate finished before it could be interrupted"
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == status, err.decode()
    assert err.decode().strip() == line
    assert b"generated" not in out
    with open_shard_store(store, 0, readonly=True) as st:  # committed batches stay readable
        assert st.last_lsn in (0, LSN)
