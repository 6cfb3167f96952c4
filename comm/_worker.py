"""A shard worker: one OS thread of a shard's fixed pool.

Theory of operation
-------------------
The worker owns two sockets, both created in its own thread: the PULL end of its
pipe and one DEALER connection to its shard's page server. Backends append jobs
(slots, prefetch requests) to the worker's ``inbox`` deque and ring the pipe only
when the worker is about to sleep (``idle``; for a foreground read also
``idle_fg``: asleep with only bulk requests in flight, and ``dozing``: asleep past a
short nap with small ones in flight, see ``_sleep``): a doorbell. pyzmq releases
the GIL in every socket call, so each avoided call is an avoided GIL hand-off;
under load the backends never touch a socket. The race is closed by ordering: a
backend appends, then reads the flags; the worker sets them, then re-reads the
inbox; one of the two always sees the other.

Each loop iteration takes the whole inbox, coalesces the foreground reads of one
relation at the same LSNs into one request (see _batch.py), and sends each job
at once while the windows have room (see _window.py), otherwise puts it into a
SortedList ordered by (class, bulk, arrival): foreground reads leave before
prefetches, small requests before bulk (scan) ones. Replies are matched by
request id, then checked against the request they claim to answer; a mismatch is
never delivered.

Wakeups are the main cost on this platform, so the worker never sleeps while it
has something to do, handles whole bursts per wakeup, and completes slots
directly (the waiting backend is the only other thread woken per request).
Deadlines are enforced here too (a slot whose caller gave up is released by the
worker when its reply arrives or its deadline passes), so no slot is held forever.
"""

from __future__ import annotations

import collections
import errno
import heapq
import itertools
import logging
import threading
import time
from typing import Any

import zmq
from sortedcontainers import SortedList

from shards import ShardsError, verify_page_checksum
from shards._fastpath import decode_get_pages_reply_fast
from shards.protocol import (
    DbSizeRequest,
    Kind,
    ProtocolError,
    RelSizeRequest,
    SlruSegmentRequest,
    Status,
    decode_reply,
    encode_get_pages,
    encode_request,
)

from ._batch import Batch, coalesce, is_bulk
from ._conn import Connection
from ._doorbell import DOZE_MS, stop_error
from ._errors import CommClosed, InvalidRequest, RequestTimeout, ShardUnavailable
from ._outcome import error_for, mismatch, per_block, result_of
from ._slot import settle
from ._window import Windows

log = logging.getLogger(__name__)

STOP = b""  # pipe message that stops a worker
_SWEEP_INTERVAL = 0.02
_RETRY_BASE = 0.002
_RETRY_CAP = 0.5
_GET_PAGES = int(Kind.GET_PAGES)
# plain ints: `int & zmq.POLLIN` would build an IntFlag member on every call
_POLLIN, _NOBLOCK, _EVENTS, _RCVMORE = (int(zmq.POLLIN), int(zmq.NOBLOCK), int(zmq.EVENTS),
                                        int(zmq.RCVMORE))


