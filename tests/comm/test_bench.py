"""Smoke tests of ``python -m comm bench --quick``: real page servers, every design
(backend threads), and the proc design (backend processes) against thread backends."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from comm._bench import _configure, _defaults, main  # noqa: E402


@pytest.mark.servers
@pytest.mark.timeout(60)
def test_bench_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["--quick", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "targets (ratios from this run, not judged" in text  # a smoke run, not a measure
    assert "[   quick run]" in text and "MET]" not in text
    doc = json.loads((out / "results.json").read_text())
    cells = doc["cells"]
    seen = {(c["design"], c["workload"]) for c in cells}
    for wl in ("random", "scan", "mixed", "samescan"):
        assert ("old", wl) in seen and ("pagecomm", wl) in seen
    assert ("raw", "random") in seen and ("raw", "scan") in seen
    for c in cells:
        for key in ("pages_per_s", "p50_ms", "p99_ms", "connections", "cpu_s_per_1k_pages",
                    "server_cpu_s_per_1k_pages", "prefetch", "verified", "wrong", "cdf"):
            assert key in c, (key, c["design"], c["workload"])
        assert c["pages"] > 0 and c["wrong"] == 0 and c["errors"] == 0
        assert c["verified"] > 0
    pc = [c for c in cells if c["design"] == "pagecomm"]
    old = [c for c in cells if c["design"] == "old"]
    assert all(c["connections"] == 2 for c in pc)  # 2 shards x 1 thread
    assert all(c["connections"] == 2 * c["backends"] for c in old)
    mixed = [c for c in cells if c["workload"] == "mixed" and c["design"] != "raw"]
    assert all(c["random_p99_alone_ms"] and c["random_p99_mixed_ms"] for c in mixed)
    assert {t["target"] for t in doc["targets"]}
    for name in ("throughput_vs_backends.png", "latency_cdf.png"):
        assert (out / name).stat().st_size > 1000


def _children(pid: int, words: tuple[str, ...]) -> list[str]:
    """Command lines of live children of ``pid`` that contain one of ``words``."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and any(w in cmd for w in words):
            found.append(cmd)
    return found


@pytest.mark.servers
@pytest.mark.timeout(60)
def test_bench_proc_vs_threads_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Design proc: 2 backend processes attached to one `python -m comm serve`."""
    out = tmp_path / "out"
    assert main(["--quick", "--no-progress", "--no-plots", "--designs", "pagecomm,proc",
                 "--workloads", "random,scan", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "process vs thread backends" in text and "processes 3" in text
    doc = json.loads((out / "results.json").read_text())
    proc = [c for c in doc["cells"] if c["design"] == "proc"]
    assert {c["workload"] for c in proc} == {"random", "scan"}
    for c in proc:
        assert c["backends"] == 2 and c["pages"] > 0 and c["verified"] > 0
        assert c["wrong"] == 0 and c["errors"] == 0 and not c["failures"]
        assert c["connections"] == 2  # the comm serve process: 2 shards x 1 thread
        assert c["attached"] == 3  # 2 backends + the bench's control handle
        assert c["copies_per_page"] == 3 and "cpu_method" in c
        assert set(c["cpu_split_s_per_1k_pages"]) == {"bench", "backends", "comm_serve"}
        assert c["cpu_split_s_per_1k_pages"]["backends"] > 0
        assert c["cpu_s_per_1k_pages"] and c["p50_ms"] and c["p99_ms"]
    assert [c["copies_per_page"] for c in doc["cells"] if c["design"] == "pagecomm"] == [1, 1]
    pvt = doc["proc_vs_threads"]
    assert {r["workload"] for r in pvt["pairs"]} == {"random", "scan"}
    assert all(r["pages_per_s"] > 0 for r in pvt["pairs"])
    assert pvt["copies_per_page"] == {"processes": 3, "threads": 1}
    # every backend process and the comm serve process are gone (multiprocessing's
    # resource tracker lives as long as this process: not ours to stop)
    assert not _children(os.getpid(), ("comm serve", "multiprocessing.spawn"))


def test_proc_vs_threads_defaults() -> None:
    p = argparse.ArgumentParser()
    _configure(p)
    a = p.parse_args(["--proc-vs-threads"])
    _defaults(a)
    assert (a.designs, a.workloads, a.backends, a.latency_ms) == (
        ["pagecomm", "proc"], ["random", "scan"], [16], [0.0])
    a = p.parse_args(["--proc-vs-threads", "--backends", "4", "--workloads", "samescan"])
    _defaults(a)
    assert (a.designs, a.workloads, a.backends) == (["pagecomm", "proc"], ["samescan"], [4])
    a = p.parse_args([])
    _defaults(a)
    assert "proc" not in a.designs and a.backends == [1, 16, 64]


@pytest.mark.servers
@pytest.mark.timeout(60)
def test_bench_paced_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--scan-rate / --random-rate hold each backend to its rate; the calls stay timed alone."""
    out = tmp_path / "out"
    assert main(["--quick", "--no-progress", "--no-plots", "--designs", "pagecomm",
                 "--workloads", "random,scan", "--duration", "0.3", "--scan-rate", "3200",
                 "--random-rate", "100", "--out", str(out)]) == 0
    assert "paced run: scanners 3200 pages/s, random readers 100 reads/s" in capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    assert doc["params"]["scan_rate"] == 3200 and doc["params"]["random_rate"] == 100
    cells = {c["workload"]: c for c in doc["cells"]}
    # 2 backends x 100 reads/s; 2 x 3200 pages/s (slack for the window's edges)
    assert 0 < cells["random"]["pages_per_s"] <= 2 * 100 * 1.5
    assert 0 < cells["scan"]["pages_per_s"] <= 2 * 3200 * 1.5
    assert all(c["wrong"] == 0 and c["errors"] == 0 for c in doc["cells"])


