"""``COMM_*`` variables and ``python -m comm demo`` / ``bench``: read and checked before
anything starts (a bad value: one line naming the variable, exit 2); the demo applies
the tuning ones, the bench none (a note names those set but not applied)."""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from comm.__main__ import main

HAS_BENCH = importlib.util.find_spec("matplotlib") is not None  # the 'bench' extra
needs_bench = pytest.mark.skipif(not HAS_BENCH, reason="needs the 'bench' extra")

BAD_ENV = [
    ("COMM_REQUEST_TIMEOUT", "abc"),
    ("COMM_THREADS_PER_SHARD", "0"),
    ("COMM_VERIFY_CHECKSUMS", "maybe"),
    ("COMM_METRICS_ADDR", "localhost"),
    ("COMM_SHARDS", "nowhere"),
]


@pytest.fixture(autouse=True)
def _clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No COMM_* from the caller's environment; run in a scratch directory."""
    for k in list(os.environ):
        if k.startswith("COMM_"):
            monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)


def _started(*_: Any, **__: Any) -> Any:
    raise AssertionError("the command started work despite a bad COMM_* variable")


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("var,value", BAD_ENV, ids=[v for v, _ in BAD_ENV])
def test_demo_bad_comm_variable_is_one_line(var: str, value: str,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from comm import _demo

    monkeypatch.setenv(var, value)
    monkeypatch.setattr(_demo, "_load", _started)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "pagecomm-demo-*")))
    assert main(["demo", "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"python -m comm demo: error: {var}"), line
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "pagecomm-demo-*"))) <= before


@needs_bench
@pytest.mark.parametrize("extra", [[], ["--chaos", "5"]], ids=["bench", "chaos"])
@pytest.mark.parametrize("var,value", BAD_ENV, ids=[v for v, _ in BAD_ENV])
def test_bench_bad_comm_variable_is_one_line(var: str, value: str, extra: list[str],
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import comm._bench as bench

    monkeypatch.setenv(var, value)
    monkeypatch.setattr(bench, "_run", _started)
    monkeypatch.setattr(bench, "_chaos_cli", _started)
    assert main(["bench", "--quick", "--no-progress", *extra]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"python -m comm bench: error: {var}"), line
    assert not Path("bench-out").exists()  # refused before anything was created


@needs_bench
@pytest.mark.timeout(60)
def test_bench_bad_comm_variable_in_a_real_run(tmp_path: Path) -> None:
    """The reported command: was a traceback from the proc design's comm serve, rc 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMM_")}
    env["COMM_REQUEST_TIMEOUT"] = "abc"
    r = subprocess.run([sys.executable, "-m", "comm", "bench", "--quick", "--designs", "proc",
                        "--no-progress", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=50)
    assert r.returncode == 2, r.stderr
    assert _one_error_line(r.stderr) == (
        "python -m comm bench: error: COMM_REQUEST_TIMEOUT='abc' is invalid: could not "
        "convert string to float: 'abc'")
    assert not (tmp_path / "out").exists()


@needs_bench
def test_bench_names_the_comm_variables_it_does_not_apply(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import comm._bench as bench

    class Started(Exception):
        pass

    def run(*_: Any) -> Any:
        raise Started

    monkeypatch.setenv("COMM_THREADS_PER_SHARD", "3")
    monkeypatch.setenv("COMM_REQUEST_TIMEOUT", "5")
    monkeypatch.setattr(bench, "_run", run)
    with pytest.raises(Started):
        bench.main(["--quick", "--no-progress", "--out", "o"])
    assert capsys.readouterr().err.splitlines() == [
        "python -m comm bench: not applying COMM_THREADS_PER_SHARD, COMM_REQUEST_TIMEOUT "
        "(the bench configures every design from its flags)"]


@needs_bench
def test_bench_proc_serve_gets_only_the_bench_settings() -> None:
    """The proc design's comm serve inherited the caller's COMM_* (timeouts, checksums,
    slots, metrics, ...) that the thread design never saw: now neither does."""
    from comm._bench._proc import serve_env
    from comm._bench._setup import Params

    caller = {"PATH": "/usr/bin", "COMM_REQUEST_TIMEOUT": "1", "COMM_VERIFY_CHECKSUMS": "1",
              "COMM_SLOTS_PER_BACKEND": "2", "COMM_METRICS_PORT": "9300",
              "COMM_THREADS_PER_SHARD": "9", "COMM_SHARDS": "tcp://elsewhere:1"}
    p = Params(threads_per_shard=2, inflight=32, inflight_pages=128, prefetch_pages=5000)
    env = serve_env(caller, ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], 1024, p, 4)
    assert {k: v for k, v in env.items() if k.startswith("COMM_")} == {
        "COMM_SHARDS": "tcp://127.0.0.1:1,tcp://127.0.0.1:2", "COMM_STRIPE_SIZE": "1024",
        "COMM_THREADS_PER_SHARD": "2", "COMM_INFLIGHT_PER_CONN": "32",
        "COMM_INFLIGHT_PAGES_PER_CONN": "128", "COMM_PREFETCH_PAGES": "5000"}
    assert env["PATH"] == "/usr/bin" and env["PYTHONPATH"]


@pytest.mark.servers
@pytest.mark.timeout(120)
def test_demo_applies_the_comm_tuning_variables(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Tuning variables reach the demo's Communicator; those naming page servers do not
    (it starts its own), and a note says so."""
    from comm import _demo

    env = {"COMM_THREADS_PER_SHARD": "2", "COMM_INFLIGHT_PER_CONN": "8",
           "COMM_SLOTS_PER_BACKEND": "4", "COMM_PREFETCH_PAGES": "300",
           "COMM_REQUEST_TIMEOUT": "12.5", "COMM_VERIFY_CHECKSUMS": "yes",
           "COMM_SHARDS": "tcp://127.0.0.1:1", "COMM_STRIPE_SIZE": "7"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    seen: list[Any] = []
    real = _demo.Communicator

    def spy(*, config: Any) -> Any:
        seen.append(config)
        return real(config=config)

    monkeypatch.setattr(_demo, "Communicator", spy)
    assert main(["demo", "--source", "synth", "--shards", "1", "--rels", "1", "--nblocks",
                 "64", "--backends", "2", "--no-progress"]) == 0
    (cfg,) = seen
    assert (cfg.threads_per_shard, cfg.inflight_per_conn, cfg.slots_per_backend,
            cfg.prefetch_pages, cfg.request_timeout, cfg.verify_checksums) == (
        2, 8, 4, 300, 12.5, True)
    assert len(cfg.shards) == 1 and cfg.shards != ("tcp://127.0.0.1:1",)
    assert cfg.stripe_size != 7
    out, err = capsys.readouterr()
    assert "connections        2 to 1 page servers" in out
    assert "pages verified     64 (wrong: 0, errors: 0)" in out
    assert "python -m comm demo: not applying COMM_SHARDS, COMM_STRIPE_SIZE (the demo starts " \
           "its own page servers)" in err.splitlines()
