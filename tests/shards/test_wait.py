"""Sub-millisecond waits on a ZeroMQ socket (shards/_wait.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import zmq

from shards._wait import precise_timers, readable

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket, zmq.Poller]]:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.setsockopt(zmq.LINGER, 0)
    b.setsockopt(zmq.LINGER, 0)
    a.bind("inproc://wait-test")
    b.connect("inproc://wait-test")
    poller = zmq.Poller()
    poller.register(b, zmq.POLLIN)
    yield a, b, poller
    a.close(0)
    b.close(0)
    ctx.term()


@pytest.mark.parametrize("timeout", [0.0, 0.0004, 0.002])
@pytest.mark.parametrize("fd_kind", ["real", "beyond select"])
def test_readable_waits_out_its_timeout_then_sees_a_message(pair, timeout, fd_kind) -> None:
    a, b, poller = pair
    fd = int(b.getsockopt(zmq.FD)) if fd_kind == "real" else 5000  # type: ignore[arg-type]
    assert not readable(b, poller, fd, timeout)  # may end early: the caller waits again
    a.send(b"x")
    assert readable(b, poller, fd, 0.0004) or readable(b, poller, fd, 0.01)
    assert b.recv(zmq.NOBLOCK) == b"x"


def test_precise_timers_is_harmless() -> None:
    slept: list[float] = []

    def run() -> None:  # in a thread of its own: the setting is per thread
        precise_timers()  # Linux: the timer slack is now 1 us; elsewhere nothing
        t0 = time.monotonic()
        time.sleep(0.0002)
        slept.append(time.monotonic() - t0)

    th = threading.Thread(target=run)
    th.start()
    th.join(10)
    assert slept and slept[0] >= 0.0002
