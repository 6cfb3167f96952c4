"""``python -m comm``: demo (the main job), serve (the communicator as a process for
backend processes), bench (the benchmark suite)."""

from __future__ import annotations

import argparse
import logging
import sys

from shards import _cli


def main(argv: list[str] | None = None) -> int:
    from . import _demo, _serve_cli
    from ._errors import ConfigError

    parser = argparse.ArgumentParser(prog="python -m comm",
                                     description="pagecomm: the communicator")
    parser.add_argument(*_cli.VERBOSE, action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo.add_cli(sub)
    _serve_cli.add_cli(sub)
    try:
        from . import _bench
    except ImportError as e:  # matplotlib & co are the 'bench' extra
        bench = sub.add_parser("bench", help="the benchmark suite (pip install pagecomm[bench])")
        bench.set_defaults(func=lambda args, e=e: sys.exit(
            f"bench needs the 'bench' extra: pip install -e '.[bench]' ({e})"))
    else:
        _bench.add_cli(sub)
    args = _cli.parse(parser, argv, logging.WARNING)
    try:
        return _cli.run(lambda: args.func(args))
    except ConfigError as e:  # e.g. a COMM_* variable (the message names it): one line
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
