"""A page server survives fuzzing of its socket (random, truncated, mutated, oversized
and wrong-version frames) and keeps answering valid clients."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import zmq

import comm
from shards import LocalCluster, generate_store
from shards._synth import synth_pages
from shards.protocol import MAX_MESSAGE_BYTES, GetPagesRequest, RequestClass, encode_request

pytestmark = [pytest.mark.servers, pytest.mark.timeout(90)]
LSN = 0x1000000


def mutations(rnd: random.Random, good: bytes):
    for _ in range(1500):
        pick = rnd.randrange(7)
        if pick == 0:
            yield [rnd.randbytes(rnd.randrange(0, 80))]
        elif pick == 1:
            yield [good[:rnd.randrange(len(good))]]
        elif pick == 2:
            b = bytearray(good)
            for _ in range(rnd.randrange(1, 6)):
                b[rnd.randrange(len(b))] = rnd.randrange(256)
            yield [bytes(b)]
        elif pick == 3:
            yield [bytes([rnd.choice((0, 2, 9, 255))]) + good[1:]]  # wrong version
        elif pick == 4:
            yield [good] * rnd.randrange(2, 40)  # too many frames
        elif pick == 5:
            yield [good + rnd.randbytes(rnd.randrange(1, 64))]  # trailing bytes
        else:
            yield [b""]


def test_server_survives_socket_fuzzing(tmp_path: Path) -> None:
    desc = generate_store(tmp_path / "store", 1, rels=1, nblocks=8, lsns=(LSN,))
    rel = desc["rels"][0]
    good = encode_request(GetPagesRequest(1, 0, RequestClass.NORMAL, LSN, LSN, rel, (1, 2)))[0]
    with LocalCluster(tmp_path / "store") as cluster:
        ctx = zmq.Context()
        try:
            fuzz = ctx.socket(zmq.DEALER)
            fuzz.setsockopt(zmq.LINGER, 0)
            fuzz.connect(cluster.endpoints[0])
            for frames in mutations(random.Random(42), good):
                fuzz.send_multipart(frames)
            big = ctx.socket(zmq.DEALER)  # over ZMQ_MAXMSGSIZE: the server drops this peer
            big.setsockopt(zmq.LINGER, 0)
            big.connect(cluster.endpoints[0])
            big.send(b"\x01" + b"\0" * (MAX_MESSAGE_BYTES + 10))
            while fuzz.poll(500):  # drain whatever error replies came back
                fuzz.recv_multipart()
            fuzz.close(0)
            big.close(0)
        finally:
            ctx.term()
        assert cluster.procs[0].poll() is None  # still running
        with comm.Communicator(cluster.endpoints) as c, c.backend() as be:
            assert be.get_pages(rel, range(8), LSN) == synth_pages(rel, range(8), LSN)
