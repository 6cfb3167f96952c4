"""The Communicator: one per process, between all backends and all shards.

Theory of operation
-------------------
The communicator owns one ZeroMQ Context, a fixed pool of ShardWorker threads
per shard (each with one pipelined DEALER connection), the job table through
which backends hand requests to workers (the pipe carries only an 8-byte key),
and the shared prefetch buffer. Backends are created with ``backend()``; each
owns its slot ring and its own pipe sockets. ``close()`` stops the workers
(through their pipes), which fail everything pending with CommClosed, then
closes every remaining socket and terminates the Context, so nothing leaks.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import zmq

from prefetch import PrefetchBuffer, RelSizeCache
from shards import MAX_BLOCKS_PER_REQUEST, RelTag, ShardsError
from shards._curve import load_public, load_secret
from shards.protocol import Kind, RequestClass

from ._backend import Backend
from ._config import CommConfig
from ._errors import CommClosed, ConfigError, InvalidRequest, ShardUnavailable
from ._map import ShardMap
from ._metrics import LatencySnapshot, MetricsServer, merge_snapshots, start_metrics_server
from ._validate import FORKS, check_shard_endpoints, forked_error
from ._worker import STOP, ShardWorker

log = logging.getLogger(__name__)
_instances = itertools.count(1)
_PREFETCH = int(RequestClass.PREFETCH)
_RETIRE_GRACE = 60.0  # seconds a replaced map's workers are kept at least (see _reap_retired)


def _curve_files(cfg: CommConfig) -> tuple[str, str] | None:
    """The CURVE key files, read once here so that a bad one is a ConfigError now."""
    if cfg.curve_secret is None or cfg.curve_server_key is None:
        return None
    try:
        load_secret(cfg.curve_secret)
    except ShardsError as e:
        raise ConfigError(f"COMM_CURVE_SECRET: {e}") from None
    try:
        load_public(cfg.curve_server_key)
    except ShardsError as e:
        raise ConfigError(f"COMM_CURVE_SERVER_KEY: {e}") from None
    return cfg.curve_secret, cfg.curve_server_key


class PrefetchJob:
    """A communicator-owned wire request that fills the prefetch buffer. It has the
    interface the worker expects of a job (like a Slot); foreground reads that join
    it are completed with its pages, and promote it by raising ``cls``."""

    __slots__ = ("kind", "cls", "rel", "blocks", "lsn", "nms", "deadline", "attempt", "extra",
                 "shard", "buffer", "owner", "qkey", "sent", "worker")

    def __init__(self, buffer: PrefetchBuffer, owner: str, rel: RelTag, blocks: tuple[int, ...],
                 lsn: int, nms: int, deadline: float, shard: int) -> None:
        self.kind, self.cls, self.rel, self.blocks = int(Kind.GET_PAGES), _PREFETCH, rel, blocks
        self.lsn, self.nms, self.deadline, self.shard = lsn, nms, deadline, shard
        self.attempt, self.extra, self.buffer, self.owner = 0, None, buffer, owner
        self.qkey: Any = None
        self.sent = False
        self.worker: Any = None  # the worker it was handed to (promotions go there too)

    def is_live(self) -> bool:
        return True

    def complete(self, pages: Sequence[bytes]) -> bool:
        # one buffer lock hold and one lock hold per joined slot, not one per page
        got = self.buffer.fill_many(self.rel, self.blocks, self.lsn, pages)
        if got:
            by_slot: dict[int, tuple[Any, list[tuple[int, bytes]]]] = {}
            for slot, i, page in got:
                by_slot.setdefault(id(slot), (slot, []))[1].append((i, page))
            for slot, items in by_slot.values():
                slot.deliver_parts(items)
        return True

    def fail(self, error: BaseException) -> bool:
        for slot, i in self.buffer.discard_many(self.rel, self.blocks, self.lsn):
            slot.fail_part(i, error)
        return True

    def describe(self) -> dict[str, Any]:
        return {"owner": self.owner, "state": "PREFETCH", "kind": self.kind, "shard": self.shard,
                "rel": str(self.rel), "blocks": list(self.blocks), "lsn": self.lsn,
                "nms": self.nms, "attempt": self.attempt}


class Communicator:
    """Multiplexes many backends' page reads over a few pipelined connections per shard.

    ``Communicator(["tcp://127.0.0.1:6400", ...], stripe_size=2048)``, with any other
    setting by name (``request_timeout=3``; see CommConfig) or a whole ``config=``; or
    ``Communicator.from_env()``, which reads the ``COMM_*`` variables (the constructor
    does not). Use as a context manager.
    """

    def __init__(self, shards: Sequence[str] | None = None, stripe_size: int | None = None, *,
                 config: CommConfig | None = None, **settings: Any) -> None:
        cfg = config or CommConfig()
        if shards is not None:
            if isinstance(shards, str):
                raise ConfigError("shards must be a list of endpoints, not one string")
            cfg = cfg.replace(shards=tuple(shards))
        if stripe_size is not None:
            cfg = cfg.replace(stripe_size=stripe_size)
        if settings:  # any CommConfig field by name, e.g. request_timeout=3
            cfg = cfg.replace(**settings)
        if not cfg.shards:
            raise ConfigError("no shards: pass a list of page-server endpoints or set COMM_SHARDS")
        self.config = cfg
        self._uid = f"{os.getpid()}-{next(_instances)}"
        self._buffer = PrefetchBuffer(cfg.prefetch_pages)
        self._relsizes = RelSizeCache(cfg.relsize_cache)
        # _lock guards: _backends, _next_bid, _closed, _control
        self._lock = threading.Lock()
        self._backends: dict[int, Backend] = {}
        self._next_bid = 1
        self._closed = False
        self._control: zmq.Socket | None = None  # owned by whichever thread holds _lock
        self._started = time.monotonic()
        self._curve = _curve_files(cfg)
        self._ctx = zmq.Context()
        self._ctx.set(zmq.MAX_SOCKETS, cfg.max_sockets)
        # workers of replaced maps, with when: stopped once idle past the grace period
        # (_reap_retired), the rest at close
        self._retired: list[tuple[float, ShardWorker]] = []
        self._forks = FORKS[0]  # a forked child inherits this object, not its threads
        self._fronts: list[Any] = []  # CommServers serving backend processes (stats, metrics)
        self._latency_retired: LatencySnapshot = {}  # closed backends' latencies (_lock)
        self._metrics: MetricsServer | None = None
        self._map = ShardMap(cfg.shards, cfg.stripe_size, [], 0)
        try:
            self._map = ShardMap(cfg.shards, cfg.stripe_size, self._start_pools(cfg.shards, 0,
                                                                                 None), 0)
            if cfg.metrics_port is not None:
                try:
                    self._metrics = start_metrics_server(self, cfg.metrics_port,
                                                         cfg.metrics_addr)
                except OSError as e:  # a port in use, an address not on this host
                    raise ConfigError(f"COMM_METRICS_ADDR/COMM_METRICS_PORT: cannot listen "
                                      f"on {cfg.metrics_addr}:{cfg.metrics_port}: {e}") from None
        except BaseException:
            self.close()
            raise

    @classmethod
    def from_env(cls, **overrides: Any) -> Communicator:
        """A communicator configured from the ``COMM_*`` environment variables."""
        return cls(config=CommConfig.from_env(**overrides))

    @property
    def _workers(self) -> list[list[ShardWorker]]:
        return self._map.workers

    def _start_pools(self, endpoints: tuple[str, ...], generation: int,
                     old: ShardMap | None) -> list[list[ShardWorker]]:
        """Worker pools for ``endpoints``; a shard whose index and endpoint are unchanged
        keeps its pool (and its connections)."""
        pools: list[list[ShardWorker]] = []
        started: list[ShardWorker] = []
        try:
            for shard, endpoint in enumerate(endpoints):
                if old is not None and shard < old.count and old.endpoints[shard] == endpoint:
                    pools.append(old.workers[shard])
                    continue
                pool = []
                for k in range(self.config.threads_per_shard):
                    pool.append(self._start_worker(shard, k, endpoint, generation, started))
                pools.append(pool)
        except BaseException:  # the ones already running are stopped by close()
            self._retired += [(0.0, w) for w in started]
            raise
        return pools

    def _start_worker(self, shard: int, k: int, endpoint: str, generation: int,
                      started: list[ShardWorker]) -> ShardWorker:
        """Start one worker; it is in ``started`` before its thread runs, so that one
        that fails to start in time is still stopped by close()."""
        w = ShardWorker(self._ctx, shard, k, endpoint,
                        f"inproc://pagecomm-{self._uid}-g{generation}-s{shard}-w{k}",
                        window=self.config.inflight_per_conn,
                        page_window=self.config.inflight_pages_per_conn,
                        verify=self.config.verify_checksums,
                        attempt_timeout=self.config.attempt_timeout,
                        stuck_after=self.config.stuck_log_after, curve=self._curve)
        started.append(w)
        w.start()
        return w

    # ------------------------------------------------------------ backends
    def backend(self) -> Backend:
        """A new Backend with its own slot ring; use it from one thread."""
        if self._forks != FORKS[0]:
            raise forked_error("this Communicator")
        with self._lock:
            if self._closed:
                raise CommClosed("the communicator is closed")
            bid = self._next_bid
            if bid >= 1 << 40:
                raise CommClosed("backend ids exhausted")
            self._next_bid += 1
            be = Backend(self, bid, self.config.slots_per_backend)
            self._backends[bid] = be
        return be

    def _new_backend_id(self) -> int:
        """An id for a backend process (shares the space of thread backends' ids)."""
        with self._lock:
            bid = self._next_bid
            self._next_bid += 1
            return bid

    def _forget_backend(self, be: Backend) -> None:
        with self._lock:  # merged under the same lock: a scrape never sees counts drop
            if self._backends.pop(be.id, None) is not None:
                self._latency_retired = merge_snapshots(self._latency_retired,
                                                        be._latency.snapshot())
        self._buffer.forget_owner(be.id)

    def _open_pipe(self, pipe: str) -> zmq.Socket:
        """A PUSH socket for the calling thread, connected to one worker's pipe."""
        s = self._ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 0)  # doorbells only; bounded by the slot ring
        s.connect(pipe)
        return s

    def update_shards(self, endpoints: Sequence[str], stripe_size: int | None = None) -> None:
        """Switch to a new shard map (a live shard split). Requests already handed to a
        worker finish on the old map; new requests use the new one. The stripe size
        cannot change; a request answered "not my shard" is retried on the new map."""
        eps, stripe_size = check_shard_endpoints(endpoints, stripe_size)
        with self._lock:
            if self._closed:
                raise CommClosed("the communicator is closed")
            old = self._map
            if stripe_size is not None and stripe_size != old.stripe:
                raise ConfigError(f"stripe_size cannot change on a live split "
                                  f"({old.stripe} -> {stripe_size})")
            gen = old.generation + 1
            new = ShardMap(eps, old.stripe, self._start_pools(eps, gen, old), gen)
            kept = {id(w) for pool in new.workers for w in pool}
            now = time.monotonic()
            self._retired += [(now, w) for pool in old.workers for w in pool
                              if id(w) not in kept]
            self._map = new
            self.config = self.config.replace(shards=eps)
        log.info("shard map %d: %d shards %s", gen, len(eps), ", ".join(eps))
        self._reap_retired()

    def _reap_retired(self) -> None:
        """Stop the workers of replaced maps that have been idle past the grace period:
        a call that began on the old map still finishes there, so they are kept for
        longer than a call's default timeout. Without this, every split would leave a
        pool of threads and connections behind until close()."""
        grace = max(_RETIRE_GRACE, 2 * self.config.request_timeout)
        now = time.monotonic()
        with self._lock:
            # idle: asleep with nothing in flight (its stats are current then), nothing
            # queued or handed over; a job that still comes is refused (hand_over)
            done = [w for t, w in self._retired if now - t >= grace and w.idle
                    and not w.inbox and not w.stats.queued]
            gone = {id(w) for w in done}
            self._retired = [(t, w) for t, w in self._retired if id(w) not in gone]
        for w in done:
            w.retired = True
        self._stop_workers(done)

    # ------------------------------------------------------------ prefetch
    def _prefetch(self, be: Backend, rel: RelTag, blocks: list[int], lsn: int, nms: int,
                  deadline: float) -> int:
        todo = self._buffer.reserve(be.id, rel, blocks, lsn, nms)
        if not todo:
            return 0
        m = self._map
        by_shard: dict[int, list[int]] = {}
        for b in todo:
            by_shard.setdefault(m.shard_of(rel, b), []).append(b)
        jobs = [PrefetchJob(self._buffer, be.name, rel, tuple(blks[k:k + MAX_BLOCKS_PER_REQUEST]),
                            lsn, nms, deadline, shard)
                for shard, blks in by_shard.items()
                for k in range(0, len(blks), MAX_BLOCKS_PER_REQUEST)]
        n = 0
        try:
            for job in jobs:
                job.worker = m.worker_for(job.shard, be.id)
                self._buffer.attach(rel, job.blocks, lsn, job)
                be._submit(job, job.worker)
                n += 1
        except BaseException as e:
            # every reservation must be filled or dropped: left PENDING, a reader that
            # joined it would wait out its deadline, and the entry could never be evicted.
            # The job that failed to ring may still be taken from its worker's inbox;
            # filling an entry that is gone then does nothing.
            err = ShardUnavailable(f"prefetch by {be.name} abandoned: {e}")
            for job in jobs[n:]:
                job.fail(err)
            raise
        return len(todo)

    def _promote(self, job: Any, submit: Any) -> None:
        """A foreground read joined prefetch ``job``: make sure it does not wait behind
        other prefetches. ``submit(job, worker)`` hands it to its worker again, which
        re-sorts it as NORMAL (or ignores it if it was sent meanwhile)."""
        if job is None or job.cls == RequestClass.NORMAL or job.sent:
            return
        job.cls = int(RequestClass.NORMAL)
        self._buffer.note_promotion()
        submit(job, job.worker)

    # ------------------------------------------------------------ introspection
    @property
    def metrics_port(self) -> int | None:
        """The port of the Prometheus endpoint (None if it is off): with
        COMM_METRICS_PORT=0, the free port it took."""
        return self._metrics.port if self._metrics is not None else None

    def stats(self) -> dict[str, Any]:
        """Per-shard queue depth, in flight and counters; prefetch counters; slots."""
        shards = []
        m = self._map
        for shard, workers in enumerate(m.workers):
            agg: dict[str, int] = {}
            for w in workers:
                for k, v in w.stats.as_dict().items():
                    agg[k] = agg.get(k, 0) + v
            agg["reconnects"] = sum(w.reconnects for w in workers)
            shards.append({"shard": shard, "endpoint": m.endpoints[shard],
                           "threads": len(workers), "connections": len(workers), **agg})
        with self._lock:
            backends, fronts = list(self._backends.values()), list(self._fronts)
        return {
            "shards": shards,
            # backend processes (comm serve) count too: attached, with requests pending
            "backends": len(backends) + sum(f.attached() for f in fronts),
            "slots_in_use": (sum(b.slots_in_use() for b in backends)
                             + sum(f.pending() for f in fronts)),
            "connections": sum(len(w) for w in m.workers),
            "map_generation": m.generation,
            "prefetch": self._buffer.snapshot(),
            "relsize_cache": self._relsizes.snapshot(),
            "uptime_s": round(time.monotonic() - self._started, 3),
        }

    def _shard_trouble(self, shard: int) -> str:
        """A hint for timeout messages: what is known to be wrong with ``shard``."""
        m = self._map
        if not 0 <= shard < m.count:
            return ""
        conns = [getattr(w, "_conn", None) for w in m.workers[shard]]
        if any(c is not None and c.auth_failed for c in conns):
            return " (the server refused our CURVE key)"
        failed = [c for c in conns if c is not None and c.handshake_failed and not c.connected]
        if failed:
            return f" (the handshake with {m.endpoints[shard]} fails: {failed[0].handshake_hint()})"
        if conns and not any(c is not None and c.connected for c in conns):
            return f" (not connected to {m.endpoints[shard]})"
        return ""

    def _latency_snapshot(self) -> LatencySnapshot:
        """Call latencies of every backend, live and closed (for the metrics endpoint)."""
        with self._lock:
            live, retired = list(self._backends.values()), self._latency_retired
            fronts = list(self._fronts)
        return merge_snapshots(retired, *(b._latency.snapshot() for b in live),
                               *(f.latency.snapshot() for f in fronts))

    def dump_inflight(self, older_than: float = 0.0) -> list[dict[str, Any]]:
        """Requests on the wire for longer than ``older_than`` seconds, oldest first."""
        if isinstance(older_than, bool) or not isinstance(older_than, (int, float)) or \
                not older_than >= 0:
            raise InvalidRequest(f"older_than must be a number of seconds >= 0, got "
                                 f"{older_than!r}")
        now = time.monotonic()
        out = []
        for w in self._all_workers():
            for job, sent in w.inflight_snapshot():
                age = now - sent
                if age >= older_than:
                    out.append({**job.describe(), "worker": w.name, "age_s": round(age, 3)})
        return sorted(out, key=lambda d: -d["age_s"])

    def __repr__(self) -> str:
        if self._closed:
            return f"<Communicator {self._uid} closed>"
        parts = []
        for s in self.stats()["shards"]:
            parts.append(f"shard{s['shard']}: queued={s['queued']} inflight={s['inflight']} "
                         f"completed={s['completed']} errors={s['errors']}")
        return f"<Communicator {self._uid} {len(self._backends)} backends; {'; '.join(parts)}>"

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop the workers, fail pending calls with CommClosed, release everything.
        Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            backends = list(self._backends.values())
        if self._metrics is not None:
            self._metrics.stop()
        self._stop_workers(self._all_workers())
        for be in backends:
            be.close()
        for slot, i in self._buffer.clear():
            slot.fail_part(i, CommClosed("the communicator is closed"))
        self._ctx.term()

    def _all_workers(self) -> list[ShardWorker]:
        seen: dict[int, ShardWorker] = {}
        for w in [w for pool in self._map.workers for w in pool] + [w for _, w in self._retired]:
            seen.setdefault(id(w), w)
        return list(seen.values())

    def _stop_workers(self, workers: list[ShardWorker]) -> None:
        """STOP into each worker's pipe and wait for it, one control socket at a time.
        A worker that cannot be sent a STOP (no socket left: the limit that made
        another worker fail to start) ends when term() fails its poll with ETERM."""
        for w in workers:
            if not w.thread.is_alive():
                continue
            try:
                ctl = self._ctx.socket(zmq.PUSH)
            except zmq.ZMQError as e:
                log.error("cannot stop %s in order: %s", w.name, e)
                continue
            try:
                ctl.setsockopt(zmq.LINGER, 0)
                ctl.connect(w.pipe)
                ctl.send(STOP)
                w.thread.join(10)
            finally:
                ctl.close(0)

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass
