"""The protocol's messages: kinds, classes, statuses, and one frozen dataclass per
request and reply. Their byte layout lives in _protocol.py (docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from ._types import RelTag


class Kind(IntEnum):
    GET_PAGES = 1
    REL_SIZE = 2
    DB_SIZE = 3
    SLRU_SEGMENT = 4


class RequestClass(IntEnum):
    NORMAL = 0
    PREFETCH = 1
    BACKGROUND = 2


class Status(IntEnum):
    OK = 0
    NOT_FOUND = 1
    INVALID_REQUEST = 2
    INTERNAL_ERROR = 3
    SLOW_DOWN = 4


class SlruKind(IntEnum):
    CLOG = 0  # pg_xact
    MULTIXACT_MEMBERS = 1  # pg_multixact/members
    MULTIXACT_OFFSETS = 2  # pg_multixact/offsets


@dataclass(frozen=True, slots=True)
class GetPagesRequest:
    id: int
    attempt: int
    cls: RequestClass
    lsn: int
    nms: int
    rel: RelTag
    blocks: tuple[int, ...]
    kind = Kind.GET_PAGES


@dataclass(frozen=True, slots=True)
class RelSizeRequest:
    id: int
    attempt: int
    cls: RequestClass
    lsn: int
    nms: int
    rel: RelTag
    allow_missing: bool
    kind = Kind.REL_SIZE


@dataclass(frozen=True, slots=True)
class DbSizeRequest:
    id: int
    attempt: int
    cls: RequestClass
    lsn: int
    nms: int
    db: int
    kind = Kind.DB_SIZE


@dataclass(frozen=True, slots=True)
class SlruSegmentRequest:
    id: int
    attempt: int
    cls: RequestClass
    lsn: int
    nms: int
    slru_kind: SlruKind
    segno: int
    kind = Kind.SLRU_SEGMENT


@dataclass(frozen=True, slots=True)
class GetPagesReply:
    id: int
    attempt: int
    status: Status
    lsn: int
    nms: int
    rel: RelTag
    blocks: tuple[int, ...]
    pages: tuple[bytes, ...] = ()
    reason: str = ""
    kind = Kind.GET_PAGES


@dataclass(frozen=True, slots=True)
class RelSizeReply:
    id: int
    attempt: int
    status: Status
    lsn: int
    nms: int
    rel: RelTag
    exists: bool = False
    nblocks: int = 0
    reason: str = ""
    kind = Kind.REL_SIZE


@dataclass(frozen=True, slots=True)
class DbSizeReply:
    id: int
    attempt: int
    status: Status
    lsn: int
    nms: int
    db: int
    size: int = 0
    reason: str = ""
    kind = Kind.DB_SIZE


@dataclass(frozen=True, slots=True)
class SlruSegmentReply:
    id: int
    attempt: int
    status: Status
    lsn: int
    nms: int
    slru_kind: SlruKind
    segno: int
    segment: bytes = b""
    reason: str = ""
    kind = Kind.SLRU_SEGMENT


Request = GetPagesRequest | RelSizeRequest | DbSizeRequest | SlruSegmentRequest
Reply = GetPagesReply | RelSizeReply | DbSizeReply | SlruSegmentReply
