"""Cells: the matrix expansion of a sweep, and what one array task runs.

A cell is one stage function on one typed config, writing into ``RUN_DIR/<stage>/<cell-id>/``.
Cell ids are stable (built from the cell's parameters, never from its position), so a re-run
finds its own work. Each cell folder gets ``cell.json`` (status, config hash, job id, log path,
error); ``status: done`` is written only after the stage function returned finished outputs.

Layout, chosen so the stages find each other's outputs::

    RUN_DIR/prepare/data/prepared/       the prepared dataset (PrepareConfig.out)
    RUN_DIR/generate/<arch>-<label>/     GenerateConfig.out; RUN_DIR/generate is classify's and
                                         segment's synthetic_dir (brainhpc.classify.data layout)
    RUN_DIR/classify/<model>-<train data>-s<seed>/   (a vae cell scores all its techniques)
    RUN_DIR/segment/unet-<train data>-s<seed>/
    RUN_DIR/evaluate/<entry>/            an [[evaluate]] entry: summary.json, and the scores of
                                         each finished model in <stage>/<model cell id>/
    RUN_DIR/aggregate/results/           -> RUN_DIR/results/ (metrics.csv, table.md, plots)

With several datasets (``[data.<name>]``) the prepare cell of dataset <name> is ``<name>``
(``RUN_DIR/prepare/<name>/prepared``) and every other cell id starts with ``<name>/``
(``RUN_DIR/classify/<name>/cnn-real-s0``; synthetic_dir ``RUN_DIR/generate/<name>``); those
cells carry ``params["dataset"]``. A plain ``[data]`` keeps the layout above (no prefix, no
``dataset`` param: the config hashes of older run directories stay valid).

Preemption and time limits: SLURM sends SIGUSR2 ``signal_delay_s`` before the time limit, and
SIGTERM on preemption. ``CellRunner`` handles both the same way: it asks the live trainer to
checkpoint and stop at the next step boundary; once the stage function has returned
"interrupted", submitit's handler dumps the requeued submission (``checkpoint()``: the same cells,
never ``--force``) and counts time-outs against ``max_num_timeout``. The requeue itself is not
done here: a cell may run in a container without Slurm's client, config or munge socket. The
cell leaves a flag file (``requeue_flag``) and the sbatch script's teardown, on the host after
``srun``, runs ``scontrol requeue`` for this array task (see ``submit.teardown_lines``). The
requeued task runs the same cells, and the stage functions resume from their checkpoints.

Device: a SLURM cell runs with ``device=cuda`` exactly when its stage requested GPUs
(``Sweep.device``) and fails before training when torch sees none. Packing (``cells_per_task``):
one array task runs several small cells in turn; one failing does not stop the others.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass, fields
from pathlib import Path

import submitit

from brainhpc import __version__
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import config_hash, write_json
from brainhpc.sweep.config import SINGLE, STAGES, Sweep

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


def dataset_of(cell: Cell) -> str:
    """The dataset a cell belongs to ("data" for a plain [data] table)."""
    return cell.params.get("dataset") or SINGLE


def prepared_dir(run_dir: str | Path, dataset: str = SINGLE) -> Path:
    return Path(run_dir) / "prepare" / dataset / "prepared"


def synthetic_dir(run_dir: str | Path, dataset: str | None = None) -> Path:
    """The folder of a dataset's generate cells (``<arch>-<label>/``)."""
    return Path(run_dir) / "generate" / dataset if dataset else Path(run_dir) / "generate"


def results_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "results"


def _train_id(text: str) -> str:
    return text.replace(":", "_")


def _settings(params: dict) -> dict:
    """A classify cell's settings other than the techniques its one training scores."""
    return {k: v for k, v in params.items() if k != "techniques"}


