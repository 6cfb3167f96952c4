"""Misbehaving page servers (fault hooks of an in-process PageServer): a wrong or
corrupted page is an error, never data; stuck requests are visible."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import comm
from shards import PageServer, ServerFaults, generate_store, open_shard_store, synth_page
from shards.protocol import Status

pytestmark = [pytest.mark.servers, pytest.mark.timeout(60)]
LSN = 0x1000000


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, comm.RelTag]:
    d = tmp_path_factory.mktemp("faults") / "store"
    desc = generate_store(d, 1, rels=1, nblocks=64, lsns=(LSN,))
    return d, desc["rels"][0]


@pytest.fixture
def server(store) -> Iterator[PageServer]:
    st = open_shard_store(store[0], 0, readonly=True)
    srv = PageServer(st, faults=ServerFaults(seed=1)).start()
    yield srv
    srv.stop()
    st.close()


def test_wrong_block_is_never_delivered(server, store):
    server.faults.wrong_block_rate = 1.0
    with comm.Communicator([server.endpoint]) as c, c.backend() as be:
        with pytest.raises(comm.ShardUnavailable, match="blocks"):
            be.get_page(store[1], 3, LSN, timeout=2)
        assert c.stats()["shards"][0]["bad_replies"] >= 1


def test_corrupted_page_fails_checksum_verification(server, store):
    server.faults.corrupt_rate = 1.0
    cfg = comm.CommConfig(verify_checksums=True)
    with comm.Communicator([server.endpoint], config=cfg) as c, c.backend() as be:
        with pytest.raises(comm.ShardUnavailable, match="checksum"):
            be.get_page(store[1], 3, LSN, timeout=2)
    server.faults.corrupt_rate = 0.0
    with comm.Communicator([server.endpoint], config=cfg) as c, c.backend() as be:
        assert be.get_page(store[1], 3, LSN) == synth_page(store[1], 3, LSN)


def test_internal_error_is_not_retried(server, store):
    server.faults.error_status = Status.INTERNAL_ERROR
    with comm.Communicator([server.endpoint]) as c, c.backend() as be:
        with pytest.raises(comm.ServerError):
            be.get_page(store[1], 3, LSN, timeout=5)
        assert sum(s["retries"] for s in c.stats()["shards"]) == 0


def test_dropped_request_is_retried_with_a_new_attempt(server, store):
    server.faults.drop_rate = 0.5  # every other request vanishes
    cfg = comm.CommConfig(attempt_timeout=0.1)
    with comm.Communicator([server.endpoint], config=cfg) as c, c.backend() as be:
        for b in range(20):
            assert be.get_page(store[1], b, LSN, timeout=10) == synth_page(store[1], b, LSN)
        assert sum(s["retries"] for s in c.stats()["shards"]) > 0


def test_stuck_request_is_logged_and_listed(server, store, caplog):
    server.faults.drop_rate = 1.0
    cfg = comm.CommConfig(stuck_log_after=0.1, attempt_timeout=60)
    with comm.Communicator([server.endpoint], config=cfg) as c, c.backend() as be:
        with caplog.at_level(logging.WARNING, logger="comm._worker"):
            with pytest.raises(comm.RequestTimeout):
                be.prefetch(store[1], [7], LSN)  # nobody waits: stays in flight
                time.sleep(0.3)
                stuck = c.dump_inflight(older_than=0.1)
                assert stuck and stuck[0]["blocks"] == [7] and stuck[0]["age_s"] >= 0.1
                be.get_page(store[1], 9, LSN, timeout=0.2)
        assert any("stuck" in r.getMessage() and "'blocks': [7]" in r.getMessage()
                   for r in caplog.records)
