"""The link of a backend process to the communicator process (see _attach.py):
its socket, completion FIFO and shared segment, and the liveness of both ends.

Theory of operation
-------------------
Nothing here blocks without a bound. Messages go out with NOBLOCK; a full queue
(the communicator is not reading) is waited out in slices, like a completion, up to
the call's deadline. The communicator is found gone by its pid (a zombie counts:
see _procutil.py) or by the end-of-file of the completion FIFO, whose write end it
holds: then this side unlinks the orphaned segment (if the communicator died), and
every later call raises CommClosed naming why, at once.

An attach that fails after its message went out (the handshake's timeout) sends a
detach after it, and lingers a moment at close for both to leave: a communicator
that gets to the attach late drops what it made for it.

``close()`` may come from any thread: during a call, the owner's wait notices it
within a slice and ends with CommClosed, and the owner detaches (closes the socket
and unmaps the segment) as the call returns: a socket is only ever closed by the
thread using it. A link inherited through os.fork() raises CommClosed in the child
(its socket has no I/O thread there); closing it in the child only drops the
child's copies, never the parent's socket or segment.

Control calls carry a sequence number that their reply echoes (see _ipc.py): a late
reply to a call that gave up (cancelled, timed out) is dropped, not taken for the
answer to the next one.
"""

from __future__ import annotations

import functools
import os
import select
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing import resource_tracker, shared_memory
from typing import ParamSpec, TypeVar

import zmq

from . import _ipc
from ._errors import Cancelled, CommClosed, RequestTimeout
from ._procutil import RING_PREFIX, process_gone, remove_stale_rings
from ._validate import FORKS, check_owner, forked_error

