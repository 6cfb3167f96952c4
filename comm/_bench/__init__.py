"""``python -m comm bench``: the raw ceiling, the old design and pagecomm (backend threads
or processes), side by side.

Theory of operation
-------------------
One run generates one synthetic store, then for each injected latency starts ONE
LocalCluster (page servers as subprocesses) and measures every requested
(design, workload, backends) cell against those same servers: (a) ``raw``, a
pipelined pyzmq client with no communicator logic; (b) ``old``, one connection
per backend per shard with a 128-deep readahead ring; (c) ``pagecomm`` with
backend threads; (d) ``proc`` (opt-in): pagecomm as ``python -m comm serve`` with
backend PROCESSES. Results go to a table on stdout, ``results.json`` and two PNG
plots in ``--out``; the issue's targets and the process-vs-thread ratios are
computed from cells of this one run.

The ``COMM_*`` variables are read and checked before anything starts (a bad value:
one-line error, exit 2) but never applied: every design, proc's ``comm serve``
included, is configured from the flags alone, so the designs are compared alike
(``ENV_HELP``; a note on stderr names any that are set).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shards import MAX_BLOCKNO, MAX_BLOCKS_PER_REQUEST
from shards._server import MAX_WAIT_SECONDS

from .._config import INT_RANGES, CommConfig
from .._demo import MAX_RELS, MAX_SHARDS, env_config, int_arg, temp_dir
from .._errors import ConfigError
from . import _report
from ._pagecomm import prefetch_buffer_pages
from ._setup import Dataset, Params
from ._workloads import WORKLOADS, run_cell

__all__ = ["add_cli", "main", "run_cli"]

DESIGNS = ("raw", "old", "pagecomm", "proc")
DEFAULT_DESIGNS = ["raw", "old", "pagecomm"]  # proc spawns a process per backend: opt-in
# CommConfig's ranges (comm/_config.py) for the flags that set its fields: checked at
# parse time so the error names the flag, not COMM_*
CONFIG_RANGES: dict[str, tuple[str, int, int]] = {
    flag: (attr, *INT_RANGES[attr][1:])
    for flag, attr in (("--threads-per-shard", "threads_per_shard"),
                       ("--inflight", "inflight_per_conn"),
                       ("--inflight-pages", "inflight_pages_per_conn"),
                       ("--prefetch-pages", "prefetch_pages"))
}
MAX_SECONDS = 1e6  # as CommConfig's timeouts; time.sleep overflows far above it
MAX_LATENCY_MS = MAX_WAIT_SECONDS * 1000  # what a page server accepts, in ms
# --quick's values for flags not given; then the plain defaults (explicit flags win)
QUICK: dict[str, Any] = {"backends": [2], "shards": 2, "duration": 0.3, "latency_ms": [0.0],
         "pages_per_rel": 1024, "rels": 4}
PLAIN: dict[str, Any] = {"shards": 4, "duration": 3.0, "rels": 8, "pages_per_rel": 16384}
ENV_HELP = ("COMM_* variables (docs/tuning.md) are checked before anything starts (a bad "
            "value is an error, exit 2) but not applied: every design, proc's comm serve "
            "included, is configured from these flags alone, so the designs are compared "
            "alike.")


def _items(text: str) -> list[str]:
    """The comma-separated items of a list flag; an empty one is a typo, not a skip."""
    vals = [v.strip() for v in text.split(",")]
    if not all(vals):
        raise argparse.ArgumentTypeError(f"empty item in {text!r}")
    return vals


def _ints(text: str) -> list[int]:
    items = _items(text)
    try:
        vals = [int(v) for v in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 1,16,64, got {text!r}") from None
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}") from None
    return vals


def _floats(text: str) -> list[float]:
    items = _items(text)
    try:
        vals = [float(v) for v in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0,0.5, got {text!r}") from None
    if not all(0 <= v < MAX_LATENCY_MS for v in vals):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected finite non-negative numbers below "
                                         f"{MAX_LATENCY_MS}, got {text!r}") from None
    return vals


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        vals = _items(text)
        bad = [v for v in vals if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad}: choose from {','.join(allowed)}")
        return vals
    return parse


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _seconds(text: str) -> float:
    v = _number(text)
    if not 0 < v <= MAX_SECONDS:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0 and <= "
                                         f"{MAX_SECONDS:g}, got {text!r}")
    return v


def _rate(text: str) -> float:
    v = _number(text)
    if not (v == 0.0 or 0.01 <= v < math.inf):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be 0 (unpaced) or a finite number >= 0.01, "
                                         f"not {text}")
    return v


def _config_int(flag: str) -> Callable[[str], int]:
    _, lo, hi = CONFIG_RANGES[flag]
    return int_arg(lo, hi)


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", type=_ints, default=None,
                   help="backend counts (list, default 1,16,64)")
    p.add_argument("--shards", type=int_arg(1, MAX_SHARDS), default=None,
                   help=f"page servers, 1..{MAX_SHARDS} (default 4)")
    p.add_argument("--threads-per-shard", type=_config_int("--threads-per-shard"), default=1,
                   help="pagecomm workers per shard")
    p.add_argument("--inflight", type=_config_int("--inflight"), default=64,
                   help="in-flight window per connection (pagecomm and raw)")
    p.add_argument("--inflight-pages", type=_config_int("--inflight-pages"),
                   default=CommConfig.inflight_pages_per_conn,
                   help="pages of multi-page requests in flight per connection (pagecomm)")
    p.add_argument("--latency-ms", type=_floats, default=None,
                   help="injected server latencies (list, default 0,0.5)")
    p.add_argument("--duration", type=_seconds, default=None, help="seconds per cell (default 3)")
    p.add_argument("--workloads", type=_choices(WORKLOADS), default=None,
                   help=f"list (default {','.join(WORKLOADS)})")
    p.add_argument("--designs", type=_choices(DESIGNS), default=None,
                   help=f"list from {','.join(DESIGNS)} (default {','.join(DEFAULT_DESIGNS)}); "
                   "proc = backend processes attached to one 'python -m comm serve'")
    p.add_argument("--proc-vs-threads", action="store_true",
                   help="process vs thread backends: defaults become --designs pagecomm,proc "
                   "--workloads random,scan --backends 16 --latency-ms 0")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="JSON + PNG directory")
    p.add_argument("--quick", action="store_true",
                   help="tiny CI smoke run: defaults become 2 shards, 2 backends, 4 rels of "
                   "1024 pages, 0.3 s cells, latency 0; flags given explicitly still win")
    p.add_argument("--rels", type=int_arg(1, MAX_RELS), default=None,
                   help="relations (default 8)")
    p.add_argument("--pages-per-rel", type=int_arg(1, MAX_BLOCKNO + 1), default=None,
                   help="pages per relation, >= --scan-batch (default 16384)")
    p.add_argument("--scan-batch", type=int_arg(1, MAX_BLOCKS_PER_REQUEST), default=32,
                   help=f"pages per foreground scan call, 1..{MAX_BLOCKS_PER_REQUEST} (one "
                   "wire request)")
    p.add_argument("--distance", type=int_arg(0), default=128,
                   help="prefetch distance (pagecomm; 0: only the batch being read) = "
                   "readahead ring size (old design, >= 1)")
    p.add_argument("--prefetch-pages", type=_config_int("--prefetch-pages"), default=0,
                   help="pagecomm prefetch buffer (default: backends x (distance + batch), "
                   "at least 4096)")
    p.add_argument("--scan-rate", type=_rate, default=0.0, metavar="PAGES_PER_S",
                   help="pace each scanning backend to this many pages/s (default 0: as fast "
                   "as it can); with --random-rate, a load that leaves the CPU some room")
    p.add_argument("--random-rate", type=_rate, default=0.0, metavar="READS_PER_S",
                   help="pace each random reader to this many reads/s (default 0: closed "
                   "loop); the pause is outside the timed call")
    p.add_argument("--chaos", type=_seconds, metavar="SECONDS", default=None,
                   help="instead of the benchmark: a chaos soak of this many seconds (kill -9, "
                   "restart, freeze page servers under --backends readers; counts every outcome)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m comm bench", epilog=ENV_HELP)
    _configure(p)
    return p


def add_cli(subparsers: Any) -> None:
    """Register ``bench`` on ``python -m comm``'s sub-commands."""
    p = subparsers.add_parser("bench", help="benchmark: raw ceiling vs old design vs pagecomm",
                              description=__doc__.split("\n\n")[0] if __doc__ else None,
                              epilog=ENV_HELP)
    _configure(p)
    p.set_defaults(func=functools.partial(run_cli, parser=p))


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    return run_cli(p.parse_args(argv), p)


