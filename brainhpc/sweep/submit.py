"""Turning planned cells into jobs: SLURM arrays through submitit, or local/debug execution.

* ``slurm``: one array per stage (split into several when longer than the cluster's
  ``MaxArraySize``), each stage ``--dependency=afterany`` on the previous stage's arrays, so
  every stage runs even when some cells failed (a cell that needs a missing input fails with a
  message naming the cell that must run first, and the aggregate reports it). Returns at once.
* ``local``: the same cells as subprocesses on this machine (submitit's LocalExecutor), stage by
  stage, at most ``array_parallelism`` at a time; blocks until the end.
* ``debug``: in this process, one cell after the other (breakpoints work).

``RUN_DIR/sweep.json`` names the sweep file that owns the run directory; ``RUN_DIR/jobs.json``
lists every submission (stage, job id, cells in array order) for ``status``.
"""

from __future__ import annotations

import getpass
import json
import logging
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import submitit
from submitit.slurm.slurm import _make_sbatch_string

from brainhpc.errors import BrainhpcError
from brainhpc.fsio import write_json
from brainhpc.sweep.cells import Cell, CellRunner, read_marker
from brainhpc.sweep.config import STAGES, Resources, Sweep

log = logging.getLogger(__name__)

EXECUTORS = ("slurm", "local", "debug")
NO_SLURM = ("sbatch is not on PATH: this machine has no SLURM client. Run the cells here with "
            "--executor local (or debug), or start the development cluster with "
            "`make cluster-up` (bash slurm/cluster.sh up)")