def expand(sweep: Sweep, run_dir: Path) -> dict[str, list[Cell]]:
    """Every cell of every stage, in stage order (the stage functions validate params here)."""
    rd = str(Path(run_dir).resolve())
    plan: dict[str, list[Cell]] = {s: [] for s in STAGES}

    def add(stage: str, ds: str, base: str, params: dict) -> None:
        if sweep.named:
            plan[stage].append(Cell(stage, f"{ds}/{base}", {**params, "dataset": ds}, rd))
        else:
            plan[stage].append(Cell(stage, base, params, rd))

    for d in sweep.datasets:
        prep = {"data": None if d.path is None else str(d.path), "phantom": d.phantom,
                "size": d.size, "seed": d.seed, "labels": d.labels}
        if d.phantom_lesions != "standard":  # earlier run folders keep their cell hashes
            prep["phantom_lesions"] = d.phantom_lesions
        plan["prepare"].append(Cell("prepare", d.name, {**prep, "dataset": d.name}
                                    if sweep.named else prep, rd))
    g = sweep.generate
    for ds in g.datasets if g is not None else ():
        for arch in g.archs:
            for label in g.labels:
                params = {"arch": arch, "label": label, "seed": g.seed, "epochs": g.epochs,
                          "n_samples": g.n_samples, "batch_size": g.batch_size,
                          "min_images": g.min_images, "quality": g.quality,
                          "checkpoint_every": g.checkpoint_every,
                          "options": g.options.get(arch, {})}
                if g.feature_steps is not None:
                    params["feature_steps"] = g.feature_steps
                if label == "tumour" and ds in g.with_masks:
                    params["with_masks"] = True
                add("generate", ds, f"{arch}-{label}", params)
    for ds in sweep.names:
        by_id: dict[str, tuple[int, dict]] = {}
        for i, block in enumerate(sweep.classify):
            if ds not in block.datasets:
                continue
            for train in block.train_data:
                for seed in block.seeds:
                    # a VAE detector trains once per (training data, seed) and scores all its
                    # techniques from the same residual maps (brainhpc.classify.run)
                    cid = f"{block.model}-{_train_id(train)}-s{seed}"
                    params = {"model": block.model, "train_data": train, "seed": seed,
                              **block.options}
                    if block.model == "vae":
                        params["techniques"] = list(block.techniques)
                    if block.epochs is not None:
                        params["epochs"] = block.epochs
                    if block.batch_size is not None:
                        params["batch_size"] = block.batch_size
                    if cid in by_id:  # two blocks naming the same cell: run it once
                        first, old = by_id[cid]
                        if _settings(old) != _settings(params):
                            raise BrainhpcError(
                                f"{sweep.source}: classify.cells[{first}] and classify.cells[{i}]"
                                f" both make cell {cid} of dataset {ds}, with different settings")
                        if block.model == "vae":  # one training, the techniques of both
                            old["techniques"] += [t for t in block.techniques
                                                  if t not in old["techniques"]]
                        continue
                    by_id[cid] = (i, params)
        for cid, (_, params) in by_id.items():
            add("classify", ds, cid, params)
        seg: dict[str, dict] = {}
        for i, block in enumerate(sweep.segment):
            if ds not in block.datasets:
                continue
            for train in block.train_data:
                for seed in block.seeds:
                    cid = f"unet-{_train_id(train)}-s{seed}"
                    params = {"train_data": train, "seed": seed, **block.options}
                    if block.epochs is not None:
                        params["epochs"] = block.epochs
                    if block.batch_size is not None:
                        params["batch_size"] = block.batch_size
                    if cid in seg and seg[cid][1] != params:
                        raise BrainhpcError(
                            f"{sweep.source}: segment.cells[{seg[cid][0]}] and segment.cells[{i}]"
                            f" both make cell {cid} of dataset {ds}, with different settings")
                    seg.setdefault(cid, (i, params))
        for cid, (_, params) in seg.items():
            add("segment", ds, cid, params)
    for e in sweep.evaluate:
        models = {dataset_of(c) for s in ("classify", "segment") for c in plan[s]}
        if not models & set(e.datasets):
            raise BrainhpcError(f"{sweep.source}: evaluate entry {e.name!r}: no classify or "
                                f"segment cells on {', '.join(e.datasets)} to score")
        for ds in (n for n in e.datasets if n in models):
            source = {"path": str(e.path)} if e.path is not None else \
                {"phantom": e.phantom, "seed": e.seed}
            lesions = next(d.phantom_lesions for d in sweep.datasets if d.name == ds)
            if e.path is None and lesions != "standard":  # fresh phantoms like the models'
                source["phantom_lesions"] = lesions
            add("evaluate", ds, e.name, {"name": e.name, **source, "labels": e.labels,
                                         "split": e.split})
    plan["aggregate"].append(Cell("aggregate", "results", {"name": sweep.name}, rd))
    for stage in ("generate", "classify", "segment", "evaluate"):
        for cell in plan[stage]:
            stage_config(cell)  # fail on bad options before anything is submitted
    return plan


