"""The pagecomm wire protocol, sans-IO: pure encode/decode of ZeroMQ multipart frames.

Theory of operation
-------------------
Every message is a list of frames. Frame 0 is a fixed 32-byte prefix followed by a
kind-specific body. Requests are always exactly one frame. An OK GetPages reply
is ONE frame too: its header, then the pages back to back. A receiver pays for
every frame (pyzmq releases the GIL in each receive call, and in a busy
multithreaded client each release can cost a thread hand-off), so the hottest
message has one; protocol version 1 sent one frame per page. Other bulk data (an
SLRU segment, an error reason) follows in one frame of its own. Replies echo the
request id, attempt, LSNs and the relation/blocks asked for, so that a receiver can
check a reply against its request before trusting it.

Status codes are in-band: a failed request never tears down a connection shared by
many backends. Decoding validates every field and raises only ProtocolError.
The byte layout is documented in docs/protocol.md; tests/shards/test_protocol.py
pins it byte for byte.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import IntEnum
from typing import Any, TypeVar

from ._errors import ProtocolError
from ._messages import (
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
    SlruKind,
    SlruSegmentReply,
    SlruSegmentRequest,
    Status,
)
from ._types import BLCKSZ, MAX_BLOCKNO, MAX_BLOCKS_PER_REQUEST, MAX_FORKNUM, RelTag

PROTOCOL_VERSION = 2  # 2: an OK GetPages reply is one frame (1 had a frame per page)
REPLY_FLAG = 0x80
MAX_REASON_BYTES = 1024
SLRU_PAGES_PER_SEGMENT = 32
MAX_SLRU_SEGMENT_BYTES = SLRU_PAGES_PER_SEGMENT * BLCKSZ
MAX_MESSAGE_BYTES = MAX_SLRU_SEGMENT_BYTES + 4096
"""Upper bound on any single frame; servers set ZMQ_MAXMSGSIZE to this."""
MAX_FRAMES = 2  # a header, then at most one bulk frame (an SLRU segment or a reason)


# version, kind, class-or-status, flags, request id, attempt, request_lsn, not_modified_since
_PREFIX = struct.Struct("<BBBBQIQQ")
_REL = struct.Struct("<IIIBBH")  # spc, db, rel, fork, count-or-flag, zero pad
_DB = struct.Struct("<I")
_SLRU = struct.Struct("<BxxxI")
_RELSIZE_REPLY = struct.Struct("<IIIBBHI")  # rel fields, exists, pad, nblocks
_DBSIZE_REPLY = struct.Struct("<IIQ")  # db, pad, size
_BLOCK_STRUCTS = [struct.Struct(f"<{n}I") for n in range(MAX_BLOCKS_PER_REQUEST + 1)]
_PREFIX_LEN = _PREFIX.size  # 32
# Plain-int sets: a membership test is cheaper than an IntEnum call on the hot path.
_CLASSES = frozenset(int(c) for c in RequestClass)
_STATUSES = frozenset(int(s) for s in Status)
_SLRU_KINDS = frozenset(int(k) for k in SlruKind)
_PAGE_TYPES = (bytes, bytearray, memoryview)
_INVALID_BLOCKNO = MAX_BLOCKNO + 1  # the only u32 that is not a block number; `in` beats max()


# ---------------------------------------------------------------- encoding

def _prefix(kind: int, cls_or_status: int, msg: Request | Reply) -> bytes:
    try:
        if msg.nms > msg.lsn:
            raise ProtocolError(f"not_modified_since {msg.nms} is above request_lsn {msg.lsn}")
        return _PREFIX.pack(PROTOCOL_VERSION, kind, cls_or_status, 0, msg.id, msg.attempt,
                            msg.lsn, msg.nms)
    except (struct.error, TypeError) as e:
        raise ProtocolError(f"cannot encode {type(msg).__name__}: {e}") from None


def _rel_body(rel: RelTag, count_or_flag: int) -> bytes:
    try:
        if rel.fork > MAX_FORKNUM:
            raise ProtocolError(f"unknown fork {rel.fork}")
        return _REL.pack(rel.spc, rel.db, rel.rel, rel.fork, count_or_flag, 0)
    except (struct.error, TypeError, AttributeError) as e:
        raise ProtocolError(f"cannot encode rel {rel!r}: {e}") from None


def _blocks_body(blocks: tuple[int, ...]) -> bytes:
    try:
        if not 1 <= len(blocks) <= MAX_BLOCKS_PER_REQUEST:
            raise ProtocolError(f"GetPages needs 1..{MAX_BLOCKS_PER_REQUEST} blocks, "
                                f"got {len(blocks)}")
        if _INVALID_BLOCKNO in blocks:
            raise ProtocolError(f"block number {_INVALID_BLOCKNO} is InvalidBlockNumber")
        return _BLOCK_STRUCTS[len(blocks)].pack(*blocks)
    except (struct.error, TypeError) as e:
        raise ProtocolError(f"cannot encode blocks: {e}") from None


def _checked_member(value: int, allowed: frozenset[int], what: str) -> int:
    try:
        if value in allowed:
            return value
    except TypeError:  # unhashable
        pass
    raise ProtocolError(f"unknown {what} {value!r}")


def encode_get_pages(id: int, attempt: int, cls: int, lsn: int, nms: int, rel: RelTag,
                     blocks: Sequence[int]) -> bytes:
    """Fast path for the hottest message: the one frame of a GetPages request."""
    try:
        n = len(blocks)
        # One combined test keeps the valid path cheap; the slow checks name the culprit.
        if (not 1 <= n <= MAX_BLOCKS_PER_REQUEST or cls not in _CLASSES or nms > lsn
                or rel.fork > MAX_FORKNUM or _INVALID_BLOCKNO in blocks):
            _blocks_body(tuple(blocks))
            _checked_member(cls, _CLASSES, "request class")
            _rel_body(rel, n)
            raise ProtocolError(f"not_modified_since {nms} is above request_lsn {lsn}")
        return (_PREFIX.pack(PROTOCOL_VERSION, Kind.GET_PAGES, cls, 0, id, attempt, lsn, nms)
                + _REL.pack(rel.spc, rel.db, rel.rel, rel.fork, n, 0)
                + _BLOCK_STRUCTS[n].pack(*blocks))
    except (struct.error, TypeError, AttributeError) as e:
        raise ProtocolError(f"cannot encode GetPages: {e}") from None


def encode_request(msg: Request) -> list[bytes]:
    """Frames of a request (always exactly one)."""
    if isinstance(msg, GetPagesRequest):
        return [encode_get_pages(msg.id, msg.attempt, msg.cls, msg.lsn, msg.nms, msg.rel,
                                 msg.blocks)]
    if not isinstance(msg, (RelSizeRequest, DbSizeRequest, SlruSegmentRequest)):
        raise ProtocolError(f"not a request: {type(msg).__name__}")
    head = _prefix(msg.kind, _checked_member(msg.cls, _CLASSES, "request class"), msg)
    if isinstance(msg, RelSizeRequest):
        return [head + _rel_body(msg.rel, 1 if msg.allow_missing else 0)]
    try:
        if isinstance(msg, DbSizeRequest):
            return [head + _DB.pack(msg.db)]
        sk = _checked_member(msg.slru_kind, _SLRU_KINDS, "SLRU kind")
        return [head + _SLRU.pack(sk, msg.segno)]
    except struct.error as e:
        raise ProtocolError(f"cannot encode {type(msg).__name__}: {e}") from None


def _reason_frames(status: int, reason: str) -> list[bytes]:
    if status == Status.OK:
        return []
    if not isinstance(reason, str):
        raise ProtocolError(f"reason must be a str, got {type(reason).__name__}")
    raw = reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]
    return [raw.decode("utf-8", "ignore").encode("utf-8")]


def encode_reply(msg: Reply) -> list[bytes]:
    """Frames of a reply: header, then the pages / segment (OK) or a reason (error)."""
    if not isinstance(msg, (GetPagesReply, RelSizeReply, DbSizeReply, SlruSegmentReply)):
        raise ProtocolError(f"not a reply: {type(msg).__name__}")
    status = _checked_member(msg.status, _STATUSES, "status")
    head = _prefix(msg.kind | REPLY_FLAG, status, msg)
    tail = _reason_frames(msg.status, msg.reason)
    if isinstance(msg, GetPagesReply):
        head += _rel_body(msg.rel, len(msg.blocks)) + _blocks_body(msg.blocks)
        if msg.status == Status.OK:
            if len(msg.pages) != len(msg.blocks):
                raise ProtocolError(f"{len(msg.pages)} pages for {len(msg.blocks)} blocks")
            for p in msg.pages:
                if not isinstance(p, _PAGE_TYPES) or len(p) != BLCKSZ:
                    raise ProtocolError(f"a page must be {BLCKSZ} bytes, got {_describe(p)}")
            return [b"".join([head, *msg.pages])]  # one frame: header, then the pages
        return [head] + tail
    if isinstance(msg, RelSizeReply):
        # _rel_body validates the rel; the reply layout differs only after the fork byte.
        _rel_body(msg.rel, 0)
        r = msg.rel
        try:
            body = _RELSIZE_REPLY.pack(r.spc, r.db, r.rel, r.fork, 1 if msg.exists else 0, 0,
                                       msg.nblocks)
        except struct.error as e:
            raise ProtocolError(f"cannot encode RelSizeReply: {e}") from None
        return [head + body] + tail
    if isinstance(msg, DbSizeReply):
        try:
            return [head + _DBSIZE_REPLY.pack(msg.db, 0, msg.size)] + tail
        except struct.error as e:
            raise ProtocolError(f"cannot encode DbSizeReply: {e}") from None
    if isinstance(msg, SlruSegmentReply):
        try:
            sk = _checked_member(msg.slru_kind, _SLRU_KINDS, "SLRU kind")
            frames = [head + _SLRU.pack(sk, msg.segno)]
        except struct.error as e:
            raise ProtocolError(f"cannot encode SlruSegmentReply: {e}") from None
        if msg.status == Status.OK:
            if not isinstance(msg.segment, _PAGE_TYPES):
                raise ProtocolError(f"SLRU segment must be bytes, got {_describe(msg.segment)}")
            if len(msg.segment) > MAX_SLRU_SEGMENT_BYTES or len(msg.segment) % BLCKSZ:
                raise ProtocolError(f"SLRU segment of {len(msg.segment)} bytes is not whole pages "
                                    f"up to {MAX_SLRU_SEGMENT_BYTES}")
            frames.append(bytes(msg.segment))
        return frames + tail
    raise AssertionError("unreachable")


def _describe(obj: object) -> str:
    return f"{len(obj)} bytes" if isinstance(obj, _PAGE_TYPES) else type(obj).__name__


def error_reply(req: Request, status: Status, reason: str) -> Reply:
    """The error reply to ``req``, echoing what it asked for."""
    if status == Status.OK:
        raise ProtocolError("error_reply needs a status other than OK")
    common = (req.id, req.attempt, status, req.lsn, req.nms)
    if isinstance(req, GetPagesRequest):
        return GetPagesReply(*_five(common), rel=req.rel, blocks=req.blocks, reason=reason)
    if isinstance(req, RelSizeRequest):
        return RelSizeReply(*common, rel=req.rel, reason=reason)
    if isinstance(req, DbSizeRequest):
        return DbSizeReply(*common, db=req.db, reason=reason)
    return SlruSegmentReply(*_five(common), slru_kind=req.slru_kind, segno=req.segno, reason=reason)


# ---------------------------------------------------------------- decoding

# int -> member: a dict lookup is several times cheaper than an IntEnum call
_E = TypeVar("_E", bound=IntEnum)
_MEMBERS: dict[type[IntEnum], dict[int, IntEnum]] = {
    e: {int(m): m for m in e} for e in (Kind, RequestClass, Status, SlruKind)}


def _enum(enum: type[_E], value: int, what: str) -> Any:
    """The member of ``enum`` for ``value`` (typed Any: callers know which enum)."""
    member = _MEMBERS[enum].get(value)
    if member is None:
        raise ProtocolError(f"unknown {what} {value}")
    return member


def _check_frames(frames: Sequence[bytes]) -> memoryview:
    if not isinstance(frames, (list, tuple)):
        raise ProtocolError(f"frames must be a list of bytes, got {type(frames).__name__}")
    if not 1 <= len(frames) <= MAX_FRAMES:
        raise ProtocolError(f"{len(frames)} frames (expected 1..{MAX_FRAMES})")
    try:
        head = memoryview(frames[0]).cast("B")
    except (TypeError, ValueError):
        raise ProtocolError(f"frame 0 is {type(frames[0]).__name__}, not bytes") from None
    if len(head) < _PREFIX_LEN:
        raise ProtocolError(f"header of {len(head)} bytes is shorter than {_PREFIX_LEN}")
    if head[0] != PROTOCOL_VERSION:
        raise ProtocolError(f"unknown protocol version {head[0]} (this side speaks "
                            f"{PROTOCOL_VERSION})")
    return head


def _rel(buf: memoryview, off: int) -> tuple[RelTag, int]:
    spc, db, rel, fork, n, pad = _REL.unpack_from(buf, off)
    if fork > MAX_FORKNUM:
        raise ProtocolError(f"unknown fork {fork}")
    if pad:
        raise ProtocolError("non-zero padding after rel")
    return RelTag(spc, db, rel, fork), n


def _blocks(buf: memoryview, off: int, n: int, page_bytes: int = 0) -> tuple[int, ...]:
    """The ``n`` block numbers at ``off``; ``buf`` must end ``page_bytes`` after them."""
    if not 1 <= n <= MAX_BLOCKS_PER_REQUEST:
        raise ProtocolError(f"block count {n} outside 1..{MAX_BLOCKS_PER_REQUEST}")
    if len(buf) != off + (4 + page_bytes) * n:
        what = "GetPages header" if not page_bytes else "OK GetPages reply frame"
        raise ProtocolError(f"{what} is {len(buf)} bytes, expected "
                            f"{off + (4 + page_bytes) * n}")
    blocks = _BLOCK_STRUCTS[n].unpack_from(buf, off)
    for b in blocks:
        if b > MAX_BLOCKNO:
            raise ProtocolError(f"block number {b} is InvalidBlockNumber")
    return blocks


def _nbytes(frame: object, what: str) -> int:
    """Size of a bytes-like frame; anything else (str, int, None...) is a ProtocolError."""
    if type(frame) is bytes:
        return len(frame)
    try:
        with memoryview(frame) as m:  # type: ignore[arg-type]
            return m.nbytes
    except (TypeError, ValueError):
        raise ProtocolError(f"{what} is {type(frame).__name__}, not bytes") from None


def _exact(buf: memoryview, size: int, what: str) -> None:
    if len(buf) != size:
        raise ProtocolError(f"{what} header is {len(buf)} bytes, expected {size}")


def _one_frame(frames: Sequence[bytes], what: str) -> None:
    if len(frames) != 1:
        raise ProtocolError(f"{what} must be exactly one frame, got {len(frames)}")


def decode_request(frames: Sequence[bytes]) -> Request:
    """Parse and validate a request; raises ProtocolError on anything malformed."""
    head = _check_frames(frames)
    _one_frame(frames, "a request")
    _, kind, cls, flags, rid, attempt, lsn, nms = _PREFIX.unpack_from(head)
    if kind & REPLY_FLAG:
        raise ProtocolError(f"kind {kind:#x} is a reply, expected a request")
    kind = _enum(Kind, kind, "request kind")
    cls = _enum(RequestClass, cls, "request class")
    if flags:
        raise ProtocolError(f"unknown flags {flags:#x}")
    if nms > lsn:
        raise ProtocolError(f"not_modified_since {nms} is above request_lsn {lsn}")
    common = (rid, attempt, cls, lsn, nms)
    try:
        if kind == Kind.GET_PAGES:
            rel, n = _rel(head, _PREFIX_LEN)
            return GetPagesRequest(*common, rel, _blocks(head, _PREFIX_LEN + _REL.size, n))
        if kind == Kind.REL_SIZE:
            _exact(head, _PREFIX_LEN + _REL.size, "RelSize")
            rel, flag = _rel(head, _PREFIX_LEN)
            if flag > 1:
                raise ProtocolError(f"allow_missing must be 0 or 1, got {flag}")
            return RelSizeRequest(*common, rel, bool(flag))
        if kind == Kind.DB_SIZE:
            _exact(head, _PREFIX_LEN + _DB.size, "DbSize")
            return DbSizeRequest(*common, _DB.unpack_from(head, _PREFIX_LEN)[0])
        _exact(head, _PREFIX_LEN + _SLRU.size, "SlruSegment")
        sk, segno = _SLRU.unpack_from(head, _PREFIX_LEN)
        if head[_PREFIX_LEN + 1: _PREFIX_LEN + 4] != b"\0\0\0":
            raise ProtocolError("non-zero padding in SlruSegment")
        return SlruSegmentRequest(*common, _enum(SlruKind, sk, "SLRU kind"), segno)
    except struct.error as e:
        raise ProtocolError(f"truncated {kind.name} request: {e}") from None


def _reason(frames: Sequence[bytes], status: int, nbody: int) -> str:
    if status == Status.OK:
        return ""
    if len(frames) != 2:
        raise ProtocolError(f"an error reply has a header and a reason frame, got {len(frames)}")
    n = _nbytes(frames[1], "reason frame")
    if n > MAX_REASON_BYTES:
        raise ProtocolError(f"reason of {n} bytes exceeds {MAX_REASON_BYTES}")
    raw = bytes(frames[1])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("reason is not valid UTF-8") from None


def decode_reply(frames: Sequence[Any]) -> Reply:
    """Parse and validate a reply; raises ProtocolError on anything malformed. Frames
    may be any bytes-like objects (``zmq.Frame`` included); what the reply carries
    (pages, segment, reason) comes out as ``bytes``."""
    head = _check_frames(frames)
    _, kind, status, flags, rid, attempt, lsn, nms = _PREFIX.unpack_from(head)
    if not kind & REPLY_FLAG:
        raise ProtocolError(f"kind {kind:#x} is a request, expected a reply")
    kind = _enum(Kind, kind & ~REPLY_FLAG, "reply kind")
    status = _enum(Status, status, "status")
    if flags:
        raise ProtocolError(f"unknown flags {flags:#x}")
    if nms > lsn:
        raise ProtocolError(f"not_modified_since {nms} is above request_lsn {lsn}")
    common = (rid, attempt, status, lsn, nms)
    try:
        if kind == Kind.GET_PAGES:
            return _decode_get_pages_reply(frames, head, common)
        if kind == Kind.REL_SIZE:
            _exact(head, _PREFIX_LEN + _RELSIZE_REPLY.size, "RelSize reply")
            spc, db, rel, fork, exists, pad, nblocks = _RELSIZE_REPLY.unpack_from(head, _PREFIX_LEN)
            if fork > MAX_FORKNUM or exists > 1 or pad:
                raise ProtocolError("bad RelSize reply body (fork, exists flag or padding)")
            reason = _reason(frames, status, 1)
            if status == Status.OK and len(frames) != 1:
                raise ProtocolError("a RelSize reply is one frame")
            return RelSizeReply(*common, RelTag(spc, db, rel, fork), bool(exists), nblocks, reason)
        if kind == Kind.DB_SIZE:
            _exact(head, _PREFIX_LEN + _DBSIZE_REPLY.size, "DbSize reply")
            db, pad, size = _DBSIZE_REPLY.unpack_from(head, _PREFIX_LEN)
            if pad:
                raise ProtocolError("non-zero padding in DbSize reply")
            reason = _reason(frames, status, 1)
            if status == Status.OK and len(frames) != 1:
                raise ProtocolError("a DbSize reply is one frame")
            return DbSizeReply(*common, db, size, reason)
        return _decode_slru_reply(frames, head, common)
    except struct.error as e:
        raise ProtocolError(f"truncated {kind.name} reply: {e}") from None


def _five(common: tuple[Any, ...]) -> tuple[int, int, Status, int, int]:
    """The five common reply fields (id, attempt, status, lsn, nms), typed."""
    rid, attempt, status, lsn, nms = common
    return rid, attempt, status, lsn, nms


def _decode_get_pages_reply(frames: Sequence[bytes], head: memoryview,
                            common: tuple[Any, ...]) -> Reply:
    rel, n = _rel(head, _PREFIX_LEN)
    status = common[2]
    if status != Status.OK:
        blocks = _blocks(head, _PREFIX_LEN + _REL.size, n)
        return GetPagesReply(*_five(common), rel, blocks, (), _reason(frames, status, 1))
    if len(frames) != 1:
        raise ProtocolError(f"an OK GetPages reply is one frame, got {len(frames)}")
    blocks = _blocks(head, _PREFIX_LEN + _REL.size, n, BLCKSZ)
    off = _PREFIX_LEN + _REL.size + 4 * n
    pages = tuple(bytes(head[off + i * BLCKSZ: off + (i + 1) * BLCKSZ]) for i in range(n))
    return GetPagesReply(*_five(common), rel, blocks, pages, "")


def _decode_slru_reply(frames: Sequence[bytes], head: memoryview,
                       common: tuple[Any, ...]) -> Reply:
    _exact(head, _PREFIX_LEN + _SLRU.size, "SlruSegment reply")
    sk, segno = _SLRU.unpack_from(head, _PREFIX_LEN)
    if head[_PREFIX_LEN + 1: _PREFIX_LEN + 4] != b"\0\0\0":
        raise ProtocolError("non-zero padding in SlruSegment reply")
    sk = _enum(SlruKind, sk, "SLRU kind")
    status = common[2]
    if status != Status.OK:
        return SlruSegmentReply(*_five(common), sk, segno, b"", _reason(frames, status, 1))
    if len(frames) != 2:
        raise ProtocolError(f"an OK SlruSegment reply has 2 frames, got {len(frames)}")
    seg = frames[1]
    nseg = _nbytes(seg, "SLRU segment frame")
    if nseg > MAX_SLRU_SEGMENT_BYTES or nseg % BLCKSZ:
        raise ProtocolError(f"SLRU segment of {nseg} bytes is not whole pages "
                            f"up to {MAX_SLRU_SEGMENT_BYTES}")
    return SlruSegmentReply(*_five(common), sk, segno, bytes(seg), "")


def peek_request_id(frame: bytes) -> tuple[int, int] | None:
    """(id, attempt) of a request header that may be otherwise malformed, or None."""
    try:
        if len(frame) >= _PREFIX_LEN and frame[0] == PROTOCOL_VERSION:
            _, _, _, _, rid, attempt, _, _ = _PREFIX.unpack_from(frame)
            return rid, attempt
    except (TypeError, struct.error):
        pass
    return None


def malformed_reply(head: bytes, ids: tuple[int, int], reason: str) -> Reply:
    """An INVALID_REQUEST reply to a request that did not decode, echoing what can be read."""
    rid, attempt = ids
    try:
        _, kind, _, _, _, _, lsn, nms = _PREFIX.unpack_from(head)
    except struct.error:
        kind, lsn, nms = Kind.GET_PAGES, 0, 0
    if nms > lsn:
        lsn = nms = 0
    common = (rid, attempt, Status.INVALID_REQUEST, lsn, nms)
    kind &= ~REPLY_FLAG
    reason = f"malformed request: {reason}"
    nil = RelTag(0, 0, 0, 0)
    if kind == Kind.REL_SIZE:
        return RelSizeReply(*common, rel=nil, reason=reason)
    if kind == Kind.DB_SIZE:
        return DbSizeReply(*common, db=0, reason=reason)
    if kind == Kind.SLRU_SEGMENT:
        return SlruSegmentReply(*common, slru_kind=SlruKind.CLOG, segno=0, reason=reason)
    return GetPagesReply(*common, rel=nil, blocks=(0,), reason=reason)
