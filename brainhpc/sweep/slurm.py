"""The SLURM executor: one array per stage through submitit, the sbatch script, cluster checks.

Every non-empty stage is submitted as array(s) (split when longer than the cluster's
``MaxArraySize``; ``cells_per_task`` packs small cells into one task), each stage
``--dependency=afterany`` on the jobs of the stages it needs (``brainhpc.stages``), including
cells of earlier runs that are still queued, so every stage runs even when some cells failed (a
cell that needs a missing input fails with a message naming the cell that must run first, and
the aggregate reports it). It returns at once. Before submitting: the resources are checked
against ``sinfo`` and the container's brainhpc/submitit against this host's.

The sbatch script of a stage (``sbatch_script``; ``--dry-run`` prints it): submitit's, plus
``--requeue``, ``srun --cpus-per-task --kill-on-bad-exit=1``, a SIGTERM trap so the teardown
runs, and the teardown that requeues the array task when its cell left a requeue flag.
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

from brainhpc import __version__, stages
from brainhpc.errors import BrainhpcError
from brainhpc.sweep.config import Sweep
from brainhpc.sweep.plan import Cell
from brainhpc.sweep.resources import Resources
from brainhpc.sweep.rundir import append_jobs, chunks, log_folder
from brainhpc.sweep.runner import CellRunner

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


def check_cluster(sweep: Sweep, selected: list[str], info: dict) -> None:
    """Refuse resources this cluster cannot give (every problem at once, each naming its key)."""
    problems = []
    if sweep.cluster and sweep.cluster != info["cluster"]:
        problems.append(f"profile {sweep.profile!r} is written for cluster {sweep.cluster!r}, "
                        f"this is cluster {info['cluster']!r}: pass --profile with this site's "
                        "profile (slurm/profiles/gpu-cluster.toml is a template)")
    parts = info["partitions"]
    for stage in selected:
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


def setup_lines(sweep: Sweep, stage: str) -> list[str]:
    """The top of a stage's script: the fixed lines, the NCCL knobs set for it, the profile's."""
    return ["export PYTHONNOUSERSITE=1  # no ~/.local packages in the job, host or container",
            "# SIGTERM (preemption, scancel) reaches the cell through srun; the trap makes this",
            "# script wait for srun and run the teardown below instead of dying at once",
            "trap 'echo \"brainhpc: batch script got SIGTERM\"' TERM",
            *sweep.resources[stage].env(), *sweep.setup]


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
    mem = f"{int(r.mem)}G" if float(r.mem).is_integer() else f"{int(r.mem * 1024)}M"
    params = {"job_name": f"{sweep.name}-{stage}", "partition": r.partition,
              "time": r.time_min, "cpus_per_task": r.cpus_per_task, "mem": mem,
              "ntasks_per_node": r.tasks, "array_parallelism": r.array_parallelism,
              "stderr_to_stdout": True, "wckey": r.wckey or None,
              "srun_args": [f"--cpus-per-task={r.cpus_per_task}", "--kill-on-bad-exit=1",
                            *r.srun_args],
              "setup": setup_lines(sweep, stage),
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


class _ScriptOnly(submitit.SlurmExecutor):
    """The SLURM executor for writing scripts only (``--dry-run``): submitit refuses to build
    one where ``srun`` is missing, and a dry run on a laptop must still print the scripts."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def executor(sweep: Sweep, stage: str, run_dir: Path, dependency: str | None = None,
             kind: type = submitit.SlurmExecutor) -> submitit.SlurmExecutor:
    """The submitit executor of a stage's arrays, with every sbatch parameter set."""
    ex = kind(folder=log_folder(run_dir, stage), python=python_command(sweep, run_dir),
              max_num_timeout=sweep.resources[stage].max_num_timeout)
    params = slurm_params(sweep, stage, run_dir)
    if dependency:
        params["dependency"] = dependency
    ex.update_parameters(**params)
    return ex


def sbatch_script(sweep: Sweep, stage: str, run_dir: Path, n_tasks: int,
                  dependency: str | None = None) -> str:
    """The sbatch script of this stage's array (``--dry-run``, the golden files): the text the
    very executor ``submit_slurm`` uses writes, through the method submitit itself calls when it
    submits (submitit has no public dry run; a SLURM test holds the two to each other)."""
    ex = executor(sweep, stage, run_dir, dependency, kind=_ScriptOnly)
    if n_tasks > 1:
        ex.parameters["map_count"] = n_tasks  # as submitit's map_array does
    return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")


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



# ------------------------------------------------------------------------------ submission

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
                 info: dict, waiting: dict[str, list[str]] | None = None,
                 redo: frozenset[str] = frozenset()) -> list[dict]:
    """Submit every non-empty stage as array(s), afterany on the jobs of the stages it needs
    (this run's and ``waiting``: earlier runs' still-queued ones); returns the job records.
    ``redo``: cells run with force although ``force`` is off (``--rerun-stale``)."""
    records: list[dict] = []
    stage_jobs = {s: list((waiting or {}).get(s, [])) for s in stages.NAMES}
    for stage in stages.NAMES:
        if not cells[stage]:
            continue
        r = sweep.resources[stage]
        after = sorted({j for s in stages.TABLE[stage].after for j in stage_jobs[s]}, key=int)
        ex = executor(sweep, stage, run_dir, "afterany:" + ":".join(after) if after else None)
        runner = CellRunner(force, sweep.device(stage), redo)
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
            append_jobs(run_dir, rec)
    return records
