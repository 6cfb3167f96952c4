"""PageServer in-process: every request kind, priorities, sharding, LSN waits,
malformed frames, latency overlap, fault injection, stop/start."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from waiting import wait_for

from shards._errors import ShardsError
from shards._protocol import (
    DbSizeRequest,
    GetPagesRequest,
    RelSizeRequest,
    Reply,
    Request,
    RequestClass,
    SlruKind,
    SlruSegmentRequest,
    Status,
    decode_reply,
    encode_request,
)
from shards._server import PageServer, ServerFaults
from shards._shardmap import shard_for
from shards._store import PageStore
from shards._types import BLCKSZ, RelTag

pytestmark = pytest.mark.timeout(30)
REL = RelTag(1663, 16384, 16397)
NORMAL, PREFETCH, BACKGROUND = RequestClass.NORMAL, RequestClass.PREFETCH, RequestClass.BACKGROUND


def page(rel: RelTag, blkno: int, lsn: int) -> bytes:
    return (f"{rel}:{blkno}@{lsn};".encode() * BLCKSZ)[:BLCKSZ]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PageStore]:
    with PageStore(tmp_path / "s", map_size=1 << 28) as s:
        with s.batch() as b:
            b.set_nblocks(REL, 10, 8)
            for i in range(8):
                b.put_page(REL, i, 10, page(REL, i, 10))
            b.put_page(REL, 3, 20, page(REL, 3, 20))
            b.set_db_size(16384, 10, 12345)
            b.put_slru(SlruKind.CLOG, 2, 10, b"\x55" * (2 * BLCKSZ))
        yield s


class Client:
    """A DEALER connection with helpers; owned by the test thread."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.next_id = 0

    def get(self, blocks: list[int], lsn: int = 100, nms: int = 0, cls: RequestClass = NORMAL,
            rel: RelTag = REL) -> GetPagesRequest:
        self.next_id += 1
        return GetPagesRequest(self.next_id, 0, cls, lsn, nms, rel, tuple(blocks))

    def send(self, req: Request) -> None:
        self.sock.send_multipart(encode_request(req))

    def recv_frames(self, timeout: float = 5.0) -> list[bytes] | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return self.sock.recv_multipart()

    def recv(self, timeout: float = 5.0) -> Reply:
        frames = self.recv_frames(timeout)
        assert frames is not None, "no reply"
        return decode_reply(frames)

    def call(self, req: Request) -> Reply:
        self.send(req)
        reply = self.recv()
        assert (reply.id, reply.kind) == (req.id, req.kind)
        return reply

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def settled_stats(srv: PageServer, ready: Callable[[dict], bool]) -> dict:
    """Stats once ``ready(stats)`` holds, or after 5 s (the caller's asserts then say
    what is off): the loop merges an iteration's counters right after its replies go
    out, so a reply can arrive before its counters do."""
    wait_for(lambda: ready(srv.stats()), timeout=5.0)
    return srv.stats()


@pytest.fixture
def serve(store: PageStore) -> Iterator:
    made: list[tuple[PageServer, Client]] = []

    def make(**kw) -> tuple[PageServer, Client]:
        srv = PageServer(store, **kw).start()
        cl = Client(srv.endpoint)
        made.append((srv, cl))
        return srv, cl

    yield make
    for srv, cl in made:
        cl.close()
        srv.stop()


def test_get_pages_versions_and_errors(serve) -> None:
    srv, c = serve()
    assert srv.endpoint.startswith("tcp://127.0.0.1:") and not srv.endpoint.endswith(":0")
    r = c.call(c.get([3, 0, 7], lsn=15))
    assert r.status == Status.OK and r.blocks == (3, 0, 7)
    assert r.pages == (page(REL, 3, 10), page(REL, 0, 10), page(REL, 7, 10))
    assert c.call(c.get([3], lsn=25)).pages == (page(REL, 3, 20),)
    r = c.call(c.get([8], lsn=25))
    assert r.status == Status.NOT_FOUND and "block 8" in r.reason and "beyond" in r.reason
    r = c.call(c.get([0], lsn=5))
    assert r.status == Status.NOT_FOUND and "does not exist" in r.reason
    r = c.call(c.get([0], rel=RelTag(1663, 16384, 99)))
    assert r.status == Status.NOT_FOUND
    st = settled_stats(srv, lambda st: st["errors"].get("NOT_FOUND") == 3)  # the last one
    assert st["requests"]["GET_PAGES"] == 5 and st["classes"]["NORMAL"] == 5
    assert st["pages_served"] == 4 and st["errors"]["NOT_FOUND"] == 3


