"""Integration fixtures. The PostgreSQL harness itself lives in tests/pgcluster.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pgcluster import PgCluster, make_pgbench_cluster, require_pg


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A STOPPED, checksummed PostgreSQL 15 cluster with pgbench -i -s 2 loaded, shared by
    the session. Tests that modify it must work on ``pg_cluster.clone()`` instead."""
    require_pg()
    pg = make_pgbench_cluster(scale=2)
    try:
        yield pg
    finally:
        pg.cleanup()
