"""Messages between backend processes and the communicator process, sans-IO.

Theory of operation
-------------------
A backend process (``comm.attach``) talks to ``python -m comm serve`` over one
DEALER -> ROUTER connection on an ipc:// endpoint. Requests and completions are
small fixed-layout messages; pages never travel through this pipe: the
communicator writes them straight into the backend's slot ring in shared memory
and the completion names the slot (and the slot's use number, so a late
completion for an abandoned earlier use is recognised). All integers are little
endian. Decoding validates lengths and ranges and raises IpcError only.

Completions normally skip the socket: the backend passes the path of a FIFO it
reads when it attaches, and the thread that completes a request writes the
completion record into the slot's header in shared memory (an error's message
into the slot's page area) and a 6-byte ring (slot, use) into the FIFO: no hop
through the communicator's front thread. Writes of up to PIPE_BUF bytes to a pipe
are atomic, so rings from many threads never interleave. A communicator that
cannot open the FIFO sends completion messages over the socket instead.

Control calls (``update_shards``: b"S", ``comm_stats``: b"T") carry a sequence
number right after the tag; the reply (b"s" / b"t") echoes it, then a status byte
(OK, or the error class as in completions), then the body (the stats' JSON, or
the error's message). A reply whose number is not the call's own is a late answer
to an earlier call that was cancelled or timed out: the backend discards it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shards import BLCKSZ, MAX_BLOCKS_PER_REQUEST

from ._errors import (
    Cancelled,
    CommClosed,
    CommError,
    ConfigError,
    InvalidRequest,
    NotFound,
    PageNotFound,
    RelationNotFound,
    RequestTimeout,
    ServerError,
    ShardUnavailable,
    WrongShard,
)

PAGES_PER_SLOT = MAX_BLOCKS_PER_REQUEST
SLOT_BYTES = PAGES_PER_SLOT * BLCKSZ
PREFETCH = 100  # request kind: fill the shared prefetch buffer, no slot, no completion
MAX_SLOTS = 1024

_ATTACH = struct.Struct("<cIH")            # b"A", pid, slots wanted
_ATTACHED = struct.Struct("<cIIHH")        # b"a", communicator pid, backend id, slots, pages
_REQ = struct.Struct("<cHIBBBxIIIIQQdII")  # b"R", slot, use, kind, cls, fork, spc, db, rel,
#                                            count, lsn, nms, timeout, extra1, extra2
_CANCEL = struct.Struct("<cHI")            # b"C", slot, use
_DONE = struct.Struct("<cHIBBxxIQ")        # b"d", slot, use, status, exists, count, value
_SHARDS = struct.Struct("<cII")            # b"S", seq, stripe size; then endpoints, comma-sep.
_STATS = struct.Struct("<cI")              # b"T", seq
_CONTROL_REPLY = struct.Struct("<cIB")     # b"s" / b"t", seq, status; then the body
_RING = struct.Struct("<HI")               # slot, use: a completion is in the slot's header
_HEADER = struct.Struct("<IBBHIQ")         # use, status, exists, message bytes, count, value
HEADER_BYTES = 32                          # per slot, after the slots' page areas
_MAX_MESSAGE = 1024
_MAX_PATH = 4096
RING_BYTES = _RING.size

# completion status codes <-> the exception raised in the backend process
_ERRORS: list[type[CommError]] = [CommError, PageNotFound, RelationNotFound, NotFound,
                                  InvalidRequest, ServerError, ShardUnavailable,
                                  RequestTimeout, Cancelled, CommClosed, WrongShard,
                                  ConfigError]
OK = 255
MAX_PID = 2**31 - 1  # pid_t: a larger one would overflow os.kill, 0 would signal a group


class IpcError(CommError):
    """A malformed message between a backend process and the communicator process."""


@dataclass(frozen=True, slots=True)
class Req:
    slot: int
    use: int
    kind: int
    cls: int
    spc: int
    db: int
    rel: int
    fork: int
    lsn: int
    nms: int
    timeout: float
    extra1: int
    extra2: int
    blocks: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Done:
    slot: int
    use: int
    status: int  # OK or an index into the error classes
    exists: bool
    count: int  # pages written into the slot / segment pages
    value: int  # nblocks, db size, segment bytes
    message: str = ""


def _unpack(st: struct.Struct, msg: bytes, what: str) -> tuple:
    if len(msg) < st.size:
        raise IpcError(f"{what} message of {len(msg)} bytes is truncated")
    return st.unpack_from(msg)


def encode_attach(pid: int, slots: int, ring_path: str = "") -> bytes:
    """``ring_path``: the FIFO the backend reads completion rings from ('' for none)."""
    return _ATTACH.pack(b"A", pid, slots) + ring_path.encode()


def decode_attach(msg: bytes) -> tuple[int, int, str]:
    _, pid, slots = _unpack(_ATTACH, msg, "attach")
    if not 1 <= pid <= MAX_PID:
        raise IpcError(f"attach names pid {pid} (1..{MAX_PID})")
    if not 1 <= slots <= MAX_SLOTS:
        raise IpcError(f"attach asks for {slots} slots (1..{MAX_SLOTS})")
    if len(msg) - _ATTACH.size > _MAX_PATH:
        raise IpcError(f"attach names a ring path of {len(msg) - _ATTACH.size} bytes")
    try:
        path = msg[_ATTACH.size:].decode()
    except UnicodeDecodeError:
        raise IpcError("attach names a ring path that is not UTF-8") from None
    if path and (not path.startswith("/") or "\0" in path):
        raise IpcError(f"attach names a ring path {path!r} that is not an absolute path")
    return pid, slots, path


def segment_bytes(slots: int) -> int:
    """Size of a backend's shared segment: the slots' page areas, then their headers."""
    return slots * (SLOT_BYTES + HEADER_BYTES)


def write_completion(buf: memoryview, slots: int, d: Done) -> None:
    """Write ``d`` into slot ``d.slot``'s header (its message into the slot's page
    area: a failed request returns no pages)."""
    msg = d.message.encode("utf-8", "replace")[:_MAX_MESSAGE]
    if msg:
        base = d.slot * SLOT_BYTES
        buf[base:base + len(msg)] = msg
    _HEADER.pack_into(buf, slots * SLOT_BYTES + d.slot * HEADER_BYTES, d.use, d.status,
                      d.exists, len(msg), d.count, d.value)


def read_completion(buf: memoryview, slots: int, slot: int) -> Done:
    """The completion ``write_completion`` left in ``slot``'s header."""
    if not 0 <= slot < slots:
        raise IpcError(f"completion ring for slot {slot} of {slots}")
    use, status, exists, n, count, value = _HEADER.unpack_from(
        buf, slots * SLOT_BYTES + slot * HEADER_BYTES)
    if status != OK and status >= len(_ERRORS):
        raise IpcError(f"unknown completion status {status}")
    if n > _MAX_MESSAGE or (status == OK and count > PAGES_PER_SLOT):
        raise IpcError(f"completion of slot {slot} claims {count} pages, {n} message bytes")
    base = slot * SLOT_BYTES
    message = bytes(buf[base:base + n]).decode("utf-8", "replace") if n else ""
    return Done(slot, use, status, bool(exists), count, value, message)