def test_rel_size_db_size_slru(serve) -> None:
    _, c = serve()
    r = c.call(RelSizeRequest(1, 0, NORMAL, 15, 0, REL, False))
    assert (r.status, r.exists, r.nblocks) == (Status.OK, True, 8)
    r = c.call(RelSizeRequest(2, 0, NORMAL, 5, 0, REL, True))
    assert (r.status, r.exists, r.nblocks) == (Status.OK, False, 0)
    assert c.call(RelSizeRequest(3, 0, NORMAL, 5, 0, REL, False)).status == Status.NOT_FOUND
    r = c.call(DbSizeRequest(4, 0, NORMAL, 15, 0, 16384))
    assert (r.status, r.size) == (Status.OK, 12345)
    assert c.call(DbSizeRequest(5, 0, NORMAL, 15, 0, 1)).status == Status.NOT_FOUND
    r = c.call(SlruSegmentRequest(6, 0, NORMAL, 15, 0, SlruKind.CLOG, 2))
    assert (r.status, r.segment) == (Status.OK, b"\x55" * (2 * BLCKSZ))
    r = c.call(SlruSegmentRequest(7, 0, NORMAL, 15, 0, SlruKind.CLOG, 3))
    assert r.status == Status.NOT_FOUND


def test_sharding(serve) -> None:
    owners = {b: shard_for(REL, b, 2, 2) for b in range(8)}
    srv1, c = serve(shard=1, shard_count=2, stripe_size=2)
    mine = [b for b, s in owners.items() if s == 1]
    other = [b for b, s in owners.items() if s == 0]
    assert mine and other
    assert c.call(c.get(mine)).status == Status.OK
    r = c.call(c.get(mine + other[:1]))
    assert r.status == Status.INVALID_REQUEST and f"block {other[0]}" in r.reason
    for req in (RelSizeRequest(50, 0, NORMAL, 15, 0, REL, True),
                DbSizeRequest(51, 0, NORMAL, 15, 0, 16384),
                SlruSegmentRequest(52, 0, NORMAL, 15, 0, SlruKind.CLOG, 2)):
        r = c.call(req)
        assert r.status == Status.INVALID_REQUEST and "shard 0" in r.reason


@contextlib.contextmanager
def _held_loop(srv: PageServer, c: Any) -> Iterator[dict[str, bool]]:
    """Hold the server loop in a batch (its store reader waits on the gate) after
    sending request 1, so that what the test sends next is drained as one batch."""
    orig = srv.store.reader
    gate = {"hold": True}

    def slow_reader():
        while gate["hold"]:
            time.sleep(0.01)
        return orig()

    srv.store.reader = slow_reader  # type: ignore[method-assign]
    try:
        c.send(c.get([0]))  # the loop takes this one and blocks in slow_reader
        time.sleep(0.1)
        yield gate
    finally:
        gate["hold"] = False
        del srv.store.reader


def test_priorities_within_a_drained_batch(serve) -> None:
    srv, c = serve(latency=0.0)
    # freeze the loop in a long batch window: queue prefetches, then normals, then let it run
    with _held_loop(srv, c) as gate:
        order = []
        for cls in (BACKGROUND, PREFETCH, PREFETCH, NORMAL, NORMAL):
            req = c.get([1], cls=cls)
            order.append((req.id, cls))
            c.send(req)
        time.sleep(0.2)
        gate["hold"] = False
        first = c.recv()
        assert first.id == 1
        got = [c.recv().id for _ in order]
        by_id = dict(order)
        classes = [by_id[i] for i in got]
        assert classes == [NORMAL, NORMAL, PREFETCH, PREFETCH, BACKGROUND]


