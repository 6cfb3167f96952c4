"""PostgreSQL harness for tests: the library's throw-away cluster (shards/_pgcluster.py)
plus the pytest policy: missing binaries skip, or fail loudly when CI=true."""

from __future__ import annotations

import os
from pathlib import Path

from shards._pgcluster import (  # noqa: F401  (re-exported for the tests)
    DEFAULT_PG_BIN,
    PgCluster,
    PgUnavailable,
    find_pg_bin,
    make_pgbench_cluster,
    relation_pages,
)


def require_pg() -> Path:
    """The binaries' directory; skip the test if missing (fail if CI=true)."""
    import pytest

    pg_bin = find_pg_bin()
    if pg_bin is None:
        msg = f"PostgreSQL 15 binaries not found (looked in $PG_BIN, {DEFAULT_PG_BIN}, PATH)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " and CI=true: refusing to skip", pytrace=False)
        pytest.skip(msg)
    return pg_bin


