"""The page server's Prometheus endpoint: scraped over HTTP, figures move with reads."""

from __future__ import annotations

import pytest
import zmq
from promtext import scrape, value
from waiting import wait_for

import shards
from shards.protocol import GetPagesRequest, RequestClass, Status, decode_reply, encode_request

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def server(tmp_path):
    info = shards.generate_store(tmp_path, 1, rels=1, nblocks=64)
    with shards.open_shard_store(tmp_path, 0, readonly=True) as store, \
            shards.PageServer(store, metrics_port=0) as srv:
        yield srv, info


def ask(endpoint: str, req: GetPagesRequest) -> Status:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(endpoint)
        s.send_multipart(encode_request(req))
        assert s.poll(5000), "no reply"
        return decode_reply(s.recv_multipart()).status
    finally:
        s.close(0)
        ctx.term()


def test_scrape_moves_with_reads(server):
    srv, info = server
    port = srv.metrics.port
    assert port > 0
    before = scrape(port)
    assert value(before, "pagecomm_server_pages_served_total", shard="0") == 0
    assert value(before, "pagecomm_server_errors_total", status="not_found") == 0
    rel, lsn = info["rels"][0], info["lsns"][-1]
    ok = GetPagesRequest(1, 0, RequestClass.NORMAL, lsn, lsn, rel, (0, 1, 2))
    assert ask(srv.endpoint, ok) == Status.OK
    missing = GetPagesRequest(2, 0, RequestClass.PREFETCH, lsn, lsn, rel, (10_000,))
    assert ask(srv.endpoint, missing) == Status.NOT_FOUND
    # the server folds an iteration's counters into its totals after sending that
    # iteration's replies, so a scrape right after a reply may be one iteration behind
    assert wait_for(lambda: value(scrape(port), "pagecomm_server_errors_total",
                                  status="not_found") == 1, timeout=5.0)
    after = scrape(port)
    assert value(after, "pagecomm_server_pages_served_total", shard="0") == 3
    assert value(after, "pagecomm_server_requests_total", kind="get_pages") == 2
    assert value(after, "pagecomm_server_requests_by_class_total", **{"class": "normal"}) == 1
    assert value(after, "pagecomm_server_requests_by_class_total", **{"class": "prefetch"}) == 1
    assert value(after, "pagecomm_server_errors_total", status="not_found") == 1
    assert value(after, "pagecomm_server_malformed_total", outcome="dropped") == 0
    assert value(after, "pagecomm_server_parked") == 0


def test_stop_releases_the_port(tmp_path):
    shards.generate_store(tmp_path, 1, rels=1, nblocks=4)
    with shards.open_shard_store(tmp_path, 0, readonly=True) as store:
        srv = shards.PageServer(store, metrics_port=0).start()
        port = srv.metrics.port
        srv.stop()
        srv.stop()  # idempotent
        assert srv.metrics is None
        # the port is free again: a second server can take it
        with shards.PageServer(store, metrics_port=port) as again:
            assert again.metrics.port == port
            scrape(port)


def test_no_metrics_unless_asked(tmp_path):
    shards.generate_store(tmp_path, 1, rels=1, nblocks=4)
    with shards.open_shard_store(tmp_path, 0, readonly=True) as store, \
            shards.PageServer(store) as srv:
        assert srv.metrics is None
    with pytest.raises(ValueError, match="metrics_port"):
        shards.PageServer(store, metrics_port=70000)