def test_fewest_pages_first_within_a_class(serve) -> None:
    srv, c = serve(latency=0.0)
    with _held_loop(srv, c) as gate:
        sent = []
        for cls, blocks in ((NORMAL, [1, 2, 3]), (PREFETCH, [3]), (NORMAL, [4]), (NORMAL, [5, 6]),
                            (NORMAL, [7])):
            req = c.get(blocks, cls=cls)
            sent.append((req.id, (cls, len(blocks))))
            c.send(req)
        time.sleep(0.2)
        gate["hold"] = False
        assert c.recv().id == 1
        by_id = dict(sent)
        got = [by_id[c.recv().id] for _ in sent]
        assert got == [(NORMAL, 1), (NORMAL, 1), (NORMAL, 2), (NORMAL, 3), (PREFETCH, 1)]


def test_lsn_wait_then_error_without_blocking_others(serve, store: PageStore) -> None:
    srv, c = serve(lsn_wait=1.0)
    t0 = time.monotonic()
    waiting = c.get([0], lsn=500, nms=500)
    c.send(waiting)
    time.sleep(0.05)
    quick = c.get([1], lsn=15)
    c.send(quick)
    # the quick one is served while the other is parked: its reply comes first (by
    # order, not by a time limit a loaded machine could miss)
    first, r = c.recv(), c.recv()
    assert first.id == quick.id and first.status == Status.OK
    assert r.id == waiting.id and r.status == Status.INTERNAL_ERROR
    assert "has not reached not_modified_since 500" in r.reason
    assert time.monotonic() - t0 >= 1.0
    # the store catches up while a request is parked: it is then served
    slow = c.get([0], lsn=600, nms=600)
    c.send(slow)
    time.sleep(0.05)
    store.set_last_lsn(600)
    r = c.recv()
    assert r.id == slow.id and r.status == Status.OK and r.pages == (page(REL, 0, 10),)


def test_slow_down_when_queue_full(serve) -> None:
    srv, c = serve(lsn_wait=5.0, max_queue=2)
    parked = [c.get([0], lsn=900, nms=900) for _ in range(2)]
    for req in parked:
        c.send(req)
    time.sleep(0.1)
    r = c.call(c.get([1], cls=PREFETCH))
    assert r.status == Status.SLOW_DOWN and "queue is full" in r.reason
    assert settled_stats(srv, lambda st: st["parked"] == 2)["parked"] == 2


def test_malformed_frames_survived(serve) -> None:
    srv, c = serve()
    good = encode_request(c.get([0]))[0]
    c.sock.send(b"junk")                                     # no readable id: dropped
    c.sock.send_multipart([good, b"extra"])                  # two frames: answered
    bad_kind = bytearray(good)
    bad_kind[1] = 77
    c.sock.send(bytes(bad_kind))                             # unknown kind: answered
    c.sock.send(good[:40])                                   # truncated GetPages: answered
    replies = [c.recv() for _ in range(3)]
    assert all(r.status == Status.INVALID_REQUEST for r in replies)
    assert all(r.id == 1 and "malformed" in r.reason for r in replies)
    assert c.recv_frames(0.1) is None
    assert c.call(c.get([0], lsn=15)).status == Status.OK
    st = settled_stats(srv, lambda st: st["requests"].get("GET_PAGES") == 1)  # the last one
    assert st["malformed_dropped"] == 1 and st["malformed_answered"] == 3


def test_latency_overlaps(serve) -> None:
    _, c = serve(latency=0.05)
    t0 = time.monotonic()
    reqs = [c.get([i % 8], lsn=15) for i in range(20)]
    for req in reqs:
        c.send(req)
    got = {c.recv().id for _ in reqs}
    elapsed = time.monotonic() - t0
    assert got == {r.id for r in reqs}
    assert 0.05 <= elapsed < 0.5, elapsed  # serialised would be 1.0 s


