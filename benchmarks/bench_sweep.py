"""Sweep overheads on the local SLURM cluster (slurm/cluster.sh up), measured side by side:

1. time from ``python -m brainhpc.sweep jobs/smoke.toml`` to all smoke cells submitted (the
   jobs are cancelled right after; nothing trains);
2. per-cell scheduling overhead: N trivial cells as one submitit array (what the sweep does)
   vs N separate jobs: seconds to submit, and the median submit-to-start and submit-to-done
   latency per cell;
3. what the pre-submit checks cost: reading the cluster (scontrol + sinfo) and checking the
   resources against it, and the container version check (here through the stand-in prefix of
   tests/container_standin.sh: one python start with torch imported, as in an image).

    .venv/bin/python benchmarks/bench_sweep.py [--cells 10]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import submitit

REPO = Path(__file__).resolve().parents[1]


def trivial(i: int) -> float:
    """A cell that does nothing: returns when it started (wall clock, same machine)."""
    return time.time()


def wait_all(jobs, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    ids = sorted({j.job_id.split("_")[0] for j in jobs})
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(ids)], capture_output=True,
                             text=True, timeout=30).stdout
        if not out.strip():
            return
        time.sleep(0.2)
    subprocess.run(["scancel", *ids], timeout=30)
    raise SystemExit(f"jobs {ids} not done after {timeout} s")


def latencies(jobs, t_submit: float) -> tuple[float, float, float]:
    """Median submit-to-start, median submit-to-done (result file written), total seconds."""
    starts, ends = [], []
    for j in jobs:
        starts.append(j.result() - t_submit)
        ends.append(j.paths.result_pickle.stat().st_mtime - t_submit)
    return statistics.median(starts), statistics.median(ends), max(ends)


def bench_cells(n: int, folder: Path) -> None:
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ex = submitit.SlurmExecutor(folder=folder / "array", python=sys.executable)
    ex.update_parameters(partition="debug", time=5, cpus_per_task=1, mem="500M",
                         array_parallelism=n, stderr_to_stdout=True)
    t0 = time.time()
    array = ex.map_array(trivial, range(n))
    t_array = time.time() - t0
    wait_all(array)
    a = latencies(array, t0)
    ex1 = submitit.SlurmExecutor(folder=folder / "single", python=sys.executable)
    ex1.update_parameters(partition="debug", time=5, cpus_per_task=1, mem="500M",
                          stderr_to_stdout=True)
    t0 = time.time()
    singles = [ex1.submit(trivial, i) for i in range(n)]
    t_single = time.time() - t0
    wait_all(singles)
    s = latencies(singles, t0)
    print(f"{n} trivial cells            one array   {n} jobs    ratio (jobs/array)")
    ratio = t_single / t_array
    print(f"submit (s)                  {t_array:9.2f}  {t_single:9.2f}    {ratio:.1f}x")
    print(f"median submit->start (s)    {a[0]:9.2f}  {s[0]:9.2f}    {s[0] / a[0]:.2f}x")
    print(f"median submit->done (s)     {a[1]:9.2f}  {s[1]:9.2f}    {s[1] / a[1]:.2f}x")
    print(f"all done (s)                {a[2]:9.2f}  {s[2]:9.2f}    {s[2] / a[2]:.2f}x")
    print(f"per-cell overhead (all done / n): array {a[2] / n:.2f} s, jobs {s[2] / n:.2f} s")


def bench_submit(folder: Path) -> None:
    run = folder / "smoke-run"
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "brainhpc.sweep", "jobs/smoke.toml",
                          "--run-dir", str(run)], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    took = time.monotonic() - t0
    recs = json.loads((run / "jobs.json").read_text()) if (run / "jobs.json").exists() else []
    subprocess.run(["scancel", *[r["job_id"] for r in recs]], timeout=30)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    cells = sum(len(r["cells"]) for r in recs)
    print(f"smoke sweep: {cells} cells in {len(recs)} arrays submitted {took:.2f} s after "
          f"invocation (incl. python start-up and imports); cancelled")


def bench_checks(folder: Path, repeats: int = 3) -> None:
    from brainhpc.stages import NAMES as STAGES
    from brainhpc.sweep import slurm
    from brainhpc.sweep.config import load_sweep

    sweep = load_sweep(REPO / "jobs" / "smoke.toml")
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        slurm.check_cluster(sweep, list(STAGES), slurm.cluster_info())
        t.append(time.perf_counter() - t0)
    print(f"cluster check (scontrol show config + sinfo + checks): median "
          f"{statistics.median(t):.2f} s of {repeats}")
    path = folder / "ctr.toml"
    standin = REPO / "tests" / "container_standin.sh"
    path.write_text((REPO / "jobs" / "smoke.toml").read_text() + "\n[container]\nprefix = "
                    f'"bash {standin} --bind {{binds}} {sys.executable}"\n')
    sweep = load_sweep(path)
    (folder / "run").mkdir(exist_ok=True)
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        slurm.image_versions(sweep, folder / "run")
        t.append(time.perf_counter() - t0)
    print(f"container version check (stand-in prefix, imports torch): median "
          f"{statistics.median(t):.2f} s of {repeats}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=10)
    args = p.parse_args()
    up = shutil.which("scontrol") and " is UP" in subprocess.run(
        ["scontrol", "ping"], capture_output=True, text=True, timeout=20).stdout
    if not up:  # `make bench` runs every benchmark: skip, do not fail
        print("bench_sweep: skipped, no SLURM cluster up (bash slurm/cluster.sh up)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bench_submit(folder)
        bench_checks(folder)
        bench_cells(args.cells, folder)


if __name__ == "__main__":
    main()
