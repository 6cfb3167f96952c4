"""``python -m shards``: import-pgdata, generate, serve (each sub-command lives beside its code)."""

from __future__ import annotations

import argparse
import logging
import sys

from . import _curve, _pgimport, _serve_cli, _synth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shards",
                                     description="pagecomm page service tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _pgimport.add_cli(sub)
    _synth.add_cli(sub)
    _serve_cli.add_cli(sub)
    _curve.add_cli(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
