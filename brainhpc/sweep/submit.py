"""Turning planned cells into jobs: SLURM arrays through submitit, or local/debug execution.

* ``slurm``: one array per stage (split into several when longer than the cluster's
  ``MaxArraySize``; ``cells_per_task`` packs small cells into one task), each stage
  ``--dependency=afterany`` on the jobs of the stages it needs (``STAGE_TABLE``), including
  cells of earlier runs that are still queued, so every stage runs even when some cells failed
  (a cell that needs a missing input fails with a message naming the cell that must run first,
  and the aggregate reports it). Returns at once. Before submitting: the resources are checked
  against ``sinfo`` and the container's brainhpc/submitit against this host's.
* ``local``: the same cells as subprocesses on this machine (submitit's LocalExecutor), stage by
  stage, at most ``array_parallelism`` at a time; blocks until the end.
* ``debug``: in this process, one cell after the other (breakpoints work).

The sbatch script of a stage (``sbatch_script``; ``--dry-run`` prints it): submitit's, plus
``--requeue``, ``srun --cpus-per-task --kill-on-bad-exit=1``, a SIGTERM trap so the teardown
runs, and the teardown that requeues the array task when its cell left a requeue flag.

``RUN_DIR/sweep.json`` names the sweep file that owns the run directory; ``RUN_DIR/jobs.json``
lists every submission (stage, job id, cells in array order, cells per task) for ``status``.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError
from submitit.slurm.slurm import _make_sbatch_string

from brainhpc import __version__
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import write_json
from brainhpc.sweep.cells import Cell, CellRunner, dataset_of, is_done, read_marker
from brainhpc.sweep.config import STAGE_TABLE, STAGES, Resources, Sweep

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


# ------------------------------------------------------------------ the cluster, from sinfo

def parse_minutes(text: str) -> int | None:
    """sinfo's time limit (``infinite``, ``d-h:m:s``, ``d-h``, ``h:m:s``, ``m:s``, ``m``) in whole
    minutes (seconds dropped: a limit of 30:30 admits 30 minutes, not 31)."""
    text = text.strip()
    if text.lower() in ("infinite", "unlimited", "n/a", ""):
        return None
    days, _, rest = text.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if len(parts) == 1:
        parts = [parts[0], 0, 0] if days else [0, parts[0], 0]
    h, m, _s = [0] * (3 - len(parts)) + parts
    return (int(days or 0) * 24 + h) * 60 + m


def parse_gpus(gres: str) -> dict[str, int]:
    """sinfo's ``%G`` of one node group (``gpu:2``, ``gpu:a100:4(S:0-1),gpu:v100:2``, ``(null)``)
    -> GPUs per node by type, "" for all of them together."""
    out: dict[str, int] = {}
    for gtype, count in re.findall(r"(?:^|,)gpu(?::([^:,()]+))?:(\d+)", gres):
        out[gtype] = out.get(gtype, 0) + int(count)
    if out:
        out[""] = sum(out.values())
    return out


def parse_sinfo(text: str) -> dict[str, dict]:
    """``sinfo -h -o '%P|%l|%G'`` -> partition -> {max_time_min, gpus: {type: per node}}."""
    parts: dict[str, dict] = {}
    for line in text.splitlines():
        if line.count("|") != 2:
            continue
        name, limit, gres = line.split("|")
        p = parts.setdefault(name.rstrip("*"), {"max_time_min": parse_minutes(limit),
                                                "gpus": {}})
        for gtype, n in parse_gpus(gres).items():
            p["gpus"][gtype] = max(p["gpus"].get(gtype, 0), n)
    return parts


def cluster_info() -> dict:
    """Name, MaxArraySize and partitions (time limit, GPUs per node) of this machine's cluster."""
    if shutil.which("sbatch") is None:
        raise BrainhpcError(NO_SLURM)
    config = _cmd(["scontrol", "show", "config"])
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", config, re.M)
    name = re.search(r"^ClusterName\s*=\s*(\S+)", config, re.M)
    return {"max_array_size": int(m.group(1)) if m else 1001,
            "cluster": name.group(1) if name else "?",
            "partitions": parse_sinfo(_cmd(["sinfo", "-h", "-o", "%P|%l|%G"]))}


