"""Bad input to ``python -m comm bench`` and ``python -m comm demo``: a one-line argparse
error naming the flag, exit status 2, no traceback, nothing started. Parse-time only:
no page servers, no store."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

from comm.__main__ import main
from comm._config import CommConfig
from comm._errors import ConfigError
from shards._shardmap import check_shard_params

HAS_BENCH = importlib.util.find_spec("matplotlib") is not None  # the 'bench' extra
needs_bench = pytest.mark.skipif(not HAS_BENCH, reason="needs the 'bench' extra")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in a scratch directory: a check that let a run through would create bench-out."""
    monkeypatch.chdir(tmp_path)


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI; it must exit 2 with argparse's one-line error. Returns that line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


BENCH_CASES = [
    (["--duration", "0"], ["--duration", "> 0"]),
    (["--duration", "-1"], ["--duration", "> 0"]),
    (["--duration", "nan"], ["--duration", "finite"]),
    (["--duration", "inf"], ["--duration", "finite"]),
    (["--shards", "0"], ["--shards", "1..255"]),
    (["--shards", "300"], ["--shards", "1..255"]),
    (["--rels", "0"], ["--rels", "'0'"]),
    (["--pages-per-rel", "0"], ["--pages-per-rel", "'0'"]),
    (["--threads-per-shard", "0"], ["--threads-per-shard", "1..64"]),
    (["--threads-per-shard", "65"], ["--threads-per-shard", "1..64"]),
    (["--inflight", "0"], ["--inflight", "1..65536"]),
    (["--inflight-pages", "0"], ["--inflight-pages", "1..16777216"]),
    (["--prefetch-pages", "-1"], ["--prefetch-pages", "0..16777216"]),
    (["--scan-batch", "0"], ["--scan-batch", "1..32"]),
    (["--scan-batch", "-1"], ["--scan-batch", "1..32"]),
    (["--scan-batch", "33"], ["--scan-batch", "1..32"]),
    (["--distance", "-1"], ["--distance", ">= 0"]),
    (["--distance", "0"], ["--distance 0", "old design"]),
    (["--latency-ms", "nan"], ["--latency-ms", "finite"]),
    (["--latency-ms", "inf"], ["--latency-ms", "finite"]),
    (["--latency-ms", "-1"], ["--latency-ms", "non-negative"]),
    (["--latency-ms", "0,5e6"], ["--latency-ms", "below 3600000"]),
    (["--chaos", "-1"], ["--chaos", "> 0"]),
    (["--chaos", "0"], ["--chaos", "> 0"]),
    (["--chaos", "nan"], ["--chaos", "finite"]),
    (["--backends", "1,,2"], ["--backends", "empty item"]),
    (["--backends", "1,"], ["--backends", "empty item"]),
    (["--backends", "0"], ["--backends", "positive"]),
    (["--latency-ms", "0,,0.5"], ["--latency-ms", "empty item"]),
    (["--workloads", "random,,scan"], ["--workloads", "empty item"]),
    (["--designs", "raw,"], ["--designs", "empty item"]),
    (["--designs", "fast"], ["--designs", "choose from"]),
    (["--scan-rate", "-1"], ["--scan-rate", "must be 0 (unpaced) or a finite number >= 0.01"]),
    (["--random-rate", "nan"], ["--random-rate", "must be 0 (unpaced)"]),
    # checks across flags, after --quick's defaults
    (["--pages-per-rel", "16"], ["--pages-per-rel", "--scan-batch"]),
    (["--quick", "--pages-per-rel", "8", "--scan-batch", "16"], ["--pages-per-rel (8)",
                                                                 "--scan-batch (16)"]),
    (["--backends", "256", "--distance", "100000"], ["--distance", "--prefetch-pages",
                                                     "16777216"]),
]


@needs_bench
@pytest.mark.parametrize("argv,words", BENCH_CASES, ids=[" ".join(a) for a, _ in BENCH_CASES])
def test_bench_refuses(argv: list[str], words: list[str],
                       capsys: pytest.CaptureFixture[str]) -> None:
    line = _error(["bench", "--no-progress", *argv], capsys)
    assert line.startswith("python -m comm bench: error: ")
    for w in words:
        assert w in line, line
    assert not Path("bench-out").exists()  # refused before anything was created


