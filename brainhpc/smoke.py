"""``brainhpc smoke``: the main job end to end on embedded phantom data (no download needed).

It is the smoke sweep (``jobs/smoke.toml``: prepare -> generate -> classify -> aggregate, one cell
of each kind, phantom data at 64 px, sized so the outputs show learning) run on this machine
through submitit's local executor, so it needs neither a cluster nor a GPU. ``make smoke`` and
``docker run IMAGE smoke`` call it.

Threads: the local executor runs ``array_parallelism`` cells at once, each of which would start
one OpenMP thread per core; on 2 cores that is 4 threads fighting for 2, and every OpenMP barrier
then waits for a descheduled thread. Unless ``OMP_NUM_THREADS`` is set, each cell gets its share
of the cores (at most the sweep's ``cpus_per_task``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from brainhpc.sweep import cli as sweep_cli
from brainhpc.sweep.config import JOBS, load_sweep
from brainhpc.train.distributed import allocated_cpus

log = logging.getLogger(__name__)


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


def cell_threads(jobs_file: Path = JOBS / "smoke.toml") -> int:
    """Intra-op threads per cell: the cores shared by the cells that run at once."""
    res = load_sweep(jobs_file).resources.values()
    at_once = max(r.array_parallelism for r in res)
    return max(1, min(min(r.cpus_per_task for r in res), allocated_cpus() // at_once))


def run(args) -> int:
    jobs = JOBS / "smoke.toml"
    if args.executor == "local" and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(cell_threads(jobs))  # inherited by the cells
        log.info("smoke cells: %s thread(s) each", os.environ["OMP_NUM_THREADS"])
    argv = [str(jobs), "--executor", args.executor, "--run-dir", str(args.out)]
    if args.profile:
        argv += ["--profile", args.profile]
    rc = sweep_cli.main(argv + (["--force"] if args.force else []))
    results = args.out / "results"
    if rc == 0:
        print(f"smoke run done: {results / 'table.md'}, {results / 'metrics.csv'}, plots in "
              f"{results}; preview of the data: {args.out}/prepare/data/prepared/preview.png")
    return rc
