"""Smoke test of ``python -m comm bench --quick``: real page servers, every design."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from comm._bench import main  # noqa: E402


@pytest.mark.servers
@pytest.mark.timeout(60)
def test_bench_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["--quick", "--no-progress", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "targets (ratios from this run)" in text
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
