"""``python -m comm serve --listen ipc://PATH``: the communicator as its own process
(see _server.py), configured from the COMM_* variables, until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from shards._curve import is_loopback

from ._errors import CommError
from ._server import CommServer


def add_cli(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the communicator as its own process for backend "
                                     "processes (shards and tuning from COMM_* variables)")
    p.add_argument("--listen", required=True, help="endpoint for backends, e.g. ipc:///tmp/c")
    p.set_defaults(func=serve_main)


def serve_main(args: argparse.Namespace) -> int:
    from ._communicator import Communicator

    if not is_loopback(args.listen):  # backends share memory with us: same host only
        print(f"error: --listen {args.listen}: backend processes share memory with the "
              f"communicator, so they run on this host, and this endpoint has no "
              f"authentication: listen on ipc://PATH (or a loopback address)",
              file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        comm = Communicator.from_env()
    except CommError as e:  # a COMM_* variable: the message names it
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = CommServer(comm, args.listen)
    try:
        server.start()
        if comm.metrics_port is not None:  # COMM_METRICS_PORT=0 takes a free port: say which
            addr = comm.config.metrics_addr
            host = f"[{addr}]" if ":" in addr else addr
            print(f"metrics http://{host}:{comm.metrics_port}/metrics", file=sys.stderr,
                  flush=True)
        print(f"READY {server.endpoint}", flush=True)
        while not stop.wait(0.5):
            pass
    except CommError as e:  # e.g. --listen names an endpoint that cannot be bound
        print(f"error: --listen: {e}", file=sys.stderr)
        return 2
    finally:
        server.stop()
        comm.close()
        server.release()
    print("stopped", file=sys.stderr)
    return 0
