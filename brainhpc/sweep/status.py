"""Where a run stands, cell by cell: ``python -m brainhpc.sweep status RUN_DIR`` (``cell_states``,
``table``) and the live view of a local run (``Board``).

States come from the cells' markers (``cell.json``: running, done, failed) and, for SLURM, the
queue (pending/running from ``squeue``); a training cell's epoch and step come from the
``progress.json`` its trainer refreshes every few seconds. A done cell whose marker records other
code than this (``brainhpc.provenance``) is ``done (stale)``: ``--rerun-stale`` would redo it.
"""

from __future__ import annotations

import time
from pathlib import Path

from brainhpc import stages
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import read_json
from brainhpc.provenance import code_version, recorded_code
from brainhpc.sweep.plan import Cell
from brainhpc.sweep.rundir import cell_jobs
from brainhpc.sweep.slurm import queue_states

STALE = "done (stale)"
ORDER = ("done", STALE, "running", "pending", "failed", "interrupted", "lost", "not submitted")


def progress(folder: Path) -> str:
    """"epoch 3/18, 41%" from a training cell's progress.json ("" when it has none)."""
    p = read_json(Path(folder) / "progress.json")
    if not p.get("steps"):
        return ""
    return f"epoch {p['epoch']}/{p['epochs']}, {100 * p['step'] / p['steps']:.0f}%"


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _state(m: dict, job: str, queued: dict[str, str]) -> tuple[str, str]:
    """(state, detail) of a cell from its marker, its latest job and the queue."""
    state = m.get("status", "not submitted")
    in_queue = queued.get(job, "")
    if in_queue and m.get("job_id") == job and state in ("done", "failed"):
        in_queue = ""  # finished inside a task that runs on (packed cells)
    if in_queue:
        state = "running" if in_queue in ("RUNNING", "COMPLETING") else "pending"
    elif state in ("running", "not submitted") and job:
        state = "lost"  # the job ended without writing done/failed (killed, time limit)
    detail = m.get("error", "")
    if state == "pending" and in_queue != "PENDING":
        detail = in_queue
    if state == "lost":
        detail = "job ended without finishing (killed or out of time); re-run the sweep"
    return state, detail


def _keys(run_dir: Path, jobs: dict) -> list[tuple[str, str]]:
    keys = set(jobs)
    for stage in stages.NAMES:  # cell ids: "<id>" or, with several datasets, "<dataset>/<id>"
        for marker in [*(run_dir / stage).glob("*/cell.json"),
                       *(run_dir / stage).glob("*/*/cell.json")]:
            keys.add((stage, marker.parent.relative_to(run_dir / stage).as_posix()))
    return sorted(keys, key=lambda k: (stages.NAMES.index(k[0]), k[1]))


def cell_states(run_dir: Path, queued: dict[str, str] | None = None) -> list[dict]:
    """Every cell that has a folder or a submission, with its state and where to look."""
    run_dir = Path(run_dir)
    if not (run_dir / "sweep.json").exists():
        raise BrainhpcError(f"{run_dir} is not a sweep run directory (no sweep.json)")
    queued = queue_states() if queued is None else queued
    jobs = cell_jobs(run_dir)
    rows = []
    for stage, cid in _keys(run_dir, jobs):
        job = jobs.get((stage, cid), "")
        m = read_json(run_dir / stage / cid / "cell.json")
        state, detail = _state(m, job, queued)
        if state == "done" and recorded_code(m) not in (None, code_version()["code_hash"]):
            state, detail = STALE, f"ran code {recorded_code(m)}, now {code_version()['code_hash']}"
        rows.append({"stage": stage, "cell": cid, "state": state,
                     "job": job or m.get("job_id", ""),
                     "wall_s": m.get("wall_seconds_total", m.get("wall_seconds", "")),
                     "restarts": m.get("restarts", 0), "log": m.get("log", ""),
                     "detail": detail,
                     "progress": progress(run_dir / stage / cid) if state == "running" else ""})
    return rows


