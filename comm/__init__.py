"""pagecomm's communicator: many backends, one set of pipelined connections per shard.

    import comm
    with comm.Communicator(["tcp://127.0.0.1:6400"]) as c, c.backend() as be:
        page = be.get_page(comm.RelTag(1663, 5, 16384), 0, lsn=lsn)
"""

from shards import MAIN_FORKNUM, RelTag
from shards.protocol import SlruKind

from ._attach import ProcBackend, attach
from ._backend import Backend
from ._communicator import Communicator
from ._config import CommConfig
from ._errors import (
    Cancelled,
    CommClosed,
    CommError,
    ConfigError,
    InvalidRequest,
    InvalidStateError,
    NotFound,
    PageNotFound,
    RelationNotFound,
    RequestTimeout,
    ServerError,
    ShardUnavailable,
    WrongShard,
)
from ._slot import Slot, SlotState

__all__ = [
    "MAIN_FORKNUM", "Backend", "ProcBackend", "attach", "Cancelled", "CommClosed",
    "CommConfig", "CommError",
    "Communicator", "ConfigError", "InvalidRequest", "InvalidStateError", "NotFound",
    "PageNotFound", "RelTag", "RelationNotFound", "RequestTimeout", "ServerError",
    "ShardUnavailable", "Slot", "SlotState", "SlruKind", "WrongShard",
]