def _cmd(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as e:
        raise BrainhpcError(NO_SLURM) from e
    except subprocess.TimeoutExpired as e:
        raise BrainhpcError(f"`{' '.join(args)}` did not answer within 60 s: is slurmctld up? "
                            "(scontrol ping)") from e
    if out.returncode != 0:
        raise BrainhpcError(f"`{' '.join(args)}` failed ({out.returncode}): "
                            f"{(out.stderr or out.stdout).strip()}")
    return out.stdout


def cluster_info() -> dict:
    """MaxArraySize and the partitions of the cluster this machine submits to."""
    if shutil.which("sbatch") is None:
        raise BrainhpcError(NO_SLURM)
    config = _cmd(["scontrol", "show", "config"])
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", config, re.M)
    name = re.search(r"^ClusterName\s*=\s*(\S+)", config, re.M)
    partitions = [p.rstrip("*") for p in _cmd(["sinfo", "-h", "-o", "%P"]).split()]
    return {"max_array_size": int(m.group(1)) if m else 1001,
            "cluster": name.group(1) if name else "?", "partitions": sorted(set(partitions))}


def check_partitions(sweep: Sweep, stages: list[str], partitions: list[str]) -> None:
    for stage in stages:
        part = sweep.resources[stage].partition
        if part not in partitions:
            raise BrainhpcError(f"partition {part!r} (resources.{stage}.partition or "
                                f"--partition) does not exist on this cluster; sinfo lists: "
                                f"{', '.join(partitions)}")


def python_command(sweep: Sweep) -> str:
    """The python every task runs: this interpreter, or the container's through its prefix."""
    if sweep.container:
        return f"{sweep.container} python"
    return shlex.quote(sys.executable)


def slurm_params(sweep: Sweep, stage: str) -> dict:
    """submitit SlurmExecutor parameters of one stage (tasks_per_node = one task per GPU)."""
    r: Resources = sweep.resources[stage]
    mem = f"{int(r.mem_gb)}G" if float(r.mem_gb).is_integer() else f"{int(r.mem_gb * 1024)}M"
    params = {"job_name": f"{sweep.name}-{stage}", "partition": r.partition,
              "time": r.time_min, "cpus_per_task": r.cpus_per_task, "mem": mem,
              "ntasks_per_node": r.tasks, "array_parallelism": r.array_parallelism,
              "stderr_to_stdout": True}
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    if r.account:
        params["account"] = r.account
    if sweep.setup:
        params["setup"] = list(sweep.setup)
    return params


def log_folder(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "logs" / stage


def sbatch_script(sweep: Sweep, stage: str, run_dir: Path, n_cells: int,
                  dependency: str | None = None) -> str:
    """The sbatch script submitit writes for this stage's array (used by --dry-run and tests)."""
    folder = log_folder(run_dir, stage)
    command = " ".join([python_command(sweep), "-u -m submitit.core._submit",
                        shlex.quote(str(folder))])
    params = slurm_params(sweep, stage)
    if dependency:
        params["dependency"] = dependency
    if n_cells > 1:
        params["map_count"] = n_cells
    return _make_sbatch_string(command=command, folder=folder, **params)


def chunks(cells: list[Cell], size: int) -> list[list[Cell]]:
    """Arrays of at most ``size`` tasks (SLURM rejects indexes >= MaxArraySize)."""
    return [cells[i:i + size] for i in range(0, len(cells), size)]


# ------------------------------------------------------------------ run directory bookkeeping

def claim_run_dir(sweep: Sweep, run_dir: Path, force: bool) -> None:
    """Refuse a run directory that another sweep file created, unless ``force``."""
    path = run_dir / "sweep.json"
    mine = {"name": sweep.name, "source": str(sweep.source)}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        if {k: old.get(k) for k in mine} != mine and not force:
            raise BrainhpcError(f"{run_dir} was created by sweep {old.get('name')!r} "
                                f"({old.get('source')}), not {sweep.name!r} ({sweep.source}); "
                                "choose another --run-dir or pass --force to take it over")
    write_json(path, {**mine, "claimed": time.time()})


def read_jobs(run_dir: Path) -> list[dict]:
    try:
        return json.loads((Path(run_dir) / "jobs.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def cell_jobs(run_dir: Path) -> dict[tuple[str, str], str]:
    """(stage, cell id) -> the SLURM job id of its latest submission (``A_i`` in an array)."""
    out = {}
    for rec in read_jobs(run_dir):
        if rec.get("executor") != "slurm":
            continue
        for i, cid in enumerate(rec["cells"]):
            out[(rec["stage"], cid)] = rec["job_id"] if len(rec["cells"]) == 1 \
                else f"{rec['job_id']}_{i}"
    return out


def queue_states() -> dict[str, str]:
    """Job id -> state of this user's jobs still in the queue (array tasks one per line)."""
    if shutil.which("squeue") is None:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T"],
                             capture_output=True, text=True, timeout=30).stdout
    except subprocess.TimeoutExpired:
        return {}
    return dict(line.split("|", 1) for line in out.split() if "|" in line)


def todo(plan: dict[str, list[Cell]], run_dir: Path, stages: list[str], force: bool,
         queued: dict[str, str]) -> tuple[dict[str, list[Cell]], dict[str, list[str]]]:
    """Cells to submit per stage, and why others are left alone (done / still queued)."""
    jobs = cell_jobs(run_dir)
    submit: dict[str, list[Cell]] = {s: [] for s in STAGES}
    skipped: dict[str, list[str]] = {"done": [], "queued": []}
    changed = []
    for stage in stages:
        for cell in plan[stage]:
            job = jobs.get((stage, cell.id))
            if job and job in queued:
                skipped["queued"].append(f"{stage}/{cell.id} (job {job} {queued[job]})")
                continue
            marker = read_marker(cell) or {}
            if not force and marker.get("status") == "done":
                if marker.get("config_hash") == cell.hash or stage == "aggregate":
                    skipped["done"].append(f"{stage}/{cell.id}")
                    continue
                changed.append(f"{stage}/{cell.id}")
            submit[stage].append(cell)
    if changed:
        raise BrainhpcError(f"finished cells whose config changed in the sweep file: "
                            f"{', '.join(changed)}; pass --force to redo them (or restore the "
                            "sweep file)")
    if "aggregate" in stages and any(submit[s] for s in STAGES if s != "aggregate"):
        submit["aggregate"] = list(plan["aggregate"])  # new results: aggregate again
    return submit, skipped


# ------------------------------------------------------------------------------ executors

def submit_slurm(sweep: Sweep, cells: dict[str, list[Cell]], run_dir: Path, force: bool,
                 info: dict) -> list[dict]:
    """Submit every non-empty stage as array(s), chained afterany; returns the job records."""
    records: list[dict] = []
    after: list[str] = []
    for stage in STAGES:
        if not cells[stage]:
            continue
        ex = submitit.SlurmExecutor(folder=log_folder(run_dir, stage),
                                    python=python_command(sweep))
        params = slurm_params(sweep, stage)
        if after:
            params["dependency"] = "afterany:" + ":".join(after)
        ex.update_parameters(**params)
        ids = []
        for chunk in chunks(cells[stage], info["max_array_size"]):
            jobs = ex.map_array(CellRunner(force), chunk)
            job_id = jobs[0].job_id.split("_")[0]
            ids.append(job_id)
            rec = {"stage": stage, "job_id": job_id, "cells": [c.id for c in chunk],
                   "executor": "slurm", "after": list(after), "submitted": time.time()}
            records.append(rec)
            _append_jobs(run_dir, rec)
        after = ids
    return records


def run_here(executor: str, sweep: Sweep, cells: dict[str, list[Cell]], run_dir: Path,
             force: bool) -> list[dict]:
    """local: subprocesses, ``array_parallelism`` at a time; debug: in this process."""
    records = []
    for stage in STAGES:
        if not cells[stage]:
            continue
        r = sweep.resources[stage]
        if executor == "debug":
            ex = submitit.DebugExecutor(folder=log_folder(run_dir, stage))
            size = 1
        else:
            ex = submitit.LocalExecutor(folder=log_folder(run_dir, stage))
            ex.update_parameters(timeout_min=r.time_min, tasks_per_node=r.tasks)
            size = r.array_parallelism
        for chunk in chunks(cells[stage], size):
            jobs = [ex.submit(CellRunner(force), cell) for cell in chunk]
            for cell, job in zip(chunk, jobs, strict=True):
                try:
                    job.result()
                except Exception as e:  # the cell's marker holds the error; others go on
                    log.error("%s/%s failed: %s", stage, cell.id, str(e).strip().splitlines()[-1]
                              if str(e).strip() else type(e).__name__)
            rec = {"stage": stage, "job_id": ",".join(str(j.job_id) for j in jobs),
                   "cells": [c.id for c in chunk], "executor": executor,
                   "submitted": time.time()}
            records.append(rec)
            _append_jobs(run_dir, rec)
    return records


def _append_jobs(run_dir: Path, rec: dict) -> None:
    write_json(Path(run_dir) / "jobs.json", read_jobs(run_dir) + [rec])
