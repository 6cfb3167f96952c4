"""Backends as processes: `python -m comm serve` in its own process, backend
processes attached over ipc with their slot rings in shared memory."""

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

import comm
from shards import LocalCluster, generate_store
from shards._synth import synth_pages

pytestmark = [pytest.mark.servers, pytest.mark.timeout(120)]
SHARDS, STRIPE, NBLOCKS, LSN = 4, 16, 256, 0x1000000

READER = r"""
import random, sys, comm
from shards._synth import synth_pages, synth_rels
ep, seed, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rels = synth_rels(2)
want = {r: synth_pages(r, range(%(nblocks)d), %(lsn)d) for r in rels}
rnd = random.Random(seed); ok = wrong = 0
with comm.attach(ep) as be:
    print("attached", flush=True)
    i = 0
    while n < 0 or i < n:
        rel = rnd.choice(rels)
        blocks = [rnd.randrange(%(nblocks)d) for _ in range(rnd.choice((1, 7, 40)))]
        if rnd.random() < 0.2:
            be.prefetch(rel, range(blocks[0], min(%(nblocks)d, blocks[0] + 32)), %(lsn)d)
        pages = be.get_pages(rel, blocks, %(lsn)d)
        good = all(p == want[rel][b] for p, b in zip(pages, blocks))
        ok += good; wrong += not good; i += 1
print(f"ok={ok} wrong={wrong}", flush=True)
""" % {"nblocks": NBLOCKS, "lsn": LSN}  # noqa: UP031 (the script has braces of its own)


def shm_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    d = tmp_path_factory.mktemp("procs") / "store"
    generate_store(d, SHARDS, STRIPE, rels=2, nblocks=NBLOCKS, lsns=(LSN,))
    with LocalCluster(d) as cl:
        yield cl


class CommProcess:
    def __init__(self, cluster: LocalCluster, path: Path, own_group: bool = False) -> None:
        """``own_group``: in a process group of its own, which os.killpg kills with its
        resource tracker (that would otherwise unlink its segments after it)."""
        self.endpoint = f"ipc://{path}"
        env = {**os.environ, "COMM_SHARDS": ",".join(cluster.endpoints),
               "COMM_STRIPE_SIZE": str(STRIPE)}
        self.proc = subprocess.Popen([sys.executable, "-m", "comm", "serve", "--listen",
                                      self.endpoint], stdout=subprocess.PIPE, env=env,
                                     start_new_session=own_group)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        assert line.startswith("READY"), line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


@pytest.fixture
def commproc(cluster: LocalCluster, tmp_path: Path) -> Iterator[CommProcess]:
    cp = CommProcess(cluster, tmp_path / "comm.ipc")
    yield cp
    cp.stop()


