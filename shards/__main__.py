"""``python -m shards``: import-pgdata, generate, serve (each sub-command lives beside its code).

``-v``/``--verbose`` is taken before or after the sub-command's name. Ctrl-C prints
one line, ``interrupted``, and exits 130; SIGTERM takes the same path (the
command's clean-up runs: stores closed, write transactions aborted) and exits
143. ``serve`` installs handlers of its own and stops cleanly with status 0.
(shards/_cli.py, shared with ``python -m comm``.)
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import _cli, _curve, _pgimport, _serve_cli, _synth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards",
                                     description="pagecomm page service tools")
    parser.add_argument(*_cli.VERBOSE, action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _pgimport.add_cli(sub)
    _synth.add_cli(sub)
    _serve_cli.add_cli(sub)
    _curve.add_cli(sub)
    args = _cli.parse(parser, argv, logging.INFO)
    return _cli.run(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
