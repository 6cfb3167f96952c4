"""Chaos in CI (bounded, ~15 s): 32 backends read verified pages from 4 shards while a
fault loop kills (-9), restarts, freezes and thaws page servers. Every call either
returned the right bytes or raised a typed error within its deadline."""

from __future__ import annotations

from pathlib import Path

import pytest

from comm._bench._chaos import run_chaos

pytestmark = [pytest.mark.servers, pytest.mark.timeout(90)]


def test_chaos(tmp_path: Path) -> None:
    r = run_chaos(tmp_path, shards=4, backends=32, seconds=12.0, call_timeout=1.5)
    calls = r["calls"]
    print(f"\nchaos: {r}")
    assert calls.get("WRONG", 0) == 0 and calls.get("HUNG", 0) == 0
    assert not [k for k in calls if k.startswith("UNTYPED")], calls
    assert r["threads_left"] == 0 and r["slots_in_use"] == 0
    assert calls["ok"] > calls["calls"] // 4  # it kept serving through the faults
    assert sum(r["faults"].values()) >= 5
