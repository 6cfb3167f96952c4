"""Design (d), proc: backends as PROCESSES attached to ``python -m comm serve``.

Theory of operation
-------------------
One cell starts ONE ``python -m comm serve`` subprocess (its own session, stderr
to a file) against the cell's LocalCluster, configured like pagecomm's in-process
Communicator through ``COMM_*`` variables (``serve_env``: the bench's values only;
none inherited from the caller's environment), and N backend processes with
multiprocessing's 'spawn' context. Each backend process ``comm.attach()``es,
wraps the handle in the same :class:`PagecommBackend` the thread design uses and
runs the same loops (``_workloads._random`` / ``_scan``), so only the process
boundary differs. Start-up is a handshake on one result queue: every child reads
one warm-up page and reports ``ready`` (or ``failed``); the parent then samples
CPU, sets ``go``, sleeps the cell's duration and sets ``stop`` (a watcher thread
in each child turns it into the local stop flag the loops poll). Children send
their tallies (latencies as raw doubles) back on the queue and exit.

CPU is the sum of the bench process (getrusage RUSAGE_SELF), the comm serve
process and every backend process (/proc/<pid>/stat utime+stime), each sampled
at the start and the end of the timed window. Every process is cleaned up in a
``finally`` (stop flag, then terminate/kill; SIGTERM then kill for comm serve;
then the temporary directory of its ipc endpoint), each step even if an earlier
one failed. That directory is created, and comm serve started, only inside
``__enter__``'s armed clean-up and with interrupts deferred until the object
holds them (``deferred_interrupts``), so Ctrl-C or SIGTERM at any moment leaves
nothing behind. Children ignore SIGINT, so Ctrl-C reaches only the parent, which
cleans up, and a child whose parent vanished exits on its own. Connections are the comm serve
process's ``stats()["connections"]``, read by a control handle of the parent.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from array import array
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from shards import LocalCluster, RelTag
from shards._cli import deferred_interrupts

from .._config import ENV_PREFIX
from ._pagecomm import PagecommBackend, prefetch_buffer_pages
from ._setup import (
    COPIES_PER_PAGE,
    COPY_PATH,
    CPU_METHOD,
    Dataset,
    ExpectedPages,
    Params,
    Recorder,
    Tally,
    own_cpu,
    pid_cpu,
    server_cpu,
    summarize,
)
from ._workloads import _random, _scan

_PKG_PARENT = str(Path(__file__).resolve().parent.parent.parent)
_START_TIMEOUT = 120.0  # spawning many interpreters on a small box is slow
_STOP_TIMEOUT = 30.0


@dataclass(frozen=True)
class _Spec:
    """What a backend process needs (picklable)."""

    endpoint: str
    rels: tuple[tuple[int, int, int, int], ...]
    lsn: int
    nblocks: int
    params: Params


class _ChildData(ExpectedPages):
    """The parts of Dataset a backend process uses (no store needed)."""

    def __init__(self, spec: _Spec) -> None:
        self.rels = [RelTag(*r) for r in spec.rels]
        self.lsn, self.nblocks = spec.lsn, spec.nblocks


# ------------------------------------------------------------------ child side
def backend_process(spec: _Spec, i: int, role: str, go: Any, stop: Any, out: Any) -> None:
    """Entry point of one backend process (spawned): attach, warm up, loop, report."""
    from .. import attach

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent cleans up on Ctrl-C
    ppid = os.getppid()
    ds = _ChildData(spec)
    rec = Recorder(ds, 1, spec.params.seed)  # type: ignore[arg-type]
    t = rec.tally(role)
    failure, ready = "", False
    try:
        reader = PagecommBackend(types.SimpleNamespace(ds=ds, p=spec.params),  # type: ignore
                                 attach(spec.endpoint))
    except Exception as e:
        out.put(("failed", i, f"{type(e).__name__}: {e}"))
        return
    try:
        reader.get_page(ds.rels[0], 0)  # warm-up: the ipc connection, the segment
        out.put(("ready", i, ""))
        ready = True
        if not _wait_go(go, stop, ppid):
            return
        threading.Thread(target=_watch, args=(stop, rec.stop, ppid), daemon=True).start()
        if role == "random":
            _random(reader, rec, t, i, spec.params.random_rate)
        else:
            _scan(reader, rec, t, i, spec.params, role == "samescan")
    except Exception as e:
        failure = f"{type(e).__name__}: {e}"
        t.errors += 1
    finally:
        reader.close()
        rec.verify(t)
    if not ready:
        out.put(("failed", i, failure))
        return
    out.put(("done", i, {"role": role, "pages": t.pages, "calls": t.calls,
                         "lat": t.lat.tobytes(), "checked": t.checked, "wrong": t.wrong,
                         "errors": t.errors, "failure": failure}))


def _wait_go(go: Any, stop: Any, ppid: int) -> bool:
    while not go.wait(0.5):
        if os.getppid() != ppid:
            return False
    return not stop.is_set()


def _watch(stop: Any, local: threading.Event, ppid: int) -> None:
    """Turn the cross-process stop (or the parent's death) into the loops' stop flag."""
    while not stop.wait(0.2):
        if os.getppid() != ppid:
            break
    local.set()


# ------------------------------------------------------------------ parent side
def proc_phase(roles: list[str], ds: Dataset, cluster: LocalCluster,
               p: Params) -> dict[str, Any]:
    """One measurement with ``len(roles)`` backend processes; same figures as _phase."""
    with _ProcCell(ds, cluster, p, len(roles)) as cell:
        raw, tallies, failures = cell.run(roles)
    res = summarize(tallies, raw)
    res["roles"] = {r: summarize(tallies, raw, r) for r in sorted(set(roles))}
    for r in res["roles"].values():
        r.pop("cdf", None)
    pf = raw["stats"]["prefetch"]
    per_k = 1000.0 / res["pages"] if res["pages"] else 0.0
    res.update(backends=len(roles), connections=raw["stats"]["connections"],
               prefetch={"hits": pf["hits"] + pf["joins"], "waste": pf["wasted"],
                         "issued": pf["issued"], "detail": pf},
               cpu_split_s_per_1k_pages={k: round(v * per_k, 5)
                                         for k, v in raw["cpu_split"].items()},
               cpu_method=CPU_METHOD["proc"], copies_per_page=COPIES_PER_PAGE["proc"],
               copy_path=COPY_PATH["proc"], attached=raw["attached"],
               failures=failures)
    return res


def serve_env(environ: Mapping[str, str], endpoints: list[str], stripe: int, p: Params,
              backends: int) -> dict[str, str]:
    """comm serve's environment: ``environ`` without its ``COMM_*`` variables (the bench
    applies none: the thread design's Communicator gets none either), plus the cell's."""
    env = {k: v for k, v in environ.items() if not k.startswith(ENV_PREFIX)}
    env.update({"COMM_SHARDS": ",".join(endpoints), "COMM_STRIPE_SIZE": str(stripe),
                "COMM_THREADS_PER_SHARD": str(p.threads_per_shard),
                "COMM_INFLIGHT_PER_CONN": str(p.inflight),
                "COMM_INFLIGHT_PAGES_PER_CONN": str(p.inflight_pages),
                "COMM_PREFETCH_PAGES": str(prefetch_buffer_pages(p, backends))})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PKG_PARENT, env.get("PYTHONPATH")]))
    return env


class _ProcCell:
    """The comm serve process, the backend processes and their queue (parent only)."""

    def __init__(self, ds: Dataset, cluster: LocalCluster, p: Params, n: int) -> None:
        self.ds, self.cluster, self.p, self.n = ds, cluster, p, n
        self.dir: Path | None = None  # created in __enter__, where close() is armed
        self.endpoint = ""
        self.serve: subprocess.Popen[bytes] | None = None
        self._err: IO[bytes] | None = None
        self.ctl: Any = None
        self.mp = mp.get_context("spawn")
        self.go, self.stop = self.mp.Event(), self.mp.Event()
        self.out: Any = self.mp.Queue()
        self.children: list[Any] = []

    def __enter__(self) -> _ProcCell:
        try:
            with deferred_interrupts():  # no interrupt between mkdtemp and self.dir
                self.dir = Path(tempfile.mkdtemp(prefix="pagecomm-proc-"))
            self.endpoint = f"ipc://{self.dir}/comm.ipc"
            self._start_serve()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_serve(self) -> None:
        from .. import attach

        env = serve_env(os.environ, self.cluster.endpoints, self.ds.stripe, self.p, self.n)
        self._err = tempfile.TemporaryFile(prefix="comm-serve-stderr-")
        # an interrupt inside Popen, after the fork, would lose the child (its own session:
        # no signal of ours reaches it) and leave it serving in the directory
        with deferred_interrupts():
            self.serve = subprocess.Popen(
                [sys.executable, "-m", "comm", "serve", "--listen", self.endpoint],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._err, env=env,
                start_new_session=True)
        self._await_ready()
        self.ctl = attach(self.endpoint, slots=1)

    def _await_ready(self) -> None:
        proc = self.serve
        assert proc is not None and proc.stdout is not None
        deadline, line = time.monotonic() + 30, b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise RuntimeError(f"bench: comm serve printed no READY within 30 s"
                                       f"{self._stderr_tail()}")
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"bench: comm serve exited with status {proc.wait()} "
                                       f"before READY{self._stderr_tail()}")
                line += chunk
        if not line.startswith(b"READY "):
            raise RuntimeError(f"bench: comm serve printed {line!r} instead of READY")

    def _stderr_tail(self) -> str:
        if self._err is None:
            return ""
        self._err.seek(0)
        tail = self._err.read().decode(errors="replace").strip()[-2000:]
        return f"; its stderr:\n{tail}" if tail else ""

    def run(self, roles: list[str]) -> tuple[dict[str, Any], list[Tally], list[str]]:
        """Start the children, time the window, collect their tallies."""
        assert self.serve is not None
        rels: tuple[tuple[int, int, int, int], ...] = tuple(
            (r.spc, r.db, r.rel, r.fork) for r in self.ds.rels)
        spec = _Spec(self.endpoint, rels, self.ds.lsn,
                     self.ds.nblocks, self.p)
        for i, role in enumerate(roles):
            c = self.mp.Process(target=backend_process, name=f"bench-proc-{i}", daemon=True,
                                args=(spec, i, role, self.go, self.stop, self.out))
            c.start()
            self.children.append(c)
        self._collect("ready", _START_TIMEOUT)
        attached = self.ctl.comm_stats()["processes"]["attached"]  # all, before any leaves
        pids = [c.pid for c in self.children] + [self.serve.pid]
        cpu0, scpu0 = (own_cpu(), *(pid_cpu(x) for x in pids)), server_cpu(self.cluster)
        t0 = time.perf_counter()
        self.go.set()
        time.sleep(self.p.duration)
        self.stop.set()
        elapsed = time.perf_counter() - t0
        cpu1, scpu1 = (own_cpu(), *(pid_cpu(x) for x in pids)), server_cpu(self.cluster)
        d = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
        split = {"bench": d[0], "backends": sum(d[1:-1]), "comm_serve": d[-1]}
        stats = self.ctl.comm_stats()
        done = self._collect("done", _STOP_TIMEOUT)
        tallies, failures = [], []
        for r in done:
            t = Tally(r["role"], r["pages"], r["calls"], array("d", r["lat"]), r["checked"],
                      r["wrong"], r["errors"])
            tallies.append(t)
            if r["failure"]:
                failures.append(r["failure"])
        raw = {"elapsed": elapsed, "cpu": sum(split.values()), "server_cpu": scpu1 - scpu0,
               "cpu_split": split, "stats": stats, "attached": attached}
        return raw, tallies, failures

    def _collect(self, what: str, timeout: float) -> list[Any]:
        """One ``what`` message per child; a 'failed' child or a dead one is an error."""
        got: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(got) < self.n:
            try:
                kind, i, val = self.out.get(timeout=0.5)
            except queue.Empty:
                dead = [c.name for c in self.children if c.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"bench: backend process(es) {', '.join(dead)} died"
                                       f"{self._stderr_tail()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bench: only {len(got)} of {self.n} backend "
                                       f"processes were {what} after {timeout:g} s") from None
                continue
            if kind == "failed":
                raise RuntimeError(f"bench: a proc backend failed to start: {val}"
                                   f"{self._stderr_tail()}")
            if kind == what:
                got[i] = val
        return [got[i] for i in sorted(got)]

    def close(self) -> None:
        """Stop and reap every process, then remove the directory (safe twice, also after
        errors or Ctrl-C); every step runs even if an earlier one raised."""
        self.stop.set()
        self.go.set()
        with contextlib.ExitStack() as steps:  # run last-registered first
            steps.callback(self._remove_dir)
            steps.callback(self._stop_serve)
            steps.callback(self._stop_children)
            if self.ctl is not None:
                ctl, self.ctl = self.ctl, None
                steps.callback(ctl.close)

    def _stop_children(self) -> None:
        deadline = time.monotonic() + 10
        for c in self.children:
            c.join(max(0.0, deadline - time.monotonic()))
        for c in self.children:
            if c.is_alive():
                c.terminate()
                c.join(5)
            if c.is_alive():
                c.kill()
                c.join(5)
        self.children = []
        self.out.close()
        self.out.cancel_join_thread()

    def _stop_serve(self) -> None:
        try:
            if self.serve is not None:
                if self.serve.poll() is None:
                    self.serve.send_signal(signal.SIGTERM)
                    try:
                        self.serve.wait(10)
                    except subprocess.TimeoutExpired:
                        self.serve.kill()
                        self.serve.wait(10)
                if self.serve.stdout is not None:
                    self.serve.stdout.close()
                self.serve = None
        finally:
            if self._err is not None:
                self._err.close()
                self._err = None

    def _remove_dir(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