def test_sub_millisecond_latency_waits_without_spinning(serve) -> None:
    # zmq's poll counts whole milliseconds: a reply due in under one used to make the
    # loop spin with poll(0), a core per server under the bench's 0.5 ms latency
    srv, c = serve(latency=0.0008)
    c.call(c.get([0], lsn=15))  # warm-up
    clock = time.pthread_getcpuclockid(srv._thread.ident)
    cpu0, t0 = time.clock_gettime(clock), time.monotonic()
    for i in range(40):
        assert c.call(c.get([i % 8], lsn=15)).status == Status.OK
    cpu, wall = time.clock_gettime(clock) - cpu0, time.monotonic() - t0
    assert wall >= 40 * 0.0008  # every reply waited out its latency
    assert cpu < 0.5 * wall, (cpu, wall)  # ... asleep, not spinning


def test_faults(serve, store: PageStore) -> None:
    faults = ServerFaults(seed=1)
    srv, c = serve(faults=faults)
    faults.drop_rate = 1.0
    c.send(c.get([0]))
    assert c.recv_frames(0.2) is None
    faults.drop_rate = 0.0
    faults.error_status = Status.SLOW_DOWN
    r = c.call(c.get([0]))
    assert r.status == Status.SLOW_DOWN and r.reason == "injected fault"
    faults.error_status = None
    faults.corrupt_rate = 1.0
    r = c.call(c.get([2], lsn=15))
    assert r.status == Status.OK and r.pages[0] != page(REL, 2, 10)
    faults.corrupt_rate = 0.0
    faults.wrong_block_rate = 1.0
    r = c.call(c.get([2], lsn=15))
    assert r.blocks == (3,) and r.pages == (page(REL, 3, 10),)
    faults.wrong_block_rate = 0.0
    faults.garbage_rate = 1.0
    c.send(c.get([0]))
    assert c.recv_frames() is not None  # something arrived, whatever it is
    faults.garbage_rate = 0.0
    assert c.call(c.get([4], lsn=15)).pages == (page(REL, 4, 10),)
    want = {"dropped": 1, "error_status": 1, "corrupt": 1, "wrong_block": 1, "garbage": 1}
    assert settled_stats(srv, lambda st: st["faults"] == want)["faults"] == want


def test_lifecycle(store: PageStore) -> None:
    srv = PageServer(store)
    with pytest.raises(ShardsError, match="not started"):
        _ = srv.endpoint
    srv.start()
    t0 = time.monotonic()
    srv.stop()
    srv.stop()
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(ShardsError, match="cannot start"):
        srv.start()
    with PageServer(store) as srv2:
        with pytest.raises(ShardsError, match="cannot bind"):
            PageServer(store, bind=srv2.endpoint).start()
    with pytest.raises(ValueError, match="shard"):
        PageServer(store, shard=2, shard_count=2)
    with pytest.raises(ValueError, match="latency"):
        PageServer(store, latency=-1)


def test_pages_put_one_by_one_are_served(tmp_path: Path) -> None:
    """PageStore.put_page extends the relation, so a server finds what was put."""
    with PageStore(tmp_path / "one", map_size=1 << 28) as st:
        for b in range(4):
            st.put_page(REL, b, 100, page(REL, b, 100))
        with PageServer(st) as srv:
            c = Client(srv.endpoint)
            try:
                r = c.call(c.get([0, 3], lsn=100))
                assert r.status == Status.OK, r
                assert r.pages == (page(REL, 0, 100), page(REL, 3, 100))
                r = c.call(RelSizeRequest(99, 0, NORMAL, 100, 0, REL, False))
                assert r.status == Status.OK and r.nblocks == 4
                r = c.call(c.get([4], lsn=100))
                assert r.status == Status.NOT_FOUND and "beyond" in r.reason
            finally:
                c.close()


