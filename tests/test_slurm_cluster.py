"""End-to-end tests through the REAL local SLURM cluster started by slurm/cluster.sh.

They skip (with the reason) when SLURM is not installed or the cluster is not up; CI runs
`bash slurm/cluster.sh up` first. Every wait is bounded so a broken cluster fails, not hangs.
"""

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROFILES = sorted((REPO / "slurm" / "profiles").glob("*.toml"))
JOB_TIMEOUT_S = 90  # generous: the machine's 2 cores are shared by several developers
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def _cluster_problem() -> str | None:
    """Why the real cluster cannot be used, or None when it can."""
    hint = "start it with `bash slurm/cluster.sh up` (or `make cluster-up`)"
    if shutil.which("sinfo") is None:
        return f"SLURM is not installed (no sinfo on PATH): {hint}"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        if " is UP" not in ping.stdout:  # asking sinfo now would retry for ~10 s
            first = (ping.stdout + ping.stderr).strip().splitlines()[:1]
            return f"slurmctld is not up ({' '.join(first)}): {hint}"
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True,
                                text=True, timeout=20).stdout.split()
    except subprocess.TimeoutExpired as exc:
        return f"SLURM did not answer within 20 s ({exc.cmd}): {hint}"
    if not any(s in ("idle", "mixed", "allocated", "completing") for s in states):
        return f"no usable node (sinfo states {states}): {hint}"
    return None


_PROBLEM = _cluster_problem()
needs_cluster = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


def run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"{cmd} failed ({out.returncode}): {out.stderr.strip()}"
    return out.stdout


def sbatch(*args: str) -> str:
    """Submit and return the job id (never --wait: it notices completion slowly)."""
    job_id = run(["sbatch", "--parsable", *args]).strip().split(";")[0]
    assert re.fullmatch(r"\d+", job_id), f"sbatch printed no job id: {job_id!r}"
    return job_id


def job_states(job_id: str) -> list[str]:
    """States of the job (one per array task) as scontrol reports them (kept MinJobAge=300 s)."""
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True,
                         text=True, timeout=30)
    return re.findall(r"\bJobState=(\S+)", out.stdout)


def wait_job(job_id: str, n_tasks: int = 1, timeout: float = JOB_TIMEOUT_S) -> list[str]:
    """Poll until all n_tasks records of the job are final; fail with the states on timeout."""
    deadline = time.monotonic() + timeout
    states: list[str] = []
    while time.monotonic() < deadline:
        states = job_states(job_id)
        if len(states) >= n_tasks and all(s in FINAL_STATES for s in states):
            return states
        time.sleep(0.5)
    queue = subprocess.run(["squeue", "-h", "-o", "%i %T %r %j"], capture_output=True,
                           text=True, timeout=30).stdout.strip()
    subprocess.run(["scancel", job_id], timeout=30)
    pytest.fail(f"job {job_id} not finished after {timeout} s (states {states}); cancelled it. "
                f"Queue (id state reason name); other jobs holding the node starve the tests:\n"
                f"{queue}")


@pytest.mark.parametrize("path", PROFILES, ids=[p.name for p in PROFILES])
def test_site_profiles_parse(path: Path) -> None:
    profile = tomllib.loads(path.read_text())
    assert isinstance(profile.get("name"), str), f"{path}: missing string key 'name'"
    res = profile.get("resources")
    assert isinstance(res, dict), f"{path}: missing table [resources]"
    assert isinstance(res.get("partition"), str), f"{path}: [resources] needs 'partition'"
    assert isinstance(res.get("gpus_per_node"), int), f"{path}: [resources] needs 'gpus_per_node'"


def test_profiles_exist() -> None:
    assert {p.name for p in PROFILES} >= {"local.toml", "gpu-cluster.toml"}


@needs_cluster
def test_sbatch_trivial_job_completes(tmp_path: Path) -> None:
    token = f"hello-{os.getpid()}-{time.time_ns()}"
    t0 = time.monotonic()
    job_id = sbatch("-o", str(tmp_path / "out-%j.txt"), "--wrap", f"echo {token}; hostname -s")
    assert wait_job(job_id) == ["COMPLETED"]
    out = (tmp_path / f"out-{job_id}.txt").read_text()
    assert token in out, f"job output lacks the token: {out!r}"
    print(f"submit-to-done {time.monotonic() - t0:.2f} s")


@needs_cluster
def test_failing_job_is_reported_failed(tmp_path: Path) -> None:
    job_id = sbatch("-o", str(tmp_path / "out.txt"), "--wrap", "exit 3")
    assert wait_job(job_id) == ["FAILED"]
    out = run(["scontrol", "-o", "show", "job", job_id])
    assert "ExitCode=3:0" in out


