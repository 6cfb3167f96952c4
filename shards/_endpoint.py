"""ZeroMQ endpoints of page servers, checked before a socket sees them: a bad one
would otherwise fail only inside a worker thread or a server's bind."""

from __future__ import annotations

import os
import socket
import stat
import time


def endpoint_problem(ep: str, *, bind: bool = False) -> str | None:
    """What is wrong with endpoint ``ep`` (None if nothing). To connect, a tcp endpoint
    needs a host and a port in 1..65535; to ``bind``, host ``*`` (every interface) and
    port ``*`` or 0 (a free one) are fine too."""
    scheme, sep, rest = ep.partition("://")
    if not sep or not rest:
        return "is not an endpoint like tcp://host:port, ipc://path or inproc://name"
    if scheme in ("ipc", "inproc"):
        return None
    if scheme != "tcp":
        return f"has transport {scheme!r}; page servers listen on tcp, ipc or inproc"
    host, colon, port = rest.rpartition(":")
    if not colon or not host or (not bind and host in ("[]", "*")):
        return "needs a host and a port, like tcp://127.0.0.1:6400"
    if bind and port == "*":
        return None
    if not (port.isascii() and port.isdigit()) or not (0 if bind else 1) <= int(port) <= 65535:
        return f"has port {port!r}; a port is {0 if bind else 1}..65535"
    return None


def ipc_path(ep: str) -> str | None:
    """The socket file of an ``ipc://`` endpoint (None for other transports and for
    Linux's abstract names, ``ipc://@name``, which have no file)."""
    scheme, _, path = ep.partition("://")
    if scheme != "ipc" or not path or path.startswith("@"):
        return None
    return path


def ipc_in_use(ep: str) -> bool:
    """Whether a process listens on ``ep``'s socket file. ZeroMQ's bind on an ipc path
    replaces any file there, so a second server would silently take the address over
    from a live one; servers ask this first. A stale file (nobody listening) is not
    in use: the bind replaces it."""
    path = ipc_path(ep)
    if path is None:
        return False
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (BlockingIOError, TimeoutError):  # a listener so busy its backlog is full
        return True
    except OSError:  # refused: a stale file left by a server that died
        return False
    finally:
        probe.close()
    return True


def remove_ipc(ep: str, wait: float = 0.5) -> None:
    """Remove ``ep``'s socket file after the server that bound it has closed its
    socket (ZeroMQ leaves it behind), so that clients are told at once that nobody
    listens there. Anything but a socket file is left alone."""
    path = ipc_path(ep)
    if path is None:
        return
    # ZeroMQ closes the listener in its I/O thread, a moment after close() returns
    end = time.monotonic() + wait
    while ipc_in_use(ep) and time.monotonic() < end:
        time.sleep(0.01)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode) and not ipc_in_use(ep):
            os.unlink(path)
    except OSError:
        pass
