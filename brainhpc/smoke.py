"""``brainhpc smoke``: the main job end to end on embedded phantom data (no download needed).

It is the smoke sweep (``jobs/smoke.toml``: prepare -> generate -> classify -> aggregate, one cell
of each kind, phantom data at 64 px, one epoch) run on this machine through submitit's local
executor, so it needs neither a cluster nor a GPU. ``make smoke`` and ``docker run IMAGE smoke``
call it.
"""

from __future__ import annotations

from pathlib import Path

from brainhpc.sweep import cli as sweep_cli
from brainhpc.sweep.config import JOBS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("smoke", help="run the whole study in miniature on phantom data",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/smoke"), help="run folder")
    p.add_argument("--executor", choices=("local", "debug"), default="local",
                   help="local: one subprocess per cell (default); debug: in this process")
    p.add_argument("--force", action="store_true", help="redo every cell")
    p.set_defaults(func=run)


def run(args) -> int:
    argv = [str(JOBS / "smoke.toml"), "--executor", args.executor, "--run-dir", str(args.out)]
    rc = sweep_cli.main(argv + (["--force"] if args.force else []))
    results = args.out / "results"
    if rc == 0:
        print(f"smoke run done: {results / 'table.md'}, {results / 'metrics.csv'}, plots in "
              f"{results}; preview of the data: {args.out}/prepare/data/prepared/preview.png")
    return rc
