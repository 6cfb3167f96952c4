"""Backend processes (comm.attach) against an in-process CommServer: reads that
joined a failed prefetch are read again, slots come back whatever ends a wait,
the ipc path is not taken over from a live communicator and is removed on stop,
and the handle's arguments and introspection match a thread backend's."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakeserver import FakeServer, fake_page
from waiting import wait_for

import comm
from comm import RelTag
from comm._server import CommServer

pytestmark = pytest.mark.timeout(60)
REL = RelTag(1663, 5, 16384)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FakeServer, comm.Communicator, CommServer]]:
    with FakeServer() as s, comm.Communicator([s.endpoint], stripe_size=8,
                                              config=comm.CommConfig(request_timeout=5)) as c:
        server = CommServer(c, f"ipc://{tmp_path}/front.ipc").start()
        try:
            yield s, c, server
        finally:
            server.stop()
            c.close()
            server.release()


def test_a_read_that_joined_a_failed_prefetch_is_read_again(served: Any) -> None:
    """The prefetch's own short deadline passes; the read, with 5 s, gets its page (a
    thread backend does the same)."""
    s, _, server = served
    with comm.attach(server.endpoint) as be:
        s.delay = 0.4
        be.prefetch(REL, [7], lsn=100, timeout=0.1)
        time.sleep(0.02)  # the prefetch is in flight: the read joins it
        assert be.get_page(REL, 7, lsn=100, timeout=5) == fake_page(REL, 7, 100)
        assert be.get_pages(REL, [8, 9], lsn=100) == [fake_page(REL, b, 100) for b in (8, 9)]


def test_a_completion_taken_in_while_waiting_for_a_slot_frees_that_slot(served: Any) -> None:
    s, _, server = served
    with comm.attach(server.endpoint, slots=2) as be:
        s.frozen = True  # one slot orphaned until the worker's deadline (5 s)
        threading.Timer(0.2, be.cancel).start()
        with pytest.raises(comm.Cancelled):
            be.get_page(REL, 1, lsn=100, timeout=3)
        s.frozen = False
        # two chunks, one free slot: the first chunk completes while the call waits
        # for the orphan; then the deadline passes
        with pytest.raises(comm.RequestTimeout):
            be.get_pages(REL, list(range(40)), lsn=100, timeout=0.5)
        assert len(be._free) == 1 and be._orphans == {be._orphans.copy().pop()}
        end = time.monotonic() + 8
        while len(be._free) < 2 and time.monotonic() < end:  # the orphan's completion
            try:
                be.get_page(REL, 2, lsn=100, timeout=0.3)
            except comm.CommError:
                pass
        assert len(be._free) == 2 and not be._orphans


def test_a_second_communicator_on_a_live_ipc_path_is_refused(served: Any) -> None:
    _, c, server = served
    path = server.endpoint.partition("ipc://")[2]
    other = CommServer(c, server.endpoint)
    with pytest.raises(comm.CommError, match="another process listens there"):
        other.start()
    other.release()
    with comm.attach(server.endpoint) as be:  # the first still serves
        assert be.get_page(REL, 3, lsn=100) == fake_page(REL, 3, 100)
    server.stop()
    assert not os.path.exists(path)  # removed: attach() says at once nobody listens
    with pytest.raises(comm.CommClosed, match="does not exist"):
        comm.attach(server.endpoint)


@pytest.mark.parametrize("bad", [-1, 0, float("nan"), float("inf"), 1e9, "x", True])
def test_attach_timeout_is_checked(served: Any, bad: Any) -> None:
    _, _, server = served
    with pytest.raises(comm.InvalidRequest, match="timeout"):
        comm.attach(server.endpoint, timeout=bad)


def test_the_handle_looks_like_a_thread_backend(served: Any) -> None:
    _, _, server = served
    with comm.attach(server.endpoint, slots=4) as be:
        assert repr(be).startswith(f"<ProcBackend {be.name} open slots=4 in_use=0")
        assert be.cancel() == 0
        with pytest.raises(comm.InvalidRequest, match="not one string"):
            be.update_shards("tcp://127.0.0.1:1", 8)  # type: ignore[arg-type]
    assert "closed" in repr(be)


def test_a_dead_attachers_fifo_directory_is_removed(served: Any, tmp_path: Path) -> None:
    import tempfile

    from comm._procutil import RING_PREFIX as _RING_PREFIX
    _, _, server = served
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that no longer runs
    stale = Path(tempfile.gettempdir()) / f"{_RING_PREFIX}{pid}-abc"
    stale.mkdir()
    (stale / "ring").write_bytes(b"")
    live = Path(tempfile.mkdtemp(prefix=f"{_RING_PREFIX}{os.getpid()}-"))
    try:
        with comm.attach(server.endpoint):
            pass
        assert not stale.exists() and live.exists()
    finally:
        for d in (stale, live):
            if d.exists():
                for f in d.iterdir():
                    f.unlink()
                d.rmdir()


def test_a_process_read_answered_wrong_shard_after_a_split_is_read_again(
        tmp_path: Path) -> None:
    import fakeserver as fs

    from shards.protocol import Status

    class Disowning(FakeServer):
        disown = False

        def _answer(self, frames: list[bytes]) -> list[bytes]:
            if self.disown:
                req = fs.decode_request(frames)
                return fs.encode_reply(fs.error_reply(req, Status.INVALID_REQUEST,
                                                      "block belongs to shard 1, this is "
                                                      "shard 0"))
            return super()._answer(frames)

    with Disowning() as a, FakeServer() as b, comm.Communicator(
            [a.endpoint], stripe_size=8, config=comm.CommConfig(request_timeout=5)) as c:
        server = CommServer(c, f"ipc://{tmp_path}/front.ipc").start()
        try:
            with comm.attach(server.endpoint) as be:
                assert be.get_page(REL, 1, lsn=100) == fake_page(REL, 1, 100)
                a.disown, a.delay = True, 0.3  # answered after the split below
                threading.Timer(0.1, lambda: c.update_shards([b.endpoint])).start()
                assert be.get_pages(REL, [1, 2, 3], lsn=100, timeout=3) == [
                    fake_page(REL, x, 100) for x in (1, 2, 3)]
                c.update_shards([a.endpoint])  # the same map answers WrongShard: an error
                a.delay = 0
                with pytest.raises(comm.WrongShard, match="not on shard 0"):
                    be.get_page(REL, 4, lsn=100, timeout=2)
                assert be.comm_stats()["processes"]["pending"] == 0
        finally:
            server.stop()
            c.close()
            server.release()


def test_process_backends_count_in_stats_and_metrics(served: Any) -> None:
    s, c, server = served
    with comm.attach(server.endpoint) as be:
        for b in range(5):
            assert be.get_page(REL, b, lsn=100) == fake_page(REL, b, 100)
        s.frozen = True
        seen: list[dict[str, Any]] = []  # stats taken while the call waits
        timer = threading.Timer(0.2, lambda: seen.append(c.stats()))
        timer.start()
        with pytest.raises(comm.RequestTimeout):
            be.get_page(REL, 9, lsn=100, timeout=0.5)
        timer.join()
        assert seen[0]["backends"] == 1 and seen[0]["slots_in_use"] == 1
        s.frozen = False
        lat = c._latency_snapshot()
        assert sum(n for _, _, n in lat.values()) >= 5  # the process backend's calls


def test_a_process_timeout_names_the_request(served: Any) -> None:
    s, _, server = served
    with comm.attach(server.endpoint) as be:
        s.frozen = True
        with pytest.raises(comm.RequestTimeout, match=r"GET_PAGES 1663/5/16384 \[9\] at lsn 0x64"):
            be.get_page(REL, 9, lsn=100, timeout=0.3)


def test_process_update_shards_keeps_the_stripe_when_not_given(served: Any) -> None:
    s, c, server = served
    with comm.attach(server.endpoint) as be:
        be.update_shards([s.endpoint])
        assert c._map.generation == 1 and c._map.stripe == 8
        with pytest.raises(comm.InvalidRequest, match="stripe_size"):
            be.update_shards([s.endpoint], 0)


def test_dump_inflight_checks_its_argument(served: Any) -> None:
    _, c, _ = served
    for bad in ("x", None, -1, float("nan")):
        with pytest.raises(comm.InvalidRequest, match="older_than"):
            c.dump_inflight(bad)


@contextlib.contextmanager
def _dealer(server: CommServer) -> Iterator[Any]:
    """A raw DEALER to the communicator's front, as a misbehaving backend would use."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    try:
        yield sock
    finally:
        sock.close(0)
        ctx.term()


