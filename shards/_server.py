"""The page server: one shard's page store behind a ZeroMQ ROUTER socket.

Theory of operation
-------------------
One thread owns the ROUTER socket and runs a loop:

1. poll (the timeout is the earliest of: a delayed reply falls due, a parked
   request should be re-checked, the stop flag should be looked at);
2. DRAIN every queued request without blocking into one batch (up to max_batch);
3. sort the batch with the parked requests, NORMAL before PREFETCH before
   BACKGROUND, and within a class the fewest pages first (then arrival order), so
   a foreground read never waits behind prefetches that happened to arrive first,
   nor a random read behind a scan's batches; requests beyond ``max_queue`` are
   answered SLOW_DOWN at once;
4. serve the whole batch in ONE read transaction of the store (one snapshot);
   a request whose not_modified_since is above the store's last_lsn is PARKED
   and re-tried on later iterations until ``lsn_wait`` seconds have passed, so it
   never blocks other requests;
5. send the replies. With injected ``latency`` a reply is held until
   arrival+latency in a small time-ordered heap: requests overlap, as they
   would on a real network, rather than being serialised by the delay. Waits
   under a millisecond use select() with a 1 us timer slack (_wait.py: zmq's poll counts
   whole milliseconds and would spin); waking adds a few tens of microseconds.

Every status is in-band; malformed frames are answered INVALID_REQUEST when their
request id can be read, else dropped and counted. :class:`ServerFaults` injects
drops, corrupt pages, wrong blocks, forced statuses and garbage frames for tests.

An ``ipc://`` path where a live server listens is refused like a TCP port in use
(ZeroMQ's bind would silently replace that server's socket file); a stale file,
with nobody listening, is bound over. A stopped server removes its socket file.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import zmq

from ._curve import check_exposure, secure_server
from ._endpoint import ipc_in_use, remove_ipc
from ._errors import InvalidArgument, ProtocolError, ShardsError, StoreError
from ._fastpath import ok_get_pages_reply
from ._faults import ServerFaults, inject
from ._layout import check_store_layout
from ._protocol import (
    MAX_MESSAGE_BYTES,
    DbSizeReply,
    DbSizeRequest,
    GetPagesReply,
    GetPagesRequest,
    Kind,
    RelSizeReply,
    RelSizeRequest,
    Reply,
    Request,
    RequestClass,
    SlruSegmentReply,
    Status,
    decode_request,
    encode_reply,
    error_reply,
    malformed_reply,
    peek_request_id,
)
from ._shardmap import DEFAULT_STRIPE_SIZE, check_shard_params, shard_for_unchecked
from ._store import PageStore, StoreReader
from ._types import BLCKSZ
from ._wait import precise_timers, readable

log = logging.getLogger(__name__)
MAX_WAIT_SECONDS = 3600  # injected latency and lsn_wait stay below an hour

_IDLE_POLL_S = 0.05      # how often an idle loop looks at the stop flag
_PARK_RECHECK_S = 0.005  # how often parked requests re-read the store's last_lsn
_HWM = 10_000
# counter keys, built once: an f-string and an enum .name per request add up
_REQUEST_KEYS = {k: f"requests.{k.name}" for k in Kind}
_CLASS_KEYS = {c: f"classes.{c.name}" for c in RequestClass}
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)  # plain ints: no IntFlag ops


@dataclass(slots=True)
class _Pending:
    envelope: list[bytes]
    req: Request
    arrival: float
    seq: int
    frame: bytes  # the request as received: an OK GetPages reply echoes its rel and blocks

    def order(self) -> tuple[int, int, int]:
        """Serving order: class, then the fewest pages first, then arrival."""
        return self.req.cls, len(getattr(self.req, "blocks", ())), self.seq


class PageServer:
    """Serves one shard of a page store over a ROUTER socket (see module docstring).

    A store whose ``meta()`` records its shard, shard_count and stripe_size (one
    written by import_pgdata or generate_store) must be served with those
    (InvalidArgument naming both layouts, at construction); a store without
    them (a plain PageStore) is served as told."""

    def __init__(self, store: PageStore, shard: int = 0, shard_count: int = 1,
                 stripe_size: int = DEFAULT_STRIPE_SIZE, bind: str = "tcp://127.0.0.1:0", *,
                 latency: float = 0.0, lsn_wait: float = 1.0,
                 faults: ServerFaults | None = None, max_queue: int = 4096,
                 max_batch: int = 1024, metrics_port: int | None = None,
                 metrics_addr: str = "127.0.0.1", curve_secret: str | None = None,
                 curve_clients: str | None = None, insecure: bool = False) -> None:
        check_shard_params(shard_count, stripe_size)
        if not isinstance(shard, int) or not 0 <= shard < shard_count:
            raise InvalidArgument(f"shard={shard!r} is outside 0..{shard_count - 1}")
        if not isinstance(bind, str) or "://" not in bind:
            raise InvalidArgument(f"bind must be a ZeroMQ endpoint like tcp://127.0.0.1:0, "
                                  f"got {bind!r}")
        for name, v in (("latency", latency), ("lsn_wait", lsn_wait)):
            if not isinstance(v, (int, float)) or not 0 <= v < MAX_WAIT_SECONDS:
                raise InvalidArgument(f"{name} must be seconds in 0..{MAX_WAIT_SECONDS}, "
                                      f"got {v!r}")
        for name, v in (("max_queue", max_queue), ("max_batch", max_batch)):
            if not isinstance(v, int) or v < 1:
                raise InvalidArgument(f"{name} must be a positive int, got {v!r}")
        if metrics_port is not None and (isinstance(metrics_port, bool) or not isinstance(
                metrics_port, int) or not 0 <= metrics_port <= 65535):
            raise InvalidArgument(f"metrics_port must be an integer in 0..65535, "
                                  f"got {metrics_port!r}")
        if (curve_secret is None) != (curve_clients is None):
            raise InvalidArgument("CURVE needs both curve_secret (this server's .key_secret "
                                  "file) and curve_clients (a directory of accepted client "
                                  ".key files)")
        check_store_layout(store, shard, shard_count, stripe_size)
        check_exposure(bind, curve_secret is not None, insecure, log)
        self.curve_secret, self.curve_clients = curve_secret, curve_clients
        self.store = store
        self.metrics_port, self.metrics_addr = metrics_port, metrics_addr
        self.metrics: Any = None  # a _metrics.ServerMetrics while running with metrics_port
        self.shard, self.shard_count, self.stripe_size = shard, shard_count, stripe_size
        self.bind, self.latency, self.lsn_wait = bind, float(latency), float(lsn_wait)
        self.faults = faults
        self.max_queue, self.max_batch = max_queue, max_batch
        self._rng = random.Random(faults.seed if faults else None)
        # guards _totals, _gauges, _state, _endpoint, _thread, metrics
        self._lock = threading.Lock()
        self._totals: Counter[str] = Counter()
        self._gauges = {"parked": 0, "delayed": 0}
        self._state = "new"  # new -> running -> stopped
        self._endpoint: str | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._stopping = threading.Event()
        self._start_error: BaseException | None = None
        # owned by the server thread only
        self._parked: list[_Pending] = []
        self._delayed: list[tuple[float, int, list[bytes]]] = []
        self._seq = 0

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> PageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """The bound endpoint with its real port (after :meth:`start`)."""
        with self._lock:
            if self._endpoint is None:
                raise ShardsError("PageServer is not started")
            return self._endpoint

    def start(self) -> PageServer:
        """Bind and start serving in a thread; returns once bound."""
        with self._lock:
            if self._state != "new":
                raise ShardsError(f"PageServer cannot start: it is {self._state}")
            self._state = "running"
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"page-server-{self.shard}")
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            with self._lock:
                self._state = "stopped"
            raise ShardsError(f"cannot bind {self.bind}: {self._start_error}") from None
        if self.metrics_port is not None:
            self._start_metrics(self.metrics_port)
        return self

    def _start_metrics(self, port: int) -> None:
        from ._metrics import ServerMetrics  # prometheus_client only when asked for

        try:
            metrics = ServerMetrics(self, port, self.metrics_addr)
        except OSError as e:
            self.stop()
            raise ShardsError(f"cannot serve metrics on {self.metrics_addr}:"
                              f"{self.metrics_port}: {e}") from None
        with self._lock:
            stopped = self._state == "stopped"  # stop() ran meanwhile
            if not stopped:
                self.metrics = metrics
        if stopped:
            metrics.stop()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket (idempotent; returns within ~50 ms)."""
        with self._lock:
            thread, self._state = self._thread, "stopped"
            metrics, self.metrics = self.metrics, None
        if metrics is not None:
            metrics.stop()
        self._stopping.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("page server thread %s did not stop in %.1fs", thread.name, timeout)

    def stats(self) -> dict[str, Any]:
        """Counters: requests by kind and class, pages served, errors by status, etc."""
        with self._lock:
            totals, gauges = dict(self._totals), dict(self._gauges)
        out: dict[str, Any] = {"requests": {}, "classes": {}, "errors": {}, "faults": {},
                               "pages_served": 0, "malformed_dropped": 0,
                               "malformed_answered": 0, "send_errors": 0, **gauges}
        for key, n in totals.items():
            group, _, name = key.partition(".")
            if name:
                out[group][name] = n
            else:
                out[group] = n
        return out

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        ctx = zmq.Context(io_threads=1)
        sock = ctx.socket(zmq.ROUTER)
        auth = None
        try:
            if self.curve_secret is not None and self.curve_clients is not None:
                auth = secure_server(ctx, sock, self.curve_secret, self.curve_clients)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # unroutable replies are dropped
            sock.setsockopt(zmq.RCVHWM, _HWM)
            sock.setsockopt(zmq.SNDHWM, _HWM)
            if ipc_in_use(self.bind):  # zmq's bind would replace a live server's socket file
                raise ShardsError("Address already in use (a live server listens on "
                                  "its socket file)")
            sock.bind(self.bind)
            with self._lock:
                self._endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except Exception as e:  # ZMQError, ShardsError, anything a key file can cause
            self._start_error = e
            sock.close(0)
            if auth is not None:
                auth.stop()
            ctx.term()
            self._started.set()
            return
        self._started.set()
        log.info("page server shard %d/%d serving %s", self.shard, self.shard_count,
                 self._endpoint)
        try:
            self._loop(sock)
        except Exception:  # never expected: keep the process alive, log loudly
            log.exception("page server loop failed")
        finally:
            sock.close(0)
            if auth is not None:
                auth.stop()
            ctx.term()
            with self._lock:
                endpoint = self._endpoint
            if endpoint is not None:  # its ipc socket file, now that nobody listens on it
                remove_ipc(endpoint)

    def _loop(self, sock: zmq.Socket) -> None:
        if self.latency:
            precise_timers()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        fd = int(sock.getsockopt(zmq.FD))
        while not self._stopping.is_set():
            counts: Counter[str] = Counter()
            timeout = _IDLE_POLL_S
            if self._parked:
                timeout = min(timeout, _PARK_RECHECK_S)
            if self._delayed:
                timeout = max(0.0, min(timeout, self._delayed[0][0] - time.monotonic()))
            batch: list[_Pending] = []
            if readable(sock, poller, fd, timeout):
                batch = self._drain(sock, counts)
            now = time.monotonic()
            if batch or self._parked:
                self._serve(sock, batch, now, counts)
            if self._delayed:
                self._flush_delayed(sock, time.monotonic(), counts)
            with self._lock:
                self._totals.update(counts)
                self._gauges["parked"] = len(self._parked)
                self._gauges["delayed"] = len(self._delayed)

    def _drain(self, sock: zmq.Socket, counts: Counter[str]) -> list[_Pending]:
        batch: list[_Pending] = []
        now = time.monotonic()
        for _ in range(self.max_batch):
            try:
                frames = sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                break
            # a DEALER sends [id, request]; a REQ adds an empty delimiter [id, b"", request]
            cut = 2 if len(frames) >= 3 and frames[1] == b"" else 1
            envelope, body = frames[:cut], frames[cut:]
            try:
                req = decode_request(body)
            except ProtocolError as e:
                self._malformed(sock, envelope, body, str(e), counts)
                continue
            self._seq += 1
            counts[_REQUEST_KEYS[req.kind]] += 1
            counts[_CLASS_KEYS[req.cls]] += 1
            batch.append(_Pending(envelope, req, now, self._seq, body[0]))
        return batch

    def _malformed(self, sock: zmq.Socket, envelope: list[bytes], body: list[bytes],
                   reason: str, counts: Counter[str]) -> None:
        ids = peek_request_id(body[0]) if body else None
        if ids is None:
            counts["malformed_dropped"] += 1
            return
        counts["malformed_answered"] += 1
        counts["errors.INVALID_REQUEST"] += 1
        self._send(sock, envelope, encode_reply(malformed_reply(body[0], ids, reason)), counts)

    def _serve(self, sock: zmq.Socket, batch: list[_Pending], now: float,
               counts: Counter[str]) -> None:
        work = self._parked + batch
        self._parked = []
        work.sort(key=_Pending.order)
        for p in work[self.max_queue:]:  # the lowest classes, the biggest, the latest
            self._emit(sock, None, p, error_reply(
                p.req, Status.SLOW_DOWN, f"server queue is full ({self.max_queue} requests)"),
                now, counts)
        del work[self.max_queue:]
        done = 0
        try:
            with self.store.reader() as r:
                last = r.last_lsn
                for p in work:
                    done += 1
                    if p.req.nms > last:
                        if now - p.arrival < self.lsn_wait:
                            self._parked.append(p)
                            continue
                        reply: Reply | list[bytes] = error_reply(p.req, Status.INTERNAL_ERROR,
                                            f"store at LSN {last} has not reached "
                                            f"not_modified_since {p.req.nms} after waiting "
                                            f"{self.lsn_wait:g}s")
                    else:
                        reply = self._answer(r, p.req)
                        if type(reply) is list:  # the pages of an OK GetPages reply
                            if self.faults is None and self._emit_pages(sock, p, reply, now,
                                                                        counts):
                                continue
                            reply = _ok_reply(p.req, reply)
                    assert not isinstance(reply, list)
                    self._emit(sock, r, p, reply, now, counts)
        except StoreError as e:  # the store itself failed: fail the rest, keep serving
            log.error("page store failed: %s", e)
            failed = ([work[done - 1]] if done else []) + work[done:] + self._parked
            self._parked = []
            for p in failed:
                self._emit(sock, None, p, error_reply(p.req, Status.INTERNAL_ERROR,
                                                      f"page store failed: {e}"), now, counts)

    def _answer(self, r: StoreReader, req: Request) -> Reply | list[bytes]:
        """The reply to ``req``; for an OK GetPages just its pages (see _emit_pages)."""
        try:
            if isinstance(req, GetPagesRequest):
                return self._get_pages(r, req)
            if self.shard != 0:
                return error_reply(req, Status.INVALID_REQUEST,
                                   f"{req.kind.name} is served by shard 0, this is shard "
                                   f"{self.shard}")
            common = (req.id, req.attempt, Status.OK, req.lsn, req.nms)
            if isinstance(req, RelSizeRequest):
                n = r.nblocks(req.rel, req.lsn)
                if n is not None or req.allow_missing:
                    return RelSizeReply(*common, rel=req.rel, exists=n is not None,
                                        nblocks=n or 0)
                return error_reply(req, Status.NOT_FOUND,
                                   f"relation {req.rel} does not exist at LSN {req.lsn}")
            if isinstance(req, DbSizeRequest):
                size = r.db_size(req.db, req.lsn)
                if size is None:
                    return error_reply(req, Status.NOT_FOUND,
                                       f"database {req.db} has no size at LSN {req.lsn}")
                return DbSizeReply(*common, db=req.db, size=size)
            seg = r.get_slru(req.slru_kind, req.segno, req.lsn)
            if seg is None:
                return error_reply(req, Status.NOT_FOUND,
                                   f"SLRU {req.slru_kind.name} segment {req.segno} not found "
                                   f"at LSN {req.lsn}")
            return SlruSegmentReply(*common, slru_kind=req.slru_kind, segno=req.segno,
                                    segment=seg)
        except StoreError:
            raise
        except Exception as e:  # a bug must cost one request, not the server
            log.exception("serving %r failed", req)
            return error_reply(req, Status.INTERNAL_ERROR, f"server error: {e}")

    def _get_pages(self, r: StoreReader, req: GetPagesRequest) -> Reply | list[bytes]:
        rel, blocks, lsn = req.rel, req.blocks, req.lsn
        if self.shard_count > 1:
            checked: set[int] = set()
            for b in blocks:
                stripe = b // self.stripe_size
                if stripe in checked:
                    continue
                checked.add(stripe)
                owner = shard_for_unchecked(rel, b, self.shard_count, self.stripe_size)
                if owner != self.shard:
                    return error_reply(req, Status.INVALID_REQUEST,
                                       f"block {b} of {rel} belongs to shard {owner}, "
                                       f"this is shard {self.shard}")
        n = r.nblocks(rel, lsn)
        if n is None:
            return error_reply(req, Status.NOT_FOUND,
                               f"relation {rel} does not exist at LSN {lsn}")
        for b in blocks:
            if b >= n:
                return error_reply(req, Status.NOT_FOUND, f"block {b} of {rel} is beyond "
                                   f"its size of {n} blocks at LSN {lsn}")
        pages = r._get_pages(rel, blocks, lsn)
        for b, page in zip(blocks, pages, strict=True):
            if page is None:
                return error_reply(req, Status.NOT_FOUND,
                                   f"no version of block {b} of {rel} at or below LSN {lsn}")
        return pages  # type: ignore[return-value]

    # ------------------------------------------------------------ replies

    def _emit_pages(self, sock: zmq.Socket, p: _Pending, pages: list[bytes], now: float,
                    counts: Counter[str]) -> bool:
        """The hot path: an OK GetPages reply, its header made from the request frame
        (the bytes encode_reply would produce), no reply object. False if a page is
        not a whole bytes page: the caller then takes the general, checking path."""
        for page in pages:
            if type(page) is not bytes or len(page) != BLCKSZ:
                return False
        counts["pages_served"] += len(pages)
        self._schedule(sock, p, [ok_get_pages_reply(p.frame, pages)], now, counts)
        return True

    def _emit(self, sock: zmq.Socket, r: StoreReader | None, p: _Pending, reply: Reply,
              now: float, counts: Counter[str]) -> None:
        f = self.faults
        if f is not None:
            reply_or_frames = inject(f, self._rng, r, p.req, reply, counts)
            if reply_or_frames is None:
                return
            if isinstance(reply_or_frames, list):
                self._schedule(sock, p, reply_or_frames, now, counts)
                return
            reply = reply_or_frames
        if reply.status != Status.OK:
            counts[f"errors.{reply.status.name}"] += 1
        elif isinstance(reply, GetPagesReply):
            counts["pages_served"] += len(reply.pages)
        try:
            frames = encode_reply(reply)
        except ProtocolError as e:  # e.g. a corrupt record of the wrong size
            log.error("cannot encode reply to %r: %s", p.req, e)
            counts["errors.INTERNAL_ERROR"] += 1
            frames = encode_reply(error_reply(p.req, Status.INTERNAL_ERROR,
                                              f"cannot encode reply: {e}"))
        self._schedule(sock, p, frames, now, counts)

    def _schedule(self, sock: zmq.Socket, p: _Pending, frames: list[bytes], now: float,
                  counts: Counter[str]) -> None:
        due = p.arrival + self.latency
        if due <= now:
            self._send(sock, p.envelope, frames, counts)
        else:
            self._seq += 1
            heapq.heappush(self._delayed, (due, self._seq, p.envelope + frames))

    def _flush_delayed(self, sock: zmq.Socket, now: float, counts: Counter[str]) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, _, msg = heapq.heappop(self._delayed)
            self._send(sock, [], msg, counts)

    def _send(self, sock: zmq.Socket, envelope: list[bytes], frames: list[bytes],
              counts: Counter[str]) -> None:
        msg = envelope + frames
        last = len(msg) - 1
        try:  # send_multipart without its per-frame type checks and wrappers
            for i, frame in enumerate(msg):
                sock.send(frame, _SNDMORE if i < last else _NOBLOCK)
        except zmq.ZMQError as e:  # peer gone or its queue full: the client will time out
            counts["send_errors"] += 1
            log.debug("reply not sent: %s", e)


def _ok_reply(req: Request, pages: list[bytes]) -> GetPagesReply:
    assert isinstance(req, GetPagesRequest)
    return GetPagesReply(req.id, req.attempt, Status.OK, req.lsn, req.nms, req.rel, req.blocks,
                         tuple(pages))