@needs_bench
def test_bench_out_must_be_a_directory(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert "--out" in _error(["bench", "--out", str(f)], capsys)
    line = _error(["bench", "--out", str(f / "sub")], capsys)
    assert f"--out {f / 'sub'}: Not a directory" in line


@needs_bench
def test_bench_out_write_failure_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--out fails only when results are written (removed, disk full): exit 2, one line."""
    import comm._bench as bench

    def no_space(*_: object) -> list[Path]:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench, "_run", lambda args, p: [])  # no page servers
    monkeypatch.setattr(bench, "_write", no_space)
    assert bench.main(["--quick", "--no-progress", "--out", "o"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["python -m comm bench: error: --out o: [Errno 28] No space left on device"]


@needs_bench
def test_bench_quick_yields_to_explicit_flags() -> None:
    from comm._bench import _defaults, _parser

    p = _parser()
    a = p.parse_args(["--quick"])
    _defaults(a)
    assert (a.backends, a.shards, a.rels, a.pages_per_rel, a.latency_ms, a.duration) == (
        [2], 2, 4, 1024, [0.0], 0.3)
    a = p.parse_args(["--quick", "--backends", "4,8", "--shards", "3", "--rels", "2",
                      "--pages-per-rel", "64", "--latency-ms", "0.5", "--duration", "1"])
    _defaults(a)
    assert (a.backends, a.shards, a.rels, a.pages_per_rel, a.latency_ms, a.duration) == (
        [4, 8], 3, 2, 64, [0.5], 1.0)
    a = p.parse_args([])
    _defaults(a)
    assert (a.shards, a.rels, a.pages_per_rel, a.duration) == (4, 8, 16384, 3.0)


@needs_bench
def test_bench_ranges_match_commconfig() -> None:
    """The bench checks CommConfig's limits itself (to name the flag): same numbers."""
    from comm._bench import CONFIG_RANGES

    for field, lo, hi in CONFIG_RANGES.values():
        CommConfig(**{field: lo})  # type: ignore[arg-type]
        CommConfig(**{field: hi})  # type: ignore[arg-type]
        for bad in (lo - 1, hi + 1):
            with pytest.raises(ConfigError):
                CommConfig(**{field: bad})  # type: ignore[arg-type]


def test_max_shards_matches_the_shards_package() -> None:
    from comm._demo import MAX_SHARDS

    check_shard_params(MAX_SHARDS, 1)
    with pytest.raises(ValueError):
        check_shard_params(MAX_SHARDS + 1, 1)


DEMO_CASES = [
    (["--backends", "0"], ["--backends", ">= 1"]),
    (["--backends", "-3"], ["--backends", ">= 1"]),
    (["--backends", "x"], ["--backends", "expected an integer"]),
    (["--nblocks", "0"], ["--nblocks", "'0'"]),
    (["--nblocks", "-5"], ["--nblocks", "'-5'"]),
    (["--shards", "0"], ["--shards", "1..255"]),
    (["--shards", "256"], ["--shards", "1..255"]),
    (["--rels", "0"], ["--rels", "'0'"]),
    (["--scale", "0"], ["--scale", ">= 1"]),
    (["--prefetch", "-1"], ["--prefetch", ">= 0"]),
]


@pytest.mark.parametrize("argv,words", DEMO_CASES, ids=[" ".join(a) for a, _ in DEMO_CASES])
def test_demo_refuses(argv: list[str], words: list[str],
                      capsys: pytest.CaptureFixture[str]) -> None:
    line = _error(["demo", "--no-progress", *argv], capsys)
    assert line.startswith("python -m comm demo: error: argument ")
    for w in words:
        assert w in line, line


def test_demo_accepts_prefetch_zero() -> None:
    """0 turns prefetch off (documented): accepted, unlike -1."""
    p = argparse.ArgumentParser()
    from comm._demo import add_cli

    add_cli(p.add_subparsers())
    assert p.parse_args(["demo", "--prefetch", "0"]).prefetch == 0



def test_verbose_may_come_after_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    import comm.__main__ as cli
    from comm import _demo

    levels: list[int] = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: levels.append(kw["level"]))
    monkeypatch.setattr(_demo, "run", lambda args: 0)
    assert cli.main(["demo", "-v"]) == 0
    assert cli.main(["demo"]) == 0
    assert levels == [logging.DEBUG, logging.WARNING]


@pytest.mark.parametrize("listen", ["tcp://0.0.0.0:0", "tcp://10.1.2.3:7000"])
def test_serve_refuses_a_non_loopback_listen(listen: str, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COMM_SHARDS", "tcp://127.0.0.1:1")
    assert main(["serve", "--listen", listen]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and listen in err and "ipc://PATH" in err
