"""What ``python -m shards`` and ``python -m comm`` share: ``-v`` before or after the
command's name, and Ctrl-C / SIGTERM ending a command with one line once its own
clean-up has run (130 / 143) instead of a traceback or, for SIGTERM's default
action, a process killed with its page servers and temporary stores left behind.
``deferred_interrupts`` holds Ctrl-C and SIGTERM back while a temporary directory
or a child process is made and its clean-up armed. (``comm`` imports this;
``shards`` imports nothing of ``comm``.)"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator

VERBOSE = ("-v", "--verbose")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None,
          level: int) -> argparse.Namespace:
    """Parse ``argv`` (``-v`` also after the command's name) and set up logging at
    ``level``, or DEBUG with ``-v``. The parser must define ``-v/--verbose``."""
    args, rest = parser.parse_known_args(argv)
    if any(a in VERBOSE for a in rest):
        args.verbose = True
        rest = [a for a in rest if a not in VERBOSE]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else level,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args


def run(command: Callable[[], int | None]) -> int:
    """Run ``command``; Ctrl-C exits 130 and SIGTERM 143, each with one line."""
    try:
        with term_as_interrupt():
            return int(command() or 0)
    except Terminated:  # the command's own finally blocks have cleaned up
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


class Terminated(KeyboardInterrupt):
    """SIGTERM, taking the Ctrl-C path (every clean-up catches KeyboardInterrupt).
    Commands let it propagate (after their clean-up) so that the exit is 143, not 130."""


@contextlib.contextmanager
def term_as_interrupt() -> Iterator[None]:
    """SIGTERM (``timeout``, ``kill``, a supervisor) raises Terminated in the main
    thread, so the command's clean-up runs. Only in the main thread, and only if
    nobody installed a SIGTERM handler already (``serve`` commands set their own)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        # once: a second TERM must not break into the clean-up the first one started
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Ctrl-C and SIGTERM held back until the block ends, then delivered to the handlers
    in place before it: for creating a temporary directory or a child process and arming
    its clean-up in one step, so that no interrupt falls between the two. Keep the block
    short. Main thread only (elsewhere, and with a handler not set from Python: no-op)."""
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.getsignal(s) for s in sigs}
    if threading.current_thread() is not threading.main_thread() or \
            any(h is None for h in old.values()):
        yield
        return
    held: list[int] = []
    for s in sigs:
        signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        # restored with both blocked: a signal arriving between the two restores would
        # raise here and leave the other on the recorder, lost
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        try:
            for s, h in old.items():
                signal.signal(s, h)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        # SIGTERM first: with both held, the exit status is SIGTERM's (143)
        for signum in sorted(set(held), key=lambda n: n != signal.SIGTERM):
            signal.raise_signal(signum)  # its handler runs (and may raise) here
