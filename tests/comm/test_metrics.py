"""comm's metrics: the lock-free latency recorder, the collector, and a real scrape over
HTTP of a Communicator reading from an in-process page server."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from promtext import scrape, value

import comm
import shards
from comm._metrics import (
    BUCKETS,
    CommCollector,
    LatencyRecorder,
    merge_snapshots,
    start_metrics_server,
)
from shards.protocol import Kind, RequestClass

pytestmark = pytest.mark.timeout(30)
GET, NORMAL, PREFETCH = int(Kind.GET_PAGES), int(RequestClass.NORMAL), int(RequestClass.PREFETCH)


def test_latency_recorder_buckets_and_snapshot():
    r = LatencyRecorder()
    assert r.snapshot() == {}
    r.observe(GET, NORMAL, 0.00005)  # on a bound: that bucket ("le")
    r.observe(GET, NORMAL, 0.0003)
    r.observe(GET, NORMAL, 99.0)     # beyond the last bound: +Inf
    r.observe(GET, PREFETCH, 0.002)
    snap = r.snapshot()
    assert set(snap) == {(GET, NORMAL), (GET, PREFETCH)}
    row, total, n = snap[(GET, NORMAL)]
    assert len(row) == len(BUCKETS) + 1 and n == 3 == sum(row)
    assert total == pytest.approx(99.00035)
    assert row[0] == 1 and row[BUCKETS.index(0.0005)] == 1 and row[-1] == 1
    merged = merge_snapshots(snap, r.snapshot())
    assert merged[(GET, NORMAL)][2] == 6 and merged[(GET, PREFETCH)][1] == pytest.approx(0.004)
    assert snap[(GET, NORMAL)][2] == 3  # merging copies, never aliases
    r.observe(99, 7, 0.1)  # out-of-range labels must not raise on the hot path
    assert sum(v[2] for v in r.snapshot().values()) == 5


class _StubComm:
    def __init__(self) -> None:
        self.rec = LatencyRecorder()

    def stats(self):
        shard = {"shard": 0, "endpoint": "tcp://x:1", "threads": 1, "connections": 1,
                 "queued": 2, "inflight": 3, "sent": 5, "completed": 4, "errors": 1,
                 "timeouts": 0, "retries": 1, "stale_replies": 1, "bad_replies": 0,
                 "resets": 0, "pages": 40, "reconnects": 1, "coalesced": 6, "splits": 1}
        return {"shards": [shard], "backends": 2, "slots_in_use": 1, "connections": 1,
                "map_generation": 0, "uptime_s": 1.5,
                "prefetch": {"issued": 7, "hits": 3, "buffered": 4, "capacity": 64}}

    def _latency_snapshot(self):
        return self.rec.snapshot()


def test_collector_families():
    stub = _StubComm()
    stub.rec.observe(GET, NORMAL, 0.0003)
    stub.rec.observe(GET, NORMAL, 0.02)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(CommCollector(stub))
    text = generate_latest(reg).decode()
    hist = {"kind": "get_pages", "class": "normal"}
    assert value(text, "pagecomm_request_seconds_count", **hist) == 2
    assert value(text, "pagecomm_request_seconds_bucket", le="0.0005", **hist) == 1
    assert value(text, "pagecomm_request_seconds_bucket", le="+Inf", **hist) == 2
    assert value(text, "pagecomm_request_seconds_sum", **hist) == pytest.approx(0.0203)
    assert value(text, "pagecomm_pages_total", shard="0") == 40
    assert value(text, "pagecomm_reconnects_total", shard="0") == 1
    assert value(text, "pagecomm_coalesced_total", shard="0") == 6
    assert value(text, "pagecomm_batch_splits_total", shard="0") == 1
    assert value(text, "pagecomm_queue_depth", shard="0") == 2
    assert value(text, "pagecomm_inflight", shard="0") == 3
    assert value(text, "pagecomm_stale_replies_total") == 1
    assert value(text, "pagecomm_prefetch_total", event="issued") == 7
    assert value(text, "pagecomm_prefetch_total", event="wasted") == 0
    assert value(text, "pagecomm_slots_in_use") == 1
    assert value(text, "pagecomm_prefetch_buffered") == 4
    assert value(text, "pagecomm_shard_info", shard="0", endpoint="tcp://x:1") == 1


@pytest.fixture
def page_server(tmp_path):
    info = shards.generate_store(tmp_path, 1, rels=1, nblocks=64)
    with shards.open_shard_store(tmp_path, 0, readonly=True) as store, \
            shards.PageServer(store) as srv:
        yield srv, info


def test_scrape_moves_when_pages_are_read(page_server):
    srv, info = page_server
    rel, lsn = info["rels"][0], info["lsns"][-1]
    cfg = comm.CommConfig(metrics_port=0, request_timeout=5)
    with comm.Communicator([srv.endpoint], config=cfg) as c:
        own = getattr(c, "_metrics", None)  # started by the Communicator once it is wired
        ms = own if own is not None else start_metrics_server(c, 0)
        try:
            assert ms.port > 0
            assert c.metrics_port == (ms.port if own is not None else None)
            hist = {"kind": "get_pages", "class": "normal"}
            with c.backend() as be:
                be.get_page(rel, 0, lsn=lsn)  # opens the connection: every series exists
                before = scrape(ms.port)
                pages0 = value(before, "pagecomm_pages_total", shard="0")
                count0 = value(before, "pagecomm_request_seconds_count", **hist)
                assert be.get_pages(rel, list(range(1, 33)), lsn=lsn)
                be.get_page(rel, 40, lsn=lsn)
            after = scrape(ms.port)
            assert value(after, "pagecomm_pages_total", shard="0") >= pages0 + 33
            assert value(after, "pagecomm_request_seconds_count", **hist) >= count0 + 2
            assert value(after, "pagecomm_completed_total", shard="0") >= 2
            assert value(after, "pagecomm_inflight", shard="0") == 0
            assert value(after, "pagecomm_slots_in_use") == 0
            assert value(after, "pagecomm_timeouts_total", shard="0") == 0
        finally:
            if own is None:
                ms.stop()
                ms.stop()  # idempotent
    if own is not None:  # the communicator stops its endpoint on close()
        with pytest.raises(OSError):
            scrape(ms.port)


def test_metrics_listen_where_configured(page_server):
    srv, _ = page_server
    cfg = comm.CommConfig(metrics_port=0, metrics_addr="127.0.0.2", request_timeout=5)
    with comm.Communicator([srv.endpoint], config=cfg) as c:
        ms = c._metrics
        assert ms is not None and ms.addr == "127.0.0.2"
        assert "pagecomm_slots_in_use" in scrape(ms.port, host="127.0.0.2")
        with pytest.raises(OSError):
            scrape(ms.port)  # not on 127.0.0.1


def test_an_address_not_on_this_host_is_a_config_error(page_server):
    srv, _ = page_server
    cfg = comm.CommConfig(metrics_port=0, metrics_addr="192.0.2.1")  # TEST-NET-1
    with pytest.raises(comm.ConfigError, match="COMM_METRICS_ADDR"):
        comm.Communicator([srv.endpoint], config=cfg)
    with pytest.raises(comm.ConfigError, match="COMM_METRICS_ADDR"):
        comm.CommConfig(metrics_addr=5)  # type: ignore[arg-type]


def test_bad_port_is_a_config_error():
    with pytest.raises(comm.ConfigError, match="metrics port"):
        start_metrics_server(_StubComm(), -1)
