"""``python -m comm bench`` / ``demo`` stopped by SIGTERM (``timeout``, ``kill``) clean
up like on Ctrl-C: no page server left running, no temporary store left behind."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from waiting import wait_for

pytestmark = [pytest.mark.servers, pytest.mark.timeout(120)]


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(task) as f:
                out.update(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _is_page_server(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"shards\0serve" in f.read()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("argv, prefix", [
    (["bench", "--quick", "--duration", "30", "--no-plots", "--no-progress"],
     "pagecomm-bench-"),
    (["demo", "--source", "synth"], "pagecomm-demo-"),
])
def test_sigterm_stops_the_page_servers_and_removes_the_store(tmp_path, argv, prefix):
    pattern = os.path.join(tempfile.gettempdir(), prefix + "*")
    before = set(glob.glob(pattern))
    args = [sys.executable, "-m", "comm", *argv]
    if argv[0] == "bench":
        args += ["--out", str(tmp_path / "out")]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        servers: set[int] = set()

        def started() -> bool:
            servers.update(c for c in _children(p.pid) if _is_page_server(c))
            return len(servers) >= 2

        assert wait_for(started, timeout=90), "the page servers never started"
        time.sleep(0.3)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert b"Traceback" not in err, err.decode()
    # 128 + SIGTERM, as if the signal had ended it (the demo exited 130, as for Ctrl-C)
    assert p.returncode == 128 + signal.SIGTERM, err.decode()
    assert wait_for(lambda: not any(_alive(s) for s in servers), timeout=15), servers
    assert set(glob.glob(pattern)) <= before
