"""brainhpc: a subcommand per stage (prepare, generate, classify, segment, evaluate), smoke, sweep.

A stage's subcommand is generated from its config dataclass (``brainhpc.options``): its flags,
defaults and help are the config's fields. A ``BrainhpcError`` becomes ``error: ...`` on stderr
and exit status 2; an interrupted cell (SIGTERM, re-run to resume) exits with 3; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial

from brainhpc import __version__, options, smoke, stages
from brainhpc.errors import BrainhpcError
from brainhpc.sweep import cli as sweep_cli

INTERRUPTED = 3


def run_stage(stage: stages.Stage, args: argparse.Namespace) -> int:
    """``brainhpc <stage> ...``: the config from the flags, the stage function on it."""
    cfg = options.from_args(stage.config_class(), args)
    result = stage.run(cfg)
    return INTERRUPTED if result.get("status") == "interrupted" else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainhpc", description=__doc__.splitlines()[0],
                                     epilog="brainhpc COMMAND --help: the flags of a command")
    parser.add_argument("--version", action="version", version=f"brainhpc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage in stages.TABLE.values():
        if not stage.command:
            continue
        p = sub.add_parser(stage.name, help=stage.help, description=stage.help)
        options.add_arguments(p, stage.config_class())
        p.set_defaults(func=partial(run_stage, stage))
    smoke.add_parser(sub)
    sweep_cli.add_parser(sub)
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
