"""The worker's windows (comm/_window.py), on stand-in jobs: no sockets, no threads."""

from __future__ import annotations

import pytest

from comm import _window
from comm._window import SMALL_HOLD, Windows

NORMAL, PREFETCH = 0, 1


class _Job:
    kind = 1  # GET_PAGES

    def __init__(self, nblocks: int = 1, cls: int = NORMAL) -> None:
        self.blocks, self.cls = tuple(range(nblocks)), cls


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    now = [1000.0]
    monkeypatch.setattr(_window.time, "monotonic", lambda: now[0])
    return now


def test_the_request_window_bounds_foreground_and_prefetch_gets_three_quarters():
    w = Windows(window=8, page_window=256)
    assert w.prefetch_window == 6
    for rid in range(6):
        assert w.room(_Job(cls=PREFETCH))
        w.track(rid, _Job(cls=PREFETCH), 0.0)
    assert not w.room(_Job(cls=PREFETCH))  # prefetches stop at 6 of 8
    assert w.room(_Job())  # a foreground read still goes
    w.track(6, _Job(), 0.0)
    w.track(7, _Job(), 0.0)
    assert not w.room(_Job())  # the window is full for everyone
    assert w.untrack(7) is not None and w.room(_Job())


def test_bulk_fills_the_window_when_no_small_request_is_about(clock):
    w = Windows(window=64, page_window=64)
    for rid in range(10):  # 320 pages: far past the page window
        assert w.room(_Job(32))
        w.track(rid, _Job(32), clock[0])
    assert w.pages == 320 and w.small == 0


def test_bulk_waits_for_the_page_window_while_a_small_request_is_in_flight(clock):
    w = Windows(window=64, page_window=64)
    w.track(1, _Job(32), clock[0])
    w.track(2, _Job(), clock[0])  # a random read in flight
    assert w.room(_Job(32))  # 32 + 32 <= 64
    w.track(3, _Job(32), clock[0])
    assert not w.room(_Job(32))  # 96 > 64: the read must not queue behind it
    assert w.room(_Job())  # small requests never wait for the page window
    assert not w.room(_Job(32, cls=PREFETCH))  # prefetches: 3/4 of the page window


def test_a_small_request_keeps_the_page_window_closed_for_a_while_after(clock):
    w = Windows(window=64, page_window=64)
    w.track(1, _Job(32), clock[0])
    w.track(2, _Job(32), clock[0])
    w.track(3, _Job(), clock[0])
    w.untrack(3)  # answered: no small request in flight, but one was just sent
    assert not w.room(_Job(32))
    clock[0] += SMALL_HOLD + 0.001
    assert w.room(_Job(32))


def test_untrack_counts_by_size_not_by_class_and_ignores_unknown_ids(clock):
    w = Windows(window=8, page_window=64)
    job = _Job(32, cls=PREFETCH)
    w.track(5, job, clock[0])
    job.cls = NORMAL  # promoted while in flight
    assert w.untrack(5) == (job, clock[0])
    assert w.pages == 0 and w.small == 0
    assert w.untrack(5) is None and w.untrack(99) is None
    assert w.pages == 0 and w.small == 0


def test_clear_returns_every_job_in_flight_and_zeroes_the_counts(clock):
    w = Windows(window=8, page_window=64)
    jobs = [_Job(32), _Job(), _Job(2)]
    for rid, job in enumerate(jobs):
        w.track(rid, job, clock[0])
    table = w.inflight
    assert w.clear() == jobs
    assert w.inflight is table and not table  # the worker holds on to the same dict
    assert (w.pages, w.small) == (0, 0)
