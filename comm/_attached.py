"""One backend process attached to the communicator process (see _server.py): its
shared-memory slot ring, its completion FIFO, and the ring of a completion from
whichever thread completes a request (usually a shard worker), with no hop through
the front thread (see _ipc.py for the records)."""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import threading
from multiprocessing import shared_memory

from . import _ipc
from ._procreq import ProcRequest

log = logging.getLogger(__name__)


class GaveUp(Exception):
    """The backend left before its attach was served (the front makes nothing)."""


class Attached:
    """One attached backend process. The front thread owns it, except ``ring()``,
    which any completing thread calls."""

    def __init__(self, bid: int, ident: bytes, pid: int, slots: int, ring_path: str) -> None:
        self.id, self.ident, self.pid, self.slots = bid, ident, pid, slots
        self.name = f"proc-backend-{bid}(pid {pid})"
        # before the segment: a backend that gave up on the handshake gets none
        self.ring_fd: int | None = _open_ring(ring_path, self.name) if ring_path else None
        try:
            self.shm = shared_memory.SharedMemory(create=True,
                                                  size=_ipc.segment_bytes(slots))
        except BaseException:
            if self.ring_fd is not None:
                os.close(self.ring_fd)
            raise
        self.pending: dict[int, ProcRequest] = {}
        self.gone = False
        # _lock guards: ring_fd and the mapping of shm, between ring() (any thread)
        # and close()/hang_up() (front thread): a ring never goes to a closed, reused fd
        self._lock = threading.Lock()

    def ring(self, p: ProcRequest) -> bool:
        """Any thread: complete ``p`` through shared memory and the FIFO. False if
        that is not possible (no FIFO, the backend left): the front sends it."""
        with self._lock:  # held over one non-blocking write: never long
            fd, buf = self.ring_fd, self.shm.buf
            if fd is None or self.gone or buf is None:
                return False
            _ipc.write_completion(buf, self.slots, done_of(p))
            p.rung = True  # before the ring: the backend may reuse the slot at once
            try:
                os.write(fd, _ipc.encode_ring(p.slot, p.use))
            except OSError:  # the backend closed its end (it left or died), or it is full
                p.rung = False
                return False
            return True

    def hang_up(self) -> None:
        """Front thread: close the FIFO's write end, the segment still mapped (parts
        in flight may still write into it). The backend reads end-of-file: a wait
        ends with CommClosed at once, its pending requests included."""
        with self._lock:
            if self.ring_fd is not None:
                os.close(self.ring_fd)
                self.ring_fd = None

    def close(self) -> None:
        """Front thread: unmap the segment and close the FIFO (no ring in progress)."""
        with self._lock:
            if self.ring_fd is not None:
                os.close(self.ring_fd)
                self.ring_fd = None
            try:
                self.shm.close()
            except BufferError:
                log.warning("%s: segment still in use at close", self.name)

    def view(self, slot: int) -> memoryview:
        buf = self.shm.buf
        assert buf is not None  # mapped until _drop()
        return buf[slot * _ipc.SLOT_BYTES:(slot + 1) * _ipc.SLOT_BYTES]


def _open_ring(path: str, name: str) -> int | None:
    """The write end of a backend's completion FIFO, or None (then completions go over
    the socket). Only a FIFO is opened: a backend names the path, and whoever may
    connect must not make the communicator write into a file or open a device."""
    try:
        if not stat.S_ISFIFO(os.lstat(path).st_mode):
            raise OSError(f"{path!r} is not a FIFO")
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY)
    except (OSError, ValueError) as e:
        if isinstance(e, OSError) and e.errno == errno.ENXIO:  # a FIFO nobody reads:
            raise GaveUp(f"{name}: its completion FIFO has no reader: it gave up on the "
                         f"handshake (or died); not attached") from None
        log.warning("%s: cannot use its completion FIFO (%s); completions go over the "
                    "socket", name, e)
        return None
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):  # swapped between the two looks
        os.close(fd)
        log.warning("%s: %r is not a FIFO; completions go over the socket", name, path)
        return None
    return fd


def readers_gone(atts: list[Attached]) -> list[Attached]:
    """Front thread: the backends whose FIFO's read end is closed (the write end
    polls POLLERR): they gave up on the handshake, closed or died. One poll() for
    all of them."""
    by_fd = {a.ring_fd: a for a in atts if a.ring_fd is not None}
    if not by_fd:
        return []
    p = select.poll()
    for fd in by_fd:
        p.register(fd, 0)  # POLLERR and POLLHUP are reported whatever is asked
    return [by_fd[fd] for fd, ev in p.poll(0) if ev & (select.POLLERR | select.POLLHUP)]


def done_of(p: ProcRequest) -> _ipc.Done:
    """The completion record of a finished request."""
    if p.error is not None:
        return _ipc.Done(p.slot, p.use, _ipc.status_of(p.error), False, 0, 0, str(p.error))
    return _ipc.Done(p.slot, p.use, _ipc.OK, p.exists, p.count, p.value)
