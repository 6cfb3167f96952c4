"""Prometheus metrics of a Communicator, computed at scrape time.

Theory of operation
-------------------
Nothing on the request path touches prometheus_client. The counters already
exist (WorkerStats, PrefetchCounters, slot rings), and each backend records its
request latencies in a :class:`LatencyRecorder` that only its own thread writes:
one bisect and two list increments per call, no lock, no allocation. A scrape
(HTTP GET on the metrics port) runs :class:`CommCollector` in the HTTP server's
thread; it reads ``Communicator.stats()`` and ``Communicator._latency_snapshot()``
(racy reads of plain ints and lists: a figure may be one request behind, never
corrupt) and turns them into metric families.

Each communicator has its own CollectorRegistry (never the global one), so two
communicators in one process, or a test that makes many, never collide.
"""

from __future__ import annotations

import logging
import threading
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from shards.protocol import Kind, RequestClass

from ._errors import ConfigError

log = logging.getLogger(__name__)

# Upper bounds (seconds) of the latency buckets, 50 us .. 10 s; +Inf is implicit.
BUCKETS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
)
_NB = len(BUCKETS) + 1  # counts per key, the last one is +Inf
_KINDS = 16   # kind values 0..15 (Kind uses 1..4)
_CLASSES = 4  # class values 0..3 (RequestClass uses 0..2)

LatencySnapshot = dict[tuple[int, int], tuple[list[int], float, int]]


class LatencyRecorder:
    """Request latencies of one backend, by (kind, class), in fixed buckets.

    Written ONLY by the owning backend's thread, without a lock; ``snapshot()``
    may be called from any thread (a racy read: fine for monitoring). All storage
    is preallocated: ``observe`` does one bisect and two in-place list updates.
    """

    __slots__ = ("_counts", "_sums")

    def __init__(self) -> None:
        # flat: index (kind * _CLASSES + cls) * _NB + bucket; sums: kind * _CLASSES + cls
        self._counts = [0] * (_KINDS * _CLASSES * _NB)
        self._sums = [0.0] * (_KINDS * _CLASSES)

    def observe(self, kind: int, cls: int, seconds: float,
                _bounds: tuple[float, ...] = BUCKETS, _bisect: Any = bisect_left) -> None:
        """Record one request of ``kind`` and ``cls`` that took ``seconds``."""
        key = (kind & 15) * _CLASSES + (cls & 3)  # masks: a bad value can't raise here
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus "le")
        self._counts[key * _NB + _bisect(_bounds, seconds)] += 1
        self._sums[key] += seconds

    def snapshot(self) -> LatencySnapshot:
        """{(kind, cls): (per-bucket counts (not cumulative, last = +Inf), sum, count)}
        for every key observed at least once."""
        counts, sums = self._counts, self._sums
        out: LatencySnapshot = {}
        for key in range(_KINDS * _CLASSES):
            row = counts[key * _NB:(key + 1) * _NB]
            n = sum(row)
            if n:
                out[divmod(key, _CLASSES)] = (row, sums[key], n)
        return out


def merge_snapshots(*snaps: Mapping[tuple[int, int], tuple[list[int], float, int]]
                    ) -> LatencySnapshot:
    """The sum of several ``LatencyRecorder.snapshot()`` results (same format)."""
    out: LatencySnapshot = {}
    for snap in snaps:
        for key, (row, total, n) in snap.items():
            have = out.get(key)
            if have is None:
                out[key] = (list(row), total, n)
            else:
                out[key] = ([a + b for a, b in zip(have[0], row, strict=True)],
                            have[1] + total, have[2] + n)
    return out


def _name(enum: Any, value: int) -> str:
    try:
        return enum(value).name.lower()
    except ValueError:
        return str(value)


# per-shard counters: stats key -> (metric name, help)
_SHARD_COUNTERS = (
    ("pages", "pagecomm_pages_total", "Pages received from the shard's page server"),
    ("sent", "pagecomm_requests_sent_total", "Wire requests sent (each attempt counts)"),
    ("completed", "pagecomm_completed_total", "Wire requests answered OK"),
    ("errors", "pagecomm_errors_total",
     "Wire requests failed (error status, bad checksum, no time left to retry)"),
    ("timeouts", "pagecomm_timeouts_total", "Requests failed because their deadline passed"),
    ("retries", "pagecomm_retries_total",
     "Attempts retried (SLOW_DOWN, attempt timeout, disconnect, reset)"),
    ("resets", "pagecomm_resets_total",
     "Connections dropped and replaced after a malformed or mismatched reply"),
    ("reconnects", "pagecomm_reconnects_total", "Times a connection to the server was lost"),
    ("coalesced", "pagecomm_coalesced_total",
     "Foreground reads that shared another read's wire request (same relation and LSNs)"),
    ("splits", "pagecomm_batch_splits_total",
     "Coalesced requests answered with a per-block error and re-sent read by read"),
)
_SHARD_GAUGES = (
    ("queued", "pagecomm_queue_depth",
     "Requests waiting in the workers' queues (not yet on the wire), incl. delayed retries"),
    ("inflight", "pagecomm_inflight", "Requests on the wire awaiting a reply"),
    ("connections", "pagecomm_shard_connections", "Connections (worker threads) to the shard"),
)
_PREFETCH_EVENTS = ("issued", "deduplicated", "hits", "joins", "promotions", "wasted",
                    "dropped", "late", "failed")