class WorkerStats:
    """Counters written only by the worker thread; read (racily, that is fine) by stats()."""

    __slots__ = ("queued", "inflight", "sent", "completed", "errors", "timeouts", "retries",
                 "stale_replies", "bad_replies", "resets", "pages", "coalesced", "splits")

    def __init__(self) -> None:
        self.queued = self.inflight = self.sent = self.completed = self.errors = 0
        self.timeouts = self.retries = self.stale_replies = self.bad_replies = 0
        self.resets = self.pages = self.coalesced = self.splits = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class ShardWorker:
    """One thread, one pipe, one connection. Created and started by the Communicator."""

    def __init__(self, ctx: zmq.Context, shard: int, index: int, server: str, pipe: str, *,
                 window: int, verify: bool, page_window: int = 256,
                 attempt_timeout: float = 10.0,
                 stuck_after: float = 10.0, curve: tuple[str, str] | None = None) -> None:
        self.ctx, self.shard, self.index = ctx, shard, index
        self.server, self.pipe, self.verify = server, pipe, verify
        self.attempt_timeout, self.stuck_after = attempt_timeout, stuck_after
        self.curve = curve  # (client secret file, server public key file) or None
        self._logged: set[int] = set()  # request ids already logged as stuck
        self.name = f"comm-shard{shard}-w{index}"
        self.stats = WorkerStats()
        self.ready = threading.Event()
        self.startup_error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        # shared with backends, no lock: deque append/popleft and a bool store are atomic
        self.inbox: collections.deque[Any] = collections.deque()
        self.idle = False  # True while the worker may block in poll: ring the doorbell
        self.idle_fg = False  # ... with only bulk in flight (far-off replies): ring for fg
        self.dozing = False  # ... or past its nap with small ones out (_sleep): ring for fg
        self.stopped = False  # set as the thread ends: jobs handed over after are refused
        self.retired = False  # set before a STOP when its shard map was replaced
        # below: touched only by the worker thread
        self._queue: SortedList = SortedList()
        self._win = Windows(window, page_window)  # what is in flight, and the limits
        self._inflight = self._win.inflight  # request id -> (job, sent at); never rebound
        self._delayed: list[tuple[float, int, Any]] = []  # heap of (due, seq, job): retries
        self._seq = itertools.count()
        self._rid = itertools.count(1)
        self._conn: Connection  # created in the worker thread
        self._blocked = False  # the DEALER refused a send (no peer): wait for POLLOUT
        self._stopping = False
        self._done: list[tuple[Any, Any]] = []  # completions to deliver before sleeping

    # ------------------------------------------------------------ thread body
    def start(self) -> None:
        self.thread.start()
        if not self.ready.wait(10) or self.startup_error is not None:
            e = self.startup_error
            hint = (" (too many sockets: fewer backends, shards or threads per shard, or "
                    "a higher open-file limit)"
                    if isinstance(e, zmq.ZMQError) and e.errno == errno.EMFILE else "")
            raise CommClosed(f"{self.name} failed to start: {e}{hint}")

    def _run(self) -> None:
        pull = None
        try:
            pull = self.ctx.socket(zmq.PULL)
            pull.setsockopt(zmq.LINGER, 0)
            pull.setsockopt(zmq.RCVHWM, 0)
            pull.bind(self.pipe)
            self._conn = Connection(self.ctx, self.server, self.name, self.curve)
        except (zmq.ZMQError, ShardsError) as e:
            if pull is not None:  # left open, it would block the context's term()
                pull.close(0)
            self.startup_error = e
            self.ready.set()
            return
        self.ready.set()
        try:
            self._loop(pull)
        except zmq.ZMQError as e:  # the context was torn down under us
            log.error("%s: stopping on ZeroMQ error: %s", self.name, e)
        except Exception:  # a bug: say so loudly, fail what we hold, free the sockets
            log.exception("%s: stopping on an unexpected error", self.name)
        finally:
            try:
                self._fail_everything(pull)
            finally:
                pull.close(0)  # left open, it would block the context's term()
                self._conn.close()

    def _poller(self, pull: zmq.Socket) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        poller.register(self._conn.dealer, zmq.POLLIN)
        poller.register(self._conn.monitor, zmq.POLLIN)
        return poller

    def _loop(self, pull: zmq.Socket) -> None:
        conn, inbox = self._conn, self.inbox
        poller, generation = self._poller(pull), conn.generation
        next_sweep = time.monotonic() + _SWEEP_INTERVAL
        while not self._stopping:
            if inbox:
                self._take_inbox()
            self._pump()
            if self._done:
                self._deliver()
            events = self._sleep(poller)
            # awake: no rings from here (the inbox is taken at the top of the loop)
            self.idle = self.idle_fg = self.dozing = False
            for sock, _ in events:
                if sock is pull:
                    self._drain_pipe(pull)
                elif sock is conn.dealer:
                    self._drain_replies()
                else:
                    self._on_conn_events()
            if self._blocked and conn.dealer.poll(0, zmq.POLLOUT):
                self._blocked = False
            now = time.monotonic()
            if self._delayed and self._delayed[0][0] <= now:
                self._release_delayed(now)
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + _SWEEP_INTERVAL
            self.stats.queued = len(self._queue) + len(self._delayed)
            self.stats.inflight = len(self._inflight)
            if conn.generation != generation:  # the connection was reset
                poller, generation = self._poller(pull), conn.generation

    def _sleep(self, poller: zmq.Poller) -> list[tuple[Any, int]]:
        """Wait for a reply, a doorbell, a retry falling due or the sweep.

        With small requests in flight (single pages, their batches, metadata), a
        foreground read does not ring: the next reply will wake the worker, and
        under load rings would cost more wakeups than they save. But that reply
        may be far off (a slow server, a cold page, single-page prefetches to a
        stuck one). So the worker naps DOZE_MS first; if nothing came, it turns
        ``dozing`` (a foreground read rings, see must_ring) and looks at its inbox
        again for one that came during the nap. A foreground read waits about
        DOZE_MS at most for a worker with nothing else to do; under load replies
        come sooner and the nap costs nothing."""
        inbox, small = self.inbox, self._win.small
        busy = self._inflight or self._queue or self._delayed
        self.idle = not self._inflight
        self.idle_fg = not small
        if inbox:  # arrived after the flags were set: don't sleep
            return poller.poll(0)
        if not busy:
            return poller.poll(None)
        wait_ms = int(_SWEEP_INTERVAL * 1000)
        if self._delayed:  # a retry falls due: be awake for it (+1: poll truncates)
            due = self._delayed[0][0] - time.monotonic()
            wait_ms = max(0, min(wait_ms, int(due * 1000) + 1))
        if not small or wait_ms <= DOZE_MS or len(self._inflight) >= self._win.window:
            # (a full window: a read could not be sent sooner; the reads that come
            # meanwhile are taken together at the next reply, and coalesced)
            return poller.poll(wait_ms)
        events = poller.poll(DOZE_MS)
        if events:
            return events
        self.dozing = True  # then look at the inbox again: see must_ring
        return poller.poll(0 if inbox else wait_ms - DOZE_MS)

    def _on_conn_events(self) -> None:
        if zmq.EVENT_DISCONNECTED in self._conn.events() and self._inflight:
            # the server (or the path to it) went away with our requests: retry them now
            self._retry_inflight("disconnected")

    # ------------------------------------------------------------ intake
    def _drain_pipe(self, pull: zmq.Socket) -> None:
        # doorbells: the jobs are in the inbox (EVENTS is an int)
        while pull.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]
            if pull.recv(_NOBLOCK) == STOP:
                self._stopping = True
                return

    def _take_inbox(self) -> None:
        inbox, queue = self.inbox, self._queue
        jobs: list[Any] = []
        taken: set[int] = set()  # ids of the jobs in `jobs` (alive: their ids are stable)
        while inbox:
            job = inbox.popleft()
            if id(job) in taken:  # promoted twice (two readers joined it): once is enough
                continue
            if job.qkey is not None:  # promoted while queued here: re-sort it
                queue.remove(job.qkey)
                job.qkey = None
            elif job.sent:  # promoted after it left: already on its way
                continue
            if not job.is_live():
                settle(job.fail, CommClosed("abandoned before it was sent"))  # releases it
            else:
                jobs.append(job)
                taken.add(id(job))
        if len(jobs) > 1:  # reads of one relation share a wire request (see _batch.py)
            n = len(jobs)
            jobs = coalesce(jobs)
            self.stats.coalesced += n - len(jobs)
        room = self._win.room
        for job in jobs:
            if not queue and not self._blocked and room(job):
                self._send(job)
            else:
                self._enqueue(job)

    def _enqueue(self, job: Any) -> None:
        # foreground first, and among them small requests before bulk: the shortest
        # jobs first keep random reads fast beside scans
        job.qkey = (job.cls, is_bulk(job), next(self._seq), job)
        self._queue.add(job.qkey)

    def _pump(self) -> None:
        q, room = self._queue, self._win.room
        while q and not self._blocked:
            job = q[0][-1]
            if not room(job):
                return
            q.pop(0)
            job.qkey = None
            if job.is_live():
                self._send(job)
            else:
                settle(job.fail, CommClosed("abandoned before it was sent"))

    def _send(self, job: Any) -> None:
        rid = next(self._rid)
        try:
            if job.kind == Kind.GET_PAGES:
                frame = encode_get_pages(rid, job.attempt, job.cls, job.lsn, job.nms, job.rel,
                                         job.blocks)
            else:
                frame = self._encode_other(rid, job)
        except (ProtocolError, ValueError, TypeError, OverflowError) as e:
            # backends validate first, so this is a bug; it fails this job, not the shard
            if type(job) is Batch:
                self._split(job)  # each member on its own: only the bad one fails
            else:
                self.stats.errors += 1
                settle(job.fail, InvalidRequest(f"shard {self.shard}: cannot encode "
                                                 f"{Kind(job.kind).name} {job.rel}: {e}"))
            return
        try:
            self._conn.dealer.send(frame, _NOBLOCK)
        except zmq.Again:  # not connected (IMMEDIATE): keep it, wait until writable
            self._blocked = True
            self._enqueue(job)
            return
        job.sent = True
        self._win.track(rid, job, time.monotonic())
        self.stats.sent += 1

    @staticmethod
    def _encode_other(rid: int, job: Any) -> bytes:
        common = (rid, job.attempt, job.cls, job.lsn, job.nms)
        if job.kind == Kind.REL_SIZE:
            req: Any = RelSizeRequest(*common, job.rel, job.extra)
        elif job.kind == Kind.DB_SIZE:
            req = DbSizeRequest(*common, job.extra)
        else:
            req = SlruSegmentRequest(*common, *job.extra)
        return encode_request(req)[0]

    # ------------------------------------------------------------ replies
    def _drain_replies(self) -> None:
        conn = self._conn
        generation = conn.generation
        dealer = conn.dealer
        # recv_multipart inlined with bound methods (get() does not drop the GIL);
        # ask EVENTS instead of catching zmq.Again: an exception per drain costs more.
        # An OK GetPages reply is one frame of up to 256 KB: taken without a copy, its
        # pages are copied out once by the decoder.
        recv, get, on_reply = dealer.recv, dealer.get, self._on_reply
        while conn.generation == generation and get(_EVENTS) & _POLLIN:  # type: ignore[operator]  # an int
            frames = [recv(_NOBLOCK, copy=False)]
            while get(_RCVMORE):
                frames.append(recv(_NOBLOCK, copy=False))
            on_reply(frames)

    def _on_reply(self, frames: list[zmq.Frame]) -> None:
        fast = decode_get_pages_reply_fast(frames)
        if fast is not None:  # the common case: an OK GetPages reply, checked field by field
            rid, attempt, lsn, nms, rel, blocks, pages = fast
            entry = self._inflight.get(rid)
            if entry is not None:
                job = entry[0]
                if (job.kind == _GET_PAGES and attempt == job.attempt and lsn == job.lsn
                        and nms == job.nms and blocks == job.blocks and rel == job.rel):
                    self._win.untrack(rid)
                    self._complete_ok(job, pages)
                    return
        # everything else (errors, other kinds, stale or mismatched replies, garbage)
        try:
            rep = decode_reply(frames)
        except ProtocolError as e:
            self.stats.bad_replies += 1
            self._reset(f"malformed reply: {e}")
            return
        entry = self._win.untrack(rep.id)
        if entry is None:  # answer to a request we already timed out or reset
            self.stats.stale_replies += 1
            return
        job = entry[0]
        why = mismatch(job, rep)
        if why is not None:
            self.stats.bad_replies += 1
            settle(job.fail, ShardUnavailable(f"shard {self.shard}: {why}"))
            self._reset(f"reply does not match its request: {why}")
            return
        if rep.status == Status.OK:
            self._complete_ok(job, result_of(rep))
        elif rep.status == Status.SLOW_DOWN and self._retry(job):
            return
        elif type(job) is Batch and per_block(rep):
            self._split(job)  # the status may concern some blocks only: ask one by one
        else:
            self.stats.errors += 1
            settle(job.fail, error_for(job, rep))

    def _complete_ok(self, job: Any, result: Any) -> None:
        if self.verify and job.kind == _GET_PAGES:
            bad = {blk for blk, page in zip(job.blocks, result, strict=True)
                   if not verify_page_checksum(page, blk)}
            if bad:
                self.stats.bad_replies += 1
                self.stats.errors += 1
                err = ShardUnavailable(f"shard {self.shard}: page {job.rel} block "
                                       f"{min(bad)} fails its checksum")
                if type(job) is Batch:  # only the readers of a bad page fail
                    job.complete_except(result, bad, err)
                else:
                    settle(job.fail, err)
                return
        self.stats.completed += 1
        self.stats.pages += len(job.blocks)
        self._done.append((job, result))

    def _deliver(self) -> None:
        """Wake the waiting backends in one burst, after this iteration's socket calls:
        pyzmq drops the GIL in every call, and a backend woken earlier would take it
        from under the worker at each one."""
        done, self._done = self._done, []
        for job, result in done:
            settle(job.complete, result)

    def _split(self, batch: Batch) -> None:
        self.stats.splits += 1
        for m in batch.members:
            if m.is_live():
                self._enqueue(m)
            else:
                settle(m.fail, CommClosed("abandoned while batched"))  # releases it

    def _retry(self, job: Any) -> bool:
        """Schedule another attempt with capped exponential backoff, if the deadline allows."""
        delay = min(_RETRY_CAP, _RETRY_BASE * (2 ** job.attempt))
        due = time.monotonic() + delay
        if due >= job.deadline or not job.is_live():
            return False
        job.attempt += 1
        self.stats.retries += 1
        heapq.heappush(self._delayed, (due, next(self._seq), job))
        return True

    def _release_delayed(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            self._enqueue(heapq.heappop(self._delayed)[2])

    def _reset(self, why: str) -> None:
        """Drop the connection and retry everything in flight on a fresh one (a new
        DEALER has a new server-side identity: nothing late from the old one arrives)."""
        log.warning("%s: resetting connection to %s: %s", self.name, self.server, why)
        self.stats.resets += 1
        self._conn.reset()
        self._blocked = False
        self._retry_inflight(f"connection reset ({why})")

    def _retry_inflight(self, why: str) -> None:
        for job in self._win.clear():
            if not self._retry(job):
                self.stats.errors += 1
                settle(job.fail, ShardUnavailable(f"shard {self.shard}: {why}, and the "
                                                   f"deadline leaves no time to retry"))

    # ------------------------------------------------------------ deadlines, shutdown
    def _sweep(self, now: float) -> None:
        """Deadlines, per-attempt timeouts and stuck-request logs (every 20 ms)."""
        for rid, (job, sent) in list(self._inflight.items()):
            age = now - sent
            if job.deadline <= now:
                self._win.untrack(rid)
                self._timeout(job)
            elif age >= self.attempt_timeout and self._retry(job):
                self._win.untrack(rid)  # a late reply to this attempt is dropped as stale
            elif age >= self.stuck_after and rid not in self._logged:
                self._logged.add(rid)
                log.warning("%s: request stuck for %.1fs: %s", self.name, age,
                            {**job.describe(), "request_id": rid})
        self._logged.intersection_update(self._inflight)
        if self._queue:
            dead = [e for e in self._queue if e[-1].deadline <= now or not e[-1].is_live()]
            for e in dead:
                self._queue.remove(e)
                e[-1].qkey = None
                self._timeout(e[-1])

    def _timeout(self, job: Any) -> None:
        self.stats.timeouts += 1
        why = " (the server refused our CURVE key)" if self._conn.auth_failed else ""
        settle(job.fail, RequestTimeout(
            f"shard {self.shard} did not answer {Kind(job.kind).name} {job.rel} "
            f"{list(job.blocks)} at lsn {job.lsn:#x} before the deadline (attempt "
            f"{job.attempt}){why}"))

    def _fail_everything(self, pull: zmq.Socket) -> None:
        self.stopped = True  # before the inbox is drained: see _doorbell.hand_over
        self._deliver()
        err = stop_error(self)
        pending = []
        while self.inbox:  # popleft: a job hand_over takes back is failed once, there
            pending.append(self.inbox.popleft())
        pending += [e[-1] for e in self._queue] + self._win.clear()
        pending += [e[2] for e in self._delayed]
        self._queue.clear()
        self._delayed.clear()
        for job in pending:
            settle(job.fail, err)

    @property
    def reconnects(self) -> int:
        conn = getattr(self, "_conn", None)
        return conn.reconnects if conn is not None else 0

    def inflight_snapshot(self) -> list[tuple[Any, float]]:
        """(job, sent at) pairs; a racy copy for diagnostics."""
        return list(self._inflight.values())
