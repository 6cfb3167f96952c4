"""The hand-off from a backend (or the process front) to shard workers.

A job is appended to the worker's inbox (a deque: no lock), and the worker's pipe
is rung only if the worker may be asleep (``must_ring``). pyzmq releases the GIL in
every socket call, so each avoided ring is an avoided GIL hand-off; under load
the worker never sleeps and nothing is rung. The ordering that closes the race
is described in comm/_worker.py.
"""

from __future__ import annotations

from typing import Any

import zmq

from shards.protocol import RequestClass

from ._errors import CommClosed, CommError, WrongShard
from ._slot import settle

DOORBELL = b"\x01"  # pipe message that wakes a sleeping worker
_NORMAL = int(RequestClass.NORMAL)  # a foreground read
# A worker with small requests in flight naps this long before a foreground read
# rings it (see ShardWorker._sleep): the bound on how long such a read may wait.
DOZE_MS = 2

def stop_error(w: Any) -> CommError:
    """What a job left with a stopped worker fails with: WrongShard if the worker was
    retired (its shard map was replaced: the caller reads again on the new map),
    CommClosed if the communicator is closing."""
    if w.retired:
        return WrongShard(f"{w.name} has stopped: its shard map was replaced")
    return CommClosed("the communicator is closed")


def hand_over(w: Any, job: Any) -> bool:
    """Append ``job`` to worker ``w``'s inbox. False if ``w`` has stopped and the job
    was failed here. The worker sets ``stopped`` before it drains its inbox (one
    popleft at a time), and we append before we look: either it takes the job and
    fails it, or we take it back and fail it, never both."""
    w.inbox.append(job)
    if w.stopped:
        try:
            w.inbox.remove(job)
        except ValueError:  # the stopping worker has it
            return True
        settle(job.fail, stop_error(w))
        return False
    return True


def must_ring(w: Any, job: Any) -> bool:
    """Whether handing ``job`` to worker ``w`` must ring its pipe: the worker may sleep
    with nothing in flight; or, for a foreground read, with only bulk requests (scans,
    prefetches) in flight, whose replies may be far off; or past its nap with small
    ones in flight (see ShardWorker._sleep). A dozing worker is rung once: the flag is
    cleared here (backends racing on it may each ring; an extra ring costs nothing
    but a wakeup)."""
    if w.idle:
        return True
    if job.cls != _NORMAL:
        return False
    if w.idle_fg:
        return True
    if w.dozing:
        w.dozing = False
        return True
    return False


class Doorbells:
    """One thread's hand-off to shard workers: append a job to the worker's inbox and
    ring its pipe only if the worker may be asleep. The PUSH sockets (one per worker
    pipe) are created lazily by, and belong to, the thread that owns this object."""

    def __init__(self, open_pipe: Any) -> None:
        self._open_pipe = open_pipe
        self._socks: dict[str, zmq.Socket] = {}  # worker pipe -> PUSH

    def submit(self, job: Any, w: Any) -> bool:
        """Hand ``job`` to ``w``; False if its doorbell could not be rung."""
        if not hand_over(w, job):
            return True  # failed already: nothing to ring for
        return not must_ring(w, job) or self.ring(w)

    def ring(self, w: Any) -> bool:
        try:
            sock = self._socks.get(w.pipe)
            if sock is None:  # may fail too (EMFILE): the caller decides, nobody dies
                sock = self._socks[w.pipe] = self._open_pipe(w.pipe)
            sock.send(DOORBELL, zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def close(self) -> None:
        socks, self._socks = self._socks, {}
        for sock in socks.values():
            sock.close(0)
