"""Turning a decoded reply into a result or a typed error, after checking that it
answers the request it claims to answer. Pure functions, no I/O."""

from __future__ import annotations

import re
from typing import Any

from shards.protocol import (
    DbSizeReply,
    GetPagesReply,
    Kind,
    RelSizeReply,
    Reply,
    SlruSegmentReply,
    Status,
)

from ._errors import (
    CommError,
    InvalidRequest,
    NotFound,
    PageNotFound,
    RelationNotFound,
    ServerError,
    ShardUnavailable,
    WrongShard,
)

_THIS_IS = re.compile(r"this is shard (\d+)")  # the page server's own words


def mismatch(job: Any, rep: Reply) -> str | None:
    """Why ``rep`` does not answer ``job`` (None if it does). Replies are matched by
    id first; this catches a desynchronised or misbehaving server."""
    if rep.kind != job.kind:
        return f"reply kind {rep.kind} for a {Kind(job.kind).name} request"
    if rep.attempt != job.attempt or rep.lsn != job.lsn or rep.nms != job.nms:
        return (f"reply echoes attempt {rep.attempt} lsn {rep.lsn:#x}/{rep.nms:#x}, request had "
                f"attempt {job.attempt} lsn {job.lsn:#x}/{job.nms:#x}")
    if isinstance(rep, (GetPagesReply, RelSizeReply)) and rep.rel != job.rel:
        return f"reply for rel {rep.rel}, request for {job.rel}"
    if isinstance(rep, GetPagesReply) and rep.blocks != job.blocks:
        return f"reply for blocks {list(rep.blocks)}, request for {list(job.blocks)}"
    if isinstance(rep, DbSizeReply) and rep.db != job.extra:
        return f"reply for db {rep.db}, request for {job.extra}"
    if isinstance(rep, SlruSegmentReply) and (rep.slru_kind, rep.segno) != job.extra:
        return f"reply for SLRU {rep.slru_kind}/{rep.segno}, request for {job.extra}"
    return None


def error_for(job: Any, rep: Reply) -> CommError:
    """The exception a non-OK, non-retryable status raises in the caller."""
    where = f"shard {job.shard}: {rep.reason}" if rep.reason else f"shard {job.shard}"
    st = rep.status
    if st == Status.NOT_FOUND:
        if job.kind == Kind.GET_PAGES:
            # the server's reason says whether the relation or a block is missing
            if rep.reason.startswith("relation"):
                return RelationNotFound(f"{job.rel} at lsn {job.lsn:#x} not found ({where})")
            return PageNotFound(f"{job.rel} blocks {list(job.blocks)} at lsn {job.lsn:#x} not "
                                f"found ({where})")
        if job.kind == Kind.REL_SIZE:
            return RelationNotFound(f"{job.rel} at lsn {job.lsn:#x} not found ({where})")
        return NotFound(f"{Kind(job.kind).name} at lsn {job.lsn:#x} not found ({where})")
    if st == Status.INVALID_REQUEST:
        if "belongs to shard" in rep.reason:
            return WrongShard(f"{job.rel} blocks {list(job.blocks)} are not on shard "
                              f"{job.shard} ({where}){_layout_hint(job.shard, rep.reason)}")
        return InvalidRequest(f"page server rejected the request ({where})")
    if st == Status.INTERNAL_ERROR:
        if "has not reached" in rep.reason:  # the server waited for WAL up to nms
            return ServerError(f"shard {job.shard} holds no data up to lsn {job.nms:#x} yet "
                               f"({where}); read at an LSN the page servers have reached "
                               f"(at most the store's last_lsn)")
        return ServerError(f"page server failed ({where})")
    if st == Status.SLOW_DOWN:
        return ShardUnavailable(f"page server overloaded until the deadline ({where})")
    return ServerError(f"unexpected status {st} ({where})")


def _layout_hint(shard: int, reason: str) -> str:
    """Why a page server disowns a block that the shard map sends it, when that is
    not a split in progress: the map does not describe the store's layout."""
    m = _THIS_IS.search(reason)
    if m is not None and int(m.group(1)) != shard:
        return (f"; the page server this communicator maps as shard {shard} says it is "
                f"shard {m.group(1)}: list the endpoints (COMM_SHARDS) in shard order")
    return ("; if no split is under way, the stripe size (COMM_STRIPE_SIZE) or the number "
            "of shards does not match the store's layout.json")


def result_of(rep: Reply) -> Any:
    """The value an OK reply delivers to the slot."""
    if isinstance(rep, GetPagesReply):
        return rep.pages
    if isinstance(rep, RelSizeReply):
        return (rep.exists, rep.nblocks)
    if isinstance(rep, DbSizeReply):
        return rep.size
    return rep.segment


def per_block(rep: Any) -> bool:
    """Whether an error reply may concern only some of a batch's blocks (a block
    beyond the end, a block another shard now owns), so that each member must be
    asked on its own; otherwise (a missing relation, an overloaded or failing
    server, an LSN not reached) the answer is the same for every member."""
    if rep.status == Status.NOT_FOUND:
        return not rep.reason.startswith("relation")
    return rep.status == Status.INVALID_REQUEST
