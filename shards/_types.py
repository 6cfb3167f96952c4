"""Core value types of the page service: relation tags, forks, limits.

Everything here is immutable and cheap to hash, because RelTags are dictionary
keys on every hot path (prefetch buffer, relsize cache, server batches).
"""

from __future__ import annotations

from typing import NamedTuple

from ._errors import InvalidArgument, InvalidArgumentType

BLCKSZ = 8192
"""Size of one PostgreSQL page in bytes."""

MAIN_FORKNUM = 0
FSM_FORKNUM = 1
VISIBILITYMAP_FORKNUM = 2
INIT_FORKNUM = 3
MAX_FORKNUM = INIT_FORKNUM

MAX_BLOCKNO = 0xFFFFFFFE
"""Largest valid block number (0xFFFFFFFF is PostgreSQL's InvalidBlockNumber)."""

MAX_UINT32 = 0xFFFFFFFF
MAX_LSN = 0xFFFFFFFFFFFFFFFF
MAX_BLOCKS_PER_REQUEST = 32
"""Most blocks in one GetPages request (PostgreSQL's PG_IOV_MAX)."""

FORK_SUFFIXES = {MAIN_FORKNUM: "", FSM_FORKNUM: "_fsm", VISIBILITYMAP_FORKNUM: "_vm",
                 INIT_FORKNUM: "_init"}


class RelTag(NamedTuple):
    """Identifies one fork of one relation: (tablespace, database, relfilenode, fork).

    A NamedTuple: frozen, hashable, ordered, and as cheap as a tuple to build and
    hash. Use :meth:`checked` (or :func:`check_reltag`) where the values come from
    outside; the wire decoder and the communicator's argument checks do.
    """

    spc: int
    db: int
    rel: int
    fork: int = MAIN_FORKNUM

    @classmethod
    def checked(cls, spc: int, db: int, rel: int, fork: int = MAIN_FORKNUM) -> RelTag:
        tag = cls(spc, db, rel, fork)
        check_reltag(tag)
        return tag

    def __str__(self) -> str:
        return f"{self.spc}/{self.db}/{self.rel}{FORK_SUFFIXES.get(self.fork, f'.{self.fork}')}"


def check_reltag(tag: object) -> RelTag:
    """Return ``tag`` if it is a valid RelTag, else raise TypeError/ValueError naming the field."""
    if not isinstance(tag, RelTag):
        raise InvalidArgumentType(f"rel must be a RelTag, got {type(tag).__name__}")
    for name in ("spc", "db", "rel"):
        v = getattr(tag, name)
        if not isinstance(v, int) or isinstance(v, bool):
            raise InvalidArgumentType(f"RelTag.{name} must be an int, got {type(v).__name__}")
        if not 0 <= v <= MAX_UINT32:
            raise InvalidArgument(f"RelTag.{name}={v} is outside 0..{MAX_UINT32}")
    f = tag.fork
    if not isinstance(f, int) or isinstance(f, bool):
        raise InvalidArgumentType(f"RelTag.fork must be an int, got {type(f).__name__}")
    if not 0 <= f <= MAX_FORKNUM:
        raise InvalidArgument(f"RelTag.fork={f} is not a known fork (0..{MAX_FORKNUM})")
    return tag
