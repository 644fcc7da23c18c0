"""What every array task runs: one cell (or a pack of small cells, one after the other), with
its marker, its log path, its device, and requeue through the sbatch teardown.

Each cell folder gets ``cell.json`` (status, config hash, job id, log path, error); ``status:
done`` is written only after the stage function returned finished outputs, with the code those
outputs came from (``code``, from the result; ``brainhpc.provenance``). ``redo``: cells run with
``force`` although the run was not (``sweep --rerun-stale``: done with other code), decided when
submitting rather than by each task, so every rank of a multi-task cell makes the same choice;
like ``--force``, it applies to the first run only, never to a requeued one.

Preemption and time limits: SLURM sends SIGUSR2 ``signal_delay_s`` before the time limit, and
SIGTERM on preemption. ``CellRunner`` handles both the same way: it asks the live trainer to
checkpoint and stop at the next step boundary; once the stage function has returned
"interrupted", submitit's handler dumps the requeued submission (``checkpoint()``: the same cells,
never ``--force``) and counts time-outs against ``max_num_timeout``. The requeue itself is not
done here: a cell may run in a container without Slurm's client, config or munge socket. The
cell leaves a flag file (``requeue_flag``) and the sbatch script's teardown, on the host after
``srun``, runs ``scontrol requeue`` for this array task (see ``slurm.teardown_lines``). The
requeued task runs the same cells, and the stage functions resume from their checkpoints.

Device: a cell (SLURM or ``--executor local``/``debug``) runs with ``device=cuda`` exactly when
its stage requested GPUs (``Sweep.device``) and fails before training when torch sees none.
Packing (``cells_per_task``): one array task runs several small cells in turn; one failing does
not stop the others.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
import traceback
from pathlib import Path

import submitit

from brainhpc import __version__, stages
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import write_json
from brainhpc.provenance import code_version, recorded_code
from brainhpc.sweep.plan import Cell, stage_config

log = logging.getLogger(__name__)


def run_stage(cell: Cell, force: bool = False, device: str = "auto") -> dict:
    """Call the stage function of ``cell`` (from the stage table); the result has a "status"."""
    return stages.TABLE[cell.stage].run(stage_config(cell, force, device))


def read_marker(cell: Cell) -> dict | None:
    try:
        return json.loads(cell.marker.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_done(cell: Cell) -> bool:
    m = read_marker(cell) or {}
    return m.get("status") == "done" and m.get("config_hash") == cell.hash


def is_stale(cell: Cell, unknown: bool = True) -> bool:
    """A done cell (of this config) whose outputs came from other code than this process runs;
    one that recorded no code (finished before brainhpc recorded it) counts when ``unknown``."""
    m = read_marker(cell) or {}
    if m.get("status") != "done" or m.get("config_hash") != cell.hash:
        return False
    got = recorded_code(m)
    return unknown if got is None else got != code_version()["code_hash"]


def _code_of(result: dict) -> dict | None:
    """The code behind a finished cell's outputs: what its result recorded; a stage that does not
    record it (aggregate) ran this process's code, unless it skipped (then: unknown)."""
    if isinstance(result.get("code"), dict):
        return result["code"]
    return None if result.get("skipped") else code_version()


def requeue_flag(folder: str | Path, job_id: str) -> Path:
    """The file a cell leaves for the sbatch teardown (on the host) to requeue job ``job_id``."""
    return Path(folder) / f"requeue-{job_id}"


def _live_trainer():
    """The Trainer whose fit() is running in this process, found through its SIGTERM handler."""
    from brainhpc.train.trainer import Trainer

    owner = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    return owner if isinstance(owner, Trainer) else None


def check_cuda(cell: Cell) -> None:
    """A cell that asked for GPUs must get them: fail now instead of training on the CPU."""
    import torch

    if torch.cuda.is_available():
        return
    raise BrainhpcError(
        f"{cell.stage}/{cell.id}: GPUs were requested (device=cuda) but torch "
        f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'}) sees no CUDA device; "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}. Usual causes:"
        " the container runs without --nv, the node's NVIDIA driver is older than this torch "
        "build needs (containers/README.md), or the partition gave no GPU")


