"""``brainhpc smoke``: the main job end to end on embedded phantom data (no download needed).

It is the smoke sweep (``jobs/smoke.toml``: prepare -> generate -> classify and segment ->
evaluate -> aggregate, phantom data at 64 px, sized so the outputs show learning) run on this
machine through submitit's local executor, so it needs neither a cluster nor a GPU; a live status
table shows which cells run, their epoch and time while it works. ``make smoke`` and ``docker run
IMAGE smoke`` call it.

Threads: the local executor gives each cell its share of the cores (``local.local_threads``).
"""

from __future__ import annotations

from pathlib import Path

from brainhpc.sweep import cli as sweep_cli
from brainhpc.sweep.resources import JOBS


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("smoke", help="run the whole study in miniature on phantom data",
                              description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/smoke"), help="run folder")
    p.add_argument("--executor", choices=("local", "debug"), default="local",
                   help="local: one subprocess per cell (default); debug: in this process")
    p.add_argument("--force", action="store_true", help="redo every cell")
    p.add_argument("--profile", default=None,
                   help="site profile (default: the file's, local; local-gpu puts the GPU "
                        "stages on this machine's GPU)")
    p.set_defaults(func=run)


def run(args) -> int:
    jobs = JOBS / "smoke.toml"
    argv = [str(jobs), "--executor", args.executor, "--run-dir", str(args.out)]
    if args.profile:
        argv += ["--profile", args.profile]
    rc = sweep_cli.main(argv + (["--force"] if args.force else []))
    results = args.out / "results"
    if rc == 0:
        print(f"smoke run done: {results / 'table.md'}, {results / 'metrics.csv'}, plots in "
              f"{results}; preview of the data: {args.out}/prepare/data/f0/prepared/preview.png")
    return rc