@pytest.mark.timeout(30)
def test_an_attach_naming_a_pid_outside_pid_t_leaves_the_front_serving(served: Any) -> None:
    """pid 2**31 used to be attached, then overflowed os.kill in the liveness sweep
    and killed the front thread: every backend lost its communicator."""

    from comm import _ipc
    _, _, server = served
    with comm.attach(server.endpoint) as good:
        with _dealer(server) as sock:
            for pid in (2**31, 0):
                sock.send(_ipc.encode_attach(pid, 1))
            assert not sock.poll(600)  # refused like any malformed attach: no segment
        assert server._thread.is_alive() and server.attached() == 1
        assert good.get_page(REL, 2, lsn=100, timeout=3) == fake_page(REL, 2, 100)


@pytest.mark.timeout(30)
def test_a_backend_whose_liveness_check_fails_is_dropped_not_the_front(
        served: Any, monkeypatch: pytest.MonkeyPatch) -> None:

    import comm._server as srv
    from comm import _ipc
    _, _, server = served
    odd = os.getppid()  # alive, and not the pid of the attached backend below
    real = srv.process_gone

    def gone(pid: int, zombies: bool = True) -> bool:
        if pid == odd:
            raise OverflowError("signed integer is greater than maximum")
        return real(pid, zombies)

    monkeypatch.setattr(srv, "process_gone", gone)
    with comm.attach(server.endpoint) as good:
        with _dealer(server) as sock:
            sock.send(_ipc.encode_attach(odd, 1))
            assert sock.poll(5000)  # attached: the pid itself is fine
            assert wait_for(lambda: server.attached() == 1)  # that one dropped as dead
        assert server._thread.is_alive()
        assert good.get_page(REL, 3, lsn=100, timeout=3) == fake_page(REL, 3, 100)


