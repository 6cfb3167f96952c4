"""pagecomm's page service: the API types, the wire protocol, the shard map, the
versioned page store, the page server and the PostgreSQL importer.

``shards`` imports nothing else of the project (the page service owns its API).
"""

from ._checksum import pg_checksum_page, verify_page_checksum
from ._cluster import LocalCluster
from ._errors import (
    InvalidArgument,
    InvalidArgumentType,
    PgImportError,
    ProtocolError,
    ShardsError,
    StoreError,
)
from ._layout import open_shard_store, read_layout
from ._pgimport import ImportResult, import_pgdata
from ._server import PageServer, ServerFaults
from ._shardmap import DEFAULT_STRIPE_SIZE, hash_combine, murmurhash32, shard_for
from ._store import PageStore
from ._synth import generate_store, synth_page, synth_pages
from ._types import (
    BLCKSZ,
    FSM_FORKNUM,
    INIT_FORKNUM,
    MAIN_FORKNUM,
    MAX_BLOCKNO,
    MAX_BLOCKS_PER_REQUEST,
    VISIBILITYMAP_FORKNUM,
    RelTag,
    check_reltag,
)

__all__ = [
    "BLCKSZ", "DEFAULT_STRIPE_SIZE", "FSM_FORKNUM", "INIT_FORKNUM", "MAIN_FORKNUM",
    "MAX_BLOCKNO", "MAX_BLOCKS_PER_REQUEST", "VISIBILITYMAP_FORKNUM",
    "ImportResult", "InvalidArgument", "InvalidArgumentType", "LocalCluster", "PageServer",
    "PageStore", "PgImportError",
    "ProtocolError", "RelTag", "ServerFaults", "ShardsError", "StoreError",
    "check_reltag", "generate_store", "hash_combine", "import_pgdata", "murmurhash32",
    "open_shard_store", "pg_checksum_page", "read_layout", "shard_for", "synth_page", "synth_pages",
    "verify_page_checksum",
]