class CommCollector(Collector):
    """Reads one communicator's counters at scrape time (see module docstring)."""

    def __init__(self, comm: Any) -> None:
        self._comm = comm

    def collect(self) -> Iterator[Metric]:
        try:
            st = self._comm.stats()
            lat = self._comm._latency_snapshot()
        except Exception as e:  # never a 500 with a traceback: an empty scrape, logged
            log.warning("metrics scrape of the communicator failed: %r", e)
            return
        yield _histogram(lat)
        yield from _shard_families(st.get("shards", []))
        for key, name, doc in (("bad_replies", "pagecomm_bad_replies_total",
                                "Replies that failed to decode, match their request or pass "
                                "the checksum"),
                               ("stale_replies", "pagecomm_stale_replies_total",
                                "Replies to requests already timed out, retried or reset")):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], sum(s.get(key, 0) for s in st.get("shards", [])))
            yield c
        pf = st.get("prefetch", {})
        c = CounterMetricFamily("pagecomm_prefetch_total", "Prefetch buffer events by kind",
                                labels=["event"])
        for ev in _PREFETCH_EVENTS:
            c.add_metric([ev], pf.get(ev, 0))
        yield c
        for name, doc, value in (
                ("pagecomm_slots_in_use", "Backend request slots not free (all backends)",
                 st.get("slots_in_use", 0)),
                ("pagecomm_backends", "Open backends", st.get("backends", 0)),
                ("pagecomm_connections", "Connections to page servers (all shards)",
                 st.get("connections", 0)),
                ("pagecomm_prefetch_buffered", "Pages in the prefetch buffer (any state)",
                 pf.get("buffered", 0)),
                ("pagecomm_prefetch_pending", "Prefetch buffer pages still on their way",
                 pf.get("pending", 0)),
                ("pagecomm_prefetch_capacity", "Prefetch buffer capacity in pages",
                 pf.get("capacity", 0)),
                ("pagecomm_map_generation", "Shard map generation (bumped by update_shards)",
                 st.get("map_generation", 0)),
                ("pagecomm_uptime_seconds", "Seconds since the communicator started",
                 st.get("uptime_s", 0.0))):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g


def _histogram(lat: Mapping[tuple[int, int], tuple[list[int], float, int]]
               ) -> HistogramMetricFamily:
    h = HistogramMetricFamily("pagecomm_request_seconds",
                              "Latency of backend calls as the caller sees them",
                              labels=["kind", "class"])
    for (kind, cls), (row, total, _) in sorted(lat.items()):
        buckets, acc = [], 0
        for bound, n in zip((*BUCKETS, float("inf")), row, strict=True):
            acc += n  # cumulative, and count == +Inf even when the read was racy
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), acc))
        h.add_metric([_name(Kind, kind), _name(RequestClass, cls)], buckets, total)
    return h


def _shard_families(shards: Iterable[Mapping[str, Any]]) -> Iterator[Metric]:
    shards = list(shards)
    for key, name, doc in _SHARD_COUNTERS:
        c = CounterMetricFamily(name, doc, labels=["shard"])
        for s in shards:
            c.add_metric([str(s["shard"])], s.get(key, 0))
        yield c
    for key, name, doc in _SHARD_GAUGES:
        g = GaugeMetricFamily(name, doc, labels=["shard"])
        for s in shards:
            g.add_metric([str(s["shard"])], s.get(key, 0))
        yield g
    info = GaugeMetricFamily("pagecomm_shard_info", "Always 1: the endpoint of each shard",
                             labels=["shard", "endpoint"])
    for s in shards:
        info.add_metric([str(s["shard"]), str(s.get("endpoint", ""))], 1)
    yield info


class MetricsServer:
    """An HTTP endpoint serving one registry; ``stop()`` is idempotent."""

    def __init__(self, registry: CollectorRegistry, port: int, addr: str) -> None:
        self.registry = registry
        started = start_http_server(port, addr, registry=registry)
        if not isinstance(started, tuple):  # prometheus_client < 0.20 returns nothing
            raise RuntimeError("prometheus_client >= 0.20 is required (start_http_server "
                               "must return the server)")
        self._server, self._thread = started
        self._thread.name = f"pagecomm-metrics-{self._server.server_port}"
        self.addr, self.port = addr, int(self._server.server_port)
        self._lock = threading.Lock()  # guards _stopped
        self._stopped = False

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._server.shutdown()
        self._server.server_close()  # releases the port at once
        self._thread.join(5)
        log.info("metrics endpoint %s:%d stopped", self.addr, self.port)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_metrics_server(comm: Any, port: int, addr: str = "127.0.0.1") -> MetricsServer:
    """Serve ``comm``'s metrics at http://addr:port/metrics (port 0: a free port,
    read back from ``.port``). The registry is private to this communicator."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"metrics port must be an integer in 0..65535, got {port!r}")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CommCollector(comm))
    srv = MetricsServer(registry, port, addr)
    log.info("metrics endpoint http://%s:%d/metrics", addr, srv.port)
    return srv