def test_a_store_of_another_layout_is_refused(tmp_path: Path) -> None:
    """The trial's mistake: shard 0's store served as shard 1 answered "not found" for
    pages it holds. A store whose meta records its layout must be served with it."""
    with PageStore(tmp_path / "m", map_size=1 << 28) as st:
        st.set_meta({"shard": 0, "shard_count": 2, "stripe_size": 16, "source": "synth"})
        for kw, given in ((dict(shard=1, shard_count=2, stripe_size=16), "shard=1"),
                          (dict(shard=0, shard_count=3, stripe_size=16), "shard_count=3"),
                          (dict(shard=0, shard_count=2, stripe_size=2048), "stripe_size=2048"),
                          (dict(), "shard_count=1")):
            with pytest.raises(ShardsError, match="shard=0, shard_count=2, stripe_size=16") \
                    as ei:
                PageServer(st, **kw)
            assert isinstance(ei.value, ValueError) and given in str(ei.value)
            assert str(st.path) in str(ei.value)
        PageServer(st, shard=0, shard_count=2, stripe_size=16)  # its own layout: fine
        # one shard on both sides: the stripe size maps nothing and is not compared
        st.set_meta({"shard": 0, "shard_count": 1, "stripe_size": 16})
        PageServer(st)
        with pytest.raises(ShardsError, match="shard_count=1"):
            PageServer(st, shard=1, shard_count=2, stripe_size=16)
        st.set_meta({"shard_count": 2})  # only what is recorded is compared
        PageServer(st, shard=1, shard_count=2, stripe_size=8)


def test_a_generated_shard_served_as_another_is_refused(tmp_path: Path) -> None:
    from shards import generate_store, open_shard_store

    generate_store(tmp_path / "g", 2, 16, rels=1, nblocks=32, lsns=(100,))
    with open_shard_store(tmp_path / "g", 0, readonly=True) as st:
        with pytest.raises(ShardsError, match="holds shard=0, shard_count=2, stripe_size=16"
                           ".*shard=1, shard_count=2, stripe_size=16"):
            PageServer(st, shard=1, shard_count=2, stripe_size=16)


def test_ipc_path_of_a_live_server_is_refused_like_a_tcp_port(store: PageStore,
                                                               tmp_path: Path) -> None:
    """zmq's ipc bind replaces the socket file: a second server would silently take the
    address over. It is refused instead, naming the address; the first keeps serving."""
    sock_file = tmp_path / "srv.sock"
    ep = f"ipc://{sock_file}"
    with PageServer(store, bind=ep) as first:
        second = PageServer(store, bind=ep)
        with pytest.raises(ShardsError, match="cannot bind .*srv.sock: Address already in use"):
            second.start()
        second.stop()  # idempotent on a server that never started
        cl = Client(ep)
        try:
            assert cl.call(cl.get([1], lsn=10)).pages == (page(REL, 1, 10),)
        finally:
            cl.close()
        assert settled_stats(first, lambda st: st["requests"])["requests"] == {"GET_PAGES": 1}
    assert not sock_file.exists()  # removed once its socket is closed


def test_stale_ipc_socket_file_is_bound_over_and_removed(store: PageStore,
                                                         tmp_path: Path) -> None:
    import socket

    sock_file = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_file))  # a socket file nobody listens on (a server that died)
    dead.close()
    assert sock_file.is_socket()
    ep = f"ipc://{sock_file}"
    with PageServer(store, bind=ep):
        cl = Client(ep)
        try:
            assert cl.call(cl.get([2], lsn=10)).pages == (page(REL, 2, 10),)
        finally:
            cl.close()
    assert not sock_file.exists()


def test_stop_leaves_a_regular_file_at_an_ipc_path_alone(store: PageStore,
                                                         tmp_path: Path) -> None:
    """Only a socket file is removed: if something replaced it meanwhile, it stays."""
    sock_file = tmp_path / "x.sock"
    with PageServer(store, bind=f"ipc://{sock_file}"):
        sock_file.unlink()
        sock_file.write_text("not a socket")
    assert sock_file.read_text() == "not a socket"
