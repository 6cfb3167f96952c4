"""The worker's page window: batches are held back while single-page reads wait."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from fakeserver import FakeServer
from waiting import wait_for

import comm
from comm import RelTag

REL = RelTag(1663, 5, 16384)
pytestmark = pytest.mark.timeout(60)


def test_batches_wait_behind_a_single_page_read_then_flow():
    cfg = comm.CommConfig(inflight_pages_per_conn=64, request_timeout=5)
    with FakeServer() as srv, comm.Communicator([srv.endpoint], config=cfg) as c:
        srv.frozen = True  # requests are counted, never answered
        errors: list[BaseException] = []

        def single() -> None:
            with c.backend() as be:
                try:
                    be.get_page(REL, 5, lsn=100, timeout=1.0)
                except comm.RequestTimeout as e:
                    errors.append(e)

        t = threading.Thread(target=single)
        t.start()
        assert wait_for(lambda: srv.requests == 1, timeout=5)
        with c.backend() as be:
            assert be.prefetch(REL, range(100, 356), lsn=100) == 256  # 8 requests of 32
            # prefetches may use 3/4 of the 64-page window while a single read is out:
            # one 32-page request (1 + 32 <= 48 pages), the other seven wait
            assert wait_for(lambda: srv.requests == 2, timeout=5)
            time.sleep(0.3)
            assert srv.requests == 2
            t.join(10)
            assert len(errors) == 1
            # the single read gave up (deadline): nothing to protect, the rest flows
            assert wait_for(lambda: srv.requests == 9, timeout=5)


def test_batches_use_the_request_window_without_single_reads():
    cfg = comm.CommConfig(inflight_pages_per_conn=64, request_timeout=5)
    with FakeServer() as srv, comm.Communicator([srv.endpoint], config=cfg) as c:
        srv.frozen = True
        with c.backend() as be:
            assert be.prefetch(REL, range(100, 356), lsn=100) == 256
            assert wait_for(lambda: srv.requests == 8, timeout=5)


class _Dealer:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def send(self, frame: bytes, flags: int = 0) -> None:
        self.frames.append(frame)


def test_a_job_promoted_twice_in_one_take_is_sent_once():
    import types

    import zmq

    from comm._communicator import PrefetchJob
    from comm._worker import ShardWorker
    from prefetch import PrefetchBuffer

    w = ShardWorker(zmq.Context.instance(), 0, 0, "tcp://127.0.0.1:1", "inproc://unused",
                    window=8, verify=False)
    dealer = _Dealer()
    w._conn = types.SimpleNamespace(dealer=dealer)  # type: ignore[assignment]
    job = PrefetchJob(PrefetchBuffer(64), "b", REL, (1, 2), 10, 10, time.monotonic() + 5, 0)
    w.inbox.extend([job, job])  # two readers joined it and both handed it back
    w._take_inbox()
    assert len(dealer.frames) == 1 and job.sent


class _Job:
    """A stand-in job whose liveness changes between two looks."""

    batchable = False
    kind, cls, rel, blocks, lsn, nms, attempt, shard = 1, 0, REL, (3,), 10, 10, 0, 0

    def __init__(self, lives: list[bool]) -> None:
        self.lives, self.failed, self.qkey, self.sent = lives, 0, None, False
        self.deadline = time.monotonic() + 5

    def is_live(self) -> bool:
        return self.lives.pop(0) if self.lives else True

    def fail(self, error: BaseException) -> bool:
        self.failed += 1
        return True


def _stub_worker(**kw: Any) -> tuple[Any, _Dealer]:
    import types

    import zmq

    from comm._worker import ShardWorker

    w = ShardWorker(zmq.Context.instance(), 0, 0, "tcp://127.0.0.1:1", "inproc://unused",
                    window=8, verify=False, **kw)
    dealer = _Dealer()
    w._conn = types.SimpleNamespace(dealer=dealer)  # type: ignore[assignment]
    return w, dealer


def test_a_job_failed_dead_and_resubmitted_in_one_take_is_sent():
    # an abandoned slot is failed (freed), re-armed by its backend and handed in again
    # before the worker is through the inbox: the second copy is a new request
    w, dealer = _stub_worker()
    job = _Job([False, True])
    w.inbox.extend([job, job])
    w._take_inbox()
    assert job.failed == 1 and len(dealer.frames) == 1


def test_a_batch_of_single_page_reads_is_small_work():
    from comm._batch import Batch
    from comm._batch import is_bulk as _bulk

    singles = Batch([_Job([]), _Job([])])
    assert not _bulk(singles)
    wide = _Job([])
    wide.blocks = (4, 5)
    assert _bulk(Batch([_Job([]), wide])) and _bulk(wide) and not _bulk(_Job([]))


def test_an_endpoint_that_never_connects_is_logged(caplog):
    import logging
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    caplog.set_level(logging.WARNING, logger="comm._conn")
    with comm.Communicator([f"tcp://127.0.0.1:{port}"]):
        assert wait_for(lambda: any("cannot connect to" in r.getMessage()
                                     for r in caplog.records), timeout=10)
    msg = next(r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage())
    assert f"127.0.0.1:{port}" in msg and "comm-shard0-w0" in msg


def test_a_listener_that_is_not_a_page_server_is_reported_not_flooded(caplog):
    import logging
    import socket

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    lsock.settimeout(0.1)
    port = lsock.getsockname()[1]
    stop = threading.Event()

    def accept_and_drop() -> None:  # like a database port given by mistake
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except OSError:
                continue
            conn.close()

    t = threading.Thread(target=accept_and_drop, daemon=True)
    t.start()
    caplog.set_level(logging.WARNING, logger="comm._conn")
    try:
        with comm.Communicator([f"tcp://127.0.0.1:{port}"]) as c:
            assert wait_for(lambda: any("cannot connect to" in r.getMessage()
                                         for r in caplog.records), timeout=10)
            assert not c.stats()["shards"][0]["reconnects"]
    finally:
        stop.set()
        t.join(5)
        lsock.close()
    assert not [r for r in caplog.records if "disconnected from" in r.getMessage()]


def test_a_foreground_read_does_not_wait_for_a_scan_reply_to_wake_the_worker(monkeypatch):
    # the worker sleeps until a reply or its sweep timer; with only a prefetch in
    # flight to a stuck server, a foreground read must ring it rather than wait for
    # either (the sweep is set far off here, so only a doorbell can send the read)
    monkeypatch.setattr("comm._worker._SWEEP_INTERVAL", 60.0)
    cfg = comm.CommConfig(request_timeout=5)
    with FakeServer() as srv, comm.Communicator([srv.endpoint], config=cfg) as c:
        srv.frozen = True  # requests are counted, never answered
        with c.backend() as be:
            assert be.prefetch(REL, range(100, 132), lsn=100) == 32
            assert wait_for(lambda: srv.requests == 1, timeout=5)
            w = c._map.workers[0][0]
            assert wait_for(lambda: w.idle_fg and not w.idle, timeout=5)  # asleep, bulk out
            with pytest.raises(comm.RequestTimeout):
                be.get_page(REL, 5, lsn=100, timeout=0.5)
            # it was sent while the prefetch was still out (without the doorbell only
            # the sweep, 60 s away, would have sent it)
            assert wait_for(lambda: srv.requests == 2, timeout=5)


@pytest.mark.parametrize("stuck, nap_ms", [(1, None), (3, None), (3, 300)])
def test_a_foreground_read_is_sent_while_other_reads_are_stuck(monkeypatch, stuck, nap_ms):
    # with small requests in flight the worker is not rung at once (the next reply
    # wakes it), but that reply may be far off (a slow server, a cold page): a read
    # must not wait for it, nor for the sweep (60 s here), only for the worker's nap
    # (DOZE_MS): after the nap it rings; during it (a 300 ms nap makes sure) the
    # worker finds it when the nap ends
    monkeypatch.setattr("comm._worker._SWEEP_INTERVAL", 60.0)
    if nap_ms is not None:
        monkeypatch.setattr("comm._worker.DOZE_MS", nap_ms)
    cfg = comm.CommConfig(request_timeout=5)
    with FakeServer() as srv, comm.Communicator([srv.endpoint], config=cfg) as c:
        srv.frozen = True  # requests are counted, never answered
        errors: list[BaseException] = []

        def stuck_read(i: int) -> None:
            with c.backend() as be:  # one relation each: never coalesced into one request
                try:
                    be.get_page(RelTag(1663, 5, 20000 + i), 0, lsn=100, timeout=2.0)
                except comm.RequestTimeout as e:
                    errors.append(e)

        threads = [threading.Thread(target=stuck_read, args=(b,)) for b in range(stuck)]
        for t in threads:
            t.start()
        assert wait_for(lambda: srv.requests == stuck, timeout=5)
        with c.backend() as be:
            with pytest.raises(comm.RequestTimeout):
                be.get_page(REL, 500, lsn=100, timeout=1.0)
            # sent within the nap, long before the sweep could have sent it
            assert srv.requests == stuck + 1
        for t in threads:
            t.join(10)
        assert len(errors) == stuck


def test_a_foreground_read_is_sent_while_a_single_page_prefetch_is_stuck(monkeypatch):
    # a one-page prefetch is a small request: it must not hold back a foreground read
    monkeypatch.setattr("comm._worker._SWEEP_INTERVAL", 60.0)
    cfg = comm.CommConfig(request_timeout=5)
    with FakeServer() as srv, comm.Communicator([srv.endpoint], config=cfg) as c:
        srv.frozen = True
        with c.backend() as be:
            assert be.prefetch(REL, [100], lsn=100) == 1
            assert wait_for(lambda: srv.requests == 1, timeout=5)
            with pytest.raises(comm.RequestTimeout):
                be.get_page(REL, 5, lsn=100, timeout=0.5)
            assert srv.requests == 2


def test_must_ring_for_a_foreground_read_once_a_dozing_worker():
    from types import SimpleNamespace

    from comm._doorbell import must_ring

    fg, pf = SimpleNamespace(cls=0), SimpleNamespace(cls=1)
    w = SimpleNamespace(idle=False, idle_fg=False, dozing=False)
    assert not must_ring(w, fg)  # awake, or napping: it will look at the inbox
    w.dozing = True
    assert not must_ring(w, pf)  # a prefetch never rings a worker with work out
    assert w.dozing
    assert must_ring(w, fg)
    assert not w.dozing and not must_ring(w, fg)  # one ring per doze
    w.idle_fg = True  # only bulk out: every foreground read rings (as it always did)
    assert must_ring(w, fg) and must_ring(w, fg) and not must_ring(w, pf)
    w.idle = True
    assert must_ring(w, pf)


def test_a_retry_is_sent_when_due_not_at_the_next_sweep(monkeypatch):
    # SLOW_DOWN schedules a retry a few ms later: the worker must wake for it
    monkeypatch.setattr("comm._worker._SWEEP_INTERVAL", 60.0)
    cfg = comm.CommConfig(request_timeout=5)
    with FakeServer() as srv, comm.Communicator([srv.endpoint], config=cfg) as c:
        srv.slow_down_first = 2
        with c.backend() as be:
            t0 = time.monotonic()
            assert len(be.get_page(REL, 5, lsn=100, timeout=3.0)) == 8192
            assert time.monotonic() - t0 < 2.0  # 2 + 4 ms of backoff, not the 60 s sweep
            assert srv.requests == 3
