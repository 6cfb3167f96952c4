"""Slots and prefetch reservations come back whatever interrupts a call: a cancel()
or close() from another thread between two submits, a KeyboardInterrupt in a wait,
a request the worker cannot encode. None of these may kill a shard worker, leave a
slot in use, or leave a prefetch reservation that other backends would wait on."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
from fakeserver import FakeServer, fake_page

import comm
from comm import RelTag
from comm._slot import SlotState
from shards import shard_for

pytestmark = pytest.mark.timeout(60)
REL = RelTag(1663, 5, 16384)


def _cfg(**kw: Any) -> comm.CommConfig:
    return comm.CommConfig(threads_per_shard=1, **kw)


def _on_block(shard: int, count: int = 2, n: int = 1) -> list[int]:
    return [b for b in range(1000) if shard_for(REL, b, count, 8) == shard][:n]


def _workers(c: comm.Communicator) -> list[Any]:
    return [w for pool in c._map.workers for w in pool]


def _settled(be: Any, timeout: float = 5.0) -> bool:
    """Every slot of ``be`` is back (FREE) within ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(s.state == SlotState.FREE for s in be._slots):
            return True
        time.sleep(0.02)
    return False


def test_cancel_while_waiting_for_a_slot_keeps_cancelled_slots_orphaned() -> None:
    """Slots that cancel() abandoned stay orphaned until the worker lets go; put back
    at once, the worker's completion found them FREE and the worker died."""
    with FakeServer() as s, comm.Communicator([s.endpoint], stripe_size=8,
                                              config=_cfg(slots_per_backend=3)) as c:
        be = c.backend()
        s.frozen = True  # requests stay in flight until their deadlines
        threading.Timer(0.1, be.cancel).start()
        with pytest.raises(comm.Cancelled):
            be.get_page(REL, 1, lsn=100, timeout=2)  # an orphan for 2 s
        threading.Timer(0.2, be.cancel).start()
        with pytest.raises(comm.CommError):  # 3 chunks for 2 free slots: waits, then gives up
            be.get_pages(REL, list(range(70)), lsn=100, timeout=0.6)
        # none was put back while its worker held it (a sweep may free one meanwhile)
        assert all(be._slots[i].state == SlotState.FREE for i in be._free)
        assert sorted([o.index for o in be._orphans] + be._free) == [0, 1, 2]
        s.frozen = False
        time.sleep(2.2)  # the worker lets go of every slot at its deadline
        assert all(w.thread.is_alive() for w in _workers(c))
        assert be.get_page(REL, 5, lsn=100) == fake_page(REL, 5, 100)
        assert _settled(be)
        be.close()


def test_close_between_two_submits_kills_no_worker() -> None:
    with FakeServer() as a, FakeServer() as b, comm.Communicator(
            [a.endpoint, b.endpoint], stripe_size=8, config=_cfg(request_timeout=3)) as c:
        a.delay = b.delay = 0.3
        blk0, blk1 = _on_block(0)[0], _on_block(1)[0]
        be = c.backend()
        submit, calls = be._submit, []

        def closing_submit(job: Any, w: Any) -> None:
            calls.append(job)
            if len(calls) == 2:
                be.close()  # as another thread would, at exactly this point
            submit(job, w)

        be._submit = closing_submit  # type: ignore[method-assign]
        time.sleep(0.1)  # both workers asleep: the second submit must ring
        with pytest.raises(comm.CommClosed):
            be.get_pages(REL, [blk0, blk1], lsn=100)
        time.sleep(0.8)  # the slow reply to the first chunk lands
        assert all(w.thread.is_alive() for w in _workers(c))
        with c.backend() as be2:
            assert be2.get_page(REL, blk0, lsn=100, timeout=2) == fake_page(REL, blk0, 100)


