"""Command line of the sweep::

    python -m brainhpc.sweep [JOBS_FILE] [--profile NAME] [--executor slurm|local|debug]
                             [--partition P] [--cpu-partition P] [--dry-run] [--only STAGE]
                             [--force] [--rerun-stale] [--run-dir DIR] [--data [NAME=]PATH ...]
                             [--evaluate NAME=PATH ...]
    python -m brainhpc.sweep status RUN_DIR
    python -m brainhpc.sweep aggregate RUN_DIR     (re-write RUN_DIR/results here and now)
    python -m brainhpc.sweep report RUN_DIR/results (the README's tables, from the CSVs alone)

With SLURM it needs a site profile (``--profile`` or ``profile =`` in the file), checks it
against the cluster (``sinfo``) and the container against this host, then returns right after
submitting and prints the job ids and what to run next. ``--dry-run`` prints the cells, their
resources and the sbatch script of each stage and, where a SLURM client is installed, the result
of the cluster check. ``--executor local`` runs the cells here, with a live status table.
``--rerun-stale`` also redoes (with force) the finished cells whose recorded code
(``brainhpc.provenance``) differs from this code.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

from brainhpc import stages
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import write_json
from brainhpc.provenance import code_version, describe
from brainhpc.sweep import slurm
from brainhpc.sweep.aggregate import aggregate, report
from brainhpc.sweep.config import load_sweep
from brainhpc.sweep.local import run_here
from brainhpc.sweep.plan import expand
from brainhpc.sweep.resources import PROFILES
from brainhpc.sweep.rundir import claim_run_dir, stale_cells, todo
from brainhpc.sweep.runner import is_stale, read_marker
from brainhpc.sweep.status import cell_states, table

DEFAULT_JOBS = "jobs/smoke.toml"
EXECUTORS = ("slurm", "local", "debug")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("jobs_file", nargs="?", default=DEFAULT_JOBS,
                   help=f"sweep file (default {DEFAULT_JOBS}), or 'status' / 'aggregate' / "
                        "'report'")
    p.add_argument("target", nargs="?",
                   help="RUN_DIR after 'status' or 'aggregate'; a results folder after 'report'")
    p.add_argument("--executor", choices=EXECUTORS, default="slurm")
    p.add_argument("--profile", help="site profile name (slurm/profiles/) or .toml path")
    p.add_argument("--partition", help="partition of the GPU stages (and of the CPU stages "
                   "when the profile has no cpu_partition)")
    p.add_argument("--cpu-partition", help="partition of the CPU stages (prepare, evaluate, "
                   "aggregate)")
    p.add_argument("--data", action="append", metavar="[NAME=]PATH",
                   help="raw image folder: PATH overrides [data] of the file; NAME=PATH "
                   "overrides [data.NAME] (repeat it for several datasets)")
    p.add_argument("--evaluate", action="append", metavar="NAME=PATH",
                   help="folder of the [[evaluate]] entry NAME (repeat it); entries with "
                   "dataset = \"X\" follow --data X=PATH without it")
    p.add_argument("--run-dir", type=Path,
                   help="default: the sweep file's run_dir, else runs/<sweep name>")
    p.add_argument("--only", choices=stages.NAMES, help="this stage's cells only (they still wait "
                   "for queued cells of the stages they need)")
    p.add_argument("--dry-run", action="store_true",
                   help="print cells, resources and sbatch scripts; submit nothing")
    p.add_argument("--force", action="store_true",
                   help="redo the selected cells, and take over a run dir of another sweep file")
    p.add_argument("--rerun-stale", action="store_true",
                   help="also redo (with --force, per cell) the finished cells that ran other "
                   "code than this (a different hash of the brainhpc/ sources) or recorded none")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="run a jobs/*.toml study as SLURM arrays",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run)


def _run_dir_command(args) -> int:
    """``report RESULTS``, ``aggregate RUN_DIR``, ``status RUN_DIR``."""
    if args.jobs_file == "report":
        if args.target is None:
            raise BrainhpcError("report needs a results folder: python -m brainhpc.sweep report "
                                "RUN_DIR/results")
        print(report(args.target), end="")
        return 0
    run_dir = args.target or args.run_dir
    if run_dir is None:
        raise BrainhpcError(f"{args.jobs_file} needs a run directory: "
                            f"python -m brainhpc.sweep {args.jobs_file} RUN_DIR")
    if args.jobs_file == "aggregate":
        res = aggregate(run_dir)
        print(f"{Path(run_dir) / 'results'}: {res['rows']} classify rows, "
              f"{res['segment_rows']} segment rows, {res['generators']} generator rows, "
              f"failed: {res['failed'] or 'none'}")
        return 0
    rows = cell_states(Path(run_dir))
    print(table(rows))
    return 1 if any(r["state"] in ("failed", "lost") for r in rows) else 0


def _check_slurm(sweep, plan, selected: list[str], dry: bool) -> dict | None:
    """The cluster's facts, the sweep checked against them (None: no SLURM client or no answer
    from the cluster, dry run: the plan is still worth printing)."""
    if dry and shutil.which("sbatch") is None:
        print("\nnot checked against a cluster: no SLURM client here")
        return None
    try:
        info = slurm.cluster_info()
    except BrainhpcError as e:
        if not dry:
            raise
        print(f"\nnot checked against a cluster: it did not answer ({str(e).splitlines()[0]})")
        return None
    slurm.check_cluster(sweep, [s for s in selected if plan[s]], info)
    if dry:
        print(f"\nchecked against cluster {info['cluster']} (sinfo): partitions, time "
              "limits and GPUs fit")
    return info


def _print_submitted(sweep, records: list[dict], n: int, note: str, info: dict,
                     run_dir: Path, took: float) -> None:
    print(f"submitted {n} cells of sweep {sweep.name} to SLURM cluster {info['cluster']} "
          f"in {took:.1f} s ({note}; MaxArraySize {info['max_array_size']}):")
    for r in records:
        after = f" after {','.join(r['after'])} (afterany)" if r["after"] else ""
        pack = f", {r['pack']} per task" if r.get("pack") else ""
        print(f"  {r['stage']:<10} {len(r['cells']):>4} cells{pack}  job {r['job_id']}{after}")
    print("next:")
    print(f"  python -m brainhpc.sweep status {run_dir}")
    print(f"  squeue -j {','.join(r['job_id'] for r in records)}")
    print(f"  logs: {run_dir / 'logs'}/<stage>/; results: {run_dir / 'results'}/table.md "
          f"(after job {records[-1]['job_id']})")


def _execute(args, sweep, plan, run_dir: Path, selected: list[str], info: dict | None,
             t0: float) -> int:
    """Submit (SLURM) or run here (local, debug) what is not done yet."""
    is_slurm = args.executor == "slurm"
    claim_run_dir(sweep, run_dir, args.force)
    if is_slurm and sweep.container:
        found = slurm.image_versions(sweep, run_dir)
        print(f"container: brainhpc {found['brainhpc']}, submitit {found['submitit']} (as here), "
              f"torch {found.get('torch')} (CUDA build {found.get('cuda')})")
    write_json(run_dir / "plan.json", {s: [{"id": c.id, "params": c.params} for c in plan[s]]
                                       for s in stages.NAMES})
    queued = slurm.queue_states() if is_slurm else {}
    cells, skipped, waiting = todo(plan, run_dir, selected, args.force, queued,
                                   rerun_stale=args.rerun_stale)
    redo = stale_cells(cells) if args.rerun_stale and not args.force else frozenset()
    n = sum(len(v) for v in cells.values())
    note = f"{len(skipped['done'])} done, {len(skipped['queued'])} still queued"
    if args.rerun_stale:
        note += f", {len(redo)} stale to redo (now {describe(code_version())})"
    if n == 0:
        print(f"nothing to submit for {sweep.name} in {run_dir}: {note}")
        for q in skipped["queued"]:
            print(f"  queued: {q}")
        return 0
    if is_slurm:
        records = slurm.submit_slurm(sweep, cells, run_dir, args.force, info, waiting, redo)
        _print_submitted(sweep, records, n, note, info, run_dir, time.monotonic() - t0)
        return 0
    print(f"{args.executor} run of {n} cells in {run_dir} ({note}):", flush=True)
    run_here(args.executor, sweep, cells, run_dir, args.force, redo=redo)
    rows = cell_states(run_dir, queued={})
    print(table(rows))
    print(f"{args.executor} run of {n} cells took {time.monotonic() - t0:.1f} s; results in "
          f"{run_dir / 'results'}")
    return 1 if any(r["state"] == "failed" for r in rows) else 0


def run(args) -> int:
    if args.jobs_file in ("report", "status", "aggregate"):
        return _run_dir_command(args)
    t0 = time.monotonic()
    sweep = load_sweep(args.jobs_file, data=args.data, partition=args.partition,
                       profile=args.profile, cpu_partition=args.cpu_partition,
                       evaluate=args.evaluate)
    run_dir = (args.run_dir or sweep.run_dir or Path("runs") / sweep.name).resolve()
    plan = expand(sweep, run_dir)
    selected = [args.only] if args.only else list(stages.NAMES)
    is_slurm = args.executor == "slurm"
    if is_slurm and not sweep.profile:
        have = ", ".join(sorted(p.stem for p in PROFILES.glob("*.toml")))
        raise BrainhpcError(f"{args.jobs_file}: --executor slurm needs a site profile: pass "
                            f"--profile NAME or set profile = \"NAME\" in the file (profiles in "
                            f"{PROFILES}: {have}; copy gpu-cluster.toml for a GPU site)")
    if args.dry_run:
        print(dry_run(sweep, plan, run_dir, selected, args.rerun_stale))
        if is_slurm:
            _check_slurm(sweep, plan, selected, dry=True)
        return 0
    info = _check_slurm(sweep, plan, selected, dry=False) if is_slurm else None
    return _execute(args, sweep, plan, run_dir, selected, info, t0)


def _knobs(r) -> str:
    """The resources of a stage as key=value, site knobs only where set."""
    out = [f"partition={r.partition}", f"gpus_per_node={r.gpus_per_node}",
           f"tasks_per_node={r.tasks}", f"cpus_per_task={r.cpus_per_task}", f"mem_gb={r.mem}",
           f"time_min={r.time_min}", f"array_parallelism={r.array_parallelism}",
           f"max_num_timeout={r.max_num_timeout}"]
    for key in ("gpu_type", "account", "qos", "constraint", "exclude", "reservation", "wckey"):
        if getattr(r, key):
            out.append(f"{key}={getattr(r, key)}")
    if r.gpu_flag != "gpus-per-node" and r.gpus_per_node:
        out.append(f"gpu_flag={r.gpu_flag}")
    if r.cells_per_task > 1:
        out.append(f"cells_per_task={r.cells_per_task}")
    if r.mem_gb_per_gpu and r.gpus_per_node:
        out.append(f"(mem: mem_gb={r.mem_gb}, mem_gb_per_gpu={r.mem_gb_per_gpu})")
    return " ".join(out + [line.removeprefix("export ") for line in r.env()])


def _stale_note(plan, selected: list[str], rerun_stale: bool) -> list[str]:
    """How many done cells ran other code, and whether this run would redo them (nothing when
    none did and ``--rerun-stale`` was not asked for)."""
    n = sum(is_stale(c, unknown=rerun_stale) for s in selected for c in plan[s])
    if not (n or rerun_stale):
        return []
    what = ("would re-run (--rerun-stale, with --force)" if rerun_stale
            else "--rerun-stale re-runs them")
    return [f"{describe(code_version())}: {n} done cell(s) ran other code (stale); {what}"]


def dry_run(sweep, plan, run_dir: Path, selected: list[str], rerun_stale: bool = False) -> str:
    """The matrix, the resources and the sbatch script of each stage, as text; cells finished by
    other code are marked stale."""
    out = [f"sweep {sweep.name} ({sweep.source}), profile {sweep.profile or '(none: local)'}, "
           f"run dir {run_dir}", *_stale_note(plan, selected, rerun_stale)]
    for stage in selected:
        cells = plan[stage]
        if not cells:
            continue
        r = sweep.resources[stage]
        out.append(f"\n== {stage}: {len(cells)} cell(s) ==")
        for c in cells:
            m = read_marker(c) or {}
            state = m.get("status", "new")
            if state == "done" and m.get("config_hash") != c.hash and stage != "aggregate":
                state = "done, config changed: --force"
            elif is_stale(c, unknown=rerun_stale):
                state = "done, stale code" + (": re-run" if rerun_stale else "")
            params = ", ".join(f"{k}={v}" for k, v in c.params.items()
                               if v not in (None, {}, ""))
            out.append(f"  {c.id:<40} [{state}] {params}")
        out.append(f"resources: {_knobs(r)}")
        out.append(f"device: {sweep.device(stage)}")
        before = [s for s in stages.TABLE[stage].after if plan[s]]
        dep = f"afterany:<{', '.join(before)} job ids>" if before else None
        n_tasks = -(-len(cells) // r.cells_per_task)
        out.append(f"--- sbatch script ({stage}) ---")
        out.append(slurm.sbatch_script(sweep, stage, run_dir, n_tasks, dep).rstrip())
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m brainhpc.sweep",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return run(args)
    except BrainhpcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