class CellRunner(submitit.helpers.Checkpointable):
    """What every array task runs: one cell (or a pack of small cells, one after the other),
    with its marker, its log path, its device, and requeue through the sbatch teardown."""

    def __init__(self, force: bool = False, device: str = "auto",
                 redo: frozenset[str] = frozenset()):
        self.force = force
        self.device = device
        self.redo = frozenset(redo)  # "stage/id" of cells to run with force (stale code)
        self._signal = None  # SIGUSR2/SIGTERM received: requeue once the stage has stopped
        self._submitit = None  # submitit's signal handler (checkpoint, count, requeue)

    def __call__(self, cells: Cell | list[Cell]) -> dict | list[dict]:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s "
                                "%(name)s: %(message)s", datefmt="%H:%M:%S")
        pack = list(cells) if isinstance(cells, (list, tuple)) else [cells]
        env = _job_env()
        if env["tasks"] > 1 and env["executor"] in ("slurm", "local"):
            # DDP: MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for the trainer
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                   overwrite=True)
        if env["executor"] == "slurm":
            handler = signal.getsignal(signal.SIGUSR2)
            if callable(handler):
                self._submitit = handler
                signal.signal(signal.SIGUSR2, self._on_signal)
                signal.signal(signal.SIGTERM, self._on_signal)
        force, redo = self.force, self.redo
        if (force or redo) and env["restarts"]:
            log.warning("restart %d of job %s: --force applied to the first run only; resuming",
                        env["restarts"], env["job_id"])
            force, redo = False, frozenset()
        results, failed = [], []
        for cell in pack:
            if self._signal is not None:
                break  # between packed cells: requeue now, the rest run after it
            try:
                results.append(self._run(cell, env, force or f"{cell.stage}/{cell.id}" in redo))
            except Exception as e:
                if len(pack) == 1:
                    raise
                log.error("%s/%s failed: %s", cell.stage, cell.id, e)
                failed.append(f"{cell.id} ({type(e).__name__}: {e})")
        if self._signal is not None:
            self._requeue()
        if failed:
            raise BrainhpcError(f"{len(failed)} of {len(pack)} packed cells failed (see their "
                                f"cell.json): {'; '.join(failed)}")
        return results[0] if isinstance(cells, Cell) else results

    def _run(self, cell: Cell, env: dict, force: bool) -> dict:
        base = {"cell": cell.id, "stage": cell.stage, "config_hash": cell.hash,
                "params": cell.params, "job_id": env["job_id"], "log": env["log"],
                "host": socket.gethostname(), "tasks": env["tasks"], "device": self.device,
                "brainhpc": __version__, "restarts": env["restarts"]}
        rank0 = env["rank"] == 0
        # wall_seconds is this attempt's; wall_seconds_total adds this config's earlier
        # attempts (requeues, failed tries) that recorded theirs, so requeued cells are not
        # under-counted in `status` and the provenance
        prev = read_marker(cell) or {}
        earlier = 0.0 if force or prev.get("config_hash") != cell.hash or \
            prev.get("status") == "done" else \
            float(prev.get("wall_seconds_total", prev.get("wall_seconds")) or 0.0)
        t0 = time.time()

        def times() -> dict:
            now = time.time()
            return {"started": t0, "finished": now, "wall_seconds": round(now - t0, 3),
                    "wall_seconds_total": round(earlier + now - t0, 3)}

        if rank0:
            write_json(cell.marker, {**base, "status": "running", "started": t0,
                                     "wall_seconds_total": round(earlier, 3)})
        try:
            if self.device == "cuda":
                check_cuda(cell)
            result = run_stage(cell, force, self.device)
        except Exception as e:
            if rank0:
                write_json(cell.marker, {
                    **base, "status": "failed", **times(),
                    "error": f"{type(e).__name__}: {e}", "user_error": isinstance(e,
                                                                                  BrainhpcError),
                    "traceback": traceback.format_exc()})
            raise
        status = result.get("status", "done")
        status = "done" if status in ("done", "worker") else status
        if rank0:
            code = {"code": _code_of(result)} if status == "done" else {}
            write_json(cell.marker, {**base, "status": status, **times(), **code})
        return {"cell": cell.id, "status": status}

    def _on_signal(self, signum, frame) -> None:
        """SIGUSR2 (time limit ahead) or SIGTERM (preemption): stop at a safe point, requeue."""
        if self._signal is not None:
            return  # already stopping (the trainer passes SIGTERM on after its save)
        self._signal = signum
        trainer = _live_trainer()
        name = signal.Signals(signum).name
        if trainer is None:  # not training: nothing to save first, requeue now
            log.warning("%s: requeueing", name)
            self._requeue()
            return
        log.warning("%s: asking the trainer to checkpoint and stop, then requeueing", name)
        trainer.request_checkpoint(stop=True)

    def _requeue(self) -> None:
        """submitit's handler: checkpoint() -> the requeued submission, time-out count, exit;
        its requeue step replaced by a flag for the sbatch teardown (scontrol on the host)."""
        signum, self._signal = self._signal, None
        handler = getattr(self._submitit, "__self__", None)
        if handler is None or not hasattr(handler, "env"):  # not submitit's: just call it
            self._submitit(signum, None)
            return
        handler.env._requeue = self._leave_flag
        handler.checkpoint_and_try_requeue(signum, None)

    @staticmethod
    def _leave_flag(countdown: int) -> None:
        job = os.environ["SLURM_JOB_ID"]
        flag = requeue_flag(os.environ["SUBMITIT_FOLDER"], job)
        write_json(flag, {"job_id": job, "timeouts_left": countdown, "written": time.time()})
        log.info("left %s: the sbatch script requeues job %s after srun (%d time-outs left)",
                 flag, job, countdown)

    def checkpoint(self, cells: Cell | list[Cell]) -> submitit.helpers.DelayedSubmission:
        """Called by submitit before the requeue: the same cells again (they resume), minus
        packed cells already done, and never with ``force`` (it would wipe the checkpoint)."""
        trainer = _live_trainer()
        if trainer is not None:  # only when a signal bypassed _on_signal
            trainer.request_checkpoint()
        if isinstance(cells, (list, tuple)):
            cells = [c for c in cells if not is_done(c)]
        return submitit.helpers.DelayedSubmission(CellRunner(False, self.device), cells)


def _job_env() -> dict:
    executor = os.environ.get("SUBMITIT_EXECUTOR") or "debug"
    try:
        env = submitit.JobEnvironment()
        out = {"executor": executor, "rank": env.global_rank, "tasks": env.num_tasks,
               "job_id": str(env.job_id), "log": str(env.paths.stdout)}
    except (RuntimeError, KeyError):  # debug executor / a plain call: this process is the job
        out = {"executor": executor, "rank": 0, "tasks": 1, "job_id": "", "log": ""}
    out["restarts"] = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    return out
