"""The proc design's cell (comm/_bench/_proc.py ``_ProcCell``) leaves nothing behind
when interrupted at any point of its set-up or when a step of its tear-down fails: no
``pagecomm-proc-*`` directory (its ipc endpoint), no comm serve process."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")  # comm._bench needs the 'bench' extra

from comm._bench import _proc  # noqa: E402
from comm._bench._setup import Params  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def made(made_dirs: list[Path]) -> list[Path]:
    """Every directory tempfile.mkdtemp creates during the test (tests/conftest.py)."""
    return made_dirs


@pytest.fixture
def serves(monkeypatch: pytest.MonkeyPatch) -> Any:
    """comm serve replaced by a process that never says READY; yields those started
    (and kills any the code under test lost)."""
    started: list[subprocess.Popen[bytes]] = []
    real = subprocess.Popen

    def popen(cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = real([sys.executable, "-c", "import time; time.sleep(60)"], **kw)
        started.append(p)
        return p

    monkeypatch.setattr(_proc.subprocess, "Popen", popen)
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        if p.stdout is not None:
            p.stdout.close()


def _cell() -> _proc._ProcCell:
    ds = types.SimpleNamespace(stripe=2048)
    cluster = types.SimpleNamespace(endpoints=["tcp://127.0.0.1:1"])
    return _proc._ProcCell(ds, cluster, Params(), 1)  # type: ignore[arg-type]


def test_interrupt_while_the_cell_is_made_leaves_no_directory(
        made: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C arriving just as the cell's directory is made (before the clean-up that
    removes it is armed) left /tmp/pagecomm-proc-* behind: the interrupt is now held
    until the directory is recorded, and then the clean-up removes it."""
    real = tempfile.mkdtemp  # made_dirs' recorder

    def mkdtemp_then_ctrl_c(*args: Any, **kw: Any) -> str:
        path = real(*args, **kw)
        if "pagecomm-proc-" in str(kw.get("prefix", "")):
            signal.raise_signal(signal.SIGINT)  # lands inside deferred_interrupts
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt), _cell():
        pass
    assert any("pagecomm-proc-" in p.name for p in made)
    assert not [p for p in made if p.exists()]


def test_interrupt_while_comm_serve_starts_stops_it(made: list[Path], serves: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal arriving inside Popen, after the fork, lost the child: it went on in its own
    session (no signal of ours reaches it), serving in a directory nobody removes."""
    popen = _proc.subprocess.Popen

    def interrupted(cmd: list[str], **kw: Any) -> Any:
        p = popen(cmd, **kw)
        signal.raise_signal(signal.SIGINT)  # Ctrl-C, just before Popen returns
        return p

    monkeypatch.setattr(_proc.subprocess, "Popen", interrupted)
    with pytest.raises(KeyboardInterrupt), _cell():
        pass
    assert len(serves) == 1 and serves[0].poll() is not None, "comm serve left running"
    assert made and not [p for p in made if p.exists()]


def test_a_failing_teardown_step_still_stops_serve_and_removes_the_directory(
        made: list[Path], serves: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_proc._ProcCell, "_await_ready", lambda self: None)
    import comm

    class BrokenControl:
        def close(self) -> None:
            raise RuntimeError("control handle: broken")

    monkeypatch.setattr(comm, "attach", lambda *a, **kw: BrokenControl())
    cell = _cell()
    cell.__enter__()
    assert cell.dir is not None and cell.dir.is_dir()
    with pytest.raises(RuntimeError, match="broken"):
        cell.__exit__(None, None, None)
    assert len(serves) == 1 and serves[0].poll() is not None, "comm serve left running"
    assert made and not [p for p in made if p.exists()]
    cell.close()  # safe twice