def encode_ring(slot: int, use: int) -> bytes:
    return _RING.pack(slot, use)


def decode_rings(data: bytes) -> list[tuple[int, int]]:
    """(slot, use) of each ring in ``data`` (a read of the FIFO: whole rings only,
    as every ring is written by one atomic write)."""
    if len(data) % _RING.size:
        raise IpcError(f"{len(data)} bytes of completion rings is not whole rings")
    return list(_RING.iter_unpack(data))


def encode_attached(pid: int, bid: int, slots: int, shm_name: str) -> bytes:
    return _ATTACHED.pack(b"a", pid, bid, slots, PAGES_PER_SLOT) + shm_name.encode()


def decode_attached(msg: bytes) -> tuple[int, int, int, str]:
    _, pid, bid, slots, pages = _unpack(_ATTACHED, msg, "attached")
    if not 1 <= pid <= MAX_PID:
        raise IpcError(f"communicator names pid {pid} (1..{MAX_PID})")
    if pages != PAGES_PER_SLOT:
        raise IpcError(f"communicator uses {pages} pages per slot, this side {PAGES_PER_SLOT}")
    return pid, bid, slots, msg[_ATTACHED.size:].decode()


def encode_req(r: Req) -> bytes:
    return _REQ.pack(b"R", r.slot, r.use, r.kind, r.cls, r.fork, r.spc, r.db, r.rel,
                     len(r.blocks), r.lsn, r.nms, r.timeout, r.extra1, r.extra2) + \
        struct.pack(f"<{len(r.blocks)}I", *r.blocks)


