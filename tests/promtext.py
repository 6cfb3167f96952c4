"""Reading Prometheus exposition text in tests (shared by comm and shards tests)."""

from __future__ import annotations

import re
import urllib.request


def scrape(port: int, host: str = "127.0.0.1") -> str:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        return r.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    """The sample ``name{labels...}`` (labels may be a subset) from exposition text."""
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(2))
    raise AssertionError(f"{name}{labels} not in scrape")
