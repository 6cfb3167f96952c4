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

The transport (socket, FIFO, segment, liveness of both ends, close from another
thread, fork) is the base class's: see _proclink.py.
"""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterable
from typing import Any

import zmq

from shards import BLCKSZ, MAX_BLOCKS_PER_REQUEST, RelTag
from shards._endpoint import ipc_in_use, ipc_path
from shards.protocol import Kind, RequestClass, SlruKind

from . import _ipc
from ._errors import CommClosed, InvalidRequest, RelationNotFound, RequestTimeout
from ._proclink import ProcLink, _call
from ._validate import (
    check_block,
    check_blocks,
    check_lsns,
    check_rel,
    check_shard_endpoints,
    check_timeout,
    check_u32,
)

_KINDS = {int(k) for k in Kind}
_FIFO_CHECK_EVERY = 0.05  # prefetch() looks for the communicator's end-of-file this often
_PREFETCH_WAIT = 0.05  # and waits this long at most for a full queue (then drops it)


def attach(endpoint: str, *, slots: int = 16, timeout: float = 10.0,
           request_timeout: float = 30.0) -> ProcBackend:
    """Attach this process to a communicator process (``python -m comm serve``)."""
    return ProcBackend(endpoint, slots=slots, timeout=timeout, request_timeout=request_timeout)


def _nobody_listens(endpoint: str) -> str | None:
    """Why nobody can listen at an ipc endpoint's path (None: someone may). One
    connect(), refused at once where a killed communicator left its socket file."""
    path = ipc_path(endpoint)
    if path is None:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError:
        return None  # let the handshake tell
    if not stat.S_ISSOCK(st.st_mode):
        return f"{path} is not a socket"
    if not ipc_in_use(endpoint):
        return (f"nobody listens on {path} (a stale socket file, left by a communicator "
                f"that was killed)")
    return None


class ProcBackend(ProcLink):
    def __init__(self, endpoint: str, *, slots: int = 16, timeout: float = 10.0,
                 request_timeout: float = 30.0) -> None:
        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise InvalidRequest(f"endpoint must look like ipc://PATH, got {endpoint!r}")
        why = _nobody_listens(endpoint)
        if why is not None:  # say so now, not after the handshake's timeout
            raise CommClosed(f"no communicator listens at {endpoint}: {why} (start one "
                             f"with python -m comm serve --listen {endpoint})")
        if not isinstance(slots, int) or not 1 <= slots <= _ipc.MAX_SLOTS:
            raise InvalidRequest(f"slots must be in 1..{_ipc.MAX_SLOTS}, got {slots!r}")
        super().__init__(endpoint, slots, check_timeout(timeout, 10.0),  # the handshake's
                         check_timeout(request_timeout, 30.0))
        self._free = list(range(self.slots - 1, -1, -1))
        self._uses = [0] * self.slots
        self._orphans: set[int] = set()  # slots abandoned, waiting for their completion
        self._done: dict[int, _ipc.Done] = {}  # completions received, by slot
        self._what: dict[int, tuple[int, RelTag | None, list[int], int]] = {}  # by slot

    # ------------------------------------------------------------ API
    def get_page(self, rel: RelTag, blkno: int, lsn: int, *,
                 not_modified_since: int | None = None, timeout: float | None = None) -> bytes:
        return self.get_pages(rel, [check_block(blkno)], lsn,  # named as blkno, as a
                              not_modified_since=not_modified_since,  # thread backend does
                              timeout=timeout)[0]

    @_call
    def get_pages(self, rel: RelTag, blocks: Iterable[int], lsn: int, *,
                  not_modified_since: int | None = None,
                  timeout: float | None = None) -> list[bytes]:
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

    @_call
    def prefetch(self, rel: RelTag, blocks: Iterable[int], lsn: int, *,
                 not_modified_since: int | None = None, timeout: float | None = None) -> int:
        """Ask the communicator to prefetch ``blocks``; returns at once, without a round
        trip. Returns the number of blocks ASKED for: how many the communicator queues
        (``Backend.prefetch``'s answer) is decided in the other process; 0 if it took
        no request for 50 ms (its queue is full: the prefetch is dropped)."""
        lsn, nms = check_lsns(lsn, not_modified_since)
        rel = check_rel(rel)
        blks = check_blocks(blocks)
        t = check_timeout(timeout, self._timeout)
        now = time.monotonic()
        if self._ring_fd is not None and now >= self._fifo_checked + _FIFO_CHECK_EVERY:
            # no wait follows: the FIFO's end-of-file is the one sign of a communicator
            # that left (one non-blocking read, ~2 us: not on every call)
            self._fifo_checked = now
            self._take_rings()
        try:  # a communicator that takes no request now: the prefetch is just dropped
            self._push(_ipc.encode_req(_ipc.Req(
                0, 0, _ipc.PREFETCH, int(RequestClass.PREFETCH), rel.spc, rel.db, rel.rel,
                rel.fork, lsn, nms, t, 0, 0, tuple(blks))), now + min(t, _PREFETCH_WAIT))
        except RequestTimeout:
            return 0
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

    @_call
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

    @_call
    def update_shards(self, endpoints: list[str], stripe_size: int | None = None) -> None:
        """The control message of the process form: a live shard split (the stripe size
        cannot change; None or the current one)."""
        eps, stripe = check_shard_endpoints(endpoints, stripe_size)
        # 0 on the wire: unchanged
        self._control(b"s", lambda seq: _ipc.encode_shards(seq, list(eps), stripe or 0))

    @_call
    def comm_stats(self) -> dict[str, Any]:
        """The communicator process's ``stats()``, plus ``processes``: attached backend
        processes and their pending requests."""
        return dict(json.loads(self._control(b"t", _ipc.encode_stats)))

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

    def __enter__(self) -> ProcBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals
    @_call
    def _meta(self, kind: int, rel: RelTag | None, lsn: Any, nms: Any, timeout: Any,
              e1: int = 0, e2: int = 0, keep: list[int] | None = None) -> _ipc.Done:
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
        try:
            self._push(msg, deadline)
        except BaseException:  # not sent: the slot goes back to the ring
            self._release(slot)
            raise
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

    def _note_done(self, d: _ipc.Done) -> None:
        if d.slot in self._orphans and d.use == self._uses[d.slot]:
            self._orphans.discard(d.slot)
            self._free.append(d.slot)
            return
        self._done[d.slot] = d
