"""Tests of the sans-IO wire protocol (shards/_protocol.py, documented in docs/protocol.md).

(a) a table of exact bytes per message, written by hand from the documented layout;
(b) hypothesis round trips over the full field ranges;
(c) fuzzing: the decoders return a valid message or raise ProtocolError, nothing else;
(d) the encoders reject invalid messages with ProtocolError.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shards._errors import ProtocolError
from shards._fastpath import decode_get_pages_reply_fast, ok_get_pages_reply
from shards._protocol import (
    MAX_MESSAGE_BYTES,
    MAX_REASON_BYTES,
    PROTOCOL_VERSION,
    DbSizeReply,
    DbSizeRequest,
    GetPagesReply,
    GetPagesRequest,
    RelSizeReply,
    RelSizeRequest,
    RequestClass,
    SlruKind,
    SlruSegmentReply,
    SlruSegmentRequest,
    Status,
    decode_reply,
    decode_request,
    encode_get_pages,
    encode_reply,
    encode_request,
    error_reply,
    peek_request_id,
)
from shards._types import BLCKSZ, RelTag

FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def h(text: str) -> bytes:
    """Hex literal with free whitespace, so each field of the layout sits on its own."""
    return bytes.fromhex(text)


# ------------------------------------------------------------------ (a) exact bytes

# Common prefixes, field by field: version, kind, class|status, flags | id u64 | attempt u32 |
# request_lsn u64 | not_modified_since u64 (all little-endian).
ID_A = "0807060504030201 0d0c0b0a 8877665544332211 0077665544332211"  # id 0x0102..08
ID_B = "0100000000000000 00000000 0001000000000000 8000000000000000"  # id 1, lsn 0x100/0x80
ID_C = "0200000000000000 03000000 ffffffffffffffff 0000000000000000"  # id 2, attempt 3
ID_D = "0400000000000000 01000000 0020000000000000 0020000000000000"  # id 4, nms == lsn

A = dict(id=0x0102030405060708, attempt=0x0A0B0C0D, lsn=0x1122334455667788,
         nms=0x1122334455667700)
B = dict(id=1, attempt=0, lsn=0x100, nms=0x80)
C = dict(id=2, attempt=3, lsn=0xFFFFFFFFFFFFFFFF, nms=0)
D = dict(id=4, attempt=1, lsn=0x2000, nms=0x2000)

REL_A = RelTag(1663, 5, 16384, 0)  # 7f060000 05000000 00400000 | fork 00
REL_B = RelTag(1664, 0, 1262, 1)   # 80060000 00000000 ee040000 | fork 01
PAGE1, PAGE2 = b"\x01" * BLCKSZ, b"\xfe" * BLCKSZ
SEG = b"\xaa" * BLCKSZ + b"\x55" * BLCKSZ

REQUEST_TABLE = [
    (GetPagesRequest(**A, cls=RequestClass.PREFETCH, rel=REL_A, blocks=(7, 0xFFFFFFFE)),
     [h("02 01 01 00" + ID_A + "7f060000 05000000 00400000 00 02 0000" + "07000000 feffffff")]),
    (GetPagesRequest(**B, cls=RequestClass.NORMAL, rel=REL_B, blocks=(0,)),
     [h("02 01 00 00" + ID_B + "80060000 00000000 ee040000 01 01 0000" + "00000000")]),
    (RelSizeRequest(**B, cls=RequestClass.NORMAL, rel=REL_B, allow_missing=True),
     [h("02 02 00 00" + ID_B + "80060000 00000000 ee040000 01 01 0000")]),
    (RelSizeRequest(**A, cls=RequestClass.BACKGROUND, rel=RelTag(1663, 5, 16384, 3),
                    allow_missing=False),
     [h("02 02 02 00" + ID_A + "7f060000 05000000 00400000 03 00 0000")]),
    (DbSizeRequest(**C, cls=RequestClass.BACKGROUND, db=0xDEADBEEF),
     [h("02 03 02 00" + ID_C + "efbeadde")]),
    (SlruSegmentRequest(**D, cls=RequestClass.NORMAL, slru_kind=SlruKind.MULTIXACT_OFFSETS,
                        segno=0x12345),
     [h("02 04 00 00" + ID_D + "02 000000 45230100")]),
    (SlruSegmentRequest(**D, cls=RequestClass.PREFETCH, slru_kind=SlruKind.CLOG, segno=0),
     [h("02 04 01 00" + ID_D + "00 000000 00000000")]),
]

REPLY_TABLE = [
    (GetPagesReply(**A, status=Status.OK, rel=REL_A, blocks=(7, 0xFFFFFFFE),
                   pages=(PAGE1, PAGE2)),
     [h("02 81 00 00" + ID_A + "7f060000 05000000 00400000 00 02 0000" + "07000000 feffffff")
      + PAGE1 + PAGE2]),
    (GetPagesReply(**A, status=Status.NOT_FOUND, rel=REL_A, blocks=(7,), reason="no page"),
     [h("02 81 01 00" + ID_A + "7f060000 05000000 00400000 00 01 0000" + "07000000"),
      h("6e6f2070616765")]),
    (GetPagesReply(**B, status=Status.SLOW_DOWN, rel=REL_B, blocks=(1, 2, 3), reason="é"),
     [h("02 81 04 00" + ID_B + "80060000 00000000 ee040000 01 03 0000"
        + "01000000 02000000 03000000"), h("c3a9")]),
    (RelSizeReply(**B, status=Status.OK, rel=REL_B, exists=True, nblocks=0x01020304),
     [h("02 82 00 00" + ID_B + "80060000 00000000 ee040000 01 01 0000 04030201")]),
    (RelSizeReply(**B, status=Status.OK, rel=REL_B, exists=False, nblocks=0),
     [h("02 82 00 00" + ID_B + "80060000 00000000 ee040000 01 00 0000 00000000")]),
    (RelSizeReply(**A, status=Status.INVALID_REQUEST, rel=REL_A, reason=""),
     [h("02 82 02 00" + ID_A + "7f060000 05000000 00400000 00 00 0000 00000000"), b""]),
    (DbSizeReply(**C, status=Status.OK, db=0xDEADBEEF, size=0x100000000),
     [h("02 83 00 00" + ID_C + "efbeadde 00000000 0000000001000000")]),
    (DbSizeReply(**C, status=Status.INTERNAL_ERROR, db=7, reason="boom"),
     [h("02 83 03 00" + ID_C + "07000000 00000000 0000000000000000"), h("626f6f6d")]),
    (SlruSegmentReply(**D, status=Status.OK, slru_kind=SlruKind.MULTIXACT_OFFSETS,
                      segno=0x12345, segment=SEG),
     [h("02 84 00 00" + ID_D + "02 000000 45230100"), SEG]),
    (SlruSegmentReply(**D, status=Status.OK, slru_kind=SlruKind.CLOG, segno=1, segment=b""),
     [h("02 84 00 00" + ID_D + "00 000000 01000000"), b""]),
    (SlruSegmentReply(**D, status=Status.NOT_FOUND, slru_kind=SlruKind.MULTIXACT_MEMBERS,
                      segno=9, reason="gone"),
     [h("02 84 01 00" + ID_D + "01 000000 09000000"), h("676f6e65")]),
]


@pytest.mark.parametrize("msg,frames", REQUEST_TABLE, ids=lambda x: type(x).__name__)
def test_request_exact_bytes(msg, frames):
    assert encode_request(msg) == frames
    assert decode_request(frames) == msg
    assert peek_request_id(frames[0]) == (msg.id, msg.attempt)
    if isinstance(msg, GetPagesRequest):
        assert encode_get_pages(msg.id, msg.attempt, msg.cls, msg.lsn, msg.nms, msg.rel,
                                list(msg.blocks)) == frames[0]


@pytest.mark.parametrize("msg,frames", REPLY_TABLE, ids=lambda x: type(x).__name__)
def test_reply_exact_bytes(msg, frames):
    assert encode_reply(msg) == frames
    assert decode_reply(frames) == msg


def test_table_covers_every_kind_and_status():
    assert {type(m) for m, _ in REQUEST_TABLE} == {
        GetPagesRequest, RelSizeRequest, DbSizeRequest, SlruSegmentRequest}
    assert {type(m) for m, _ in REPLY_TABLE} == {
        GetPagesReply, RelSizeReply, DbSizeReply, SlruSegmentReply}
    assert {m.status for m, _ in REPLY_TABLE} == set(Status)
    assert {m.cls for m, _ in REQUEST_TABLE} == set(RequestClass)
    assert {m.slru_kind for m, _ in REQUEST_TABLE + REPLY_TABLE
            if hasattr(m, "slru_kind")} == set(SlruKind)
    for t in (REQUEST_TABLE, REPLY_TABLE):  # every message kind has an OK and an error form
        for _, frames in t:
            assert frames[0][0] == PROTOCOL_VERSION
            assert all(len(f) <= MAX_MESSAGE_BYTES for f in frames)


def test_error_reply_echoes_request():
    for req, _ in REQUEST_TABLE:
        rep = error_reply(req, Status.SLOW_DOWN, "later")
        assert (rep.id, rep.attempt, rep.lsn, rep.nms, rep.kind) == (
            req.id, req.attempt, req.lsn, req.nms, req.kind)
        assert decode_reply(encode_reply(rep)) == rep
        for field in ("rel", "blocks", "db", "slru_kind", "segno"):
            if hasattr(req, field):
                assert getattr(rep, field) == getattr(req, field)
    with pytest.raises(ProtocolError):
        error_reply(REQUEST_TABLE[0][0], Status.OK, "")


def test_long_reason_is_truncated_on_a_character_boundary():
    req = REQUEST_TABLE[0][0]
    frames = encode_reply(error_reply(req, Status.INTERNAL_ERROR, "é" * 1000))  # 2000 bytes
    assert len(frames[1]) <= MAX_REASON_BYTES
    assert decode_reply(frames).reason == "é" * 512


# ------------------------------------------------------------------ (b) round trips

u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
blocknos = st.lists(st.integers(0, 0xFFFFFFFE), min_size=1, max_size=32).map(tuple)
rels = st.builds(RelTag, u32, u32, u32, st.integers(0, 3))
reasons = st.text(max_size=300).filter(lambda s: len(s.encode()) <= MAX_REASON_BYTES)
page = st.sampled_from([bytes(BLCKSZ), PAGE1, PAGE2, bytes(range(256)) * 32])


@st.composite
def lsns(draw):
    lsn = draw(u64)
    return lsn, draw(st.integers(0, lsn))


@st.composite
def requests(draw):
    lsn, nms = draw(lsns())
    common = dict(id=draw(u64), attempt=draw(u32), cls=draw(st.sampled_from(RequestClass)),
                  lsn=lsn, nms=nms)
    kind = draw(st.sampled_from([GetPagesRequest, RelSizeRequest, DbSizeRequest,
                                 SlruSegmentRequest]))
    if kind is GetPagesRequest:
        return kind(**common, rel=draw(rels), blocks=draw(blocknos))
    if kind is RelSizeRequest:
        return kind(**common, rel=draw(rels), allow_missing=draw(st.booleans()))
    if kind is DbSizeRequest:
        return kind(**common, db=draw(u32))
    return kind(**common, slru_kind=draw(st.sampled_from(SlruKind)), segno=draw(u32))


@st.composite
def replies(draw):
    lsn, nms = draw(lsns())
    status = draw(st.sampled_from(Status))
    ok = status == Status.OK
    common = dict(id=draw(u64), attempt=draw(u32), status=status, lsn=lsn, nms=nms,
                  reason="" if ok else draw(reasons))
    kind = draw(st.sampled_from([GetPagesReply, RelSizeReply, DbSizeReply, SlruSegmentReply]))
    if kind is GetPagesReply:
        blocks = draw(blocknos)
        pages = tuple(draw(page) for _ in blocks) if ok else ()
        return kind(**common, rel=draw(rels), blocks=blocks, pages=pages)
    if kind is RelSizeReply:
        return kind(**common, rel=draw(rels), exists=draw(st.booleans()), nblocks=draw(u32))
    if kind is DbSizeReply:
        return kind(**common, db=draw(u32), size=draw(u64))
    npages = draw(st.integers(0, 32)) if ok else 0
    return kind(**common, slru_kind=draw(st.sampled_from(SlruKind)), segno=draw(u32),
                segment=bytes([draw(st.integers(0, 255))]) * (npages * BLCKSZ))


@FAST
@given(requests())
def test_request_round_trip(msg):
    frames = encode_request(msg)
    assert len(frames) == 1 and len(frames[0]) <= MAX_MESSAGE_BYTES
    assert decode_request(frames) == msg
    assert decode_request([bytearray(frames[0])]) == msg  # any bytes-like frame
    assert peek_request_id(frames[0]) == (msg.id, msg.attempt)


@FAST
@given(replies())
def test_reply_round_trip(msg):
    frames = encode_reply(msg)
    assert all(len(f) <= MAX_MESSAGE_BYTES for f in frames)
    assert decode_reply(frames) == msg
    assert decode_reply([memoryview(f) for f in frames]).id == msg.id


def test_max_sizes_fit_in_max_message_bytes():
    big = SlruSegmentReply(1, 0, Status.OK, 5, 5, SlruKind.CLOG, 0, b"\0" * (32 * BLCKSZ))
    assert max(len(f) for f in encode_reply(big)) <= MAX_MESSAGE_BYTES
    with pytest.raises(ProtocolError):
        encode_reply(SlruSegmentReply(1, 0, Status.OK, 5, 5, SlruKind.CLOG, 0,
                                      b"\0" * (33 * BLCKSZ)))


# ------------------------------------------------------------------ (c) fuzzing

VALID_FRAMES = [f for _, f in REQUEST_TABLE + REPLY_TABLE]


def decode_either(frames):
    """Feed both decoders; each must return a valid message or raise ProtocolError."""
    for decode in (decode_request, decode_reply):
        try:
            msg = decode(frames)
        except ProtocolError:
            continue
        # A decoded message is valid: it re-encodes without error, to a decodable form.
        again = (encode_request if decode is decode_request else encode_reply)(msg)
        assert decode(again) == msg


junk_frame = st.one_of(st.binary(max_size=80), st.binary(min_size=BLCKSZ, max_size=BLCKSZ),
                       st.none(), st.integers(), st.text(max_size=40), st.floats(),
                       st.just(bytearray(b"\x01" * 40)), st.just(memoryview(b"\x01\x81")),
                       st.just([1, 2, 3]), st.just(b"\x00" * BLCKSZ))


@FAST
@given(st.lists(junk_frame, max_size=40))
def test_fuzz_random_frame_lists(frames):
    decode_either(frames)


@FAST
@given(st.one_of(st.none(), st.integers(), st.binary(), st.text(), st.dictionaries(st.text(),
                                                                                   st.text())))
def test_fuzz_not_a_frame_list(obj):
    for decode in (decode_request, decode_reply):
        with pytest.raises(ProtocolError):
            decode(obj)


@st.composite
def mutated(draw):
    frames = [bytes(f) for f in draw(st.sampled_from(VALID_FRAMES))]
    i = draw(st.integers(0, len(frames) - 1))
    f = bytearray(frames[i])
    op = draw(st.sampled_from(["truncate", "extend", "flip", "set", "drop", "add", "swap",
                               "replace"]))
    if op == "truncate":
        f = f[:draw(st.integers(0, max(0, len(f) - 1)))]
    elif op == "extend":
        f += draw(st.binary(min_size=1, max_size=16))
    elif op in ("flip", "set") and f:
        for _ in range(draw(st.integers(1, 4))):
            j = draw(st.integers(0, min(len(f), 64) - 1))  # mostly header bytes
            f[j] = f[j] ^ (1 << draw(st.integers(0, 7))) if op == "flip" else draw(
                st.integers(0, 255))
    frames[i] = bytes(f)
    if op == "drop" and len(frames) > 1:
        del frames[draw(st.integers(0, len(frames) - 1))]
    elif op == "add":
        frames.insert(draw(st.integers(0, len(frames))), draw(junk_frame))
    elif op == "swap" and len(frames) > 1:
        frames.reverse()
    elif op == "replace":  # a non-bytes or odd-sized object where a page/reason/segment goes
        frames[i] = draw(junk_frame)
    return frames


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated())
def test_fuzz_mutated_valid_encodings(frames):
    decode_either(frames)


@FAST
@given(st.sampled_from(VALID_FRAMES), st.integers(4, 0xFFFF), st.binary(min_size=32,
                                                                        max_size=32))
def test_fuzz_overwritten_prefix_fields(frames, _seed, prefix):
    decode_either([prefix + frames[0][32:]] + frames[1:])


def _with_byte(frame: bytes, offset: int, value: int) -> bytes:
    return frame[:offset] + bytes([value]) + frame[offset + 1:]


@pytest.mark.parametrize("msg,frames", REQUEST_TABLE + REPLY_TABLE,
                         ids=lambda x: type(x).__name__)
def test_each_invalid_field_is_rejected(msg, frames):
    decode = decode_request if msg in [m for m, _ in REQUEST_TABLE] else decode_reply
    head, rest = frames[0], frames[1:]
    bad_heads = [
        _with_byte(head, 0, 0), _with_byte(head, 0, PROTOCOL_VERSION + 1),  # version
        _with_byte(head, 1, 0), _with_byte(head, 1, head[1] ^ 0x80),        # kind / direction
        _with_byte(head, 1, (head[1] & 0x80) | 5),                          # unknown kind
        _with_byte(head, 2, 5 if decode is decode_reply else 3),            # status / class
        _with_byte(head, 3, 1), _with_byte(head, 3, 0x80),                  # flags
        head[:24] + struct.pack("<Q", 1 << 63) + head[32:] if msg.lsn < 1 << 63 else
        head[:16] + struct.pack("<Q", 0) + struct.pack("<Q", 1) + head[32:],  # nms > lsn
        head[:31], head + b"\0", head[:-1],                                  # lengths
    ]
    if hasattr(msg, "rel"):
        bad_heads += [_with_byte(head, 44, 4), _with_byte(head, 46, 1), _with_byte(head, 47, 1)]
    if hasattr(msg, "slru_kind"):
        bad_heads += [_with_byte(head, 32, 3)] + [_with_byte(head, i, 1) for i in (33, 34, 35)]
    if isinstance(msg, DbSizeReply):
        bad_heads += [_with_byte(head, 36, 1)]
    if isinstance(msg, RelSizeRequest | RelSizeReply):
        bad_heads += [_with_byte(head, 45, 2)]
    if isinstance(msg, GetPagesRequest | GetPagesReply):
        bad_heads += [_with_byte(head, 45, 0), _with_byte(head, 45, 33),
                      head[:48] + b"\xff\xff\xff\xff" + head[52:]]       # InvalidBlockNumber
    for bad in bad_heads:
        with pytest.raises(ProtocolError):
            decode([bad] + rest)
    with pytest.raises(ProtocolError):
        decode(frames + [b"extra"])
    with pytest.raises(ProtocolError):
        decode([head] * 40)


def test_bad_reply_bodies_are_rejected():
    ok_pages = REPLY_TABLE[0][1]
    err = REPLY_TABLE[1][1]
    seg = REPLY_TABLE[8][1]
    cases = [
        [ok_pages[0][:-BLCKSZ]],                        # one page missing
        [ok_pages[0][:-1]],                             # short page
        [ok_pages[0] + b"\0"],                          # a byte too many
        [ok_pages[0] + b"\0" * BLCKSZ],                 # a page too many
        [ok_pages[0][:-BLCKSZ], ok_pages[0][-BLCKSZ:]],  # version 1's page frames
        [ok_pages[0], b""],                             # a second frame
        ["x" * len(ok_pages[0])],                       # str is not bytes
        [None],
        [err[0]],                                       # error without reason frame
        [err[0], b"\xff\xfe"],                          # reason not UTF-8
        [err[0], b"x" * (MAX_REASON_BYTES + 1)],        # reason too long
        [err[0], "text"], [err[0], 12], [err[0], None],
        [seg[0], SEG[:-1]],                             # not whole pages
        [seg[0], b"\0" * (33 * BLCKSZ)],                # over 32 pages
        [seg[0]], [seg[0], 5],
    ]
    for frames in cases:
        with pytest.raises(ProtocolError):
            decode_reply(frames)


def test_peek_request_id_tolerates_garbage():
    assert peek_request_id(b"") is None
    assert peek_request_id(bytes([PROTOCOL_VERSION + 1]) + bytes(40)) is None
    assert peek_request_id(b"\x01" + bytes(40)) is None  # version 1 is not spoken any more
    assert peek_request_id(None) is None  # type: ignore[arg-type]
    assert peek_request_id(bytes([PROTOCOL_VERSION, 0x63]) + bytes(2) + struct.pack("<QI", 9, 2)
                           + bytes(16)) == (9, 2)


# ------------------------------------------------------------------ (d) encode-side checks

GOOD_REQ = REQUEST_TABLE[0][0]
ARGS = dict(id=1, attempt=0, lsn=10, nms=5)


@pytest.mark.parametrize("msg", [
    GetPagesRequest(**ARGS, cls=0, rel=REL_A, blocks=()),
    GetPagesRequest(**ARGS, cls=0, rel=REL_A, blocks=tuple(range(33))),
    GetPagesRequest(**ARGS, cls=0, rel=REL_A, blocks=(0xFFFFFFFF,)),
    GetPagesRequest(**ARGS, cls=0, rel=REL_A, blocks=(-1,)),
    GetPagesRequest(**ARGS, cls=0, rel=REL_A, blocks=(1 << 32,)),
    GetPagesRequest(**ARGS, cls=0, rel=REL_A, blocks=("1",)),
    GetPagesRequest(**ARGS, cls=3, rel=REL_A, blocks=(1,)),
    GetPagesRequest(**ARGS, cls=None, rel=REL_A, blocks=(1,)),
    GetPagesRequest(1, 0, 0, 5, 10, REL_A, (1,)),                    # nms > lsn
    GetPagesRequest(-1, 0, 0, 10, 5, REL_A, (1,)),
    GetPagesRequest(1 << 64, 0, 0, 10, 5, REL_A, (1,)),
    GetPagesRequest(1, 1 << 32, 0, 10, 5, REL_A, (1,)),
    GetPagesRequest(1, 0, 0, 1 << 64, 5, REL_A, (1,)),
    GetPagesRequest(**ARGS, cls=0, rel=RelTag(1, 2, 3, 4), blocks=(1,)),
    GetPagesRequest(**ARGS, cls=0, rel=RelTag(1 << 32, 2, 3, 0), blocks=(1,)),
    GetPagesRequest(**ARGS, cls=0, rel=(1, 2, 3, 0), blocks=(1,)),  # type: ignore[arg-type]
    RelSizeRequest(**ARGS, cls=0, rel=RelTag(1, 2, 3, 7), allow_missing=False),
    RelSizeRequest(**ARGS, cls=9, rel=REL_A, allow_missing=False),
    RelSizeRequest(1, 0, 0, 5, 10, REL_A, False),
    DbSizeRequest(**ARGS, cls=0, db=1 << 32),
    DbSizeRequest(**ARGS, cls=0, db=-1),
    SlruSegmentRequest(**ARGS, cls=0, slru_kind=3, segno=0),
    SlruSegmentRequest(**ARGS, cls=0, slru_kind=0, segno=1 << 32),
    REPLY_TABLE[0][0], None, object(), "request",
])
def test_encode_request_rejects(msg):
    with pytest.raises(ProtocolError):
        encode_request(msg)


@pytest.mark.parametrize("msg", [
    GetPagesReply(**ARGS, status=Status.OK, rel=REL_A, blocks=(1, 2), pages=(PAGE1,)),
    GetPagesReply(**ARGS, status=Status.OK, rel=REL_A, blocks=(1,), pages=(PAGE1[:-1],)),
    GetPagesReply(**ARGS, status=Status.OK, rel=REL_A, blocks=(1,), pages=("x" * BLCKSZ,)),
    GetPagesReply(**ARGS, status=Status.OK, rel=REL_A, blocks=(), pages=()),
    GetPagesReply(**ARGS, status=Status.NOT_FOUND, rel=REL_A, blocks=(0xFFFFFFFF,)),
    GetPagesReply(**ARGS, status=Status.NOT_FOUND, rel=REL_A, blocks=(1,), reason=None),
    GetPagesReply(**ARGS, status=5, rel=REL_A, blocks=(1,), reason="x"),
    GetPagesReply(1, 0, Status.NOT_FOUND, 5, 10, REL_A, (1,), reason="x"),
    GetPagesReply(**ARGS, status=Status.NOT_FOUND, rel=RelTag(1, 2, 3, 4), blocks=(1,)),
    RelSizeReply(**ARGS, status=Status.OK, rel=RelTag(1, 2, 3, 4)),
    RelSizeReply(**ARGS, status=Status.OK, rel=REL_A, nblocks=1 << 32),
    DbSizeReply(**ARGS, status=Status.OK, db=1, size=1 << 64),
    DbSizeReply(**ARGS, status=Status.OK, db=-1),
    SlruSegmentReply(**ARGS, status=Status.OK, slru_kind=0, segno=0, segment=b"x"),
    SlruSegmentReply(**ARGS, status=Status.OK, slru_kind=0, segno=0, segment="x" * BLCKSZ),
    SlruSegmentReply(**ARGS, status=Status.OK, slru_kind=4, segno=0),
    GOOD_REQ, None, object(),
])
def test_encode_reply_rejects(msg):
    with pytest.raises(ProtocolError):
        encode_reply(msg)


def test_encode_get_pages_rejects():
    for bad in [dict(blocks=[]), dict(blocks=[0xFFFFFFFF]), dict(cls=7), dict(nms=11),
                dict(rel=RelTag(1, 2, 3, 4)), dict(rel=None), dict(blocks=None),
                dict(id=-1), dict(lsn="10")]:
        args = dict(id=1, attempt=0, cls=0, lsn=10, nms=5, rel=REL_A, blocks=[1]) | bad
        with pytest.raises(ProtocolError):
            encode_get_pages(**args)


# ------------------------------------------------------------------ (e) hot-path helpers
# decode_get_pages_reply_fast and ok_get_pages_reply must agree with the general
# functions byte for byte: the fast path may only ever say "not mine" (None).


def fast_agrees(frames):
    """The fast decoder accepts exactly the well-formed OK GetPages replies (a frame of
    bytes or any other buffer), with decode_reply's values; anything else (malformed
    included) is None."""
    fast = decode_get_pages_reply_fast(frames)
    try:
        rep = decode_reply(frames)
    except ProtocolError:
        assert fast is None
        return
    if isinstance(rep, GetPagesReply) and rep.status == Status.OK:
        assert fast is not None
        assert fast[:6] == (rep.id, rep.attempt, rep.lsn, rep.nms, tuple(rep.rel), rep.blocks)
        assert fast[4] == rep.rel
        assert all(type(p) is bytes for p in fast[6]) and tuple(fast[6]) == rep.pages
    else:
        assert fast is None


@st.composite
def ok_get_pages_replies(draw):
    lsn, nms = draw(lsns())
    blocks = draw(blocknos)
    return GetPagesReply(draw(u64), draw(u32), Status.OK, lsn, nms, draw(rels), blocks,
                         tuple(draw(page) for _ in blocks))


@FAST
@given(st.one_of(ok_get_pages_replies(), replies()))
def test_fast_decode_agrees_on_valid_replies(msg):
    frames = encode_reply(msg)
    fast_agrees(frames)
    fast_agrees(tuple(frames))
    fast_agrees([bytearray(f) for f in frames])  # any buffer, like a zmq.Frame
    fast_agrees([memoryview(f) for f in frames])
    if isinstance(msg, GetPagesReply) and msg.status == Status.OK:
        assert decode_get_pages_reply_fast(frames) is not None


@st.composite
def mutated_get_pages(draw):
    frames = encode_reply(draw(ok_get_pages_replies()))
    op = draw(st.sampled_from(["set", "truncate", "extend", "drop", "add", "replace"]))
    i = draw(st.integers(0, len(frames) - 1))
    if op == "set":  # any header byte, including status, flags, rel, count and blocks
        f = bytearray(frames[0])
        for _ in range(draw(st.integers(1, 3))):
            f[draw(st.integers(0, len(f) - 1))] = draw(st.integers(0, 255))
        frames[0] = bytes(f)
    elif op == "truncate":
        frames[i] = frames[i][:draw(st.integers(0, max(0, len(frames[i]) - 1)))]
    elif op == "extend":
        frames[i] += draw(st.binary(min_size=1, max_size=8))
    elif op == "drop" and len(frames) > 1:
        del frames[i]
    elif op == "add":
        frames.insert(draw(st.integers(0, len(frames))), draw(junk_frame))
    elif op == "replace":
        frames[i] = draw(junk_frame)
    return frames


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_get_pages())
def test_fast_decode_agrees_on_mutated_get_pages_replies(frames):
    fast_agrees(frames)


@FAST
@given(st.one_of(mutated(), st.lists(junk_frame, max_size=40)))
def test_fast_decode_agrees_on_junk(frames):
    fast_agrees(frames)


@pytest.mark.parametrize("obj", [None, 5, b"\x01\x81", "text", {0: b"x"}, [], ()])
def test_fast_decode_rejects_non_frame_lists(obj):
    assert decode_get_pages_reply_fast(obj) is None


@FAST
@given(st.builds(GetPagesRequest, u64, u32, st.sampled_from(RequestClass), st.just(0),
                 st.just(0), rels, blocknos), st.data())
def test_ok_get_pages_reply_matches_encode_reply(req, data):
    lsn, nms = data.draw(lsns())
    req = GetPagesRequest(req.id, req.attempt, req.cls, lsn, nms, req.rel, req.blocks)
    pages = tuple(data.draw(page) for _ in req.blocks)
    frame = ok_get_pages_reply(encode_request(req)[0], pages)
    reply = GetPagesReply(req.id, req.attempt, Status.OK, lsn, nms, req.rel, req.blocks, pages)
    assert [frame] == encode_reply(reply)
