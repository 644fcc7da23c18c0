"""The local executors: the cells of a sweep on this machine, stage by stage.

* ``local``: each cell in its own subprocess (submitit's LocalExecutor), at most
  ``array_parallelism`` at a time, sharing the cores (``local_threads``), a new cell starting as
  soon as one ends; a live status table (``brainhpc.sweep.status.Board``: stage, cell, state,
  epoch, elapsed) is refreshed while they run, the way SLURM users watch ``squeue``. Blocks
  until the end.
* ``debug``: in this process, one cell after the other (breakpoints work).

Each cell runs on its stage's device (``Sweep.device``), as a SLURM task does: cuda where the
profile gives the stage GPUs (``local-gpu``: ``make gpu-check``'s smoke), and a cuda cell whose
torch sees no GPU fails at once (``runner.check_cuda``) instead of training on the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

import submitit

from brainhpc import stages
from brainhpc.sweep.config import Sweep
from brainhpc.sweep.plan import Cell
from brainhpc.sweep.resources import Resources
from brainhpc.sweep.rundir import append_jobs, log_folder
from brainhpc.sweep.runner import CellRunner
from brainhpc.sweep.status import Board

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often running cells are checked and the status refreshed


def local_threads(r: Resources, at_once: int) -> int:
    """Intra-op threads of each local cell: the cores shared by the cells that run at once, at
    most ``cpus_per_task`` (SLURM hands each cell its own cores instead). Without this, two
    cells on 2 cores start 2 threads each, and every OpenMP barrier waits for a descheduled one."""
    from brainhpc.train.distributed import allocated_cpus

    return max(1, min(r.cpus_per_task, allocated_cpus() // max(1, at_once)))


@contextlib.contextmanager
def _threads(n: int | None):
    """OMP_NUM_THREADS=n for the subprocesses started inside (an explicit user value wins)."""
    if n is None or "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = str(n)
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)


def visible_gpus() -> tuple[int, ...]:
    """The GPUs this process was given (``CUDA_VISIBLE_DEVICES`` as indices, e.g. SLURM's "2"
    for the third GPU of a shared node); () when unset or not indices (then submitit numbers
    from 0). Without it the local executor would hand its cells GPU 0, someone else's GPU."""
    text = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    parts = [x.strip() for x in text.split(",") if x.strip()]
    return tuple(int(x) for x in parts) if parts and all(x.isdigit() for x in parts) else ()


def _outcome(stage: str, cell: Cell, job) -> None:
    try:
        job.result()
    except Exception as e:  # the cell's marker holds the error; the others go on
        text = str(e).strip()
        log.error("%s/%s failed: %s", stage, cell.id,
                  text.splitlines()[-1] if text else type(e).__name__)


def _stage_local(sweep: Sweep, stage: str, cells: list[Cell], run_dir: Path,
                 runner: CellRunner, board: Board) -> list:
    """A stage's cells as subprocesses, ``array_parallelism`` at a time; the jobs."""
    r = sweep.resources[stage]
    ex = submitit.LocalExecutor(folder=log_folder(run_dir, stage))
    # GPUs the stage asked for are visible to its cells (0: CUDA_VISIBLE_DEVICES="")
    ex.update_parameters(timeout_min=r.time_min, tasks_per_node=r.tasks,
                         gpus_per_node=r.gpus_per_node, visible_gpus=visible_gpus())
    waiting, running, jobs = list(cells), [], []
    while waiting or running:
        while waiting and len(running) < r.array_parallelism:
            cell = waiting.pop(0)
            at_once = min(r.array_parallelism, len(waiting) + len(running) + 1)
            with _threads(local_threads(r, at_once)):  # the subprocess inherits it
                job = ex.submit(runner, cell)
            board.submit(cell)
            running.append((cell, job))
            jobs.append(job)
        board.refresh()
        time.sleep(POLL_S)
        for cell, job in [x for x in running if x[1].done()]:
            running.remove((cell, job))
            _outcome(stage, cell, job)
    return jobs


def _stage_debug(stage: str, cells: list[Cell], run_dir: Path, runner: CellRunner,
                 board: Board) -> list:
    ex = submitit.DebugExecutor(folder=log_folder(run_dir, stage))
    jobs = []
    for cell in cells:
        jobs.append(ex.submit(runner, cell))
        board.submit(cell)
        _outcome(stage, cell, jobs[-1])
    return jobs


def run_here(executor: str, sweep: Sweep, cells: dict[str, list[Cell]], run_dir: Path,
             force: bool, stream=None, redo: frozenset[str] = frozenset()) -> list[dict]:
    """Run ``cells`` stage by stage here (``executor``: local or debug); the job records.
    ``redo``: "stage/id" of cells to run with force although ``force`` is off (stale code)."""
    board = Board([c for s in stages.NAMES for c in cells[s]], stream or sys.stdout)
    records = []
    for stage in stages.NAMES:
        if not cells[stage]:
            continue
        # the stage's device, as on SLURM: a cell given a GPU trains on it or fails loudly
        runner = CellRunner(force, sweep.device(stage), redo)
        if executor == "debug":
            jobs = _stage_debug(stage, cells[stage], run_dir, runner, board)
        else:
            jobs = _stage_local(sweep, stage, cells[stage], run_dir, runner, board)
        rec = {"stage": stage, "job_id": ",".join(str(j.job_id) for j in jobs),
               "cells": [c.id for c in cells[stage]], "executor": executor,
               "submitted": time.time()}
        records.append(rec)
        append_jobs(run_dir, rec)
        board.refresh()
    board.close()
    return records
