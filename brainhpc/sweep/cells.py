"""Cells: the matrix expansion of a sweep, and what one array task runs.

A cell is one stage function on one typed config, writing into ``RUN_DIR/<stage>/<cell-id>/``.
Cell ids are stable (built from the cell's parameters, never from its position), so a re-run
finds its own work. Each cell folder gets ``cell.json`` (status, config hash, job id, log path,
error); ``status: done`` is written only after the stage function returned finished outputs.

Layout, chosen so the stages find each other's outputs::

    RUN_DIR/prepare/data/prepared/       the prepared dataset (PrepareConfig.out)
    RUN_DIR/generate/<arch>-<label>/     GenerateConfig.out; RUN_DIR/generate is classify's
                                         synthetic_dir (brainhpc.classify.data layout)
    RUN_DIR/classify/<model>[-<technique>]-<train data>-s<seed>/
    RUN_DIR/aggregate/results/           -> RUN_DIR/results/ (metrics.csv, table.md, plots)

Preemption: SLURM sends SIGUSR2 ``signal_delay_s`` before the time limit (and on preemption).
submitit's handler calls ``checkpoint()`` and requeues at once, which would lose the steps since
the trainer's last periodic save. So ``CellRunner`` puts its own SIGUSR2 handler in front: it asks
the live trainer to checkpoint and stop at the next step boundary, and only after the stage
function has returned "interrupted" hands over to submitit's handler (checkpoint + requeue).
The requeued task runs the same cell, and the stage function resumes from the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import submitit

from brainhpc import __version__
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import config_hash, write_json
from brainhpc.sweep.config import STAGES, Sweep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Cell:
    """One unit of work: ``params`` are the stage config's fields other than the paths."""

    stage: str
    id: str
    params: dict
    run_dir: str

    @property
    def folder(self) -> Path:
        return Path(self.run_dir) / self.stage / self.id

    @property
    def hash(self) -> str:
        return config_hash({"stage": self.stage, "id": self.id, "params": self.params})

    @property
    def marker(self) -> Path:
        return self.folder / "cell.json"


def prepared_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "prepare" / "data" / "prepared"


def results_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "results"


def _train_id(text: str) -> str:
    return text.replace(":", "_")


def expand(sweep: Sweep, run_dir: Path) -> dict[str, list[Cell]]:
    """Every cell of every stage, in stage order (the stage functions validate params here)."""
    rd = str(Path(run_dir).resolve())
    d = sweep.data
    prep = {"data": None if d.path is None else str(d.path), "phantom": d.phantom,
            "size": d.size, "seed": d.seed, "labels": d.labels}
    plan: dict[str, list[Cell]] = {s: [] for s in STAGES}
    plan["prepare"].append(Cell("prepare", "data", prep, rd))
    g = sweep.generate
    if g is not None:
        for arch in g.archs:
            for label in g.labels:
                params = {"arch": arch, "label": label, "seed": g.seed, "epochs": g.epochs,
                          "n_samples": g.n_samples, "batch_size": g.batch_size,
                          "min_images": g.min_images, "quality": g.quality,
                          "checkpoint_every": g.checkpoint_every,
                          "options": g.options.get(arch, {})}
                if g.feature_steps is not None:
                    params["feature_steps"] = g.feature_steps
                plan["generate"].append(Cell("generate", f"{arch}-{label}", params, rd))
    seen = set()
    for block in sweep.classify:
        for train in block.train_data:
            for tech in block.techniques or (None,):
                for seed in block.seeds:
                    name = block.model + (f"-{tech}" if tech else "")
                    cid = f"{name}-{_train_id(train)}-s{seed}"
                    if cid in seen:
                        continue  # two blocks naming the same cell: run it once
                    seen.add(cid)
                    params = {"model": block.model, "train_data": train, "technique": tech,
                              "seed": seed, **block.options}
                    if block.epochs is not None:
                        params["epochs"] = block.epochs
                    if block.batch_size is not None:
                        params["batch_size"] = block.batch_size
                    plan["classify"].append(Cell("classify", cid, params, rd))
    plan["aggregate"].append(Cell("aggregate", "results", {"name": sweep.name}, rd))
    for cell in plan["generate"] + plan["classify"]:
        stage_config(cell)  # fail on bad options before anything is submitted
    return plan


def stage_config(cell: Cell, force: bool = False):
    """The typed config of the stage function a cell runs (thin adapter, no logic)."""
    rd = Path(cell.run_dir)
    p = dict(cell.params)
    if cell.stage == "prepare":
        from brainhpc.data.prepare import PrepareConfig

        return PrepareConfig(out=prepared_dir(rd), force=force, progress=False, **p)
    if cell.stage == "generate":
        from brainhpc.generate import GenerateConfig

        return GenerateConfig(data=prepared_dir(rd), out=cell.folder, force=force,
                              progress=False, **p)
    if cell.stage == "classify":
        from brainhpc.classify.run import ClassifyConfig

        return ClassifyConfig(data=prepared_dir(rd), out=cell.folder,
                              synthetic_dir=rd / "generate", force=force, progress=False, **p)
    return None


