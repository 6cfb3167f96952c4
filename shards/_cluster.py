"""LocalCluster: one ``python -m shards serve`` subprocess per shard of a store directory.

Theory of operation
-------------------
Each child binds tcp://127.0.0.1:0 (or, on restart, its old endpoint) and prints
exactly one line, ``READY <endpoint>``, once bound; the parent reads that line
with a deadline, so a child that fails to start is reported with its stderr
instead of hanging the caller. Children's stderr goes to a temporary file (a pipe
nobody reads would fill up and block a chatty child). Tests use kill/freeze/thaw/
restart to model crashed, stuck and recovering page servers.

A LocalCluster goes new -> running -> stopped, once: start() on a running or
stopped one raises ShardsError and leaves every child as it is, so a second
start() can never orphan the first one's servers. A child spawned while stop()
runs (a restart racing it) is killed at once rather than left behind.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from ._errors import InvalidArgument, InvalidArgumentType, ShardsError
from ._layout import read_layout
from ._server import MAX_WAIT_SECONDS

log = logging.getLogger(__name__)
_PKG_PARENT = str(Path(__file__).resolve().parent.parent)
_MAX_LATENCY_MS = MAX_WAIT_SECONDS * 1000  # serve's --latency-ms bound


class LocalCluster:
    """Page-server subprocesses for every shard of ``store_dir`` (see module docstring)."""

    def __init__(self, store_dir: str | os.PathLike[str], shard_count: int | None = None, *,
                 latency_ms: float = 0.0, extra_args: Sequence[str] = (),
                 python: str = sys.executable, start_timeout: float = 30.0) -> None:
        self.store_dir = Path(store_dir)
        layout = read_layout(self.store_dir)
        if shard_count is not None and shard_count != layout["shard_count"]:
            raise InvalidArgument(f"shard_count={shard_count} does not match "
                                  f"{layout['shard_count']} in {self.store_dir}/layout.json")
        self.shard_count: int = layout["shard_count"]
        self.stripe_size: int = layout["stripe_size"]
        self.latency_ms = _number("latency_ms", latency_ms, lambda v: 0 <= v < _MAX_LATENCY_MS,
                                  f"milliseconds in 0..{_MAX_LATENCY_MS} (exclusive)")
        if isinstance(extra_args, (str, bytes)):  # each character would become an argument
            raise InvalidArgumentType(f"extra_args must be a sequence of arguments, "
                                      f"got {type(extra_args).__name__}")
        self.extra_args = [str(a) for a in extra_args]
        if not isinstance(python, (str, os.PathLike)):
            raise InvalidArgumentType(f"python must be a path, got {type(python).__name__}")
        self.python = os.fspath(python)
        self.start_timeout = _number("start_timeout", start_timeout,
                                     lambda v: 0 < v < float("inf"), "seconds above 0")
        self._lock = threading.Lock()  # guards procs, endpoints, _stderr, _state
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * self.shard_count
        self.endpoints: list[str] = [""] * self.shard_count
        self._stderr: list[IO[bytes] | None] = [None] * self.shard_count
        self._state = "new"  # new -> running -> stopped (see module docstring)

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LocalCluster:
        """Start every shard (in parallel) and wait until all are READY.

        Once only: on a cluster that is already running (or stopped) this raises
        ShardsError and changes nothing; create a new LocalCluster to start again.
        If any shard fails to start, every shard started so far is stopped."""
        with self._lock:
            if self._state != "new":
                now = "already running" if self._state == "running" else self._state
                raise ShardsError(f"LocalCluster of {self.store_dir} cannot start: it is {now}")
            self._state = "running"
        try:
            for i in range(self.shard_count):
                self._spawn(i, "tcp://127.0.0.1:0")
            for i in range(self.shard_count):
                self._await_ready(i)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every child, wait, then SIGKILL stragglers (idempotent)."""
        with self._lock:
            self._state = "stopped"
            procs = list(enumerate(self.procs))
        for _, p in procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)  # a frozen child cannot handle SIGTERM
                p.terminate()
        deadline = time.monotonic() + timeout
        for i, p in procs:
            if p is not None:
                try:
                    p.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("shard %d (pid %d) ignored SIGTERM; killing it", i, p.pid)
                    p.kill()
                    p.wait()
                self._close_io(i)

    # ------------------------------------------------------------ chaos

    def kill(self, i: int) -> None:
        """SIGKILL shard ``i``'s server and reap it."""
        p = self._proc(i)
        if p.poll() is None:
            p.kill()
        p.wait()

    def freeze(self, i: int, timeout: float = 5.0) -> None:
        """SIGSTOP shard ``i`` and wait until it IS stopped: connections stay up,
        nothing is answered.

        A stop takes effect only when each of the child's threads next leaves the
        kernel; a thread in an uninterruptible wait (an LMDB page fault on a busy
        disk) can keep answering for a while after kill() returns. Callers that
        assert "no reply while frozen" need the stop to have happened.
        """
        p = self._proc(i)
        p.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while not _all_threads_stopped(p.pid):
            if p.poll() is not None:
                raise ShardsError(f"shard {i} (pid {p.pid}) exited while being frozen")
            if time.monotonic() > deadline:  # leave it running, as it was
                p.send_signal(signal.SIGCONT)
                raise ShardsError(f"shard {i} (pid {p.pid}) did not stop within {timeout} s")
            time.sleep(0.002)

    def thaw(self, i: int) -> None:
        """SIGCONT shard ``i`` after :meth:`freeze`."""
        self._proc(i).send_signal(signal.SIGCONT)

    def restart(self, i: int) -> str:
        """Stop shard ``i`` (if still running) and start it again on the SAME endpoint."""
        p = self._proc(i)
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.terminate()
            try:
                p.wait(5.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._close_io(i)
        with self._lock:
            if self._state == "stopped":
                raise ShardsError("LocalCluster is stopped")
            endpoint = self.endpoints[i]
        self._spawn(i, endpoint)
        return self._await_ready(i)

    # ------------------------------------------------------------ internals

    def _proc(self, i: int) -> subprocess.Popen[bytes]:
        if not isinstance(i, int) or isinstance(i, bool):
            raise InvalidArgumentType(f"shard must be an int, got {type(i).__name__}")
        if not 0 <= i < self.shard_count:
            raise InvalidArgument(f"shard {i} is outside 0..{self.shard_count - 1}")
        with self._lock:
            p = self.procs[i]
        if p is None:
            raise ShardsError(f"shard {i} was never started")
        return p

    def _spawn(self, i: int, bind: str) -> None:
        cmd = [self.python, "-m", "shards", "serve", "--store", str(self.store_dir),
               "--shard", str(i), "--shard-count", str(self.shard_count),
               "--stripe-size", str(self.stripe_size), "--bind", bind,
               "--latency-ms", repr(self.latency_ms), *self.extra_args]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PKG_PARENT, env.get("PYTHONPATH")]))
        err = tempfile.TemporaryFile(prefix=f"shard-{i}-stderr-")
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=err, env=env, start_new_session=True)
        except OSError as e:  # no such python, not executable, out of processes
            err.close()
            raise ShardsError(f"cannot start the page server for shard {i} of "
                              f"{self.store_dir}: {self.python}: {e.strerror or e}") from None
        with self._lock:
            stopped = self._state == "stopped"
            if not stopped:
                self.procs[i], self._stderr[i] = proc, err
        if stopped:  # stop() ran meanwhile and cannot have seen this child: end it here
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            err.close()
            raise ShardsError("LocalCluster is stopped")

    def _await_ready(self, i: int) -> str:
        p = self._proc(i)
        assert p.stdout is not None
        deadline = time.monotonic() + self.start_timeout
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(p.stdout, selectors.EVENT_READ)
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self._fail(i, f"no READY line within {self.start_timeout:g}s")
                chunk = os.read(p.stdout.fileno(), 4096)
                if not chunk:
                    self._fail(i, f"exited with status {p.wait()} before READY")
                line += chunk
        text = line.decode(errors="replace").strip()
        if not text.startswith("READY "):
            self._fail(i, f"printed {text!r} instead of READY <endpoint>")
        endpoint = text.split(None, 1)[1]
        with self._lock:
            self.endpoints[i] = endpoint
        log.debug("shard %d ready at %s (pid %d)", i, endpoint, p.pid)
        return endpoint

    def _fail(self, i: int, what: str) -> None:
        p = self._proc(i)
        if p.poll() is None:
            p.kill()
            p.wait()
        with self._lock:
            err = self._stderr[i]
        tail = ""
        if err is not None:
            err.seek(0)
            tail = err.read()[-4000:].decode(errors="replace").strip()
        raise ShardsError(f"page server for shard {i} of {self.store_dir} {what}; "
                          f"stderr:\n{tail or '(empty)'}")

    def _close_io(self, i: int) -> None:
        with self._lock:
            p, err = self.procs[i], self._stderr[i]
            self._stderr[i] = None
        if p is not None and p.stdout is not None:
            p.stdout.close()
        if err is not None:
            err.close()


