"""``python -m comm demo --source pg`` stopped by SIGTERM (or Ctrl-C) at any step of
the PostgreSQL part: the throw-away cluster's directory is removed, its server is not
left running, and SIGTERM exits 143 (128 + SIGTERM) like the bench."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
from pgcluster import require_pg

from comm.__main__ import main

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]


def _postgres_in(dirs: list[Path]) -> list[int]:
    """Live processes whose command line names one of ``dirs`` (pg_ctl, postgres)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(str(x).encode() in cmd for x in dirs):
            found.append(int(d.name))
    return found


def _term(*_: Any, **__: Any) -> None:
    signal.raise_signal(signal.SIGTERM)  # as `kill <pid>` would, at this step
    time.sleep(30)  # the handler raises first
    raise AssertionError("SIGTERM did not interrupt the demo")


@pytest.mark.parametrize("step", ["pgbench", "import"])
def test_sigterm_during_the_postgresql_steps_removes_the_cluster(
        step: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        made_dirs: list[Path]) -> None:
    """pgbench: inside make_pgbench_cluster (the server is running); import: the cluster
    was made, but run() did not know it yet and left /tmp/pgcluster-* behind (exit 130)."""
    require_pg()
    from comm import _demo
    from shards import _pgcluster

    made = made_dirs
    if step == "pgbench":
        monkeypatch.setattr(_pgcluster.PgCluster, "pgbench", _term)
    else:
        monkeypatch.setattr(_demo, "import_pgdata", _term)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main() installs its own
    rc = main(["demo", "--source", "pg", "--scale", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "terminated", err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert any(p.name.startswith("pgcluster-") for p in made)  # the cluster was made
    assert [p for p in made if p.exists()] == []
    assert _postgres_in(made) == []