def decode_req(msg: bytes) -> Req:
    (_, slot, use, kind, cls, fork, spc, db, rel, count, lsn, nms, timeout, e1,
     e2) = _unpack(_REQ, msg, "request")
    limit = 1 << 20 if kind == PREFETCH else PAGES_PER_SLOT
    if count > limit or len(msg) != _REQ.size + 4 * count:
        raise IpcError(f"request with {count} blocks in {len(msg)} bytes")
    blocks = struct.unpack_from(f"<{count}I", msg, _REQ.size)
    return Req(slot, use, kind, cls, spc, db, rel, fork, lsn, nms, timeout, e1, e2, blocks)


def encode_cancel(slot: int, use: int) -> bytes:
    return _CANCEL.pack(b"C", slot, use)


def decode_cancel(msg: bytes) -> tuple[int, int]:
    _, slot, use = _unpack(_CANCEL, msg, "cancel")
    return slot, use


def encode_done(d: Done) -> bytes:
    return _DONE.pack(b"d", d.slot, d.use, d.status, d.exists, d.count, d.value) + \
        d.message.encode("utf-8", "replace")[:1024]


def decode_done(msg: bytes) -> Done:
    _, slot, use, status, exists, count, value = _unpack(_DONE, msg, "completion")
    if status != OK and status >= len(_ERRORS):
        raise IpcError(f"unknown completion status {status}")
    return Done(slot, use, status, bool(exists), count, value,
                msg[_DONE.size:].decode("utf-8", "replace"))


def encode_shards(seq: int, endpoints: list[str], stripe: int) -> bytes:
    return _SHARDS.pack(b"S", seq, stripe) + ",".join(endpoints).encode()


def decode_shards(msg: bytes) -> tuple[int, list[str], int]:
    _, seq, stripe = _unpack(_SHARDS, msg, "shards")
    try:
        eps = msg[_SHARDS.size:].decode()
    except UnicodeDecodeError:
        raise IpcError("shards message names endpoints that are not UTF-8") from None
    return seq, [e for e in eps.split(",") if e], stripe


def encode_stats(seq: int) -> bytes:
    return _STATS.pack(b"T", seq)


def control_seq(msg: bytes) -> int:
    """The sequence number of a control call (b"S" or b"T"), to answer it with."""
    return int(_unpack(_STATS, msg, "control")[1])


def encode_control_reply(tag: bytes, seq: int, body: bytes = b"",
                         error: BaseException | None = None) -> bytes:
    """The reply to control call ``seq``: ``body``, or ``error`` (any exception: its
    class travels as far as the status codes know it, its message in the body)."""
    if error is None:
        return _CONTROL_REPLY.pack(tag, seq, OK) + body
    text = str(error) if isinstance(error, CommError) else \
        f"{type(error).__name__}: {error}"
    return _CONTROL_REPLY.pack(tag, seq, status_of(error)) + \
        text.encode("utf-8", "replace")[:_MAX_MESSAGE]


def decode_control_reply(msg: bytes) -> tuple[int, int, bytes]:
    """(seq, status, body) of a control reply."""
    _, seq, status = _unpack(_CONTROL_REPLY, msg, "control reply")
    if status != OK and status >= len(_ERRORS):
        raise IpcError(f"unknown control reply status {status}")
    return seq, status, msg[_CONTROL_REPLY.size:]


def status_of(error: BaseException) -> int:
    """The completion status carrying ``error`` (the most specific known class)."""
    for i in range(len(_ERRORS) - 1, -1, -1):
        if type(error) is _ERRORS[i]:
            return i
    for i in range(len(_ERRORS) - 1, -1, -1):
        if isinstance(error, _ERRORS[i]):
            return i
    return 0


def error_of(status: int, message: str) -> CommError:
    return _ERRORS[status](message)
