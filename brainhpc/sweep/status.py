"""``python -m brainhpc.sweep status RUN_DIR``: one line per cell, from the cells' markers and
the SLURM queue (pending/running come from ``squeue``; done/failed from ``cell.json``)."""

from __future__ import annotations

import json
from pathlib import Path

from brainhpc.errors import BrainhpcError
from brainhpc.sweep.config import STAGES
from brainhpc.sweep.submit import cell_jobs, queue_states

ORDER = ("done", "running", "pending", "failed", "interrupted", "lost", "not submitted")


def cell_states(run_dir: Path, queued: dict[str, str] | None = None) -> list[dict]:
    """Every cell that has a folder or a submission, with its state and where to look."""
    run_dir = Path(run_dir)
    if not (run_dir / "sweep.json").exists():
        raise BrainhpcError(f"{run_dir} is not a sweep run directory (no sweep.json)")
    queued = queue_states() if queued is None else queued
    jobs = cell_jobs(run_dir)
    keys = set(jobs)
    for stage in STAGES:  # cell ids: "<id>" or, with several datasets, "<dataset>/<id>"
        for marker in [*(run_dir / stage).glob("*/cell.json"),
                       *(run_dir / stage).glob("*/*/cell.json")]:
            keys.add((stage, marker.parent.relative_to(run_dir / stage).as_posix()))
    rows = []
    for stage, cid in sorted(keys, key=lambda k: (STAGES.index(k[0]), k[1])):
        job = jobs.get((stage, cid), "")
        try:
            m = json.loads((run_dir / stage / cid / "cell.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            m = {}
        state = m.get("status", "not submitted")
        in_queue = queued.get(job, "")
        if in_queue and m.get("job_id") == job and state in ("done", "failed"):
            in_queue = ""  # finished inside a task that runs on (packed cells)
        if in_queue:
            state = "running" if in_queue in ("RUNNING", "COMPLETING") else "pending"
        elif state == "running" and job:
            state = "lost"  # the job ended without writing done/failed (killed, time limit)
        elif state == "not submitted" and job:
            state = "lost"
        detail = m.get("error", "")
        if state == "pending" and in_queue != "PENDING":
            detail = in_queue
        if state == "lost":
            detail = "job ended without finishing (killed or out of time); re-run the sweep"
        rows.append({"stage": stage, "cell": cid, "state": state, "job": job or m.get("job_id",
                     ""), "wall_s": m.get("wall_seconds_total", m.get("wall_seconds", "")),
                     "restarts": m.get("restarts", 0),
                     "log": m.get("log", ""), "detail": detail})
    return rows


def table(rows: list[dict]) -> str:
    """A plain-text table; failed cells get their error and log path on the next lines."""
    head = f"{'stage':<10} {'cell':<38} {'state':<13} {'job':<10} {'wall s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        wall = f"{r['wall_s']:.1f}" if isinstance(r["wall_s"], (int, float)) else ""
        lines.append(f"{r['stage']:<10} {r['cell']:<38} {r['state']:<13} {r['job']:<10} "
                     f"{wall:>8}")
        if r["state"] in ("failed", "lost", "interrupted"):
            if r["detail"]:
                lines.append(f"{'':<11}error: {r['detail'].splitlines()[0][:200]}")
            if r["log"]:
                lines.append(f"{'':<11}log:   {r['log']}")
    counts = {s: sum(r["state"] == s for r in rows) for s in ORDER}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no cells")
    return "\n".join(lines)