@needs_cluster
def test_array_of_four_runs_every_task(tmp_path: Path) -> None:
    job_id = sbatch("--array=0-3", "-o", str(tmp_path / "out-%A_%a.txt"), "--wrap",
                    f"echo $SLURM_ARRAY_JOB_ID $SLURM_ARRAY_TASK_ID > {tmp_path}/task-"
                    "$SLURM_ARRAY_TASK_ID.txt")
    assert wait_job(job_id, n_tasks=4) == ["COMPLETED"] * 4
    for task in range(4):
        assert (tmp_path / f"task-{task}.txt").read_text().split() == [job_id, str(task)]


@needs_cluster
def test_srun_two_tasks_see_their_ranks(tmp_path: Path) -> None:
    job_id = sbatch("-n", "2", "-o", str(tmp_path / "out.txt"), "--wrap",
                    "srun -n 2 bash -c 'echo rank=$SLURM_PROCID of=$SLURM_NTASKS'")
    assert wait_job(job_id) == ["COMPLETED"]
    lines = sorted((tmp_path / "out.txt").read_text().split("\n"))
    assert [ln for ln in lines if ln.startswith("rank=")] == ["rank=0 of=2", "rank=1 of=2"]


def _where_am_i(x: int) -> tuple[int, str, str]:
    """Runs inside the SLURM job. This module is not importable from the job's working
    directory, so submitit's cloudpickle must send the function by value (registered below)."""
    import submitit

    env = submitit.JobEnvironment()
    return x * x, str(env.job_id), os.environ.get("SLURM_JOB_PARTITION", "")


def _pickle_this_module_by_value() -> None:
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


@needs_cluster
def test_submitit_job_returns_its_result(tmp_path: Path) -> None:
    submitit = pytest.importorskip("submitit")
    _pickle_this_module_by_value()
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition="debug", cpus_per_task=1,
                               mem_gb=1, name="brainhpc-test")
    job = executor.submit(_where_am_i, 7)
    wait_job(job.job_id)
    value, job_id, partition = job.result()
    assert (value, job_id, partition) == (49, job.job_id, "debug")


@needs_cluster
def test_submitit_map_array_runs_each_item(tmp_path: Path) -> None:
    submitit = pytest.importorskip("submitit")
    _pickle_this_module_by_value()
    executor = submitit.SlurmExecutor(folder=tmp_path / "submitit", python=sys.executable)
    executor.update_parameters(time=5, partition="debug", cpus_per_task=1, mem="1G",
                               array_parallelism=2)
    jobs = executor.map_array(_where_am_i, [1, 2, 3])
    for job in jobs:
        wait_job(job.job_id)
    results = [job.result() for job in jobs]
    assert [r[0] for r in results] == [1, 4, 9]
    assert len({r[1] for r in results}) == 3, f"array tasks should have distinct ids: {results}"


def _fake_gpus() -> int:
    if _PROBLEM is not None:
        return 0
    out = run(["scontrol", "-o", "show", "node"])
    m = re.search(r"\bGres=gpu:(\d+)", out)
    return int(m.group(1)) if m else 0


@needs_cluster
@pytest.mark.skipif(_PROBLEM is None and _fake_gpus() < 2,
                    reason="the node has fewer than 2 (fake) GPUs: "
                    "start the cluster with FAKE_GPUS=2 (the default)")
@pytest.mark.parametrize(("flags", "expected"), [(["--gres=gpu:1"], "0"), (["--gpus=2"], "0,1")])
def test_gpu_job_sees_cuda_visible_devices(tmp_path: Path, flags: list[str],
                                           expected: str) -> None:
    job_id = sbatch("-p", "gpu", *flags, "-o", str(tmp_path / "out.txt"), "--wrap",
                    "echo CVD=$CUDA_VISIBLE_DEVICES")
    assert wait_job(job_id) == ["COMPLETED"]
    assert (tmp_path / "out.txt").read_text().strip() == f"CVD={expected}"


def _has_accounting() -> bool:
    if _PROBLEM is not None:
        return False
    return "accounting_storage/slurmdbd" in run(["scontrol", "show", "config"])


@needs_cluster
@pytest.mark.skipif(_PROBLEM is None and not _has_accounting(),
                    reason="no slurmdbd: start the cluster with SLURM_WITH_DBD=1 for sacct")
def test_sacct_reports_finished_job(tmp_path: Path) -> None:
    job_id = sbatch("-o", str(tmp_path / "out.txt"), "--wrap", "exit 5")
    assert wait_job(job_id) == ["FAILED"]
    deadline = time.monotonic() + 30  # slurmctld forwards job records to slurmdbd asynchronously
    rows: list[str] = []
    while time.monotonic() < deadline:
        rows = run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State,ExitCode"]).split()
        if rows and rows[0].split("|")[1] == "FAILED":
            break
        time.sleep(0.5)
    assert rows == [f"{job_id}|FAILED|5:0"]