def run_stage(cell: Cell, force: bool = False) -> dict:
    """Call the stage function of ``cell``; the result dict has a "status"."""
    cfg = stage_config(cell, force)
    if cell.stage == "prepare":
        from brainhpc.data.prepare import prepare

        manifest = prepare(cfg)
        return {"status": "done", "counts": manifest.get("counts")}
    if cell.stage == "generate":
        from brainhpc.generate import generate

        return generate(cfg)
    if cell.stage == "classify":
        from brainhpc.classify.run import classify

        return classify(cfg)
    from brainhpc.sweep.aggregate import aggregate

    return aggregate(cell.run_dir)


def read_marker(cell: Cell) -> dict | None:
    try:
        return json.loads(cell.marker.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _live_trainer():
    """The Trainer whose fit() is running in this process, found through its SIGTERM handler."""
    from brainhpc.train.trainer import Trainer

    owner = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return owner if isinstance(owner, Trainer) else None


class CellRunner(submitit.helpers.Checkpointable):
    """What every array task runs: one cell, with its marker, its log path and requeue."""

    def __init__(self, force: bool = False):
        self.force = force
        self._preempted = None  # (signum, submitit's handler) once SIGUSR2 came mid-training

    def __call__(self, cell: Cell) -> dict:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s "
                                "%(name)s: %(message)s", datefmt="%H:%M:%S")
        env = _job_env()
        rank0 = env["rank"] == 0
        if env["tasks"] > 1 and env["executor"] in ("slurm", "local"):
            # DDP: MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for the trainer
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if env["executor"] == "slurm":
            prev = signal.getsignal(signal.SIGUSR2)
            if callable(prev):
                signal.signal(signal.SIGUSR2, lambda s, f: self._on_usr2(s, f, prev))
        base = {"cell": cell.id, "stage": cell.stage, "config_hash": cell.hash,
                "params": cell.params, "job_id": env["job_id"], "log": env["log"],
                "host": socket.gethostname(), "tasks": env["tasks"], "brainhpc": __version__,
                "restarts": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}
        t0 = time.time()
        if rank0:
            write_json(cell.marker, {**base, "status": "running", "started": t0})
        try:
            result = run_stage(cell, self.force)
        except Exception as e:
            if rank0:
                write_json(cell.marker, {
                    **base, "status": "failed", "started": t0, "finished": time.time(),
                    "error": f"{type(e).__name__}: {e}", "user_error": isinstance(e,
                                                                                  BrainhpcError),
                    "traceback": traceback.format_exc()})
            raise
        status = result.get("status", "done")
        status = "done" if status in ("done", "worker") else status
        if rank0:
            write_json(cell.marker, {**base, "status": status, "started": t0,
                                     "finished": time.time(),
                                     "wall_seconds": round(time.time() - t0, 3)})
        if self._preempted is not None:
            signum, handler = self._preempted
            self._preempted = None
            handler(signum, None)  # submitit: checkpoint() then requeue and exit
        return {"cell": cell.id, "status": status}

    def _on_usr2(self, signum, frame, submitit_handler) -> None:
        trainer = _live_trainer()
        if trainer is None:  # not training: nothing to save first, requeue now
            submitit_handler(signum, frame)
            return
        log.warning("SIGUSR2: asking the trainer to checkpoint and stop, then requeueing")
        trainer.request_checkpoint(stop=True)
        self._preempted = (signum, submitit_handler)

    def checkpoint(self, cell: Cell) -> submitit.helpers.DelayedSubmission:
        """Called by submitit before the requeue: run the same cell again (it resumes)."""
        trainer = _live_trainer()
        if trainer is not None:  # only when SIGUSR2 bypassed _on_usr2
            trainer.request_checkpoint()
        return submitit.helpers.DelayedSubmission(CellRunner(self.force), cell)


def _job_env() -> dict:
    executor = os.environ.get("SUBMITIT_EXECUTOR") or "debug"
    try:
        env = submitit.JobEnvironment()
        return {"executor": executor, "rank": env.global_rank, "tasks": env.num_tasks,
                "job_id": str(env.job_id), "log": str(env.paths.stdout)}
    except (RuntimeError, KeyError):  # debug executor / a plain call: this process is the job
        return {"executor": executor, "rank": 0, "tasks": 1, "job_id": "", "log": ""}
