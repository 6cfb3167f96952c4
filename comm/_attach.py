"""``comm.attach(endpoint)``: a backend in another process, same API and errors as
``Communicator.backend()``.

Theory of operation
-------------------
The handle owns one DEALER socket to the communicator process and maps the
shared-memory slot ring the communicator created for it. A call validates its
arguments here, takes a free slot, sends one small request naming the slot, and
waits for the completion that names it back (the slot's event): a ring on the
backend's completion FIFO, the record in the slot's header (see _ipc.py), or a
completion message on the socket from a communicator that could not open the
FIFO. Pages are then copied out of the slot's shared memory. Waiting happens in short slices
so that a cancel from another thread, the deadline, or the death of the
communicator process (checked by pid) end the wait promptly. A slot whose wait
was abandoned is reused only after its completion arrives.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import zmq

from shards import BLCKSZ, MAX_BLOCKS_PER_REQUEST, RelTag
from shards.protocol import Kind, RequestClass, SlruKind

from . import _ipc
from ._errors import (
    Cancelled,
    CommClosed,
    InvalidRequest,
    RelationNotFound,
    RequestTimeout,
)
from ._validate import (
    check_blocks,
    check_lsns,
    check_owner,
    check_rel,
    check_timeout,
    check_u32,
)

_SLICE = 0.05
_KINDS = {int(k) for k in Kind}
_RING_PREFIX = "pagecomm-ring-"  # + pid + "-": the completion FIFO's directory


def _remove_stale_rings() -> None:
    """Remove the FIFO directories of backends that died while attaching (the name
    lives only for the handshake; a SIGTERM then leaves it). Only this user's, and
    only those whose process is gone."""
    tmp = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(tmp) if n.startswith(_RING_PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(_RING_PREFIX):].partition("-")[0]
        path = os.path.join(tmp, name)
        try:
            if not pid.isdigit() or os.lstat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (OSError, OverflowError):  # not ours to judge (another user's, a huge pid)
            pass


def attach(endpoint: str, *, slots: int = 16, timeout: float = 10.0,
           request_timeout: float = 30.0) -> ProcBackend:
    """Attach this process to a communicator process (``python -m comm serve``)."""
    return ProcBackend(endpoint, slots=slots, timeout=timeout, request_timeout=request_timeout)


class ProcBackend:
    def __init__(self, endpoint: str, *, slots: int = 16, timeout: float = 10.0,
                 request_timeout: float = 30.0) -> None:
        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise InvalidRequest(f"endpoint must look like ipc://PATH, got {endpoint!r}")
        path = endpoint.partition("ipc://")[2]
        if endpoint.startswith("ipc://") and not path.startswith("@") and \
                not os.path.exists(path):  # nobody listens there: say so now, not in 10 s
            raise CommClosed(f"no communicator listens at {endpoint}: {path} does not exist "
                             f"(start one with python -m comm serve --listen {endpoint})")
        if not isinstance(slots, int) or not 1 <= slots <= _ipc.MAX_SLOTS:
            raise InvalidRequest(f"slots must be in 1..{_ipc.MAX_SLOTS}, got {slots!r}")
        self._timeout = check_timeout(request_timeout, 30.0)
        timeout = check_timeout(timeout, 10.0)  # the attach handshake's
        self._endpoint = endpoint
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._shm: shared_memory.SharedMemory | None = None
        self._closed = False
        self._owner: int | None = None  # the thread that uses this handle (see _enter)
        self._dropped = False  # the communicator closed our completion FIFO
        self._cancel = threading.Event()
        self._ring_fd: int | None = None  # read end of the completion FIFO
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        try:
            self._attach(slots, timeout)
        except BaseException:
            self._teardown()
            raise
        self._free = list(range(self.slots - 1, -1, -1))
        self._uses = [0] * self.slots
        self._orphans: set[int] = set()  # slots abandoned, waiting for their completion
        self._done: dict[int, _ipc.Done] = {}  # completions received, by slot
        self._what: dict[int, tuple[int, RelTag | None, list[int], int]] = {}  # by slot

    def _attach(self, slots: int, timeout: float) -> None:
        # the FIFO's name lives only until the communicator has opened it
        where, path = None, ""
        try:
            _remove_stale_rings()
            where = tempfile.mkdtemp(prefix=f"{_RING_PREFIX}{os.getpid()}-")
            path = os.path.join(where, "ring")
            os.mkfifo(path, 0o600)
            self._ring_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:  # no FIFOs here (or no temp dir): completions come as messages
            path = ""
        try:
            self._sock.send(_ipc.encode_attach(os.getpid(), slots, path))
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
        resource_tracker.unregister(self._shm._name, "shared_memory")  # type: ignore[attr-defined]

    # ------------------------------------------------------------ API
    def get_page(self, rel: RelTag, blkno: int, lsn: int, *,
                 not_modified_since: int | None = None, timeout: float | None = None) -> bytes:
        return self.get_pages(rel, [blkno], lsn, not_modified_since=not_modified_since,
                              timeout=timeout)[0]

    def get_pages(self, rel: RelTag, blocks: Iterable[int], lsn: int, *,
                  not_modified_since: int | None = None,
                  timeout: float | None = None) -> list[bytes]:
        self._enter()
        lsn, nms = check_lsns(lsn, not_modified_since)
        rel = check_rel(rel)
        blks = check_blocks(blocks)
        deadline = time.monotonic() + check_timeout(timeout, self._timeout)
        chunks = [blks[i:i + MAX_BLOCKS_PER_REQUEST]
                  for i in range(0, len(blks), MAX_BLOCKS_PER_REQUEST)]
        if len(chunks) > self.slots:
            raise InvalidRequest(f"get_pages needs {len(chunks)} slots but this backend has "
                                 f"{self.slots}; ask for fewer blocks per call")
        sent: list[tuple[int, int]] = []
        try:
            for chunk in chunks:
                sent.append(self._send(Kind.GET_PAGES, rel, chunk, lsn, nms, deadline))
        except BaseException:  # give up on what was sent; slots return on completion
            for slot, use in sent:
                self._give_up(slot, use)
                self._release(slot)
            raise
        out: list[bytes] = []
        first: BaseException | None = None
        for slot, use in sent:
            try:
                d = self._wait(slot, use, deadline)
                base = slot * _ipc.SLOT_BYTES
                buf = self._buf()
                out += [bytes(buf[base + i * BLCKSZ: base + (i + 1) * BLCKSZ])
                        for i in range(d.count)]
            except BaseException as e:
                first = first or e
            finally:
                self._release(slot)
        if first is not None:
            raise first
        return out

    def prefetch(self, rel: RelTag, blocks: Iterable[int], lsn: int, *,
                 not_modified_since: int | None = None, timeout: float | None = None) -> int:
        """Ask the communicator to prefetch ``blocks``; returns at once, without a round
        trip. Returns the number of blocks ASKED for: how many the communicator queues
        (``Backend.prefetch``'s answer) is decided in the other process."""
        self._enter()
        lsn, nms = check_lsns(lsn, not_modified_since)
        rel = check_rel(rel)
        blks = check_blocks(blocks)
        t = check_timeout(timeout, self._timeout)
        self._sock.send(_ipc.encode_req(_ipc.Req(0, 0, _ipc.PREFETCH,
                                                 int(RequestClass.PREFETCH), rel.spc, rel.db,
                                                 rel.rel, rel.fork, lsn, nms, t, 0, 0,
                                                 tuple(blks))))
        return len(blks)

    def nblocks(self, rel: RelTag, lsn: int, *, not_modified_since: int | None = None,
                timeout: float | None = None) -> int:
        d = self._meta(Kind.REL_SIZE, check_rel(rel), lsn, not_modified_since, timeout)
        if not d.exists:
            raise RelationNotFound(f"{rel} does not exist at lsn {lsn:#x}")
        return d.value

    def exists(self, rel: RelTag, lsn: int, *, not_modified_since: int | None = None,
               timeout: float | None = None) -> bool:
        return self._meta(Kind.REL_SIZE, check_rel(rel), lsn, not_modified_since,
                          timeout).exists

    def db_size(self, db: int, lsn: int, *, not_modified_since: int | None = None,
                timeout: float | None = None) -> int:
        return self._meta(Kind.DB_SIZE, None, lsn, not_modified_since, timeout,
                          check_u32(db, "db")).value

    def slru_segment(self, kind: int, segno: int, lsn: int, *,
                     not_modified_since: int | None = None,
                     timeout: float | None = None) -> bytes:
        try:
            sk = SlruKind(kind)
        except ValueError:
            raise InvalidRequest(f"kind={kind!r} is not an SLRU kind") from None
        segno = check_u32(segno, "segno")
        slot_use: list[int] = []
        d = self._meta(Kind.SLRU_SEGMENT, None, lsn, not_modified_since, timeout, int(sk),
                       segno, keep=slot_use)
        base = slot_use[0] * _ipc.SLOT_BYTES
        try:
            return bytes(self._buf()[base:base + d.value])
        finally:
            self._release(slot_use[0])

    def update_shards(self, endpoints: list[str], stripe_size: int | None = None) -> None:
        """The control message of the process form: a live shard split (the stripe size
        cannot change; None or the current one)."""
        self._enter()
        if isinstance(endpoints, (str, bytes)):
            raise InvalidRequest(f"endpoints must be a list of endpoint strings, not one "
                                 f"string: {endpoints!r}")
        if stripe_size is not None and (isinstance(stripe_size, bool) or not isinstance(
                stripe_size, int) or not 1 <= stripe_size <= 0xFFFFFFFF):
            raise InvalidRequest(f"stripe_size must be a positive int, got {stripe_size!r}")
        # 0 on the wire: unchanged
        self._sock.send(_ipc.encode_shards(list(endpoints), stripe_size or 0))
        deadline = time.monotonic() + self._timeout
        while True:
            msg = self._recv(deadline)
            if msg is None:
                continue
            if msg[:1] == b"s":
                if msg != b"sOK":
                    raise InvalidRequest(msg[1:].decode("utf-8", "replace"))
                return
            self._note(msg)

    def comm_stats(self) -> dict[str, Any]:
        """The communicator process's ``stats()``, plus ``processes``: attached backend
        processes and their pending requests."""
        self._enter()
        self._sock.send(b"T")
        deadline = time.monotonic() + self._timeout
        while True:
            msg = self._recv(deadline)
            if msg is None:
                continue
            if msg[:1] == b"t":
                return dict(json.loads(msg[1:]))
            self._note(msg)

    def cancel(self) -> int:
        """Make the waiting call raise Cancelled (any thread). Returns the number of
        requests it was waiting for (read without a lock: a count, not a promise)."""
        self._cancel.set()
        return max(0, self.slots - len(self._free) - len(self._orphans))

    def stats(self) -> dict[str, int]:
        return {"slots": self.slots, "slots_in_use": self.slots - len(self._free)}

    def __repr__(self) -> str:
        state = "closed" if getattr(self, "_closed", True) else "open"
        in_use = self.stats()["slots_in_use"] if hasattr(self, "_free") else 0
        return (f"<ProcBackend {getattr(self, 'name', '?')} {state} "
                f"slots={getattr(self, 'slots', 0)} in_use={in_use}>")

    def close(self) -> None:
        """Detach (safe twice). Call from the owning thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.send(b"D", zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self._teardown()

    def __enter__(self) -> ProcBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals
    def _teardown(self) -> None:
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        if self._ring_fd is not None:
            os.close(self._ring_fd)
            self._ring_fd = None
        self._sock.close(0)
        self._ctx.term()

    def _buf(self) -> memoryview:
        if self._shm is None:
            raise CommClosed(f"{getattr(self, 'name', 'backend')} is closed")
        buf = self._shm.buf
        assert buf is not None  # mapped until close()
        return buf

    def _enter(self) -> None:
        if self._closed:
            raise CommClosed(f"{self.name} is closed")
        # two threads on one handle lost each other's completions
        self._owner = check_owner(self._owner, self.name,
                                  "attach once per thread with comm.attach()")
        self._cancel.clear()

    def _meta(self, kind: int, rel: RelTag | None, lsn: Any, nms: Any, timeout: Any,
              e1: int = 0, e2: int = 0, keep: list[int] | None = None) -> _ipc.Done:
        self._enter()
        lsn, nms = check_lsns(lsn, nms)
        deadline = time.monotonic() + check_timeout(timeout, self._timeout)
        slot, use = self._send(kind, rel, [], lsn, nms, deadline, e1, e2)
        try:
            d = self._wait(slot, use, deadline)
        except BaseException:
            self._release(slot)
            raise
        if keep is None:
            self._release(slot)
        else:
            keep.append(slot)
        return d

    def _send(self, kind: int, rel: RelTag | None, blocks: list[int], lsn: int, nms: int,
              deadline: float, e1: int = 0, e2: int = 0) -> tuple[int, int]:
        slot = self._take(deadline)
        self._uses[slot] = use = (self._uses[slot] + 1) & 0xFFFFFFFF
        self._what[slot] = (kind, rel, blocks, lsn)  # for a timeout's message
        r = rel or RelTag(0, 0, 0, 0)
        msg = _ipc.encode_req(_ipc.Req(slot, use, kind, int(RequestClass.NORMAL), r.spc, r.db,
                                       r.rel, r.fork, lsn, nms,
                                       max(0.001, deadline - time.monotonic()), e1, e2,
                                       tuple(blocks)))
        self._sock.send(msg)
        return slot, use

    def _take(self, deadline: float) -> int:
        while not self._free:
            if not self._orphans:
                raise InvalidRequest(f"{self.name}: no free slot (all {self.slots} in use)")
            self._note(self._recv(deadline))  # an orphan's completion frees its slot
        return self._free.pop()

    def _release(self, slot: int) -> None:
        self._done.pop(slot, None)
        if slot not in self._orphans:
            self._free.append(slot)

    def _wait(self, slot: int, use: int, deadline: float) -> _ipc.Done:
        while True:
            d = self._done.get(slot)
            if d is not None and d.use == use:
                if d.status != _ipc.OK:
                    raise _ipc.error_of(d.status, d.message)
                return d
            try:
                self._note(self._recv(deadline))
            except RequestTimeout:
                self._give_up(slot, use)
                kind, rel, blocks, lsn = self._what.get(slot, (0, None, [], 0))
                raise RequestTimeout(
                    f"{self.name}: no completion within the deadline for "
                    f"{Kind(kind).name if kind in _KINDS else kind} "
                    f"{rel if rel is not None else ''} {list(blocks)} at lsn {lsn:#x}"
                    ) from None
            except BaseException:  # a cancel, an interrupt: the slot is out
                self._give_up(slot, use)
                raise

    def _give_up(self, slot: int, use: int) -> None:
        """Stop waiting for request ``use`` of ``slot``. Its completion may be in
        already (taken in while waiting for another slot): then ``_release`` frees the
        slot at once. Else it is orphaned, reusable once the completion arrives; an
        orphan whose completion had been taken in would never come back."""
        d = self._done.get(slot)
        if d is not None and d.use == use:
            return
        try:  # never block on a communicator that is gone
            self._sock.send(_ipc.encode_cancel(slot, use), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self._orphans.add(slot)

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
        if not data:  # the communicator closed its end: it dropped us, or is gone
            self._poller.unregister(self._ring_fd)
            self._dropped = True
            return
        buf = self._buf()
        for slot, use in _ipc.decode_rings(data):
            d = _ipc.read_completion(buf, self.slots, slot)
            if d.use == use:  # else a stale ring: its slot has been completed since
                self._note_done(d)

    def _note_done(self, d: _ipc.Done) -> None:
        if d.slot in self._orphans and d.use == self._uses[d.slot]:
            self._orphans.discard(d.slot)
            self._free.append(d.slot)
            return
        self._done[d.slot] = d

    def _recv(self, deadline: float) -> bytes | None:
        """The next message from the communicator, or None once completion rings have
        been taken in, in short slices: a cancel, the deadline or the communicator's
        death end the wait promptly."""
        while True:
            if self._cancel.is_set():
                raise Cancelled(f"{self.name}: request cancelled")
            if self._dropped:
                raise CommClosed(f"{self.name}: the communicator closed this backend "
                                 f"(it is shutting down, or took it for dead)")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeout(f"{self.name}: no completion within the deadline")
            ready = self._poller.poll(max(1, int(min(left, _SLICE) * 1000)))
            if ready:
                if any(s is self._sock for s, _ in ready):
                    return self._sock.recv(zmq.NOBLOCK)
                self._take_rings()
                return None
            try:
                os.kill(self._comm_pid, 0)
            except ProcessLookupError:
                self._comm_died()
            except PermissionError:
                pass

    def _comm_died(self) -> None:
        if self._shm is not None:  # its owner is gone: clean /dev/shm ourselves
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
        raise CommClosed(f"{self.name}: the communicator process (pid {self._comm_pid}) died")
