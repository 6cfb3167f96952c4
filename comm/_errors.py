"""The one exception tree of pagecomm, rooted at CommError.

ZeroMQ and page-service errors are translated into these at the boundary where
they happen (worker threads, the server status of a reply); callers never see
``zmq.ZMQError`` or ``shards`` internals. Errors raised for a request travel back
to the calling backend through its slot and are raised in the caller's thread.
"""

from __future__ import annotations


class CommError(Exception):
    """Base of every error pagecomm raises to its callers."""


class InvalidRequest(CommError, ValueError):
    """Bad arguments (raised locally, before anything is sent) or a request the
    page server rejected as invalid (INVALID_REQUEST)."""


class WrongShard(InvalidRequest):
    """A page server answered that a block belongs to another shard: the shard map
    changed (a split). Retried on the new map; raised only if the map did not change."""


class ConfigError(InvalidRequest):
    """A configuration value (argument or ``COMM_*`` variable) is invalid; the
    message names the variable."""


class NotFound(CommError):
    """The page service has no such object at the requested LSN."""


class PageNotFound(NotFound):
    """A requested block does not exist at the requested LSN."""


class RelationNotFound(NotFound):
    """The relation does not exist at the requested LSN."""


class ServerError(CommError):
    """The page server failed internally (INTERNAL_ERROR); not retried."""


class ShardUnavailable(CommError):
    """A shard could not serve the request (unreachable, overloaded past the
    deadline, or it sent a reply that failed validation)."""


class RequestTimeout(ShardUnavailable, TimeoutError):
    """The call's deadline passed before its reply arrived."""


class Cancelled(CommError):
    """The call was cancelled from another thread (``Backend.cancel()``)."""


class CommClosed(CommError):
    """The communicator (or this backend) is closed."""


class InvalidStateError(CommError, RuntimeError):
    """A slot was completed twice or used in the wrong state: a bug, never expected."""
