"""Prometheus metrics of a PageServer, computed at scrape time.

Theory of operation
-------------------
The server loop already counts everything it does into a per-iteration Counter
that it folds into ``PageServer._totals`` under its lock once per loop; nothing
is added to the per-request path. A scrape runs :class:`ServerCollector` in the
HTTP server's thread and turns ``PageServer.stats()`` into metric families. Every
known kind, class and error status is exported from the start (at 0), so alert
rules see a series before the first error happens. Each server has its own
CollectorRegistry: several servers in one process (tests, LocalCluster) never
collide.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._errors import InvalidArgument
from ._protocol import Kind, RequestClass, Status

log = logging.getLogger(__name__)


class ServerCollector(Collector):
    """Reads one PageServer's ``stats()`` at scrape time."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def collect(self) -> Iterator[Metric]:
        try:
            st = self._server.stats()
        except Exception as e:  # never turn a scrape into a 500 with a traceback
            log.debug("metrics scrape failed: %s", e)
            return
        shard = str(self._server.shard)
        yield _by_label("pagecomm_server_requests_total", "Requests received, by kind",
                        "kind", [k.name for k in Kind], st.get("requests", {}), shard)
        yield _by_label("pagecomm_server_requests_by_class_total",
                        "Requests received, by class (normal = foreground)", "class",
                        [c.name for c in RequestClass], st.get("classes", {}), shard)
        yield _by_label("pagecomm_server_errors_total", "Replies with a non-OK status",
                        "status", [s.name for s in Status if s != Status.OK],
                        st.get("errors", {}), shard)
        yield _by_label("pagecomm_server_faults_total", "Injected faults (tests only)",
                        "fault", [], st.get("faults", {}), shard)
        c = CounterMetricFamily("pagecomm_server_malformed_total",
                                "Requests that did not decode: answered INVALID_REQUEST, or "
                                "dropped (no readable request id)",
                                labels=["shard", "outcome"])
        c.add_metric([shard, "answered"], st.get("malformed_answered", 0))
        c.add_metric([shard, "dropped"], st.get("malformed_dropped", 0))
        yield c
        for name, doc, key in (
                ("pagecomm_server_pages_served_total", "Pages sent in OK replies",
                 "pages_served"),
                ("pagecomm_server_send_errors_total",
                 "Replies ZeroMQ refused to send (client gone or its queue full)",
                 "send_errors")):
            c = CounterMetricFamily(name, doc, labels=["shard"])
            c.add_metric([shard], st.get(key, 0))
            yield c
        for name, doc, key in (
                ("pagecomm_server_parked", "Requests waiting for the store to reach their "
                 "not_modified_since LSN", "parked"),
                ("pagecomm_server_delayed", "Replies held back by injected latency",
                 "delayed")):
            g = GaugeMetricFamily(name, doc, labels=["shard"])
            g.add_metric([shard], st.get(key, 0))
            yield g


def _by_label(name: str, doc: str, label: str, known: list[str], got: dict[str, int],
              shard: str) -> CounterMetricFamily:
    c = CounterMetricFamily(name, doc, labels=["shard", label])
    for key in dict.fromkeys([*known, *sorted(got)]):  # known ones first, at 0 if unseen
        c.add_metric([shard, key.lower()], got.get(key, 0))
    return c


class ServerMetrics:
    """The HTTP endpoint of one PageServer's metrics; ``stop()`` is idempotent."""

    def __init__(self, server: Any, port: int, addr: str = "127.0.0.1") -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise InvalidArgument(f"metrics port must be an integer in 0..65535, got {port!r}")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServerCollector(server))
        started = start_http_server(port, addr, registry=self.registry)
        if not isinstance(started, tuple):  # prometheus_client < 0.20 returns nothing
            raise RuntimeError("prometheus_client >= 0.20 is required")
        self._httpd, self._thread = started
        self.addr, self.port = addr, int(self._httpd.server_port)
        self._thread.name = f"page-server-metrics-{self.port}"
        self._lock = threading.Lock()  # guards _stopped
        self._stopped = False
        log.info("page server shard %s metrics at http://%s:%d/metrics", server.shard, addr,
                 self.port)

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()  # releases the port at once
        self._thread.join(5)

    def __enter__(self) -> ServerMetrics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
