"""Submission bookkeeping through fake SLURM commands (sbatch, squeue, sinfo, scontrol on PATH:
the boundary only): a rejected sbatch mid-way reports what was submitted, and a re-run while
earlier cells are still queued makes the rest wait for them. The same through the real cluster:
test_sweep_slurm.py::test_rejected_sbatch_then_rerun_waits_for_queued_jobs."""

import json
import re
from pathlib import Path

import pytest

from brainhpc.sweep import local, rundir
from brainhpc.sweep.cli import main
from brainhpc.sweep.status import cell_states

SWEEP = """
name = "tiny"
profile = "local"
[data]
phantom = 100
size = 32
[generate]
archs = ["vae"]
epochs = 1
[[classify.cells]]
model = "cnn"
train_data = ["real", "synthetic:vae"]
seeds = [0, 1, 2]
"""

FAKE_SBATCH = r"""#!/usr/bin/env bash
# records each script; refuses those matching $FAKE/reject (like a QOS limit would)
n=$(( $(ls "$FAKE"/script-*.sh 2>/dev/null | wc -l) + 101 ))
if [ -s "$FAKE/reject" ] && grep -q -f "$FAKE/reject" "$1"; then
  echo "sbatch: error: Batch job submission failed: Job violates accounting/QOS policy" \
       "(job submit limit, user's size and/or time limits)" >&2
  exit 1
fi
cp "$1" "$FAKE/script-$n.sh"
echo "Submitted batch job $n"
"""
FAKE_OTHERS = {
    "srun": "exit 0",
    "squeue": 'cat "$FAKE/queue" 2>/dev/null; exit 0',
    "sinfo": 'echo "debug*|infinite|(null)"',
    "scontrol": 'printf "ClusterName = brainhpc\\nMaxArraySize = 1001\\n"',
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "sbatch").write_text(FAKE_SBATCH)
    for name, body in FAKE_OTHERS.items():
        (fake / "bin" / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
    for f in (fake / "bin").iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("FAKE", str(fake))
    monkeypatch.setenv("PATH", f"{fake / 'bin'}:/usr/bin:/bin")
    return fake


def _script(fake: Path, job: str) -> str:
    return (fake / f"script-{job}.sh").read_text()


def test_rejected_sbatch_reports_what_was_submitted_then_rerun_waits(tmp_path, fake_slurm,
                                                                     capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(SWEEP)
    run = tmp_path / "run"
    (fake_slurm / "reject").write_text("job-name=tiny-classify\n")
    assert main([str(path), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "sbatch refused the classify array (6 cells)" in err and "QOS policy" in err
    assert "already submitted in this run: prepare job 101 (1 cells); generate job 102 " \
           "(2 cells)" in err
    assert "run the same command again" in err and "Traceback" not in err
    assert [(r["stage"], r["job_id"]) for r in rundir.read_jobs(run)] == [("prepare", "101"),
                                                                       ("generate", "102")]
    assert "--dependency=afterany:101\n" in _script(fake_slurm, "102")

    # the cause is fixed; prepare and generate are still queued
    (fake_slurm / "reject").write_text("")
    (fake_slurm / "queue").write_text("101|RUNNING\n102_0|PENDING\n102_1|PENDING\n")
    assert main([str(path), "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "0 done, 3 still queued" in out
    recs = rundir.read_jobs(run)
    assert [(r["stage"], r["job_id"], r["after"]) for r in recs[2:]] == [
        ("classify", "103", ["101", "102"]), ("aggregate", "104", ["101", "102", "103"])]
    assert "#SBATCH --dependency=afterany:101:102\n" in _script(fake_slurm, "103")
    assert "#SBATCH --dependency=afterany:101:102:103\n" in _script(fake_slurm, "104")


def test_only_one_stage_still_waits_for_queued_cells_it_needs(tmp_path, fake_slurm, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(SWEEP)
    run = tmp_path / "run"
    assert main([str(path), "--run-dir", str(run)]) == 0  # 101 prepare, 102 generate, ...
    (fake_slurm / "queue").write_text("102_1|PENDING\n")  # one generate cell not finished
    assert main([str(path), "--run-dir", str(run), "--only", "classify", "--force"]) == 0
    rec = rundir.read_jobs(run)[-1]
    assert rec["stage"] == "classify" and rec["after"] == ["102"]
    assert "#SBATCH --dependency=afterany:102\n" in _script(fake_slurm, rec["job_id"])


def test_packed_cells_map_to_their_array_task(tmp_path, fake_slurm):
    path = tmp_path / "tiny.toml"
    path.write_text(SWEEP + "[resources.classify]\ncells_per_task = 4\n")
    run = tmp_path / "run"
    assert main([str(path), "--run-dir", str(run)]) == 0
    rec = next(r for r in rundir.read_jobs(run) if r["stage"] == "classify")
    assert rec["pack"] == 4 and len(rec["cells"]) == 6
    script = _script(fake_slurm, rec["job_id"])
    assert "#SBATCH --array=0-1%2" in script  # 6 cells, 4 per task -> 2 tasks
    jobs = rundir.cell_jobs(run)
    tasks = [jobs[("classify", c)] for c in rec["cells"]]
    assert tasks == [f"{rec['job_id']}_0"] * 4 + [f"{rec['job_id']}_1"] * 2
    # a packed cell that finished inside a still-running task shows done, its mates running
    first = run / "classify" / rec["cells"][0] / "cell.json"
    first.parent.mkdir(parents=True)
    first.write_text(json.dumps({"status": "done", "job_id": tasks[0], "wall_seconds": 1.0}))
    rows = {r["cell"]: r["state"] for r in cell_states(run, queued={tasks[0]: "RUNNING"})
            if r["stage"] == "classify"}
    assert rows[rec["cells"][0]] == "done" and rows[rec["cells"][1]] == "running"
    assert rows[rec["cells"][4]] == "lost"  # its task left the queue without a marker


def test_submitted_scripts_requeue_on_the_host(tmp_path, fake_slurm):
    path = tmp_path / "tiny.toml"
    path.write_text(SWEEP)
    run = tmp_path / "run"
    assert main([str(path), "--run-dir", str(run)]) == 0
    script = _script(fake_slurm, "102")
    assert re.search(r"^srun .* --cpus-per-task=1 --kill-on-bad-exit=1 ", script, re.M)
    assert "#SBATCH --requeue" in script and "--wckey" not in script
    flag = f"flag={run}/logs/generate/requeue-$SLURM_JOB_ID"
    assert flag in script and script.index("# command") < script.index(flag)


def test_local_executor_shows_the_gpus_a_stage_asked_for(tmp_path, monkeypatch):
    """make gpu-check runs the smoke on this machine's GPU (profile local-gpu): the local
    executor must pass the stage's GPUs on, or submitit hides them (CUDA_VISIBLE_DEVICES="")."""
    import submitit

    from brainhpc.sweep.config import load_sweep
    from brainhpc.sweep.plan import expand
    from brainhpc.sweep.resources import REPO

    seen = []

    class Job:
        job_id = "1"

        def result(self):
            return {}

        def done(self):
            return True

    class Local:
        def __init__(self, folder):
            pass

        def update_parameters(self, **kw):
            seen.append(kw)

        def submit(self, fn, cell):
            devices.append(fn.device)
            return Job()

    devices = []
    monkeypatch.setattr(submitit, "LocalExecutor", Local)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # e.g. SLURM gave this job the 4th GPU
    sweep = load_sweep(REPO / "jobs" / "smoke.toml", profile="local-gpu")
    plan = expand(sweep, tmp_path / "run")
    cells = {s: plan[s][:1] for s in ("prepare", "generate")}
    cells.update({s: [] for s in plan if s not in cells})
    local.run_here("local", sweep, cells, tmp_path / "run", force=False)
    assert [kw["gpus_per_node"] for kw in seen] == [0, 1]  # prepare on the CPU, generate a GPU
    assert [kw["visible_gpus"] for kw in seen] == [(3,), (3,)]  # this job's GPU, not GPU 0
    assert sweep.device("generate") == "cuda" and sweep.device("prepare") == "cpu"
    assert devices == ["cpu", "cuda"]  # each cell runs on its stage's device, as on SLURM
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-6f2a")
    assert local.visible_gpus() == ()  # UUIDs: submitit's own numbering


def test_a_local_gpu_cell_without_cuda_fails_loudly(tmp_path, capsys):
    """A GPU profile's cell run by the local executor gets device=cuda; on this CPU machine it
    fails at once, saying why, instead of training on the CPU (a real subprocess)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = tmp_path / "g.toml"
    path.write_text('name = "g"\nprofile = "local-gpu"\n[data]\nphantom = 40\nsize = 32\n'
                    '[generate]\narchs = ["vae"]\nlabels = ["healthy"]\nepochs = 1\n')
    run = tmp_path / "run"
    assert main([str(path), "--executor", "local", "--only", "generate", "--run-dir",
                 str(run)]) == 1
    marker = json.loads((run / "generate" / "vae-healthy" / "cell.json").read_text())
    assert marker["status"] == "failed" and marker["device"] == "cuda"
    assert "GPUs were requested (device=cuda)" in marker["error"]
    assert "sees no CUDA device" in marker["error"]


def test_max_num_timeout_reaches_the_submitted_cells(tmp_path, fake_slurm):
    """[resources] max_num_timeout is what each pickled submission counts time-outs down from
    (the flag-leaving handler in cells.py reads that countdown)."""
    import pickle

    path = tmp_path / "tiny.toml"
    path.write_text(SWEEP + "\n[resources]\nmax_num_timeout = 5\n"
                    "[resources.classify]\nmax_num_timeout = 0\n")
    run = tmp_path / "run"
    assert main([str(path), "--run-dir", str(run)]) == 0
    countdowns = {}
    for stage in ("generate", "classify"):
        pkls = sorted((run / "logs" / stage).glob("*_submitted.pkl"))
        assert pkls, f"no pickled submission under {run / 'logs' / stage}"
        countdowns[stage] = {pickle.loads(p.read_bytes())._timeout_countdown for p in pkls}
    assert countdowns == {"generate": {5}, "classify": {0}}


def test_local_cells_get_their_share_of_the_cores(tmp_path, monkeypatch):
    """--executor local: each cell starts with OMP_NUM_THREADS = its share of the cores (an
    OMP_NUM_THREADS the user set wins); this process's environment is left as it was."""
    import os

    import submitit

    from brainhpc.sweep.config import load_sweep
    from brainhpc.sweep.plan import expand
    from brainhpc.sweep.resources import REPO

    seen = []

    class Job:
        job_id = "1"

        def result(self):
            return {}

        def done(self):
            return True

    class Local:
        def __init__(self, folder):
            pass

        def update_parameters(self, **kw):
            pass

        def submit(self, fn, cell):  # submitit's local job copies os.environ here
            seen.append(os.environ.get("OMP_NUM_THREADS"))
            return Job()

    monkeypatch.setattr(submitit, "LocalExecutor", Local)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("brainhpc.train.distributed.allocated_cpus", lambda: 8)
    text = (REPO / "jobs" / "smoke.toml").read_text().replace("cpus_per_task = 1",
                                                             "cpus_per_task = 64")
    (tmp_path / "s.toml").write_text(text)
    sweep = load_sweep(tmp_path / "s.toml")
    plan = expand(sweep, tmp_path / "run")
    cells = {s: plan[s][:2] if s == "generate" else [] for s in plan}
    local.run_here("local", sweep, cells, tmp_path / "run", force=False)
    assert seen == ["4", "4"]  # two cells at once on 8 cores
    assert "OMP_NUM_THREADS" not in os.environ
    seen.clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    local.run_here("local", sweep, cells, tmp_path / "run", force=False)
    assert seen == ["3", "3"]
