"""Argument checks done in the caller's thread before anything is sent.
Every failure is an InvalidRequest that names the argument."""

from __future__ import annotations

import math
import os
import threading
from typing import Any

from shards import MAX_BLOCKNO, RelTag, check_reltag
from shards._endpoint import endpoint_problem
from shards._types import MAX_FORKNUM
from shards._types import MAX_UINT32 as _U32

from ._errors import CommClosed, ConfigError, InvalidRequest

MAX_LSN = 0xFFFFFFFFFFFFFFFF
MAX_BLOCKS_PER_CALL = 1 << 20  # 8 GiB of pages: more is a mistake, not a read


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise InvalidRequest(f"{name} must be an int, got {type(value).__name__}")
    return value.__index__()


def check_rel(rel: Any) -> RelTag:
    """``rel`` if it is a valid RelTag, else InvalidRequest naming the field. Called on
    every read (no cache of valid tags: RelTag(1663.0, ...) equals and hashes as
    RelTag(1663, ...)), so the common case, plain ints in range, is checked inline."""
    if type(rel) is RelTag:
        spc, db, relno, fork = rel
        if (type(spc) is int and type(db) is int and type(relno) is int
                and type(fork) is int and 0 <= spc <= _U32 and 0 <= db <= _U32
                and 0 <= relno <= _U32 and 0 <= fork <= MAX_FORKNUM):
            return rel
    try:
        return check_reltag(rel)
    except (TypeError, ValueError) as e:
        raise InvalidRequest(f"rel: {e}") from None


def check_block(blkno: Any, name: str = "blkno") -> int:
    b = blkno if type(blkno) is int else _int(blkno, name)
    if not 0 <= b <= MAX_BLOCKNO:
        raise InvalidRequest(f"{name}={b} is outside 0..{MAX_BLOCKNO}")
    return b


def check_blocks(blocks: Any) -> list[int]:
    if type(blocks) is range and blocks.step == 1 and (
            blocks.stop <= blocks.start or (blocks.start >= 0 and blocks.stop - 1 <= MAX_BLOCKNO)):
        if blocks.stop - blocks.start > MAX_BLOCKS_PER_CALL:
            raise _too_many(blocks.stop - blocks.start)
        return list(blocks)  # the common case of scans: valid as a whole
    if isinstance(blocks, (str, bytes)) or not hasattr(blocks, "__iter__"):
        raise InvalidRequest(f"blocks must be an iterable of ints, got {type(blocks).__name__}")
    if type(blocks) is range:  # any other range: its length without making it
        n = max(0, -(-(blocks.stop - blocks.start) // blocks.step))
        if n > MAX_BLOCKS_PER_CALL:
            raise _too_many(n)
    out = []
    for i, b in enumerate(blocks):
        if i == MAX_BLOCKS_PER_CALL:  # a generator may be endless: never hold more
            raise _too_many(i + 1, "more than ")
        out.append(check_block(b, f"blocks[{i}]"))
    return out


def _too_many(n: int, more: str = "") -> InvalidRequest:
    return InvalidRequest(f"{more}{n} blocks in one call; at most {MAX_BLOCKS_PER_CALL} "
                          f"(a page each: ask in smaller pieces)")


def check_lsns(lsn: Any, nms: Any) -> tuple[int, int]:
    lsn_i = lsn if type(lsn) is int else _int(lsn, "lsn")
    if not 0 < lsn_i <= MAX_LSN:
        if lsn_i == 0:  # PostgreSQL's InvalidXLogRecPtr: most likely a forgotten LSN
            raise InvalidRequest("lsn=0 is no LSN (InvalidXLogRecPtr): read at an LSN the "
                                 "page servers hold, such as their store's last_lsn")
        raise InvalidRequest(f"lsn={lsn_i} is outside 1..2**64-1")
    if nms is None:
        return lsn_i, lsn_i
    nms_i = nms if type(nms) is int else _int(nms, "not_modified_since")
    if not 0 <= nms_i <= lsn_i:
        raise InvalidRequest(f"not_modified_since={nms_i:#x} must be between 0 and "
                             f"lsn={lsn_i:#x}")
    return lsn_i, nms_i


_MAX_TIMEOUT = min(threading.TIMEOUT_MAX, 1e7)  # a lock wait refuses longer ones


def check_timeout(timeout: Any, default: float) -> float:
    if timeout is None:
        return default
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise InvalidRequest(f"timeout must be a number of seconds, got "
                             f"{type(timeout).__name__}")
    if not (0 < timeout <= _MAX_TIMEOUT and math.isfinite(timeout)):
        raise InvalidRequest(f"timeout={timeout!r} must be a positive number of seconds up to "
                             f"{_MAX_TIMEOUT:g}")
    return float(timeout)


def check_u32(value: Any, name: str) -> int:
    v = _int(value, name)
    if not 0 <= v <= 0xFFFFFFFF:
        raise InvalidRequest(f"{name}={v} is outside 0..{0xFFFFFFFF}")
    return v


def check_shard_endpoints(endpoints: Any, stripe_size: Any) -> tuple[tuple[str, ...],
                                                                      int | None]:
    """(endpoints, stripe size) of a shard map update, as Communicator.update_shards
    checks them; ConfigError naming what is wrong."""
    if isinstance(endpoints, (str, bytes)):
        raise ConfigError(f"endpoints must be a list of endpoint strings, not one string: "
                          f"{endpoints!r}")
    try:  # once: a generator would be used up by the checks below
        eps = tuple(endpoints)
    except TypeError:
        eps = ()
    if not eps or not all(isinstance(e, str) and "://" in e for e in eps):
        raise ConfigError(f"endpoints must be a non-empty list of endpoint strings, got "
                          f"{endpoints!r}")
    if stripe_size is not None:
        if isinstance(stripe_size, bool) or not hasattr(stripe_size, "__index__") or \
                not 1 <= stripe_size.__index__() <= _U32:
            raise ConfigError(f"stripe_size must be a positive int, got {stripe_size!r}")
        stripe_size = stripe_size.__index__()
    for ep in eps:
        try:
            ep.encode()
            why = endpoint_problem(ep)
        except UnicodeEncodeError:
            why = "is not valid Unicode (a lone surrogate?)"
        if why is None and (not ep.isprintable() or "," in ep):
            why = "holds a comma or an unprintable character"
        if why is not None:
            raise ConfigError(f"endpoint {ep!r} {why}")
    if len(eps) > 255:
        raise ConfigError(f"{len(eps)} shards; at most 255")
    return eps, stripe_size


# forks this process came through: a child's count is its parent's plus one, so an
# object that remembers the count it was made at knows whether it was inherited
FORKS = [0]
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: FORKS.__setitem__(0, FORKS[0] + 1))


def forked_error(what: str) -> CommClosed:
    return CommClosed(f"{what} was created before os.fork(): its threads and sockets did "
                      f"not come into this child process; create a new one in the child")


def check_owner(owner: int | None, name: str, how: str) -> int:
    """The calling thread's id; a handle used by one thread (``owner``, once set) may
    not be used by another: its sockets, slots and completions are not shared."""
    ident = threading.get_ident()
    if owner is not None and owner != ident:
        raise InvalidRequest(f"{name} belongs to another thread; {how}")
    return ident