def table(rows: list[dict]) -> str:
    """A plain-text table; failed cells get their error and log path on the next lines."""
    head = f"{'stage':<10} {'cell':<38} {'state':<13} {'job':<10} {'wall s':>8}  progress"
    lines = [head, "-" * len(head)]
    for r in rows:
        wall = f"{r['wall_s']:.1f}" if isinstance(r["wall_s"], (int, float)) else ""
        lines.append(f"{r['stage']:<10} {r['cell']:<38} {r['state']:<13} {r['job']:<10} "
                     f"{wall:>8}  {r.get('progress', '')}".rstrip())
        if r["state"] in ("failed", "lost", "interrupted"):
            if r["detail"]:
                lines.append(f"{'':<11}error: {r['detail'].splitlines()[0][:200]}")
            if r["log"]:
                lines.append(f"{'':<11}log:   {r['log']}")
    counts = {s: sum(r["state"] == s for r in rows) for s in ORDER}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no cells")
    if counts[STALE]:
        lines.append(f"stale: finished by other code than this ({code_version()['code_hash']}); "
                     "run the sweep again with --rerun-stale to redo them")
    return "\n".join(lines)


class Board:
    """The live status of a local run: one row per cell to run (stage, cell, state, epoch,
    elapsed). On a terminal the table is redrawn in place about once a second; into a file or
    a pipe (CI logs, ``make smoke | tee``) a summary line is printed when a cell changes state,
    and at least every ``quiet_s`` seconds while cells run."""

    def __init__(self, cells: list[Cell], stream, quiet_s: float = 30.0):
        self.cells, self.stream, self.quiet_s = cells, stream, quiet_s
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.t0, self._drawn, self._last, self._said = time.time(), 0, "", 0.0
        self.submitted: dict[tuple[str, str], float] = {}

    def submit(self, cell: Cell) -> None:
        """``cell`` was handed to the executor: "starting" until its process writes its marker
        (a marker from before, of an earlier attempt, is not this one's state)."""
        self.submitted[(cell.stage, cell.id)] = time.time()

    def _state(self, c: Cell, m: dict) -> str:
        since = self.submitted.get((c.stage, c.id))
        if since is None:
            return "waiting"
        fresh = m.get("config_hash") == c.hash and (m.get("started") or 0) >= since - 1
        return m.get("status", "starting") if fresh else "starting"

    def rows(self) -> list[dict]:
        out = []
        for c in self.cells:
            m = read_json(c.marker)
            state = self._state(c, m)
            started = m.get("started") or time.time()
            wall = m.get("wall_seconds") if state != "running" else time.time() - started
            out.append({"stage": c.stage, "cell": c.id, "state": state,
                        "progress": progress(c.folder) if state == "running" else "",
                        "elapsed": "" if state in ("waiting", "starting") else _clock(wall or 0)})
        return out

    def _summary(self, rows: list[dict]) -> str:
        counts = {s: sum(r["state"] == s for r in rows)
                  for s in ("done", "running", "starting", "failed", "interrupted", "waiting")}
        running = "; ".join(f"{r['stage']}/{r['cell']} {r['progress'] or 'started'} "
                            f"{r['elapsed']}" for r in rows if r["state"] == "running")
        head = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        return f"[{_clock(time.time() - self.t0)}] {head}" + (f" | {running}" if running else "")

    def _table(self, rows: list[dict]) -> list[str]:
        lines = [f"{'stage':<10} {'cell':<34} {'state':<9} {'elapsed':>8}  progress"]
        lines += [f"{r['stage']:<10} {r['cell']:<34} {r['state']:<9} {r['elapsed']:>8}  "
                  f"{r['progress']}".rstrip() for r in rows]
        return [*lines, self._summary(rows)]

    def refresh(self, force: bool = False) -> None:
        if not self.cells:
            return
        rows = self.rows()
        if self.tty:
            lines = self._table(rows)
            up = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
            self.stream.write(up + "\n".join(lines) + "\n")
            self._drawn = len(lines)
        else:
            states = "|".join(r["state"] for r in rows)
            if force or states != self._last or time.time() - self._said >= self.quiet_s:
                self.stream.write(self._summary(rows) + "\n")
                self._last, self._said = states, time.time()
        self.stream.flush()

    def close(self) -> None:
        self.refresh()
