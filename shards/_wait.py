"""Waits shorter than a millisecond on a ZeroMQ socket, for the page server's loop.

zmq's poll counts whole milliseconds: a delayed reply due in 0.4 ms would make a
loop that polls with ``int(timeout * 1000)`` spin on poll(0) until then (with
injected latency that cost each page server most of a core). Waits under a
millisecond go to select() on the socket's notification fd instead. That fd is
edge-triggered and signals a change of the socket's state, not readiness, so
ZMQ_EVENTS is read before the wait (a message already queued needs no wait) and
after it (the change may not have been an arrival). A missed or spurious edge
costs at most the sub-millisecond timeout: the caller's loop waits again.
"""

from __future__ import annotations

import ctypes
import select
import time

import zmq

_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: no IntFlag ops
_FD_SETSIZE = 1024  # select() takes descriptors below this only
_PR_SET_TIMERSLACK = 29  # prctl option (linux/prctl.h)


def readable(sock: zmq.Socket, poller: zmq.Poller, fd: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for a message on ``sock`` (registered with
    ``poller`` for POLLIN; ``fd`` is its ZMQ_FD); True if one is there."""
    if timeout >= 0.001 or timeout <= 0.0:
        return bool(poller.poll(int(timeout * 1000)))
    if sock.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]  # an int
        return True
    if fd < _FD_SETSIZE:
        select.select([fd], [], [], timeout)
    else:  # select() cannot watch it: sleep it out (a request waits < 1 ms more)
        time.sleep(timeout)
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)  # type: ignore[operator]


def precise_timers() -> None:
    """Let the calling thread's timed waits end within microseconds (Linux: timer
    slack 1 us instead of 50 us), so that injected latency is held for what it says.
    Elsewhere, or if refused, waits just end a little later."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)  # nanoseconds
    except (OSError, AttributeError):
        pass
