"""Suite-wide fixtures: every test must leave no communicator thread behind."""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # shared helpers: tests/pgcluster.py, ...


@pytest.fixture(autouse=True)
def no_leaked_threads():
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = [t.name for t in threading.enumerate()
                  if t.ident not in before and t.is_alive() and t.name.startswith("comm-")]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not leaked, f"leaked threads: {leaked}"


@pytest.fixture
def made_dirs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every directory tempfile.mkdtemp creates during the test (to check clean-ups)."""
    paths: list[Path] = []
    real = tempfile.mkdtemp

    def mkdtemp(*args: Any, **kw: Any) -> str:
        path = real(*args, **kw)
        paths.append(Path(path))
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    return paths
