"""A run directory's bookkeeping, whatever executes its cells.

``RUN_DIR/sweep.json`` names the sweep file that owns the run directory; ``RUN_DIR/jobs.json``
lists every submission (stage, job id, cells in array order, cells per task) for ``status``;
``todo`` decides, from the cells' markers and the queue, what a (re-)run submits (with
``rerun_stale``, also the done cells whose recorded code differs from this code's).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from brainhpc import stages
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import write_json
from brainhpc.sweep.config import Sweep
from brainhpc.sweep.plan import Cell, dataset_of
from brainhpc.sweep.runner import is_done, is_stale, read_marker


def log_folder(run_dir: Path, stage: str) -> Path:
    """Where submitit writes a stage's job scripts, pickles and logs."""
    return Path(run_dir) / "logs" / stage


def chunks(items: list, size: int) -> list[list]:
    """Consecutive groups of at most ``size``: packs of cells, arrays under MaxArraySize."""
    return [items[i:i + size] for i in range(0, len(items), size)]


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


def _missed(evaluate_cell: Cell, done_models: set[str]) -> bool:
    """A finished evaluate cell ran before some of its models finished (it was queued when
    they were submitted, and ran first): score them now."""
    try:
        summary = json.loads((evaluate_cell.folder / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return any(m in done_models for m in summary.get("not_finished", []))


def todo(plan: dict[str, list[Cell]], run_dir: Path, selected: list[str], force: bool,
         queued: dict[str, str], rerun_stale: bool = False
         ) -> tuple[dict[str, list[Cell]], dict[str, list[str]], dict[str, list[str]]]:
    """Cells to submit per stage; why others are left alone (done / still queued); and per
    stage the job ids of its still-queued cells, which later stages must wait for. When a
    classify/segment cell of a dataset is submitted, that dataset's finished evaluate cells are
    submitted again (they score the new models and skip the scored ones), and so is the
    aggregate. ``rerun_stale``: done cells that ran other code (``runner.is_stale``) are
    submitted too (the caller runs them with force: ``stale_cells``)."""
    jobs = cell_jobs(run_dir)
    submit: dict[str, list[Cell]] = {s: [] for s in stages.NAMES}
    skipped: dict[str, list[str]] = {"done": [], "queued": []}
    waiting: dict[str, list[str]] = {s: [] for s in stages.NAMES}
    changed = []
    for stage in stages.NAMES:
        for cell in plan[stage]:
            job = jobs.get((stage, cell.id))
            if job and job in queued:
                base = job.split("_")[0]
                if base not in waiting[stage]:
                    waiting[stage].append(base)
                if stage in selected:
                    skipped["queued"].append(f"{stage}/{cell.id} (job {job} {queued[job]})")
                continue
            if stage not in selected:
                continue
            marker = read_marker(cell) or {}
            redo = rerun_stale and is_stale(cell)  # finished by other code: redo it
            if not force and marker.get("status") == "done" and not redo:
                if marker.get("config_hash") == cell.hash or stage == "aggregate":
                    skipped["done"].append(f"{stage}/{cell.id}")
                    continue
                changed.append(f"{stage}/{cell.id}")
            submit[stage].append(cell)
    if changed:
        raise BrainhpcError(f"finished cells whose config changed in the sweep file: "
                            f"{', '.join(changed)}; pass --force to redo them (or restore the "
                            "sweep file)")
    if "evaluate" in selected:  # new models of a dataset: score them on its external sets
        fresh = {dataset_of(c) for s in ("classify", "segment") for c in submit[s]}
        done_models = {f"{s}/{c.id}" for s in ("classify", "segment") for c in plan[s]
                       if is_done(c)}
        again = [c for c in plan["evaluate"] if f"evaluate/{c.id}" in skipped["done"]
                 and (dataset_of(c) in fresh or _missed(c, done_models))]
        skipped["done"] = [x for x in skipped["done"] if x not in
                           {f"evaluate/{c.id}" for c in again}]
        ids = {c.id for c in submit["evaluate"] + again}
        submit["evaluate"] = [c for c in plan["evaluate"] if c.id in ids]
    if "aggregate" in selected and any(submit[s] for s in stages.NAMES if s != "aggregate"):
        submit["aggregate"] = list(plan["aggregate"])  # new results: aggregate again
    return submit, skipped, waiting


def stale_cells(cells: dict[str, list[Cell]]) -> frozenset[str]:
    """"stage/id" of the done cells among ``cells`` that ran other code than this (or recorded
    none): what ``--rerun-stale`` runs with force (``runner.CellRunner(redo=...)``)."""
    return frozenset(f"{s}/{c.id}" for s, group in cells.items() for c in group if is_stale(c))


def append_jobs(run_dir: Path, rec: dict) -> None:
    write_json(Path(run_dir) / "jobs.json", read_jobs(run_dir) + [rec])