def _defaults(args: argparse.Namespace) -> None:
    """Fill the flags left unset: --quick's values, then --proc-vs-threads' lists, then
    the plain defaults; a flag given explicitly always wins."""
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) is None:
                setattr(args, name, value.copy() if isinstance(value, list) else value)
    pvt = args.proc_vs_threads
    if args.designs is None:
        args.designs = ["pagecomm", "proc"] if pvt else list(DEFAULT_DESIGNS)
    if args.workloads is None:
        args.workloads = ["random", "scan"] if pvt else list(WORKLOADS)
    if args.backends is None:
        args.backends = [16] if pvt else [1, 16, 64]
    if args.latency_ms is None:
        args.latency_ms = [0.0] if pvt else [0.0, 0.5]
    for name, value in PLAIN.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _check(args: argparse.Namespace, p: Params, parser: argparse.ArgumentParser) -> None:
    """The checks that involve several flags, and --out; parser.error (exit 2) on the
    first problem, before any store is generated."""
    if args.distance == 0 and "old" in args.designs:
        # its readahead ring needs a slot: with none, its scans would have nothing to read
        parser.error("--distance 0 leaves the old design's readahead ring no slot: use "
                     ">= 1, or leave 'old' out of --designs")
    if args.pages_per_rel < args.scan_batch:
        parser.error(f"--pages-per-rel ({args.pages_per_rel}) must be >= --scan-batch "
                     f"({args.scan_batch})")
    hi = CONFIG_RANGES["--prefetch-pages"][2]
    buffer = prefetch_buffer_pages(p, max(args.backends))
    if {"pagecomm", "proc"} & set(args.designs) and buffer > hi:
        parser.error(f"--backends {max(args.backends)} x (--distance {args.distance} + "
                     f"--scan-batch {args.scan_batch}) = {buffer} prefetch pages, more than "
                     f"{hi}: lower them or set --prefetch-pages")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: is a file, not a directory")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        parser.error(f"--out {args.out}: {e.strerror or e}")
    if not os.access(args.out, os.W_OK | os.X_OK):
        parser.error(f"--out {args.out}: not writable")