@pytest.mark.timeout(30)
def test_a_killed_backend_not_yet_reaped_is_reclaimed(served: Any) -> None:
    """A zombie still answers os.kill(pid, 0): its state in /proc says it is dead."""
    import signal
    import subprocess
    import sys

    _, _, server = served
    code = ("import sys, time, comm; be = comm.attach(sys.argv[1]); "
            "print('attached', flush=True); time.sleep(60)")
    root = str(Path(comm.__file__).resolve().parent.parent)
    child = subprocess.Popen([sys.executable, "-c", code, server.endpoint],
                             stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": root})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "attached"
        assert server.attached() == 1
        os.kill(child.pid, signal.SIGKILL)  # not waited for: a zombie
        assert wait_for(lambda: server.attached() == 0, 3.0)
    finally:
        child.kill()
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()


@pytest.mark.timeout(30)
def test_a_process_backend_used_in_a_forked_child_raises_there(served: Any) -> None:
    """As a thread Backend: CommClosed in the child, whose close() leaves the parent's
    socket and segment alone; the parent reads on."""
    _, _, server = served
    with comm.attach(server.endpoint, slots=2) as be:
        assert be.get_page(REL, 1, lsn=100) == fake_page(REL, 1, 100)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into pytest
            try:
                import signal
                signal.alarm(10)  # a hang must not outlive the test
                os.close(r)
                try:
                    be.get_page(REL, 2, lsn=100, timeout=2)
                    res = "page"
                except comm.CommError as e:
                    res = f"{type(e).__name__}: {e}"
                be.close()
                be.close()
                os.write(w, (res + "\nclosed").encode())
            finally:
                os._exit(0)
        os.close(w)
        try:
            with os.fdopen(r, "rb") as f:
                out = f.read().decode()
        finally:
            os.waitpid(pid, 0)
        assert out.startswith("CommClosed: ") and "os.fork()" in out and \
            out.endswith("closed"), out
        assert server.attached() == 1  # the child's close did not detach the parent
        assert be.get_page(REL, 3, lsn=100, timeout=3) == fake_page(REL, 3, 100)


@pytest.mark.parametrize("bad", [[1], None, ["tcp://\ud800:1"], ["tcp://a:1,tcp://b:2"]],
                         ids=["int", "None", "surrogate", "comma"])
def test_process_update_shards_refuses_what_the_thread_api_refuses(served: Any,
                                                                     bad: Any) -> None:
    """ConfigError before anything is sent (was TypeError, UnicodeEncodeError; a comma
    would have split into two endpoints on the wire)."""
    _, c, server = served
    with pytest.raises(comm.ConfigError):  # the thread API: the same check
        c.update_shards(bad)
    assert c.stats()["map_generation"] == 0
    with comm.attach(server.endpoint) as be:
        with pytest.raises(comm.ConfigError, match="endpoint"):
            be.update_shards(bad)
        assert be.comm_stats()["map_generation"] == 0  # nothing was sent


@pytest.mark.timeout(30)
def test_a_control_call_always_gets_an_answer_with_the_error_class(
        served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s, c, server = served
    with comm.attach(server.endpoint) as be:
        with pytest.raises(comm.ConfigError, match="stripe_size cannot change"):
            be.update_shards([s.endpoint], 16)

        def broken(*a: Any, **k: Any) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(c, "update_shards", broken)
        t = time.monotonic()
        with pytest.raises(comm.CommError, match="RuntimeError: boom"):
            be.update_shards([s.endpoint])
        assert time.monotonic() - t < 3  # an answer, not the 30 s wait
        monkeypatch.undo()
        be.update_shards([s.endpoint])
        assert be.comm_stats()["map_generation"] == 1


@pytest.mark.timeout(30)
def test_a_late_control_reply_is_not_taken_for_the_next_calls(served: Any) -> None:
    """A control call cancelled right after its request went out: its reply (an
    error) arrives later and must not answer the next call."""
    s, _, server = served
    with comm.attach(server.endpoint) as be:
        real = be._sock.send

        def send_then_cancel(msg: bytes, *a: Any, **k: Any) -> Any:
            r = real(msg, *a, **k)
            if msg[:1] == b"S":
                be._cancel.set()  # another thread's cancel() landing just now
            return r

        be._sock.send = send_then_cancel  # type: ignore[method-assign]
        with pytest.raises(comm.Cancelled):
            be.update_shards([s.endpoint], stripe_size=16)  # would be refused
        be._sock.send = real  # type: ignore[method-assign]
        time.sleep(0.2)  # the refusal is in
        be.update_shards([s.endpoint])
        assert be.comm_stats()["map_generation"] == 1


@pytest.mark.timeout(30)
def test_close_from_another_thread_ends_the_owners_wait_with_commclosed(
        served: Any) -> None:
    s, _, server = served
    be = comm.attach(server.endpoint, slots=2)
    got: list[BaseException] = []

    def read() -> None:
        try:
            be.get_page(REL, 2, lsn=100, timeout=5)
        except BaseException as e:
            got.append(e)

    s.frozen = True
    th = threading.Thread(target=read)
    th.start()
    try:
        time.sleep(0.3)
        t = time.monotonic()
        be.close()
        th.join(5)
        assert not th.is_alive() and time.monotonic() - t < 2
        assert len(got) == 1 and type(got[0]) is comm.CommClosed, got
        assert be._shm is None  # the owner detached as its call returned
        assert wait_for(lambda: server.attached() == 0)
        with pytest.raises(comm.CommClosed, match="is closed"):
            be.get_page(REL, 3, lsn=100)
        be.close()
    finally:
        s.frozen = False
        th.join(5)
        be.close()


def _shm() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}


@pytest.mark.timeout(30)
def test_attach_to_a_stale_socket_file_says_so_at_once(tmp_path: Path) -> None:
    """A communicator killed with -9 leaves its socket file; attach used to wait its
    whole handshake timeout (10 s) for an answer nobody could give."""
    import socket

    path = tmp_path / "front.ipc"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    s.close()  # the file stays: nobody listens
    assert path.exists()
    t = time.monotonic()
    with pytest.raises(comm.CommClosed, match=f"nobody listens on {path} .*stale socket"):
        comm.attach(f"ipc://{path}")
    assert time.monotonic() - t < 1.0
    path.unlink()
    path.write_bytes(b"")
    with pytest.raises(comm.CommClosed, match="is not a socket"):
        comm.attach(f"ipc://{path}", timeout=3)


@pytest.mark.timeout(30)
def test_an_attach_that_timed_out_leaves_no_segment_behind(
        served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The front gets to the attach after the backend gave up: the detach that
    follows it has what it made dropped (it stayed for the backend's lifetime)."""
    import comm._server as srv
    _, _, server = served
    before = _shm()
    real = srv.Attached
    made: list[Any] = []

    def slow(*a: Any) -> Any:
        time.sleep(0.3)  # a busy front
        made.append(real(*a))
        return made[-1]

    monkeypatch.setattr(srv, "Attached", slow)
    with pytest.raises(comm.CommClosed, match="no communicator answered"):
        comm.attach(server.endpoint, timeout=0.05)
    assert wait_for(lambda: len(made) == 1, 5)  # the front did make one
    assert wait_for(lambda: server.attached() == 0 and not _shm() - before, 3), \
        (server.attached(), _shm() - before)
    monkeypatch.undo()
    t = time.monotonic()
    with comm.attach(server.endpoint) as be:
        assert time.monotonic() - t < 0.5  # the normal path pays nothing for it
        assert be.get_page(REL, 1, lsn=100) == fake_page(REL, 1, 100)


def _raw_attach(server: CommServer, fifo: Path | None, reader: bool) -> Any:
    """A DEALER that attaches naming ``fifo`` (read end open if ``reader``), like a
    backend that gives up at the worst moment; returns (ctx, sock, read fd)."""
    import zmq

    from comm import _ipc
    fd = None
    if fifo is not None:
        os.mkfifo(fifo)
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        if not reader:
            os.close(fd)
            fd = None
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.endpoint)
    sock.send(_ipc.encode_attach(os.getpid(), 2, str(fifo) if fifo else ""))
    return ctx, sock, fd


@pytest.mark.timeout(30)
def test_the_front_releases_a_backend_that_closed_its_fifo(served: Any,
                                                           tmp_path: Path) -> None:
    """No detach message (lost, or never sent): the FIFO's read end, closed, is
    enough; a FIFO nobody reads at attach gets nothing made at all."""
    _, _, server = served
    before = _shm()
    ctx, sock, fd = _raw_attach(server, tmp_path / "ring", reader=True)
    try:
        assert sock.poll(5000)  # attached
        sock.recv()
        assert server.attached() == 1 and len(_shm() - before) == 1
        assert fd is not None
        os.close(fd)  # the socket stays open, the process alive
        assert wait_for(lambda: server.attached() == 0 and not _shm() - before, 3)
    finally:
        sock.close(0)
        ctx.term()
    ctx, sock, _ = _raw_attach(server, tmp_path / "ring2", reader=False)
    try:
        assert not sock.poll(500)  # nobody would read the answer: none, no segment
        assert server.attached() == 0 and not _shm() - before
    finally:
        sock.close(0)
        ctx.term()


@pytest.mark.timeout(30)
def test_stop_ends_a_backends_wait_at_once(served: Any) -> None:
    """Embedded CommServer.stop() with a read in flight on a frozen server: CommClosed
    at once, not RequestTimeout at the call's deadline."""
    s, _, server = served
    be = comm.attach(server.endpoint, slots=2)
    try:
        assert be.get_page(REL, 1, lsn=100) == fake_page(REL, 1, 100)
        s.frozen = True
        timer = threading.Timer(0.3, server.stop)
        timer.start()
        t = time.monotonic()
        with pytest.raises(comm.CommClosed, match="closed this backend"):
            be.get_page(REL, 2, lsn=100, timeout=4)
        assert time.monotonic() - t < 2
        timer.join()
    finally:
        s.frozen = False
        be.close()


@pytest.mark.timeout(30)
def test_stop_sends_closed_to_a_backend_without_a_fifo(served: Any) -> None:
    from comm import _ipc
    s, _, server = served
    ctx, sock, _ = _raw_attach(server, None, reader=False)
    try:
        assert sock.poll(5000)
        sock.recv()
        s.frozen = True
        sock.send(_ipc.encode_req(_ipc.Req(1, 7, 1, 0, REL.spc, REL.db, REL.rel, REL.fork,
                                           100, 100, 4.0, 0, 0, (3,))))
        assert wait_for(lambda: server.pending() == 1, 3)
        t = time.monotonic()
        server.stop()
        assert sock.poll(2000)
        d = _ipc.decode_done(sock.recv())
        assert (d.slot, d.use) == (1, 7) and time.monotonic() - t < 2
        assert isinstance(_ipc.error_of(d.status, d.message), comm.CommClosed)
    finally:
        s.frozen = False
        sock.close(0)
        ctx.term()


@pytest.mark.timeout(30)
def test_a_backend_on_socket_completions_keeps_working_after_prefetches(
        served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A communicator that cannot open the backend's FIFO (a private /tmp) sends
    completions over the socket. The FIFO then never had a writer, and its
    end-of-file is no hang-up: prefetch() took it for one and closed the handle."""
    _, _, server = served
    monkeypatch.setattr("comm._attached._open_ring", lambda path, name: None)
    with comm.attach(server.endpoint) as be:
        assert be.get_page(REL, 2, lsn=100, timeout=3) == fake_page(REL, 2, 100)
        for i in range(3):
            assert be.prefetch(REL, [10 + i], lsn=100) == 1
            time.sleep(0.06)  # past the prefetch's FIFO check interval
        assert be.get_page(REL, 3, lsn=100, timeout=3) == fake_page(REL, 3, 100)


def test_process_gone_alive_hidden_and_zombie_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from comm._procutil import process_gone

    assert not process_gone(os.getpid()) and not process_gone(os.getpid(), zombies=False)

    def eperm(pid: int, sig: int) -> None:
        raise PermissionError

    def hidden(*a: Any, **k: Any) -> Any:
        raise FileNotFoundError  # /proc mounted hidepid=2: another user's pid is hidden

    monkeypatch.setattr(os, "kill", eperm)
    monkeypatch.setattr(builtins, "open", hidden)
    assert not process_gone(12345)  # kill said: alive, another user's


@pytest.mark.timeout(30)
def test_a_bad_block_is_named_as_a_thread_backend_names_it(served: Any) -> None:
    _, c, server = served
    with comm.attach(server.endpoint) as pb, c.backend() as tb:
        for be in (pb, tb):
            with pytest.raises(comm.InvalidRequest, match=r"^blkno=-1 is outside"):
                be.get_page(REL, -1, lsn=100)
