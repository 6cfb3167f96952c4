"""``python -m shards``: import-pgdata, generate, serve (each sub-command lives beside its code).

``-v``/``--verbose`` is taken before or after the sub-command's name. Ctrl-C prints
one line, ``interrupted``, and exits 130; SIGTERM takes the same path (the
command's clean-up runs: stores closed, write transactions aborted) and exits
143. ``serve`` installs handlers of its own and stops cleanly with status 0.
(The same handling as ``python -m comm``'s; ``shards`` imports nothing of
``comm``, so it has its own copy.)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator

from . import _curve, _pgimport, _serve_cli, _synth

_VERBOSE = ("-v", "--verbose")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards",
                                     description="pagecomm page service tools")
    parser.add_argument(*_VERBOSE, action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _pgimport.add_cli(sub)
    _synth.add_cli(sub)
    _serve_cli.add_cli(sub)
    _curve.add_cli(sub)
    args, rest = parser.parse_known_args(argv)
    if any(a in _VERBOSE for a in rest):  # also after the command's name
        args.verbose = True
        rest = [a for a in rest if a not in _VERBOSE]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        with _term_as_interrupt():
            return int(args.func(args) or 0)
    except _Terminated:  # the command's own finally blocks have cleaned up
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


class _Terminated(KeyboardInterrupt):
    """SIGTERM, taking the Ctrl-C path (every clean-up catches KeyboardInterrupt)."""


@contextlib.contextmanager
def _term_as_interrupt() -> Iterator[None]:
    """SIGTERM (``timeout``, ``kill``, a supervisor) takes the Ctrl-C path, so that a
    long generate or import-pgdata closes its stores (aborting the open write
    transaction) and ends with one line instead of a traceback. Only in the main
    thread, and only if nobody installed a SIGTERM handler already."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        # once: a second TERM must not break into the clean-up the first one started
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Terminated(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
