"""The ``brainhpc`` command line: one subcommand per stage, each defined in its own module.

A command module exposes ``add_parser(subparsers)``, which registers its subcommand and sets
``func=run`` where ``run(args) -> int``. A ``BrainhpcError`` becomes ``error: ...`` on stderr and
exit status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from brainhpc import __version__
from brainhpc.errors import BrainhpcError

COMMAND_MODULES = [
    "brainhpc.data.prepare",
    "brainhpc.smoke",
    "brainhpc.generate",
    "brainhpc.classify.run",
    "brainhpc.classify.evaluate",
    "brainhpc.segment.run",
    "brainhpc.sweep.cli",
]


def parse_option(text: str) -> tuple[str, object]:
    """``--opt KEY=VALUE`` for the stage commands: VALUE is read as JSON when it parses
    (numbers, lists, booleans), else kept as a string."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--opt expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainhpc", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"brainhpc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except BrainhpcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
