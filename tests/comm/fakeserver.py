"""A minimal in-process page server for communicator unit tests.

Serves deterministic pages (``fake_page(rel, blk, lsn)``) for any relation of
``nblocks`` blocks, with switches to misbehave: freeze (never answer), answer
with a status, mangle echoes, or send garbage. Real page servers are tested in
tests/shards and tests/integration.
"""

from __future__ import annotations

import struct
import threading
import time
from typing import Any

import zmq

from shards import BLCKSZ
from shards.protocol import (
    DbSizeReply,
    GetPagesReply,
    GetPagesRequest,
    RelSizeReply,
    RelSizeRequest,
    SlruSegmentReply,
    SlruSegmentRequest,
    Status,
    decode_request,
    encode_reply,
    error_reply,
)


def fake_page(rel: Any, blk: int, lsn: int) -> bytes:
    head = struct.pack("<IIIIIQ", rel.spc, rel.db, rel.rel, rel.fork, blk, lsn)
    return (head * (BLCKSZ // len(head) + 1))[:BLCKSZ]


class FakeServer:
    def __init__(self, nblocks: int = 1000) -> None:
        self.nblocks = nblocks
        self.frozen = False
        self.status: Status | None = None
        self.slow_down_first = 0  # answer this many requests SLOW_DOWN first
        self.mangle = False
        self.garbage = False
        self.delay = 0.0  # seconds before answering each request
        self.log: list[tuple[int, ...]] = []  # blocks of each GetPages request received
        self.requests = 0
        self.pages = 0
        self._ctx = zmq.Context.instance()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.endpoint = ""
        self._t = threading.Thread(target=self._run, name="fake-server", daemon=True)

    def __enter__(self) -> FakeServer:
        self._t.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *a: object) -> None:
        self._stop.set()
        self._t.join(5)

    def _run(self) -> None:
        s = self._ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.bind("tcp://127.0.0.1:0")
        self.endpoint = s.getsockopt_string(zmq.LAST_ENDPOINT)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not s.poll(20):
                    continue
                ident, *frames = s.recv_multipart()
                self.requests += 1
                if self.frozen:
                    continue
                if self.delay:
                    time.sleep(self.delay)
                s.send_multipart([ident, *self._answer(frames)])
        finally:
            s.close(0)

    def _answer(self, frames: list[bytes]) -> list[bytes]:
        if self.garbage:
            return [b"\x01garbage"]
        req = decode_request(frames)
        if self.slow_down_first > 0:
            self.slow_down_first -= 1
            return encode_reply(error_reply(req, Status.SLOW_DOWN, "forced by test"))
        if self.status is not None:
            return encode_reply(error_reply(req, self.status, "forced by test"))
        common = (req.id, req.attempt, Status.OK, req.lsn, req.nms)
        if isinstance(req, GetPagesRequest):
            self.log.append(req.blocks)
            if any(b >= self.nblocks for b in req.blocks):
                return encode_reply(error_reply(req, Status.NOT_FOUND, "block beyond end"))
            blocks = req.blocks
            if self.mangle:
                blocks = tuple(b + 1 for b in blocks)
            self.pages += len(blocks)
            pages = tuple(fake_page(req.rel, b, req.lsn) for b in blocks)
            return encode_reply(GetPagesReply(*common, req.rel, blocks, pages))
        if isinstance(req, RelSizeRequest):
            if req.rel.rel == 404:
                if req.allow_missing:
                    return encode_reply(RelSizeReply(*common, req.rel, False, 0))
                return encode_reply(error_reply(req, Status.NOT_FOUND, "relation missing"))
            return encode_reply(RelSizeReply(*common, req.rel, True, self.nblocks))
        if isinstance(req, SlruSegmentRequest):
            return encode_reply(SlruSegmentReply(*common, req.slru_kind, req.segno,
                                                 b"\x07" * BLCKSZ))
        return encode_reply(DbSizeReply(*common, req.db, 12345 * BLCKSZ))
