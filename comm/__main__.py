"""``python -m comm``: demo (the main job), serve (the communicator as a process for
backend processes), bench (the benchmark suite)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator


def main(argv: list[str] | None = None) -> int:
    from . import _demo, _server
    from ._errors import ConfigError

    parser = argparse.ArgumentParser(prog="python -m comm",
                                     description="pagecomm: the communicator")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo.add_cli(sub)
    _server.add_cli(sub)
    try:
        from . import _bench
    except ImportError as e:  # matplotlib & co are the 'bench' extra
        bench = sub.add_parser("bench", help="the benchmark suite (pip install pagecomm[bench])")
        bench.set_defaults(func=lambda args, e=e: sys.exit(
            f"bench needs the 'bench' extra: pip install -e '.[bench]' ({e})"))
    else:
        _bench.add_cli(sub)
    args, rest = parser.parse_known_args(argv)
    if any(a in ("-v", "--verbose") for a in rest):  # also after the command's name
        args.verbose = True
        rest = [a for a in rest if a not in ("-v", "--verbose")]
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
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
    except ConfigError as e:  # e.g. a COMM_* variable (the message names it): one line
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2


class _Terminated(KeyboardInterrupt):
    """SIGTERM, taking the Ctrl-C path (every clean-up catches KeyboardInterrupt).
    Commands let it propagate (after their clean-up) so that main() exits 143, not 130."""


@contextlib.contextmanager
def _term_as_interrupt() -> Iterator[None]:
    """SIGTERM (``timeout``, ``kill``, a supervisor) takes the Ctrl-C path, which
    stops the page servers the command started and removes its temporary store;
    left at its default, it killed this process and orphaned them. (``serve`` sets
    handlers of its own.)"""
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
