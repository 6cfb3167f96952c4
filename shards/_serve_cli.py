"""``python -m shards serve``: one shard of a page store, as a process.

Prints exactly one line on stdout, ``READY <endpoint>``, once bound; stops cleanly
on SIGTERM/SIGINT. Options map one to one onto PageServer's arguments.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from ._endpoint import endpoint_problem
from ._errors import ShardsError
from ._server import MAX_WAIT_SECONDS, PageServer

log = logging.getLogger(__name__)
_MAX_LATENCY_MS = MAX_WAIT_SECONDS * 1000


def _endpoint(text: str) -> str:
    """``--bind``: an endpoint ZeroMQ can bind (port 0 or * takes a free port)."""
    why = endpoint_problem(text, bind=True)
    if why is not None:
        msg = f"{text!r} is not an endpoint like tcp://127.0.0.1:6400, ipc://PATH or inproc://NAME"
        if not why.startswith("is not an endpoint"):  # else it would say the same twice
            msg += f" ({why})"
        raise argparse.ArgumentTypeError(msg)
    return text


def _latency_ms(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected milliseconds, got {text!r}") from None
    if not 0 <= v < _MAX_LATENCY_MS:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"must be milliseconds in 0..{_MAX_LATENCY_MS} "
                                         f"(exclusive), got {text!r}")
    return v


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve one shard of a page store")
    p.add_argument("--store", required=True, help="sharded store directory (with layout.json)")
    p.add_argument("--shard", type=int, required=True, help="which shard to serve")
    p.add_argument("--shard-count", type=int, help="must match layout.json (default: from it)")
    p.add_argument("--stripe-size", type=int, help="must match layout.json (default: from it)")
    p.add_argument("--bind", type=_endpoint, default="tcp://127.0.0.1:0",
                   help="ZeroMQ endpoint to bind (port 0: any free port)")
    p.add_argument("--latency-ms", type=_latency_ms, default=0.0,
                   help="injected reply latency, milliseconds")
    p.add_argument("--lsn-wait", type=float, default=1.0,
                   help="seconds to wait for the store to reach not_modified_since")
    p.add_argument("--max-queue", type=int, default=4096, help="SLOW_DOWN beyond this")
    p.add_argument("--metrics-port", type=int,
                   help="serve Prometheus metrics on this HTTP port (0: any free port)")
    p.add_argument("--metrics-addr", default="127.0.0.1",
                   help="address for --metrics-port (0.0.0.0 to let other hosts scrape)")
    p.add_argument("--curve-secret", default=os.environ.get("SHARDS_CURVE_SECRET"),
                   help="this server's CURVE .key_secret file (env SHARDS_CURVE_SECRET)")
    p.add_argument("--curve-clients", default=os.environ.get("SHARDS_CURVE_CLIENTS"),
                   help="directory of accepted clients' .key files (env SHARDS_CURVE_CLIENTS)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --bind without CURVE (plaintext, a warning)")
    p.set_defaults(func=_serve_cli)


def _serve_cli(args: argparse.Namespace) -> int:
    from ._layout import open_shard_store, read_layout

    try:
        layout = read_layout(args.store)
        for opt, key in (("shard_count", "shard_count"), ("stripe_size", "stripe_size")):
            given = getattr(args, opt)
            if given is not None and given != layout[key]:
                raise ShardsError(f"--{opt.replace('_', '-')} {given} does not match "
                                  f"{key}={layout[key]} in {args.store}/layout.json")
        store = open_shard_store(args.store, args.shard, readonly=True)
    except (ShardsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with store, PageServer(store, args.shard, layout["shard_count"], layout["stripe_size"],
                               args.bind, latency=args.latency_ms / 1000.0,
                               lsn_wait=args.lsn_wait, max_queue=args.max_queue,
                               metrics_port=args.metrics_port,
                               metrics_addr=args.metrics_addr,
                               curve_secret=args.curve_secret,
                               curve_clients=args.curve_clients,
                               insecure=args.insecure) as srv:
            print(f"READY {srv.endpoint}", flush=True)
            while not stop.wait(0.5):
                pass
            log.info("stopping: %s", srv.stats())
    except (ShardsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