def run_cli(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    parser = parser or _parser()
    try:  # before anything starts
        env_config(parser.prog, None, "the bench configures every design from its flags")
    except ConfigError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    if args.chaos is not None:
        return _chaos_cli(args)
    _defaults(args)
    params = Params(shards=args.shards, threads_per_shard=args.threads_per_shard,
                    inflight=args.inflight,
                    inflight_pages=args.inflight_pages, duration=args.duration, rels=args.rels,
                    pages_per_rel=args.pages_per_rel, scan_batch=args.scan_batch,
                    distance=args.distance, prefetch_pages=args.prefetch_pages,
                    scan_rate=args.scan_rate, random_rate=args.random_rate)
    _check(args, params, parser)
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        print("bench: no plots (matplotlib is missing: pip install -e '.[bench]'); the "
              "table and results.json as usual", file=sys.stderr)
        args.no_plots = True
    cells = _run(args, params)
    ts = _report.targets(cells, params.shards)
    print(_report.table(cells))
    print()
    print(_report.targets_table(ts, judged=not args.quick))
    if params.paced:
        print(f"  (paced run: scanners {params.scan_rate:g} pages/s, random readers "
              f"{params.random_rate:g} reads/s, 0 = unpaced; raw is never paced; the "
              f"targets are defined for unpaced runs)")
    pvt = _report.proc_vs_threads(cells)
    if pvt["pairs"]:
        print()
        print(_report.proc_vs_threads_table(pvt))
    doc = {"command": "python -m comm bench " + shlex.join(sys.argv[2:] if
                                                            sys.argv[1:2] == ["bench"] else
                                                            sys.argv[1:]),
           "params": vars(params), "host": {"cpus": os.cpu_count(),
                                            "python": platform.python_version(),
                                            "platform": platform.platform()},
           "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cells": cells, "targets": ts,
           "proc_vs_threads": pvt}
    try:
        files = _write(args, doc, cells)
    except OSError as e:  # e.g. --out removed or full since the check: one line, no traceback
        print(f"{parser.prog}: error: --out {args.out}: {e}", file=sys.stderr)
        return 2
    print("\nwrote " + ", ".join(str(f) for f in files))
    bad = sum(c["wrong"] for c in cells)
    if bad:
        print(f"bench: {bad} pages did not match their expected bytes", file=sys.stderr)
        return 1
    return 0


def _write(args: argparse.Namespace, doc: dict[str, Any],
           cells: list[dict[str, Any]]) -> list[Path]:
    """results.json and (unless --no-plots) the plots; the files written."""
    _report.write_json(args.out / "results.json", doc)
    files = [args.out / "results.json"]
    if not args.no_plots:
        files += _report.plots(cells, args.out)
    return files


def _chaos_cli(args: argparse.Namespace) -> int:
    from ._chaos import run_chaos

    with contextlib.ExitStack() as stack:
        root = temp_dir(stack, "pagecomm-chaos-")
        r = run_chaos(root, shards=args.shards or PLAIN["shards"],
                      backends=(args.backends or [32])[0],
                      seconds=args.chaos)
    calls = r["calls"]
    print("chaos soak: " + ", ".join(f"{k}={v}" for k, v in sorted(calls.items())))
    print(f"faults injected: {r['faults']}; retries {r['retries']}, resets {r['resets']}, "
          f"reconnects {r['reconnects']}; slots in use at the end {r['slots_in_use']}")
    bad = calls.get("WRONG", 0) + calls.get("HUNG", 0) + sum(
        v for k, v in calls.items() if k.startswith("UNTYPED"))
    print(f"wrong pages = {calls.get('WRONG', 0)}, hung calls = {calls.get('HUNG', 0)}")
    return 1 if bad or r["threads_left"] else 0


def _plan(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    """(design, workload, backends) per latency; raw once per request size."""
    plan = []
    for wl in args.workloads:
        if "raw" in args.designs and wl in ("random", "scan"):
            plan.append(("raw", wl, 0))
        for d in ("old", "pagecomm", "proc"):
            if d in args.designs:
                plan += [(d, wl, b) for b in args.backends]
    if "raw" in args.designs and "scan" not in args.workloads and "samescan" in args.workloads:
        plan.append(("raw", "scan", 0))
    return plan


def _run(args: argparse.Namespace, p: Params) -> list[dict[str, Any]]:
    plan = _plan(args)
    progress = not args.no_progress
    bar = None
    cells: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:  # clean-ups, last armed first, also on Ctrl-C
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(plan) * len(args.latency_ms), unit="cell", desc="bench",
                       file=sys.stderr)
            stack.callback(bar.close)
        root = temp_dir(stack, "pagecomm-bench-")
        ds = Dataset(root, p, progress=False)
        for lat in args.latency_ms:
            with ds.cluster(lat) as cluster:
                for design, wl, b in plan:
                    if bar is not None:
                        bar.set_description(f"{lat:g}ms {wl} {design} x{b}")
                    res = run_cell(design, wl, b, ds, cluster, p)
                    cells.append({"design": design, "workload": wl, "latency_ms": lat,
                                  "shards": p.shards, **res})
                    if bar is not None:
                        bar.set_postfix_str(f"{res['pages_per_s']:,.0f} pages/s")
                        bar.update()
    return cells