@pytest.mark.servers
@pytest.mark.timeout(60)
def test_bench_without_matplotlib_skips_the_plots(tmp_path: Path, monkeypatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = tmp_path / "out"
    assert main(["--quick", "--no-progress", "--designs", "pagecomm", "--workloads",
                 "random", "--out", str(out)]) == 0
    assert "no plots (matplotlib is missing" in capsys.readouterr().err
    assert (out / "results.json").exists() and not list(out.glob("*.png"))


@pytest.mark.servers
@pytest.mark.timeout(60)
def test_bench_distance_zero_scans_with_pagecomm_alone(tmp_path: Path) -> None:
    """Distance 0 (prefetch only the batch being read) is a pagecomm setting; only the
    old design, whose readahead ring needs a slot, refuses it."""
    out = tmp_path / "out"
    assert main(["--quick", "--no-progress", "--no-plots", "--designs", "pagecomm",
                 "--workloads", "scan", "--distance", "0", "--out", str(out)]) == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert cells and all(c["pages_per_s"] > 0 and c["wrong"] == 0 for c in cells)


@pytest.mark.parametrize("flag", ["--scan-rate", "--random-rate"])
@pytest.mark.parametrize("value", ["-1", "nan", "inf", "1e-10"])
def test_bench_refuses_bad_rates(flag: str, value: str,
                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--quick", "--no-progress", flag, value])
    assert exc.value.code == 2  # argparse's error: the flag and what was wrong
    assert (f"argument {flag}: must be 0 (unpaced) or a finite number >= 0.01"
            in capsys.readouterr().err)


def test_pacer_holds_the_rate_and_stops_at_once() -> None:
    import threading
    import time

    from comm._bench._workloads import _Pacer

    stop = threading.Event()
    p = _Pacer(200.0, stop)
    t0 = time.monotonic()
    for _ in range(10):
        p.pause(1)
    assert time.monotonic() - t0 >= 10 / 200 * 0.9  # never faster than the rate
    # the interval includes the call: 5 ms calls paced at 100/s still make 100/s, not
    # 1 / (5 + 10 ms); simulated time, so the figures are exact
    clock = [1000.0]
    waits: list[float] = []

    class FakeStop:
        def wait(self, d: float) -> None:
            waits.append(d)
            clock[0] += d

    p = _Pacer(100.0, FakeStop(), clock=lambda: clock[0])  # type: ignore[arg-type]
    for _ in range(100):
        clock[0] += 0.005  # the call
        p.pause(1)
    assert clock[0] - 1000.0 == pytest.approx(100 / 100.0)  # 100 calls in 1 s
    p.pause(1)
    clock[0] += 5.0  # a loop that fell behind does not burst to catch up
    waits.clear()
    p.pause(1)
    assert not waits
    p.pause(1)
    assert waits == [pytest.approx(0.01)]
    _Pacer(0.0, stop).pause(10**6)  # unpaced: no pause at all
    stop.set()
    t0 = time.monotonic()
    _Pacer(0.001, stop).pause(1)  # 1000 s due, but the cell is over
    assert time.monotonic() - t0 < 5
