"""The communicator as its own process: ``python -m comm serve --listen ipc://PATH``.

Theory of operation
-------------------
A front thread (``comm-front``) owns one ROUTER socket. Each backend process
attaches over it and gets a ring of slots in a shared-memory segment the front
creates (and unlinks). A request names a slot; the front validates it, serves
what it can from the shared prefetch buffer in its own thread, joins prefetches
in flight, and hands the rest to the shard workers as WireJobs, exactly like an
in-process backend's slots. Parts write their pages straight into the slot's
shared memory; the last one, in whichever thread completes it (a shard worker,
usually), writes the completion into the slot's header and rings the backend's
completion FIFO (see _ipc.py): the backend wakes with no hop through the front.
The request is also queued for the front, which forgets it at its next wakeup
(no doorbell for that). A backend whose FIFO could not be opened gets completion
messages from the front instead (a deque plus a byte on a pipe when it may sleep).

Dead backends are found by pid (same host: ipc; a zombie counts as dead) and by
their FIFO's read end, closed (a backend that gave up on the handshake or closed
without its detach arriving), every 0.2 s: their requests are abandoned, their
FIFO closed, their segment unlinked at once and unmapped when the last part
lands. A pid that cannot be checked costs that backend only. At stop every
backend is abandoned so: end-of-file on its FIFO ends its waits at once (one
without a FIFO gets CLOSED completions for its pending requests).
Control calls (b"S", b"T") always get a reply echoing their sequence number, an
error's class kept as far as the completion status codes know it (see _ipc.py).
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import threading
import time
from typing import Any

import zmq

from shards import MAX_BLOCKNO, RelTag
from shards._endpoint import ipc_in_use, remove_ipc
from shards.protocol import Kind, RequestClass, SlruKind

from . import _ipc
from ._attached import Attached, GaveUp, done_of, readers_gone
from ._doorbell import Doorbells
from ._errors import CommError, InvalidRequest, ShardUnavailable, WrongShard
from ._metrics import LatencyRecorder, merge_snapshots
from ._procreq import CLOSED, ProcRequest, WireJob
from ._procutil import process_gone
from ._validate import check_lsns, check_rel, check_timeout

log = logging.getLogger(__name__)
_POLLIN, _NOBLOCK, _EVENTS = int(zmq.POLLIN), int(zmq.NOBLOCK), int(zmq.EVENTS)  # plain ints
_LIVENESS_INTERVAL = 0.2
_NORMAL_CLASS = int(RequestClass.NORMAL)


class CommServer:
    def __init__(self, comm: Any, listen: str) -> None:
        self.comm, self.listen = comm, listen
        # backend processes' call latencies, from taking a request in to its completion
        # (front thread only: observed when the request is forgotten)
        self.latency = LatencyRecorder()
        self.endpoint = ""
        self._by_ident: dict[bytes, Attached] = {}  # front thread only
        # gone with requests still pending: unmapped when the last is forgotten, or by
        # release() (the front may have stopped before that)
        self._leaving: dict[int, Attached] = {}
        self._outbox: collections.deque[ProcRequest] = collections.deque()
        # parts to read again (see _redo_hook), from any thread, for the front
        self._redo: collections.deque[tuple[ProcRequest, list[int], tuple[Any, ...]]] = \
            collections.deque()
        self._completions = {"rung": 0, "sent": 0}  # front thread only: how they went out
        self._idle = False
        self._bell_r, self._bell_w = os.pipe()
        self._stopping = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="comm-front", daemon=True)
        self._bells = Doorbells(comm._open_pipe)  # front thread only

    # ------------------------------------------------------------ lifecycle
    def start(self) -> CommServer:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise CommError(f"cannot listen on {self.listen}: {self._error}")
        with self.comm._lock:  # its backends count in the communicator's stats and metrics
            self.comm._fronts.append(self)
        return self

    def stop(self) -> None:
        """Stop serving (safe twice); attached backends see CommClosed."""
        if self._thread.is_alive():
            self._stopping = True
            os.write(self._bell_w, b"x")
            self._thread.join(10)
        c = self.comm
        with c._lock:  # its calls stay in the latency histogram (a counter never falls)
            if self in c._fronts:
                c._fronts.remove(self)
                c._latency_retired = merge_snapshots(c._latency_retired,
                                                     self.latency.snapshot())

    def release(self) -> None:
        """Unmap every segment; call after the communicator (its workers) stopped."""
        for att in list(self._by_ident.values()) + list(self._leaving.values()):
            self._drop(att)
        for fd in (self._bell_r, self._bell_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # ------------------------------------------------------------ front thread
    def _run(self) -> None:
        ctx = self.comm._ctx
        router = None
        try:
            if ipc_in_use(self.listen):  # ZeroMQ's bind would take it over from a live one
                raise zmq.ZMQError(errno.EADDRINUSE, "another process listens there")
            router = ctx.socket(zmq.ROUTER)
            router.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.ROUTER_MANDATORY, 0)
            router.bind(self.listen)
            self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as e:
            if router is not None:  # left open, it would block the context's term()
                router.close(0)
            self._bells.close()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(self._bell_r, zmq.POLLIN)
        next_check = time.monotonic() + _LIVENESS_INTERVAL
        try:
            while not self._stopping:
                self._idle = True
                timeout = 0 if self._outbox or self._redo else int(_LIVENESS_INTERVAL * 1000)
                events = dict(poller.poll(timeout))
                self._idle = False
                if self._bell_r in events:
                    os.read(self._bell_r, 4096)
                if router in events:
                    self._drain(router)
                if self._redo:
                    self._read_again()
                self._flush(router)
                if time.monotonic() >= next_check:
                    self._check_liveness()
                    next_check = time.monotonic() + _LIVENESS_INTERVAL
        finally:
            told = 0
            for att in list(self._by_ident.values()):
                if att.ring_fd is None:  # no FIFO to hang up: tell its waits on the socket
                    told += self._tell_closed(router, att)
                self._abandon(att)
            self._bells.close()
            router.close(100 if told else 0)  # a moment for those messages to leave
            remove_ipc(self.endpoint or self.listen)  # attach() then hears at once that
            # nobody listens

    def _drain(self, router: zmq.Socket) -> None:
        while router.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]  # an int
            frames = router.recv_multipart(_NOBLOCK)
            if len(frames) != 2 or not frames[1]:
                continue
            ident, msg = frames
            try:
                self._on_message(router, ident, msg)
            except _ipc.IpcError as e:
                log.warning("bad message from a backend process: %s", e)
            except zmq.ZMQError as e:
                if e.errno == zmq.ETERM:  # the context is being torn down: stop
                    raise
                log.error("serving a message from a backend process failed: %s", e)
            except Exception:  # a bug must cost one message, not every backend's front
                log.exception("serving a message from a backend process failed")

    def _on_message(self, router: zmq.Socket, ident: bytes, msg: bytes) -> None:
        tag = msg[:1]
        att = self._by_ident.get(ident)
        if tag == b"A":
            pid, slots, ring_path = _ipc.decode_attach(msg)
            if att is not None:
                self._drop(att)
            try:
                att = Attached(self.comm._new_backend_id(), ident, pid, slots, ring_path)
            except GaveUp as e:  # nobody waits for the answer: make nothing
                log.info("%s", e)
                return
            self._by_ident[ident] = att
            log.info("attached %s with %d slots", att.name, slots)
            router.send_multipart([ident, _ipc.encode_attached(os.getpid(), att.id, slots,
                                                               att.shm.name)])
        elif att is None:
            return  # not attached (or detached): ignore
        elif tag == b"R":
            self._on_request(att, _ipc.decode_req(msg))
        elif tag == b"C":
            slot, use = _ipc.decode_cancel(msg)
            p = att.pending.get(slot)
            if p is not None and p.use == use:
                p.abandoned = True
        elif tag == b"D":
            self._abandon(att)
        elif tag in (b"T", b"S"):
            router.send_multipart([ident, self._control(tag, msg)])

    def _control(self, tag: bytes, msg: bytes) -> bytes:
        """The reply to a control call: always one, whatever goes wrong (the caller
        waits for it), with the call's sequence number."""
        seq = _ipc.control_seq(msg)  # truncated: an IpcError, no reply (not a backend)
        reply = tag.lower()
        try:
            if tag == b"T":
                st = self.comm.stats()
                st["processes"] = {"attached": len(self._by_ident),
                                   "pending": sum(1 for a in self._by_ident.values()
                                                  for p in a.pending.values() if not p.rung),
                                   "completions": dict(self._completions)}
                return _ipc.encode_control_reply(reply, seq, json.dumps(st).encode())
            _, eps, stripe = _ipc.decode_shards(msg)
            self.comm.update_shards(eps, stripe_size=stripe or None)  # 0: unchanged
            return _ipc.encode_control_reply(reply, seq)
        except Exception as e:
            if not isinstance(e, CommError):
                log.exception("control message %r failed", tag)
            return _ipc.encode_control_reply(reply, seq, error=e)

    # ------------------------------------------------------------ requests
    def _on_request(self, att: Attached, r: _ipc.Req) -> None:
        if r.kind == _ipc.PREFETCH:
            self._prefetch(att, r)
            return
        old = att.pending.get(r.slot)
        if r.slot >= att.slots or (old is not None and not old.rung):
            log.warning("%s: request for slot %d refused (out of range or busy)", att.name,
                        r.slot)
            return
        p = ProcRequest(att, r.slot, r.use, r.kind, att.view(r.slot), self._post)
        att.pending[r.slot] = p
        try:
            self._start(att, p, r)
        except CommError as e:
            p.fail(e)
        p.seal()

    def _start(self, att: Attached, p: ProcRequest, r: _ipc.Req) -> None:
        lsn, nms = check_lsns(r.lsn, r.nms)
        deadline = time.monotonic() + check_timeout(r.timeout, self.comm.config.request_timeout)
        m = self.comm._map
        if r.kind == Kind.GET_PAGES:
            rel = check_rel(RelTag(r.spc, r.db, r.rel, r.fork))
            if not r.blocks or any(b > MAX_BLOCKNO for b in r.blocks):
                raise InvalidRequest("blocks must be 1..32 valid block numbers")
            p.count = len(r.blocks)
            self._get_pages(att, p, m, rel, r.blocks, lsn, nms, deadline)
            return
        if r.kind == Kind.REL_SIZE:
            rel = check_rel(RelTag(r.spc, r.db, r.rel, r.fork))
            ans = self.comm._relsizes.get(rel, lsn, nms)
            if ans is not None:
                p.exists, p.value = ans
                return
            cache = self.comm._relsizes

            def remember(res: Any) -> None:
                cache.put(rel, lsn, nms, *res)

            job = WireJob(p, Kind.REL_SIZE, 0, rel, (), [], lsn, nms, deadline, 0, True,
                          remember)
        elif r.kind == Kind.DB_SIZE:
            job = WireJob(p, Kind.DB_SIZE, 0, None, (), [], lsn, nms, deadline, 0, r.extra1)
        elif r.kind == Kind.SLRU_SEGMENT:
            try:
                sk = SlruKind(r.extra1)
            except ValueError:
                raise InvalidRequest(f"unknown SLRU kind {r.extra1}") from None
            job = WireJob(p, Kind.SLRU_SEGMENT, 0, None, (), [], lsn, nms, deadline, 0,
                          (sk, r.extra2))
        else:
            raise InvalidRequest(f"unknown request kind {r.kind}")
        p.add_part()
        self._submit(job, m.worker_for(0, att.id))

    def _get_pages(self, att: Attached, p: ProcRequest, m: Any, rel: RelTag,
                   blocks: tuple[int, ...], lsn: int, nms: int, deadline: float) -> None:
        buf = self.comm._buffer
        args = (rel, blocks, lsn, nms, deadline)
        p.redo = self._redo_hook(att, args)
        missing: list[int] = list(range(len(blocks)))
        if buf._entries:  # racy peek: an empty buffer needs no lock
            n = len(blocks)
            hits: list[Any] = [None] * n
            p.add_parts(n)  # before the lookup: a joined part may land at once
            missing, joined, jobs = buf.lookup_many(rel, list(blocks), lsn, nms, p, hits)
            for job in jobs:
                self.comm._promote(job, self._submit)
            # write the hits; give back the parts of the pages that must be fetched
            p.deliver_parts([(i, pg) for i, pg in enumerate(hits) if pg is not None],
                            len(missing))
        self._fetch(att, p, m, args, missing)

    def _fetch(self, att: Attached, p: ProcRequest, m: Any, args: tuple[Any, ...],
               positions: list[int]) -> None:
        """Wire requests for ``positions`` of a GET_PAGES request, one per shard."""
        rel, blocks, lsn, nms, deadline = args
        by_shard: dict[int, list[int]] = {}
        for i in positions:
            by_shard.setdefault(m.shard_of(rel, blocks[i]), []).append(i)
        for shard, pos in by_shard.items():
            job = WireJob(p, Kind.GET_PAGES, int(RequestClass.NORMAL), rel,
                          tuple(blocks[i] for i in pos), pos, lsn, nms, deadline, shard)
            job.gen = m.generation
            p.add_part()
            self._submit(job, m.worker_for(shard, att.id))

    def _redo_hook(self, att: Attached, args: tuple[Any, ...]) -> Any:
        """``ProcRequest.redo`` for a GET_PAGES request (called in any thread): positions
        whose part failed on its own terms are read again by the front, within the
        request's deadline. A joined prefetch that failed (its deadline, a lost server,
        a split: ``gen`` -1) or a wire part answered WrongShard on a map replaced since
        (``gen`` older) qualifies; as in Backend.get_pages."""
        def redo(p: ProcRequest, positions: list[int], error: BaseException, gen: int) -> bool:
            if not isinstance(error, (ShardUnavailable, WrongShard)) or p.abandoned:
                return False
            if gen >= 0 and gen == self.comm._map.generation:
                return False  # the shard map it was routed on still holds: a real error
            if self._stopping or time.monotonic() >= args[4]:
                return False
            p.add_part()  # before the failed part is done: the request stays open
            self._redo.append((p, positions, args))
            if self._idle:
                try:
                    os.write(self._bell_w, b"x")
                except OSError:
                    pass  # closed at shutdown
            return True
        return redo

    def _read_again(self) -> None:
        m = self.comm._map
        while self._redo:
            p, positions, args = self._redo.popleft()
            try:
                if not p.abandoned:
                    self._fetch(p.owner, p, m, args, positions)
            except CommError as e:
                p.fail(e)
            finally:
                p.part_done()  # the part redo() added

    def _prefetch(self, att: Attached, r: _ipc.Req) -> None:
        try:
            rel = check_rel(RelTag(r.spc, r.db, r.rel, r.fork))
            lsn, nms = check_lsns(r.lsn, r.nms)
            deadline = time.monotonic() + check_timeout(r.timeout,
                                                         self.comm.config.request_timeout)
        except CommError:
            return  # prefetch never raises; a bad one is simply not done
        blocks = [b for b in r.blocks if b <= MAX_BLOCKNO]
        self.comm._prefetch(_Submitter(self, att), rel, blocks, lsn, nms, deadline)

    def _submit(self, job: Any, w: Any) -> None:
        if not self._bells.submit(job, w):
            # the job is in the worker's inbox and goes out at its next wakeup; the
            # backend's deadline bounds the wait meanwhile
            log.warning("could not ring %s's doorbell (out of sockets?)", w.name)

    # ------------------------------------------------------------ completions
    def _post(self, p: ProcRequest) -> None:
        """Any thread: a request is complete. Ring the backend directly if it can be;
        the front then only forgets the request (at its next wakeup: no doorbell),
        otherwise it sends the completion message."""
        p.t1 = time.monotonic()
        rung = p.owner.ring(p)
        self._outbox.append(p)
        if not rung and self._idle:
            try:
                os.write(self._bell_w, b"x")
            except OSError:
                pass  # closed at shutdown

    def _flush(self, router: zmq.Socket) -> None:
        while self._outbox:
            p = self._outbox.popleft()
            self.latency.observe(p.kind, _NORMAL_CLASS, p.t1 - p.t0)
            att = p.owner
            if att.pending.get(p.slot) is p:
                del att.pending[p.slot]
            p.buf.release()
            if att.gone:
                if not att.pending:
                    self._drop(att)
                continue
            if p.rung:
                self._completions["rung"] += 1
            else:
                self._completions["sent"] += 1
                router.send_multipart([att.ident, _ipc.encode_done(done_of(p))])

    # ------------------------------------------------------------ departures
    def _check_liveness(self) -> None:
        for att in readers_gone(list(self._by_ident.values())):
            log.info("%s closed its completion FIFO; releasing its slots", att.name)
            self._abandon(att)
        for att in list(self._by_ident.values()):
            try:
                # a zombie is gone too; one with a FIFO closed its read end as it
                # died (readers_gone, above): the signal check alone is enough there
                gone = process_gone(att.pid, zombies=att.ring_fd is None)
            except Exception:  # one backend's pid must not kill the front of them all
                log.exception("%s: cannot check pid %s; taking it for dead", att.name,
                              att.pid)
                gone = True
            if gone:
                log.warning("%s died; releasing its slots", att.name)
                self._abandon(att)

    def _tell_closed(self, router: zmq.Socket, att: Attached) -> int:
        """At stop: a CLOSED completion for each request of ``att`` not completed yet
        (a backend without a FIFO). Returns how many were sent."""
        n = 0
        for p in att.pending.values():
            if not p.rung:
                try:
                    router.send_multipart([att.ident, _ipc.encode_done(
                        _ipc.Done(p.slot, p.use, _ipc.status_of(CLOSED), False, 0, 0,
                                  str(CLOSED)))], _NOBLOCK)
                    n += 1
                except zmq.ZMQError:
                    pass
        return n

    def _abandon(self, att: Attached) -> None:
        """The backend left: give up its requests, unlink its segment now, unmap it
        once the workers are done with every slot."""
        att.gone = True
        att.hang_up()  # the backend's wait ends now, not at its deadline
        self._by_ident.pop(att.ident, None)
        self.comm._buffer.forget_owner(att.id)
        for p in att.pending.values():
            p.abandoned = True
            p.fail(CLOSED)
        try:
            att.shm.unlink()
        except FileNotFoundError:
            pass
        if att.pending:
            self._leaving[att.id] = att
        else:
            self._drop(att)

    def _drop(self, att: Attached) -> None:
        if not att.gone:
            self._abandon(att)
            return
        self._leaving.pop(att.id, None)
        for p in att.pending.values():
            p.buf.release()
        att.pending.clear()
        att.close()  # if a request still holds a view, _flush drops it again once released

    def attached(self) -> int:
        return len(self._by_ident)

    def pending(self) -> int:
        """Requests of attached backends not yet forgotten (a racy count, for stats)."""
        return sum(len(a.pending) for a in list(self._by_ident.values()))


class _Submitter:
    """What Communicator._prefetch needs of a backend, for a backend process."""

    def __init__(self, server: CommServer, att: Attached) -> None:
        self.id, self.name, self._server = att.id, att.name, server

    def _submit(self, job: Any, w: Any) -> None:
        self._server._submit(job, w)