def _number(name: str, v: object, ok: Callable[[float], bool], what: str) -> float:
    """``float(v)`` if ``ok`` of it, else a typed error naming ``name``: InvalidArgument
    (a ValueError, as float() raised) or, for a value float() does not take at all,
    InvalidArgumentType (a TypeError). ``what`` says what is expected."""
    try:
        f = float(v)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgumentType(f"{name} must be {what}, got {type(v).__name__}") from None
    except ValueError:
        raise InvalidArgument(f"{name} must be {what}, got {v!r}") from None
    if not ok(f):  # nan fails every comparison
        raise InvalidArgument(f"{name} must be {what}, got {v!r}")
    return f


def _all_threads_stopped(pid: int) -> bool:
    """True once every thread of ``pid`` is in the stopped state (Linux /proc).

    Where /proc is not there the stop cannot be observed; report it done, which is
    what kill() returning meant before."""
    task_dir = Path(f"/proc/{pid}/task")
    if not Path("/proc/self/task").is_dir():
        return True
    try:
        stats = [(t / "stat").read_text() for t in task_dir.iterdir()]
    except (FileNotFoundError, ProcessLookupError):
        return False  # a thread came or went while listing; look again
    # the state follows the ")" that closes the command name, which may hold spaces
    return bool(stats) and all(st[st.rindex(")") + 2] in "tT" for st in stats)