_SLICE = 0.05
_GIVE_UP_LINGER_MS = 200  # a failed handshake's detach: time to reach the communicator


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _call(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """A public call of the handle: checked on the way in (fork, closed, owner), and
    the handle detached on the way out if close() came from elsewhere meanwhile."""
    @functools.wraps(fn)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        self = args[0]
        assert isinstance(self, ProcLink)
        self._enter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._leave()
    return call


class ProcLink:
    """The transport half of a ProcBackend; the slot ring is the subclass's."""

    slots: int
    name: str

    def __init__(self, endpoint: str, slots: int, timeout: float,
                 request_timeout: float) -> None:
        self._timeout = request_timeout  # control calls'
        self._endpoint = endpoint
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._linger = 0  # at close (see _give_up_attach)
        self._sock.connect(endpoint)
        self._shm: shared_memory.SharedMemory | None = None
        self._forks = FORKS[0]  # a forked child inherits this object, not its socket
        # _lock guards: _closed, _depth (a close from another thread, see close()); an
        # RLock: a close() from a signal handler in the owner, inside _enter/_leave
        self._lock = threading.RLock()
        self._closed = False
        self._depth = 0  # calls in progress (in the owner thread: nested ones)
        self._owner: int | None = None  # the thread that uses this handle (see _enter)
        self._gone: str | None = None  # why the communicator is known gone (CommClosed)
        self._seq = 0  # of the last control call (its reply echoes it)
        self._cancel = threading.Event()
        self._ring_fd: int | None = None  # read end of the completion FIFO
        self._fifo_checked = 0.0  # when prefetch() last looked at the FIFO (see there)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        try:
            self._attach(slots, timeout)
        except BaseException:
            self._teardown()
            raise

    def _attach(self, slots: int, timeout: float) -> None:
        # the FIFO's name lives only until the communicator has opened it
        where, path = None, ""
        try:
            remove_stale_rings()
            where = tempfile.mkdtemp(prefix=f"{RING_PREFIX}{os.getpid()}-")
            path = os.path.join(where, "ring")
            os.mkfifo(path, 0o600)
            self._ring_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:  # no FIFOs here (or no temp dir): completions come as messages
            path = ""
        sent = False
        try:
            try:
                self._sock.send(_ipc.encode_attach(os.getpid(), slots, path))
                sent = True
                if not self._sock.poll(int(timeout * 1000)):
                    raise CommClosed(f"no communicator answered at {self._endpoint}")
                pid, bid, n, name = _ipc.decode_attached(self._sock.recv())
            finally:
                if where is not None:
                    shutil.rmtree(where, ignore_errors=True)
            if self._ring_fd is not None:
                self._poller.register(self._ring_fd, zmq.POLLIN)
            self._comm_pid, self.id, self.slots = pid, bid, n
            self.name = f"proc-backend-{bid}"
            self._shm = shared_memory.SharedMemory(name=name)
            # the communicator owns (and unlinks) the segment: don't let this process's
            # resource tracker unlink it when we exit
            resource_tracker.unregister(self._shm._name,  # type: ignore[attr-defined]
                                        "shared_memory")
        except BaseException:
            if sent:  # a slow communicator may still make us a segment: have it dropped
                self._give_up_attach()
            raise

    def _give_up_attach(self) -> None:
        """The handshake failed after the attach went out. A detach follows it on the
        one connection, so a communicator that gets to the attach late drops what it
        made for it; the socket's close waits a moment for the two to leave (only on
        this path: LINGER is 0 everywhere else)."""
        try:
            self._sock.send(b"D", zmq.NOBLOCK)
            self._linger = _GIVE_UP_LINGER_MS
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        """Detach (safe twice, from any thread: a call in progress ends with CommClosed
        and its thread detaches as it returns)."""
        if self._forks != FORKS[0]:  # inherited: only drop this child's copies
            self._closed, self._shm = True, None
            if self._ring_fd is not None:
                os.close(self._ring_fd)
                self._ring_fd = None
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._depth:
                return  # the call in progress sees _closed within a slice
        self._detach()

    def _detach(self) -> None:
        try:
            self._sock.send(b"D", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        if process_gone(self._comm_pid):
            self._unlink()
        self._teardown()

    def _teardown(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        if self._ring_fd is not None:
            os.close(self._ring_fd)
            self._ring_fd = None
        self._sock.close(self._linger)
        self._ctx.term()

    def _buf(self) -> memoryview:
        if self._shm is None:
            raise CommClosed(f"{getattr(self, 'name', 'backend')} is closed")
        buf = self._shm.buf
        assert buf is not None  # mapped until close()
        return buf

    def _enter(self) -> None:
        if self._forks != FORKS[0]:  # its socket has no I/O thread in this child
            raise forked_error(self.name)
        with self._lock:
            if self._closed:
                raise CommClosed(f"{self.name} is closed")
            # two threads on one handle lost each other's completions
            self._owner = check_owner(self._owner, self.name,
                                      "attach once per thread with comm.attach()")
            self._depth += 1
            if self._depth == 1:
                self._cancel.clear()

    def _leave(self) -> None:
        with self._lock:
            self._depth -= 1
            detach = self._closed and not self._depth
        if detach:  # close() came from another thread during the call
            self._detach()

    def _control(self, tag: bytes, encode: Callable[[int], bytes]) -> bytes:
        """A control call: its reply's body (an error reply raised). A reply with
        another sequence number answers an earlier call that gave up: dropped."""
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        deadline = time.monotonic() + self._timeout
        self._push(encode(seq), deadline)
        while True:
            msg = self._recv(deadline)
            if msg is None or msg[:1] != tag:
                self._note(msg)
                continue
            got, status, body = _ipc.decode_control_reply(msg)
            if got == seq:
                if status != _ipc.OK:
                    raise _ipc.error_of(status, body.decode("utf-8", "replace"))
                return body

    def _push(self, msg: bytes, deadline: float) -> None:
        """Send ``msg`` without blocking. A full queue (the communicator is not reading)
        is waited out in slices to the deadline, unless it is found gone meanwhile."""
        while True:
            if self._gone is not None:
                raise CommClosed(self._gone)
            try:
                self._sock.send(msg, zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
            if process_gone(self._comm_pid):
                self._comm_died()
            if self._closed:
                raise CommClosed(f"{self.name} is closed")
            if self._cancel.is_set():
                raise Cancelled(f"{self.name}: request cancelled")
            left = deadline - time.monotonic()
            if left <= 0:  # alive (checked above), but not reading: stopped, or stuck
                raise RequestTimeout(f"{self.name}: the communicator took no request "
                                     f"before the deadline (its queue is full)")
            self._sock.poll(max(1, int(min(left, _SLICE) * 1000)), zmq.POLLOUT)
            if self._ring_fd is not None:  # its end-of-file says the communicator left
                self._take_rings()

    def _note(self, msg: bytes | None) -> None:
        """Take in a message from the socket (None: the rings were taken in already)."""
        if msg is not None and msg[:1] == b"d":
            self._note_done(_ipc.decode_done(msg))

    def _take_rings(self) -> None:
        assert self._ring_fd is not None
        try:
            data = os.read(self._ring_fd, 256 * _ipc.RING_BYTES)
        except BlockingIOError:
            return
        if not data:  # no writer: it closed its end (dropped us, or is gone), or it never
            # opened it (completions then come over the socket): only the first hangs up
            hung_up = _hung_up(self._ring_fd)
            self._poller.unregister(self._ring_fd)
            os.close(self._ring_fd)
            self._ring_fd = None
            if not hung_up:
                return
            if process_gone(self._comm_pid):
                self._comm_died()
            self._gone = (f"{self.name}: the communicator closed this backend (it is "
                          f"shutting down, or took it for dead)")
            return
        buf = self._buf()
        for slot, use in _ipc.decode_rings(data):
            d = _ipc.read_completion(buf, self.slots, slot)
            if d.use == use:  # else a stale ring: its slot has been completed since
                self._note_done(d)

    def _note_done(self, d: _ipc.Done) -> None:
        raise NotImplementedError  # the slot ring's

    def _recv(self, deadline: float) -> bytes | None:
        """The next message from the communicator, or None once completion rings have
        been taken in, in short slices: a cancel, the deadline or the communicator's
        death end the wait promptly."""
        while True:
            if self._closed:  # by another thread
                raise CommClosed(f"{self.name} is closed")
            if self._cancel.is_set():
                raise Cancelled(f"{self.name}: request cancelled")
            if self._gone is not None:
                raise CommClosed(self._gone)
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeout(f"{self.name}: no completion within the deadline")
            ready = self._poller.poll(max(1, int(min(left, _SLICE) * 1000)))
            if ready:
                if any(s is self._sock for s, _ in ready):
                    return self._sock.recv(zmq.NOBLOCK)
                self._take_rings()
                return None
            if process_gone(self._comm_pid):
                self._comm_died()

    def _comm_died(self) -> None:
        self._unlink()
        self._gone = f"{self.name}: the communicator process (pid {self._comm_pid}) died"
        raise CommClosed(self._gone)

    def _unlink(self) -> None:
        """The communicator, which owns the segment, is gone: clean /dev/shm ourselves."""
        if self._shm is None:
            return
        # registered again first: unlink() unregisters it, and the resource tracker
        # complains of a name it does not know (unregistered at attach)
        name = self._shm._name  # type: ignore[attr-defined]
        resource_tracker.register(name, "shared_memory")
        try:
            self._shm.unlink()
        except FileNotFoundError:  # unlinked already (the communicator's own tracker)
            resource_tracker.unregister(name, "shared_memory")


def _hung_up(fd: int) -> bool:
    """Whether a FIFO's read end reports POLLHUP: Linux (like most systems) reports it
    only once a writer had opened the FIFO and all writers closed it; a read end that
    never had one reads end-of-file without it."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in p.poll(0))
