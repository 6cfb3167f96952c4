"""Errors of the page-service side. ``shards`` imports nothing of the project, so
its errors stand alone; ``comm`` translates them into its own tree at one boundary."""

from __future__ import annotations


class ShardsError(Exception):
    """Base of every error raised by the ``shards`` package."""


class InvalidArgument(ShardsError, ValueError):
    """An argument's value is out of its range or does not fit (a shard beyond the
    store's shard count, a page of the wrong size, a shard count other than the
    store's). A ValueError too, as such errors always were."""


class InvalidArgumentType(ShardsError, TypeError):
    """An argument is of the wrong type (a str where a RelTag or an int belongs).
    A TypeError too, as such errors always were."""


class ProtocolError(ShardsError, ValueError):
    """A frame sequence is malformed, truncated, oversized, of an unknown version or
    kind, or carries a field outside its range. The only error decoding raises."""


class StoreError(ShardsError):
    """The page store failed (LMDB error, corrupt record, closed store). Wraps
    ``lmdb.Error`` so callers never see it."""


class PgImportError(ShardsError):
    """A PostgreSQL data directory could not be imported (not stopped, unreadable, bad layout)."""