def test_close_during_prefetch_leaves_no_pending_reservation() -> None:
    with FakeServer() as a, FakeServer() as b, comm.Communicator(
            [a.endpoint, b.endpoint], stripe_size=8, config=_cfg(request_timeout=2)) as c:
        blk0 = _on_block(0)[0]
        later = _on_block(1, n=40)
        be = c.backend()
        submit, calls = be._submit, []

        def closing_submit(job: Any, w: Any) -> None:
            calls.append(job)
            if len(calls) == 2:
                be.close()
            submit(job, w)

        be._submit = closing_submit  # type: ignore[method-assign]
        time.sleep(0.1)
        with pytest.raises(comm.CommClosed):
            be.prefetch(REL, [blk0] + later, lsn=100)  # 3 jobs: the third is never handed over
        with c.backend() as other:
            for blk in (blk0, later[-1]):
                t0 = time.monotonic()
                assert other.get_page(REL, blk, lsn=100, timeout=1.5) == fake_page(REL, blk, 100)
                assert time.monotonic() - t0 < 1.0  # not a join that waits out its deadline
        snap = c._buffer.snapshot()
        assert snap["pending"] <= 1  # at most the first job's, which its worker answers


def test_float_field_reltag_is_refused_and_the_worker_lives() -> None:
    """RelTag(1663.0, ...) equals (and hashes as) RelTag(1663, ...): it must still be
    refused, not reach the wire encoder."""
    with FakeServer() as s, comm.Communicator([s.endpoint], stripe_size=8,
                                              config=_cfg(request_timeout=2)) as c:
        with c.backend() as be:
            assert be.get_page(REL, 1, lsn=100) == fake_page(REL, 1, 100)
            with pytest.raises(comm.InvalidRequest, match="spc must be an int"):
                be.get_page(RelTag(1663.0, 5, 16384), 2, lsn=100)  # type: ignore[arg-type]
            assert be.get_page(REL, 3, lsn=100, timeout=1) == fake_page(REL, 3, 100)
            assert all(w.thread.is_alive() for w in _workers(c))


def test_a_job_the_worker_cannot_encode_fails_alone() -> None:
    """Defence in depth: past the backend's checks, a bad job fails with InvalidRequest
    and the worker goes on serving."""
    with FakeServer() as s, comm.Communicator([s.endpoint], stripe_size=8,
                                              config=_cfg(request_timeout=2)) as c:
        with c.backend() as be:
            slot = be._take_slot(time.monotonic() + 1)
            slot.arm(1, 0, RelTag(1663.0, 5, 16384), (2,), 100, 0,  # type: ignore[arg-type]
                     time.monotonic() + 1, 0)
            be._submit(slot, c._map.worker_for(0, be.id))
            with pytest.raises(comm.InvalidRequest, match="cannot encode"):
                be._wait(slot, time.monotonic() + 1)
            assert be.get_page(REL, 3, lsn=100, timeout=1) == fake_page(REL, 3, 100)
            assert all(w.thread.is_alive() for w in _workers(c))


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs setitimer")
def test_keyboard_interrupt_in_a_wait_gives_the_slot_back() -> None:
    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        with FakeServer() as s, comm.Communicator([s.endpoint], stripe_size=8,
                                                  config=_cfg(slots_per_backend=4)) as c:
            s.delay = 0.05
            with c.backend() as be:
                for call in ([lambda: be.get_page(REL, 1, lsn=100),
                                          lambda: be.get_pages(REL, range(40), lsn=100),
                                          lambda: be.nblocks(REL, lsn=100)] * 3):
                    signal.setitimer(signal.ITIMER_REAL, 0.01)
                    with pytest.raises(KeyboardInterrupt):
                        call()
                    signal.setitimer(signal.ITIMER_REAL, 0)
                assert _settled(be)  # the late replies free every slot
                assert be.get_page(REL, 7, lsn=100, timeout=2) == fake_page(REL, 7, 100)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_update_shards_takes_any_iterable_once() -> None:
    with FakeServer() as a, FakeServer() as b, comm.Communicator(
            [a.endpoint], stripe_size=8, config=_cfg()) as c:
        c.update_shards(e for e in [a.endpoint, b.endpoint])
        assert c.config.shards == (a.endpoint, b.endpoint)
        with pytest.raises(comm.ConfigError, match="non-empty list"):
            c.update_shards(iter([]))
        with pytest.raises(comm.ConfigError, match="stripe_size must be a positive int"):
            c.update_shards([a.endpoint, b.endpoint], stripe_size="8")  # type: ignore[arg-type]
        with c.backend() as be:
            assert be.get_page(REL, 1, lsn=100) == fake_page(REL, 1, 100)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_is_told_to_make_its_own_communicator() -> None:
    with FakeServer() as s, comm.Communicator([s.endpoint], stripe_size=8,
                                              config=_cfg()) as c:
        be = c.backend()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: both calls must fail at once, naming the fork
            code = 0
            for call in (lambda: be.get_page(REL, 1, lsn=100, timeout=5), c.backend):
                try:
                    call()
                    code |= 1
                except comm.CommClosed as e:
                    code |= 0 if "os.fork()" in str(e) else 2
                except BaseException:
                    code |= 4
            os.write(w, bytes([code]))
            os._exit(0)
        os.close(w)
        got = os.read(r, 1)
        os.close(r)
        os.waitpid(pid, 0)
        assert got == b"\x00"
        assert be.get_page(REL, 1, lsn=100) == fake_page(REL, 1, 100)  # the parent's works
        be.close()