def check_cluster(sweep: Sweep, stages: list[str], info: dict) -> None:
    """Refuse resources this cluster cannot give (every problem at once, each naming its key)."""
    problems = []
    if sweep.cluster and sweep.cluster != info["cluster"]:
        problems.append(f"profile {sweep.profile!r} is written for cluster {sweep.cluster!r}, "
                        f"this is cluster {info['cluster']!r}: pass --profile with this site's "
                        "profile (slurm/profiles/gpu-cluster.toml is a template)")
    parts = info["partitions"]
    for stage in stages:
        r = sweep.resources[stage]
        key = f"resources.{stage}"
        p = parts.get(r.partition)
        if p is None:
            problems.append(f"{key}: partition {r.partition!r} (partition, cpu_partition or "
                            f"--partition) does not exist on this cluster; sinfo lists: "
                            f"{', '.join(sorted(parts))}")
            continue
        if p["max_time_min"] is not None and r.time_min > p["max_time_min"]:
            problems.append(f"{key}.time_min = {r.time_min} exceeds the MaxTime of partition "
                            f"{r.partition!r} ({p['max_time_min']} min)")
        if r.gpus_per_node:
            have = p["gpus"].get(r.gpu_type, 0)
            if have < r.gpus_per_node:
                what = f"GPUs of type {r.gpu_type!r}" if r.gpu_type else "GPUs"
                sinfo = ", ".join(f"{t or 'any'}: {n}" for t, n in sorted(p["gpus"].items()))
                problems.append(f"{key}.gpus_per_node = {r.gpus_per_node}: partition "
                                f"{r.partition!r} has at most {have} {what} per node "
                                f"(sinfo gres: {sinfo or 'no GPUs'})")
    if problems:
        raise BrainhpcError(f"the sweep does not fit cluster {info['cluster']} (checked with "
                            "sinfo):\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------ what a task runs, and how

def binds(sweep: Sweep, run_dir: Path) -> list[tuple[str, bool]]:
    """(path, read-only) the container needs: run dir, raw data, external sets,
    $BRAINHPC_CACHE, profile's."""
    out = [(str(Path(run_dir).resolve()), False)]
    for path in [d.path for d in sweep.datasets] + [e.path for e in sweep.evaluate
                                                    if e.path is not None]:
        if path is not None and (str(path), True) not in out:
            out.append((str(path), True))
    if os.environ.get("BRAINHPC_CACHE"):
        out.append((str(Path(os.environ["BRAINHPC_CACHE"]).resolve()), False))
    out += [(str(Path(b).expanduser()), False) for b in sweep.container_binds]
    for path, _ in out:
        if "," in path or ":" in path:
            raise BrainhpcError(f"cannot bind {path} into the container: ',' and ':' separate "
                                "bind specifications; move or link it to a plain path")
    return out


def python_command(sweep: Sweep, run_dir: Path) -> str:
    """The python every task runs: this interpreter, or the container's through its prefix."""
    if not sweep.container:
        return shlex.quote(sys.executable)
    paths = binds(sweep, run_dir)
    apptainer = ",".join(f"{p}:{p}:ro" if ro else p for p, ro in paths)
    volumes = " ".join(f"-v {shlex.quote(p)}:{shlex.quote(p)}" + (":ro" if ro else "")
                       for p, ro in paths)
    prefix = sweep.container.replace("{binds}", shlex.quote(apptainer))
    return f"{prefix.replace('{volumes}', volumes)} python"


def log_folder(run_dir: Path, stage: str) -> Path:
    return Path(run_dir) / "logs" / stage


def setup_lines(sweep: Sweep) -> list[str]:
    return ["export PYTHONNOUSERSITE=1  # no ~/.local packages in the job, host or container",
            "# SIGTERM (preemption, scancel) reaches the cell through srun; the trap makes this",
            "# script wait for srun and run the teardown below instead of dying at once",
            "trap 'echo \"brainhpc: batch script got SIGTERM\"' TERM",
            *sweep.setup]


def teardown_lines(folder: Path) -> list[str]:
    """Requeue on the host: the cell (maybe in a container, without Slurm) leaves a flag."""
    flag = f"{shlex.quote(str(folder))}/requeue-$SLURM_JOB_ID"
    return ["rc=$?  # srun's",
            f"flag={flag}",
            'if [ -e "$flag" ]; then',
            '  rm -f "$flag"',
            '  task=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID}',
            '  task=${task:-$SLURM_JOB_ID}',
            '  if scontrol show job "$task" | grep -q "JobState=RUNNING"; then',
            '    scontrol requeue "$task" && echo "brainhpc: requeued job $task"',
            "  else",
            '    echo "brainhpc: job $task not requeued: no longer running (cancelled?)"',
            "  fi",
            "fi",
            'exit "$rc"']


def slurm_params(sweep: Sweep, stage: str, run_dir: Path) -> dict:
    """submitit SlurmExecutor parameters of one stage (tasks_per_node = one task per GPU)."""
    r: Resources = sweep.resources[stage]
    mem = f"{int(r.mem_gb)}G" if float(r.mem_gb).is_integer() else f"{int(r.mem_gb * 1024)}M"
    params = {"job_name": f"{sweep.name}-{stage}", "partition": r.partition,
              "time": r.time_min, "cpus_per_task": r.cpus_per_task, "mem": mem,
              "ntasks_per_node": r.tasks, "array_parallelism": r.array_parallelism,
              "stderr_to_stdout": True, "wckey": r.wckey or None,
              "srun_args": [f"--cpus-per-task={r.cpus_per_task}", "--kill-on-bad-exit=1",
                            *r.srun_args],
              "setup": setup_lines(sweep),
              "teardown": teardown_lines(log_folder(run_dir, stage)),
              "additional_parameters": {"requeue": True, **r.slurm_extra}}
    if r.gpus_per_node:
        typed = f"{r.gpu_type}:" if r.gpu_type else ""
        if r.gpu_flag == "gres":
            params["gres"] = f"gpu:{typed}{r.gpus_per_node}"
        else:
            params["gpus_per_node"] = f"{typed}{r.gpus_per_node}" if typed else r.gpus_per_node
    for knob in ("account", "qos", "constraint", "exclude"):
        if getattr(r, knob):
            params[knob] = getattr(r, knob)
    if r.reservation:  # not a submitit parameter
        params["additional_parameters"]["reservation"] = r.reservation
    return params


def sbatch_script(sweep: Sweep, stage: str, run_dir: Path, n_tasks: int,
                  dependency: str | None = None) -> str:
    """The sbatch script submitit writes for this stage's array (used by --dry-run and tests)."""
    folder = log_folder(run_dir, stage)
    command = " ".join([python_command(sweep, run_dir), "-u -m submitit.core._submit",
                        shlex.quote(str(folder))])
    params = slurm_params(sweep, stage, run_dir)
    if dependency:
        params["dependency"] = dependency
    if n_tasks > 1:
        params["map_count"] = n_tasks
    return _make_sbatch_string(command=command, folder=folder, **params)


def chunks(items: list, size: int) -> list[list]:
    """Consecutive groups of at most ``size``: packs of cells, arrays under MaxArraySize."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def image_versions(sweep: Sweep, run_dir: Path) -> dict:
    """brainhpc and submitit inside the container must equal this host's: the host pickles the
    cells with its submitit and validated them with its brainhpc; the image unpickles and runs
    them. Returns what the image reports (with torch and its CUDA build)."""
    code = ("import json, brainhpc, submitit, torch; print(json.dumps({'brainhpc': "
            "brainhpc.__version__, 'submitit': submitit.__version__, 'torch': torch.__version__, "
            "'cuda': torch.version.cuda}))")
    cmd = f"{python_command(sweep, run_dir)} -c {shlex.quote(code)}"
    try:
        out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        raise BrainhpcError(f"the container did not answer within 600 s: {cmd}") from e
    try:
        found = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise BrainhpcError(f"could not read brainhpc/submitit versions from the container "
                            f"(exit {out.returncode}) with: {cmd}\n{out.stderr.strip()[-800:]}\n"
                            "check [container] prefix in the profile (the image path, "
                            "apptainer on PATH: module load?)") from None
    host = {"brainhpc": __version__, "submitit": submitit.__version__}
    differ = [f"{k} {found.get(k)} in the image, {v} here" for k, v in host.items()
              if found.get(k) != v]
    if differ:
        raise BrainhpcError(f"the container does not match this host: {'; '.join(differ)}. "
                            "Rebuild the image from this checkout (make image VARIANT=gpu && "
                            "make sif) or install the image's versions here")
    return found


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
        pack = rec.get("pack", 1)
        n_tasks = -(-len(rec["cells"]) // pack)
        for i, cid in enumerate(rec["cells"]):
            out[(rec["stage"], cid)] = rec["job_id"] if n_tasks == 1 \
                else f"{rec['job_id']}_{i // pack}"
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


def _missed(evaluate_cell: Cell, done_models: set[str]) -> bool:
    """A finished evaluate cell ran before some of its models finished (it was queued when
    they were submitted, and ran first): score them now."""
    try:
        summary = json.loads((evaluate_cell.folder / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return any(m in done_models for m in summary.get("not_finished", []))


def todo(plan: dict[str, list[Cell]], run_dir: Path, stages: list[str], force: bool,
         queued: dict[str, str]) -> tuple[dict[str, list[Cell]], dict[str, list[str]],
                                          dict[str, list[str]]]:
    """Cells to submit per stage; why others are left alone (done / still queued); and per
    stage the job ids of its still-queued cells, which later stages must wait for. When a
    classify/segment cell of a dataset is submitted, that dataset's finished evaluate cells are
    submitted again (they score the new models and skip the scored ones), and so is the
    aggregate."""
    jobs = cell_jobs(run_dir)
    submit: dict[str, list[Cell]] = {s: [] for s in STAGES}
    skipped: dict[str, list[str]] = {"done": [], "queued": []}
    waiting: dict[str, list[str]] = {s: [] for s in STAGES}
    changed = []
    for stage in STAGES:
        for cell in plan[stage]:
            job = jobs.get((stage, cell.id))
            if job and job in queued:
                base = job.split("_")[0]
                if base not in waiting[stage]:
                    waiting[stage].append(base)
                if stage in stages:
                    skipped["queued"].append(f"{stage}/{cell.id} (job {job} {queued[job]})")
                continue
            if stage not in stages:
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
    if "evaluate" in stages:  # new models of a dataset: score them on its external sets
        fresh = {dataset_of(c) for s in ("classify", "segment") for c in submit[s]}
        done_models = {f"{s}/{c.id}" for s in ("classify", "segment") for c in plan[s]
                       if is_done(c)}
        again = [c for c in plan["evaluate"] if f"evaluate/{c.id}" in skipped["done"]
                 and (dataset_of(c) in fresh or _missed(c, done_models))]
        skipped["done"] = [x for x in skipped["done"] if x not in
                           {f"evaluate/{c.id}" for c in again}]
        ids = {c.id for c in submit["evaluate"] + again}
        submit["evaluate"] = [c for c in plan["evaluate"] if c.id in ids]
    if "aggregate" in stages and any(submit[s] for s in STAGES if s != "aggregate"):
        submit["aggregate"] = list(plan["aggregate"])  # new results: aggregate again
    return submit, skipped, waiting


# ------------------------------------------------------------------------------ executors

def _rejected(stage: str, n_cells: int, error: Exception, records: list[dict],
              run_dir: Path) -> str:
    why = str(error).strip() or type(error).__name__
    done = "; ".join(f"{r['stage']} job {r['job_id']} ({len(r['cells'])} cells)"
                     for r in records) or "nothing"
    return (f"sbatch refused the {stage} array ({n_cells} cells): {why}\n"
            f"already submitted in this run: {done} (recorded in {run_dir / 'jobs.json'}).\n"
            "Fix the cause and run the same command again: finished and still-queued cells are "
            "skipped, and the rest wait for the queued jobs")


def submit_slurm(sweep: Sweep, cells: dict[str, list[Cell]], run_dir: Path, force: bool,
                 info: dict, waiting: dict[str, list[str]] | None = None) -> list[dict]:
    """Submit every non-empty stage as array(s), afterany on the jobs of the stages it needs
    (this run's and ``waiting``: earlier runs' still-queued ones); returns the job records."""
    records: list[dict] = []
    stage_jobs = {s: list((waiting or {}).get(s, [])) for s in STAGES}
    for stage in STAGES:
        if not cells[stage]:
            continue
        r = sweep.resources[stage]
        after = sorted({j for s in STAGE_TABLE[stage].after for j in stage_jobs[s]}, key=int)
        ex = submitit.SlurmExecutor(folder=log_folder(run_dir, stage),
                                    python=python_command(sweep, run_dir),
                                    max_num_timeout=r.max_num_timeout)
        params = slurm_params(sweep, stage, run_dir)
        if after:
            params["dependency"] = "afterany:" + ":".join(after)
        ex.update_parameters(**params)
        runner = CellRunner(force, sweep.device(stage))
        tasks = chunks(cells[stage], r.cells_per_task) if r.cells_per_task > 1 \
            else cells[stage]
        for array in chunks(tasks, info["max_array_size"]):
            ids = [c.id for t in array for c in (t if isinstance(t, list) else [t])]
            try:
                jobs = ex.map_array(runner, array)
            except (FailedJobError, FailedSubmissionError, OSError) as e:
                raise BrainhpcError(_rejected(stage, len(ids), e, records, run_dir)) from e
            job_id = jobs[0].job_id.split("_")[0]
            stage_jobs[stage].append(job_id)
            rec = {"stage": stage, "job_id": job_id, "cells": ids, "executor": "slurm",
                   "after": after, "submitted": time.time()}
            if r.cells_per_task > 1:
                rec["pack"] = r.cells_per_task
            records.append(rec)
            _append_jobs(run_dir, rec)
    return records


def local_threads(r: Resources, at_once: int) -> int:
    """Intra-op threads of each local cell: the cores shared by the cells that run at once, at
    most ``cpus_per_task`` (SLURM hands each cell its own cores instead). Without this, two
    cells on 2 cores start 2 threads each, and every OpenMP barrier waits for a descheduled one."""
    from brainhpc.train.distributed import allocated_cpus

    return max(1, min(r.cpus_per_task, allocated_cpus() // max(1, at_once)))


def run_here(executor: str, sweep: Sweep, cells: dict[str, list[Cell]], run_dir: Path,
             force: bool) -> list[dict]:
    """local: subprocesses, ``array_parallelism`` at a time (sharing the cores, unless
    ``OMP_NUM_THREADS`` is set); debug: in this process."""
    records = []
    user_threads = os.environ.get("OMP_NUM_THREADS")
    for stage in STAGES:
        if not cells[stage]:
            continue
        r = sweep.resources[stage]
        if executor == "debug":
            ex = submitit.DebugExecutor(folder=log_folder(run_dir, stage))
            size = 1
        else:
            ex = submitit.LocalExecutor(folder=log_folder(run_dir, stage))
            # GPUs the stage asked for are visible to its cells (0: CUDA_VISIBLE_DEVICES="")
            ex.update_parameters(timeout_min=r.time_min, tasks_per_node=r.tasks,
                                 gpus_per_node=r.gpus_per_node)
            size = r.array_parallelism
        for chunk in chunks(cells[stage], size):
            if executor == "local" and user_threads is None:  # the cells inherit it
                os.environ["OMP_NUM_THREADS"] = str(local_threads(r, len(chunk)))
            try:
                jobs = [ex.submit(CellRunner(force), cell) for cell in chunk]
            finally:
                if executor == "local" and user_threads is None:
                    os.environ.pop("OMP_NUM_THREADS", None)
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
