"""Key -> shard mapping, compatible with Neon's pageserver (libs/pageserver_api shard.rs).

Blocks are grouped in stripes of ``stripe_size`` consecutive blocks; a stripe's
shard is a hash of (relfilenode, stripe number) built from PostgreSQL's
hashfn.h functions. Unsharded tenants, and the init fork (needed by every shard
to reset unlogged relations), live on shard 0.

:func:`shard_for` is the public entry point and checks its arguments;
:func:`shard_for_unchecked` is the same hash without the checks, for hot paths
whose arguments were validated once already (the communicator's shard map, the
page server's ownership check, the importer and the generator).
"""

from __future__ import annotations

from ._errors import InvalidArgument, InvalidArgumentType
from ._types import INIT_FORKNUM, MAX_BLOCKNO, RelTag, check_reltag

_M32 = 0xFFFFFFFF
DEFAULT_STRIPE_SIZE = 2048


def murmurhash32(h: int) -> int:
    """PostgreSQL's murmurhash32 finaliser (hashfn.h), modulo 2**32."""
    h &= _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


def hash_combine(a: int, b: int) -> int:
    """PostgreSQL's hash_combine (hashfn.h), modulo 2**32."""
    b = (b + 0x9E3779B9 + ((a << 6) & _M32) + (a >> 2)) & _M32
    return (a ^ b) & _M32


def check_shard_params(shard_count: int, stripe_size: int) -> None:
    if (not isinstance(shard_count, int) or isinstance(shard_count, bool)
            or not 1 <= shard_count <= 255):
        raise InvalidArgument(f"shard_count must be an int in 1..255, got {shard_count!r}")
    if not isinstance(stripe_size, int) or isinstance(stripe_size, bool) or stripe_size < 1:
        raise InvalidArgument(f"stripe_size must be a positive int, got {stripe_size!r}")


def _check_int(name: str, v: object, lo: int, hi: int | None) -> None:
    if not isinstance(v, int) or isinstance(v, bool):
        raise InvalidArgumentType(f"{name} must be an int, got {type(v).__name__}")
    if hi is None and v < lo:
        raise InvalidArgument(f"{name}={v} must be at least {lo}")
    if hi is not None and not lo <= v <= hi:
        raise InvalidArgument(f"{name}={v} is outside {lo}..{hi}")


def shard_for(rel: RelTag, blkno: int, shard_count: int,
              stripe_size: int = DEFAULT_STRIPE_SIZE) -> int:
    """The shard (0..shard_count-1) that owns block ``blkno`` of ``rel``.

    Checks its arguments: ``rel`` a valid RelTag, ``blkno`` in 0..MAX_BLOCKNO,
    ``shard_count`` an int in 1..255, ``stripe_size`` an int >= 1
    (InvalidArgumentType for a wrong type, InvalidArgument for a value out of
    range, each naming the argument)."""
    check_reltag(rel)
    _check_int("blkno", blkno, 0, MAX_BLOCKNO)
    _check_int("shard_count", shard_count, 1, 255)
    _check_int("stripe_size", stripe_size, 1, None)
    return shard_for_unchecked(rel, blkno, shard_count, stripe_size)


def shard_for_unchecked(rel: RelTag, blkno: int, shard_count: int,
                        stripe_size: int = DEFAULT_STRIPE_SIZE) -> int:
    """:func:`shard_for` without argument checks, for hot paths whose arguments are
    known valid (garbage in, garbage out)."""
    if shard_count < 2 or rel.fork == INIT_FORKNUM:
        return 0
    h = murmurhash32(rel.rel)
    h = hash_combine(h, murmurhash32(blkno // stripe_size))
    return h % shard_count