def _build(cls, cell: Cell, params: dict, **fixed):
    """``cls(**fixed, **params)``, refusing a param that is no field of ``cls`` (a typo in a
    block's options) or one the sweep sets itself."""
    valid = {f.name for f in fields(cls)} - set(fixed)
    for key in params:
        if key not in valid:
            why = "the sweep sets it" if key in fixed else "no such field"
            raise BrainhpcError(f"{cell.stage}/{cell.id}: option {key!r}: {why} of "
                                f"{cls.__name__}; valid options: {', '.join(sorted(valid))}")
    return cls(**fixed, **params)


def stage_config(cell: Cell, force: bool = False, device: str = "auto"):
    """The typed config of the stage function a cell runs (thin adapter, no logic).

    ``device`` comes from where the cell runs (``Sweep.device``: cuda when GPUs were requested),
    never from the sweep file, so a cell cannot ask for GPUs and then train on the CPU."""
    rd = Path(cell.run_dir)
    p = dict(cell.params)
    if "device" in p:
        raise BrainhpcError(f"{cell.stage}/{cell.id}: options may not set device ({p['device']!r}):"
                            " the sweep sets it from the resources (GPUs requested -> cuda, "
                            "else cpu)")
    named = p.pop("dataset", None)  # only with several datasets ([data.<name>])
    ds = named or SINGLE
    if cell.stage == "prepare":
        from brainhpc.data.prepare import PrepareConfig

        return PrepareConfig(out=prepared_dir(rd, cell.id), force=force, progress=False, **p)
    if cell.stage == "generate":
        from brainhpc.generate import GenerateConfig

        return GenerateConfig(data=prepared_dir(rd, ds), out=cell.folder, force=force,
                              progress=False, device=device, **p)
    if cell.stage == "classify":
        from brainhpc.classify.run import ClassifyConfig

        return _build(ClassifyConfig, cell, p, data=prepared_dir(rd, ds), out=cell.folder,
                      synthetic_dir=synthetic_dir(rd, named), force=force, progress=False,
                      device=device)
    if cell.stage == "segment":
        from brainhpc.segment.run import SegmentConfig

        return _build(SegmentConfig, cell, p, data=prepared_dir(rd, ds), out=cell.folder,
                      synthetic_dir=synthetic_dir(rd, named), force=force, progress=False,
                      device=device)
    if cell.stage == "evaluate":
        from brainhpc.sweep.external import ExternalConfig

        return ExternalConfig(run_dir=rd, out=cell.folder, dataset=named, force=force,
                              device=device, **p)
    return None


def run_stage(cell: Cell, force: bool = False, device: str = "auto") -> dict:
    """Call the stage function of ``cell``; the result dict has a "status"."""
    cfg = stage_config(cell, force, device)
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
    if cell.stage == "segment":
        from brainhpc.segment.run import segment

        return segment(cfg)
    if cell.stage == "evaluate":
        from brainhpc.sweep.external import external

        return external(cfg)
    from brainhpc.sweep.aggregate import aggregate

    return aggregate(cell.run_dir)


def read_marker(cell: Cell) -> dict | None:
    try:
        return json.loads(cell.marker.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def is_done(cell: Cell) -> bool:
    m = read_marker(cell) or {}
    return m.get("status") == "done" and m.get("config_hash") == cell.hash


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

    def __init__(self, force: bool = False, device: str = "auto"):
        self.force = force
        self.device = device
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
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        if env["executor"] == "slurm":
            handler = signal.getsignal(signal.SIGUSR2)
            if callable(handler):
                self._submitit = handler
                signal.signal(signal.SIGUSR2, self._on_signal)
                signal.signal(signal.SIGTERM, self._on_signal)
        force = self.force
        if force and env["restarts"]:
            log.warning("restart %d of job %s: --force applied to the first run only; resuming",
                        env["restarts"], env["job_id"])
            force = False
        results, failed = [], []
        for cell in pack:
            if self._signal is not None:
                break  # between packed cells: requeue now, the rest run after it
            try:
                results.append(self._run(cell, env, force))
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
            write_json(cell.marker, {**base, "status": status, **times()})
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