def test_replaced_workers_are_stopped_once_idle_past_the_grace_period(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import comm._communicator as cm
    monkeypatch.setattr(cm, "_RETIRE_GRACE", 0.0)  # the grace is then 2 x request_timeout
    with FakeServer() as a, FakeServer() as b, comm.Communicator(
            [a.endpoint], stripe_size=8, config=_cfg(request_timeout=0.3)) as c:
        first = _workers(c)
        c.update_shards([b.endpoint])
        assert all(w.thread.is_alive() for w in first)  # calls begun on the old map finish
        time.sleep(0.7)
        c.update_shards([a.endpoint])  # a split later: the first pool is reaped
        assert not any(w.thread.is_alive() for w in first)
        second = [w for _, w in c._retired]
        assert second and all(w.thread.is_alive() for w in second)  # still in its grace
        with c.backend() as be:
            assert be.get_page(REL, 1, lsn=100) == fake_page(REL, 1, 100)


def test_a_call_routed_on_a_map_whose_workers_were_stopped_reads_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A call read the map, then waited (here: for a slot) past the grace and two
    splits: its job reaches a stopped worker, which refuses it (WrongShard), and the
    call routes again on the current map instead of waiting out its deadline."""
    import comm._communicator as cm
    monkeypatch.setattr(cm, "_RETIRE_GRACE", 0.0)
    with FakeServer() as a, FakeServer() as b, comm.Communicator(
            [a.endpoint], stripe_size=8, config=_cfg(request_timeout=0.2)) as c:
        be = c.backend()
        first = _workers(c)
        take, fired = be._take_slot, []

        def slow_take(deadline: float) -> Any:
            if not fired:
                fired.append(1)
                c.update_shards([b.endpoint])
                time.sleep(0.5)  # past the grace (2 x 0.2 s)
                c.update_shards([a.endpoint])  # the first pool is stopped now
                assert not any(w.thread.is_alive() for w in first)
            return take(deadline)

        be._take_slot = slow_take  # type: ignore[method-assign]
        t0 = time.monotonic()
        assert be.get_pages(REL, [1, 2], lsn=100, timeout=3) == [fake_page(REL, x, 100)
                                                                  for x in (1, 2)]
        assert time.monotonic() - t0 < 2.0
        assert not any(w.inbox for w in first)
        assert _settled(be)
        be.close()


def test_a_batch_that_cannot_be_encoded_is_split_and_only_the_bad_read_fails() -> None:
    from comm._batch import Batch
    with FakeServer() as s, comm.Communicator([s.endpoint], stripe_size=8,
                                              config=_cfg(request_timeout=2)) as c:
        with c.backend() as be:
            deadline = time.monotonic() + 2
            bad, good = be._take_slot(deadline), be._take_slot(deadline)
            bad.arm(1, 0, RelTag(1663.0, 5, 16384), (2,), 100, 0,  # type: ignore[arg-type]
                    deadline, 0)
            good.arm(1, 0, REL, (3,), 100, 0, deadline, 0)
            be._submit(Batch([bad, good]), c._map.worker_for(0, be.id))
            with pytest.raises(comm.InvalidRequest, match="cannot encode"):
                be._wait(bad, deadline)
            assert be._wait(good, deadline) == [fake_page(REL, 3, 100)]
            assert all(w.thread.is_alive() for w in _workers(c))