def reader(ep: str, seed: int, n: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", READER, ep, str(seed), str(n)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_eight_backend_processes_read_verified_pages(commproc: CommProcess) -> None:
    before = shm_segments()
    procs = [reader(commproc.endpoint, i, 150) for i in range(8)]
    outs = [p.communicate(timeout=90) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert "ok=150 wrong=0" in out, out
    with comm.attach(commproc.endpoint) as be:
        st = be.comm_stats()
        assert st["processes"]["attached"] == 1 and st["processes"]["pending"] == 0
        # every completion went straight from the completing thread to the backend's
        # FIFO, none through the front thread's socket
        done = st["processes"]["completions"]
        assert done["rung"] >= 8 * 150 and done["sent"] == 0, done
        assert sum(s["completed"] for s in st["shards"]) > 0
        assert be.get_page(comm.RelTag(1663, 16384, 16384), 3, LSN) == synth_pages(
            comm.RelTag(1663, 16384, 16384), [3], LSN)[0]
    assert wait_for(lambda: shm_segments() <= before)


def test_backend_killed_mid_read_leaks_nothing(commproc: CommProcess) -> None:
    before = shm_segments()
    p = reader(commproc.endpoint, 99, -1)  # reads until killed
    assert p.stdout is not None and p.stdout.readline().strip() == "attached"
    time.sleep(0.5)
    p.kill()
    p.wait(10)
    with comm.attach(commproc.endpoint) as be:
        assert wait_for(lambda: (lambda p: (p["attached"], p["pending"]))(
            be.comm_stats()["processes"]) == (1, 0))
        assert be.comm_stats()["slots_in_use"] == 0
    assert wait_for(lambda: shm_segments() <= before), shm_segments() - before


def test_communicator_death_is_commclosed_and_reattach_works(cluster: LocalCluster,
                                                              tmp_path: Path) -> None:
    before = shm_segments()
    cp = CommProcess(cluster, tmp_path / "c.ipc")
    rel = comm.RelTag(1663, 16384, 16384)
    be = comm.attach(cp.endpoint)
    try:
        assert be.get_page(rel, 1, LSN) == synth_pages(rel, [1], LSN)[0]
        cp.proc.kill()
        cp.proc.wait(10)
        t = time.monotonic()
        with pytest.raises(comm.CommClosed):
            be.get_page(rel, 2, LSN, timeout=30)
        assert time.monotonic() - t < 2.0
    finally:
        be.close()
    cp2 = CommProcess(cluster, tmp_path / "c.ipc")
    try:
        with comm.attach(cp2.endpoint) as be2:
            assert be2.get_page(rel, 2, LSN) == synth_pages(rel, [2], LSN)[0]
    finally:
        cp2.stop()
    assert wait_for(lambda: shm_segments() <= before), shm_segments() - before


@pytest.mark.parametrize("what", ["missing", "regular file", "symlink to a FIFO"])
def test_completions_come_over_the_socket_when_the_fifo_cannot_be_opened(
        commproc: CommProcess, tmp_path: Path, what: str) -> None:
    """A backend that names no usable FIFO is still served: its completions come as
    messages on its socket, pages in shared memory. Only a FIFO is ever written to:
    a backend cannot make the communicator write into a file it names."""
    from multiprocessing import resource_tracker, shared_memory

    import zmq

    from comm import _ipc

    rel = comm.RelTag(1663, 16384, 16384)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(commproc.endpoint)
    try:
        path = tmp_path / "ring"
        if what == "regular file":
            path.write_bytes(b"IMPORTANT DATA\n")
        elif what == "symlink to a FIFO":
            os.mkfifo(tmp_path / "fifo")
            reader = os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK)
            path.symlink_to(tmp_path / "fifo")
        sock.send(_ipc.encode_attach(os.getpid(), 4, str(path)))
        assert sock.poll(10_000)
        _, _, slots, name = _ipc.decode_attached(sock.recv())
        shm = shared_memory.SharedMemory(name=name)
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        try:
            sock.send(_ipc.encode_req(_ipc.Req(2, 7, 1, 0, rel.spc, rel.db, rel.rel, rel.fork,
                                               LSN, LSN, 10.0, 0, 0, (5, 6))))
            assert sock.poll(10_000)
            d = _ipc.decode_done(sock.recv())
            assert (d.slot, d.use, d.status, d.count) == (2, 7, _ipc.OK, 2)
            assert shm.buf is not None
            base = 2 * _ipc.SLOT_BYTES
            assert bytes(shm.buf[base:base + 2 * 8192]) == b"".join(
                synth_pages(rel, [5, 6], LSN))
        finally:
            shm.close()
        sock.send(b"D")
    finally:
        sock.close(0)
        ctx.term()
    if what == "regular file":
        assert path.read_bytes() == b"IMPORTANT DATA\n"
    elif what == "symlink to a FIFO":
        try:
            assert os.read(reader, 64) == b""  # nothing was rung through the link
        except BlockingIOError:
            pass
        os.close(reader)
    with comm.attach(commproc.endpoint) as be:
        assert wait_for(lambda: be.comm_stats()["processes"]["completions"]["sent"] >= 1)


@pytest.mark.parametrize("path", ["relative/ring", "/tmp/with\0nul"])
def test_an_attach_naming_a_bad_ring_path_is_refused_and_the_front_lives_on(
        commproc: CommProcess, path: str) -> None:
    import zmq

    from comm import _ipc

    with pytest.raises(_ipc.IpcError, match="not an absolute path"):
        _ipc.decode_attach(_ipc.encode_attach(1, 4, path))
    before = shm_segments()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(commproc.endpoint)
    try:
        sock.send(_ipc.encode_attach(os.getpid(), 4, path))
        assert not sock.poll(500)  # refused: no segment for it
    finally:
        sock.close(0)
        ctx.term()
    rel = comm.RelTag(1663, 16384, 16384)
    with comm.attach(commproc.endpoint) as be:  # the front still serves
        assert be.get_page(rel, 4, LSN) == synth_pages(rel, [4], LSN)[0]
    assert wait_for(lambda: shm_segments() <= before)


def test_attach_leaves_no_fifo_behind(commproc: CommProcess) -> None:
    import glob
    import tempfile

    pattern = os.path.join(tempfile.gettempdir(), "pagecomm-ring-*")
    before = set(glob.glob(pattern))
    with comm.attach(commproc.endpoint) as be:
        assert be.get_page(comm.RelTag(1663, 16384, 16384), 9, LSN) == synth_pages(
            comm.RelTag(1663, 16384, 16384), [9], LSN)[0]
        assert set(glob.glob(pattern)) <= before
    with pytest.raises(comm.CommClosed):
        comm.attach(commproc.endpoint + ".nobody", timeout=0.3)
    assert set(glob.glob(pattern)) <= before


def test_attach_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(comm.CommClosed):
        comm.attach(f"ipc://{tmp_path}/nobody.ipc", timeout=0.3)
    t = time.monotonic()
    with pytest.raises(comm.CommClosed, match="does not exist"):  # at once, not after 10 s
        comm.attach(f"ipc://{tmp_path}/nobody.ipc")
    assert time.monotonic() - t < 1.0
    with pytest.raises(comm.InvalidRequest):
        comm.attach("not an endpoint")


def test_shard_map_update_through_the_control_message(cluster: LocalCluster,
                                                       tmp_path: Path) -> None:
    """The process form's control message: the same endpoints in another order is a
    different map (shard i -> endpoint); a stripe size change is refused."""
    cp = CommProcess(cluster, tmp_path / "m.ipc")
    try:
        with comm.attach(cp.endpoint) as be:
            be.update_shards(cluster.endpoints, STRIPE)
            assert be.comm_stats()["map_generation"] == 1
            with pytest.raises(comm.InvalidRequest, match="stripe_size"):
                be.update_shards(cluster.endpoints, STRIPE * 2)
            rel = comm.RelTag(1663, 16384, 16384)
            assert be.get_pages(rel, range(40), LSN) == synth_pages(rel, range(40), LSN)
    finally:
        cp.stop()


@pytest.mark.parametrize("listen, env, words", [
    ("foo://bar", {"COMM_SHARDS": "tcp://127.0.0.1:1"}, "--listen foo://bar: backend"),
    ("ipc:///nonexistent/dir/c.ipc", {"COMM_SHARDS": "tcp://127.0.0.1:1"}, "No such file"),
    ("ipc:///tmp/unused.ipc", {"COMM_SHARDS": ""}, "COMM_SHARDS"),
    ("ipc:///tmp/unused.ipc", {"COMM_SHARDS": "tcp://127.0.0.1:1", "COMM_STRIPE_SIZE": "x"},
     "COMM_STRIPE_SIZE"),
])
def test_serve_refuses_bad_input_in_one_line_and_exits(listen: str, env: dict[str, str],
                                                       words: str) -> None:
    r = subprocess.run([sys.executable, "-m", "comm", "serve", "--listen", listen],
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ") and words in r.stderr


def test_a_process_backend_belongs_to_one_thread(commproc: CommProcess) -> None:
    import threading

    rel = comm.RelTag(1663, 16384, 16384)
    with comm.attach(commproc.endpoint) as be:
        assert be.get_page(rel, 1, LSN) == synth_pages(rel, [1], LSN)[0]
        errors: list[BaseException] = []

        def other() -> None:
            try:
                be.get_page(rel, 2, LSN)
            except BaseException as e:
                errors.append(e)

        th = threading.Thread(target=other)
        th.start()
        th.join(30)
        assert len(errors) == 1 and isinstance(errors[0], comm.InvalidRequest)
        assert "belongs to another thread" in str(errors[0])
        assert be.get_page(rel, 3, LSN) == synth_pages(rel, [3], LSN)[0]


def test_a_backend_dropped_by_a_live_communicator_gets_commclosed_at_once(
        cluster: LocalCluster, tmp_path: Path) -> None:
    """The front stops (the communicator process itself lives on): the backend's
    completion FIFO is closed, and its next wait ends with CommClosed, not a timeout."""
    from comm._server import CommServer

    rel = comm.RelTag(1663, 16384, 16384)
    c = comm.Communicator(list(cluster.endpoints), stripe_size=STRIPE)
    server = CommServer(c, f"ipc://{tmp_path}/front.ipc").start()
    try:
        be = comm.attach(server.endpoint)
        try:
            assert be.get_page(rel, 5, LSN) == synth_pages(rel, [5], LSN)[0]
            server.stop()
            t = time.monotonic()
            with pytest.raises(comm.CommClosed, match="closed this backend"):
                be.get_page(rel, 6, LSN, timeout=30)
            assert time.monotonic() - t < 5
        finally:
            be.close()
    finally:
        server.stop()
        c.close()
        server.release()


def test_an_interrupted_wait_keeps_the_slot_out_until_its_completion(
        commproc: CommProcess) -> None:
    """Any exception in a wait (here Ctrl-C) orphans the slot like a timeout: it is not
    reused while the communicator may still write into it."""
    rel = comm.RelTag(1663, 16384, 16384)
    with comm.attach(commproc.endpoint, slots=1) as be:
        real = be._recv

        def interrupted(deadline: float) -> bytes | None:
            be._recv = real  # type: ignore[method-assign]
            raise KeyboardInterrupt

        be._recv = interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            be.get_page(rel, 7, LSN)
        assert be.stats()["slots_in_use"] == 1  # orphaned, not back in the ring
        # the next call waits for the orphan's completion, then reuses its slot
        assert be.get_page(rel, 8, LSN) == synth_pages(rel, [8], LSN)[0]
        assert be.stats()["slots_in_use"] == 0


@pytest.mark.timeout(60)
def test_the_death_of_the_communicator_unlinks_the_segments_it_left(
        cluster: LocalCluster, tmp_path: Path) -> None:
    """Its FIFO's end-of-file comes first: the backend checks the pid, says the
    communicator died and unlinks the orphaned segment (in a call or at close)."""
    cp = CommProcess(cluster, tmp_path / "d.ipc", own_group=True)
    rel = comm.RelTag(1663, 16384, 16384)
    be1 = comm.attach(cp.endpoint)
    be2 = comm.attach(cp.endpoint)
    try:
        for be in (be1, be2):
            assert be.get_page(rel, 1, LSN) == synth_pages(rel, [1], LSN)[0]
        assert be1._shm is not None and be2._shm is not None
        seg1, seg2 = be1._shm.name, be2._shm.name
        assert {seg1, seg2} <= shm_segments()
        os.killpg(cp.proc.pid, signal.SIGKILL)  # with its resource tracker
        cp.proc.wait(10)
        t = time.monotonic()
        with pytest.raises(comm.CommClosed, match=r"communicator process \(pid \d+\) died"):
            be1.get_page(rel, 2, LSN, timeout=30)
        assert time.monotonic() - t < 2.0
        assert seg1 not in shm_segments()
        be2.close()
        assert seg2 not in shm_segments()
    finally:
        be1.close()
        be2.close()
        try:
            os.killpg(cp.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        cp.proc.wait(10)
        for name in {seg1, seg2} & shm_segments():  # what a failure left
            os.unlink(f"/dev/shm/{name}")


@pytest.mark.timeout(60)
def test_prefetch_after_the_communicator_died_raises_at_once(cluster: LocalCluster,
                                                             tmp_path: Path) -> None:
    """Prefetches used to queue ~1000 messages for a dead communicator, then block in
    zmq's send forever. A send that would block now ends, and a slot taken for a
    request that could not be sent goes back to the ring."""
    import threading

    cp = CommProcess(cluster, tmp_path / "p.ipc")
    rel = comm.RelTag(1663, 16384, 16384)
    ready, go = threading.Event(), threading.Event()
    out: dict[str, object] = {"sent": 0}

    def backend() -> None:  # one thread owns the handle
        with comm.attach(cp.endpoint, slots=2) as be:
            assert be.get_page(rel, 1, LSN) == synth_pages(rel, [1], LSN)[0]
            ready.set()
            go.wait(30)
            try:
                for i in range(3000):
                    be.prefetch(rel, [i % NBLOCKS], LSN)
                    out["sent"] = i + 1
            except comm.CommError as e:
                out["prefetch"] = e
            try:
                be.get_page(rel, 2, LSN, timeout=30)
            except comm.CommError as e:
                out["read"] = e
            out["in_use"] = be.stats()["slots_in_use"]

    th = threading.Thread(target=backend, daemon=True)  # daemon: the old code hung
    th.start()
    try:
        assert ready.wait(30)
        cp.proc.kill()
        cp.proc.wait(10)
        t = time.monotonic()
        go.set()
        th.join(10)
        assert not th.is_alive(), "prefetch blocked after the communicator died"
        assert time.monotonic() - t < 2.0
        assert isinstance(out.get("prefetch"), comm.CommClosed) and "died" in str(
            out["prefetch"]), out
        assert isinstance(out.get("read"), comm.CommClosed) and out["in_use"] == 0, out
        assert out["sent"] == 0, out  # the FIFO's end-of-file told the first one
    finally:
        go.set()
        cp.stop()


def test_a_stopped_communicator_drops_prefetches_and_times_reads_out(
        cluster: LocalCluster, tmp_path: Path) -> None:
    """SIGSTOP, not death: once its queue is full, a prefetch is dropped within 50 ms
    (it used to wait its whole timeout, then say the communicator was stuck), a read
    is a RequestTimeout at its deadline (was CommClosed), and the handle works again
    after SIGCONT."""
    cp = CommProcess(cluster, tmp_path / "s.ipc")
    rel = comm.RelTag(1663, 16384, 16384)
    try:
        with comm.attach(cp.endpoint, slots=4) as be:
            assert be.get_page(rel, 1, LSN) == synth_pages(rel, [1], LSN)[0]
            cp.proc.send_signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                dropped = 0
                for i in range(5000):  # fills the socket's queue (its high-water mark)
                    if be.prefetch(rel, [i % NBLOCKS], LSN, timeout=30) == 0:
                        dropped += 1
                        if dropped == 3:
                            break
                assert dropped == 3 and time.monotonic() - t0 < 20
                t1 = time.monotonic()
                with pytest.raises(comm.RequestTimeout):
                    be.get_page(rel, 2, LSN, timeout=1.0)
                assert time.monotonic() - t1 < 5
            finally:
                cp.proc.send_signal(signal.SIGCONT)
            assert be.get_page(rel, 3, LSN, timeout=10) == synth_pages(rel, [3], LSN)[0]
    finally:
        cp.stop()

