"""Fast paths of the wire protocol for the two hottest messages, sans-IO like the rest.

``decode_get_pages_reply_fast`` validates exactly what ``decode_reply`` validates for
an OK GetPages reply but builds no dataclass or enum members (0.7 us against 3.2);
anything else returns None and the caller takes the general path.
``ok_get_pages_reply`` builds a reply's one frame from the request's and the pages,
byte-for-byte what ``encode_reply`` would produce. tests/shards/test_protocol.py proves both agree
with the general codec.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from ._protocol import (
    _BLOCK_STRUCTS,
    _INVALID_BLOCKNO,
    _PREFIX,
    _REL,
    PROTOCOL_VERSION,
    REPLY_FLAG,
    Kind,
    Status,
)
from ._types import BLCKSZ, MAX_BLOCKS_PER_REQUEST, MAX_FORKNUM

_GET_PAGES_REPLY = int(Kind.GET_PAGES) | REPLY_FLAG
_GP_HEAD = struct.Struct(_PREFIX.format + _REL.format[1:])  # prefix + rel, 48 bytes
_GP_HEAD_LEN = _GP_HEAD.size


def decode_get_pages_reply_fast(
        frames: Sequence[Any]) -> tuple[int, int, int, int, tuple[int, int, int, int],
                                        tuple[int, ...], list[bytes]] | None:
    """The hot path of a receiver: (id, attempt, lsn, nms, (spc, db, rel, fork), blocks,
    pages) of a well-formed OK GetPages reply, else None. The one frame may be
    ``bytes`` or any C-contiguous buffer (a ``zmq.Frame`` received without copying);
    each page comes out as its own ``bytes`` (one copy).

    None means "not that": the caller falls back to :func:`decode_reply`, which gives
    the general answer (another reply, or a ProtocolError naming what is wrong). It
    validates exactly what decode_reply validates, without building a dataclass or
    enum members; the rel is a plain tuple (it compares equal to its RelTag)."""
    if (type(frames) is not list and type(frames) is not tuple) or len(frames) != 1:
        return None
    buf = frames[0]
    if type(buf) is not bytes:
        try:
            buf = memoryview(buf).cast("B")
        except (TypeError, ValueError):
            return None
    size = len(buf)
    if size < _GP_HEAD_LEN:
        return None
    ver, kind, status, flags, rid, attempt, lsn, nms, spc, db, rel, fork, n, pad = \
        _GP_HEAD.unpack_from(buf)
    if (ver != PROTOCOL_VERSION or kind != _GET_PAGES_REPLY or status or flags or nms > lsn
            or fork > MAX_FORKNUM or pad or not 1 <= n <= MAX_BLOCKS_PER_REQUEST
            or size != _GP_HEAD_LEN + (4 + BLCKSZ) * n):
        return None
    blocks = _BLOCK_STRUCTS[n].unpack_from(buf, _GP_HEAD_LEN)
    if _INVALID_BLOCKNO in blocks:
        return None
    off = _GP_HEAD_LEN + 4 * n
    if type(buf) is bytes:
        pages = [buf[o:o + BLCKSZ] for o in range(off, size, BLCKSZ)]
    else:
        pages = [bytes(buf[o:o + BLCKSZ]) for o in range(off, size, BLCKSZ)]
    return rid, attempt, lsn, nms, (spc, db, rel, fork), blocks, pages


_OK_GET_PAGES_REPLY_KIND = bytes([_GET_PAGES_REPLY, int(Status.OK)])  # bytes 1 and 2


def ok_get_pages_reply(request: bytes, pages: Sequence[bytes]) -> bytes:
    """The one frame of the OK reply to the GetPages request frame ``request``, which
    decode_request accepted, carrying ``pages`` (whole 8 KB pages, checked by the
    caller): the bytes encode_reply gives for that reply. A reply echoes id, attempt,
    LSNs, rel and blocks in the request's own layout, so only byte 1 (kind |
    REPLY_FLAG) and byte 2 (class -> status OK) differ; the pages follow."""
    return b"".join([request[:1], _OK_GET_PAGES_REPLY_KIND, request[3:], *pages])
