"""Test hosts on one machine: network namespaces joined to this one by veth pairs.

``TestHosts(n)`` creates namespaces ``pcX-<pid>-i`` with addresses 10.<a>.<i>.2/24
on their side of a veth pair and 10.<a>.<i>.1/24 on ours, runs commands inside
them with ``ip netns exec``, and removes everything on close (also after a
failure). Needs root and iproute2; ``available()`` says whether they work here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check,
                          timeout=20)


def available() -> str | None:
    """None if namespaces can be made here, else the reason they cannot."""
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    name = f"pcprobe-{os.getpid()}"
    r = _ip("netns", "add", name, check=False)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


class TestHosts:
    def __init__(self, count: int) -> None:
        self.prefix = f"pc{os.getpid() % 10000}"
        self.subnet = 100 + os.getpid() % 100  # 10.<subnet>.<i>.0/24, unlikely to clash
        self.names: list[str] = []
        self.addrs: list[str] = []
        try:
            for i in range(count):
                self._add(i)
        except BaseException:
            self.close()
            raise

    def _add(self, i: int) -> None:
        ns, here, there = f"{self.prefix}-{i}", f"{self.prefix}h{i}", f"{self.prefix}n{i}"
        _ip("netns", "add", ns)
        self.names.append(ns)
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", ns)
        _ip("addr", "add", f"10.{self.subnet}.{i}.1/24", "dev", here)
        _ip("link", "set", here, "up")
        _ip("-n", ns, "addr", "add", f"10.{self.subnet}.{i}.2/24", "dev", there)
        _ip("-n", ns, "link", "set", there, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.addrs.append(f"10.{self.subnet}.{i}.2")

    def command(self, i: int, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run inside host ``i``."""
        return ["ip", "netns", "exec", self.names[i], *argv]

    def close(self) -> None:
        for i, ns in enumerate(self.names):
            _ip("link", "del", f"{self.prefix}h{i}", check=False)  # removes both ends
            _ip("netns", "del", ns, check=False)
        self.names.clear()

    def __enter__(self) -> TestHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
