"""The sweep end to end through the REAL local SLURM cluster (slurm/cluster.sh).

Skipped with the reason when the cluster is not up. Tiny phantom data (32 px, ~120 images),
1-epoch cells; still minutes on 2 shared cores, hence @slow. Every wait is bounded.
"""

import csv
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from brainhpc.data.shards import load_split
from brainhpc.errors import BrainhpcError
from brainhpc.sweep import rundir, slurm
from brainhpc.sweep.config import load_sweep

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 1200  # the machine's 2 cores are shared by several developers


def _cluster_problem() -> str | None:
    hint = "start it with `bash slurm/cluster.sh up` (or `make cluster-up`)"
    if shutil.which("sbatch") is None:
        return f"SLURM is not installed (no sbatch on PATH): {hint}"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"scontrol ping did not answer within 20 s: {hint}"
    if " is UP" not in ping.stdout:
        return f"slurmctld is not up ({(ping.stdout + ping.stderr).strip()[:80]}): {hint}"
    return None


_PROBLEM = _cluster_problem()
needs_cluster = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))

BASE = """
name = "{name}"
profile = "local"
[data]
phantom = 120
size = 32
[generate]
archs = ["vae"]
labels = {labels}
epochs = {gen_epochs}
batch_size = 8
n_samples = 48
min_images = 16
quality = false
checkpoint_every = 1000
[classify]
epochs = 1
batch_size = 16
[resources]
partition = "debug"
time_min = 15
array_parallelism = 2
"""
STANDIN = REPO / "tests" / "container_standin.sh"
CLASSIFY = """
[[classify.cells]]               # deliberately failing: a batch larger than the training set
model = "cnn"
train_data = ["real"]
seeds = [1]
batch_size = 100000
[[classify.cells]]
model = "cnn"
train_data = ["real", "synthetic:vae"]
[[classify.cells]]
model = "vae"
techniques = ["giaem"]
train_data = ["mixed:vae"]
[resources.classify]             # two cells per array task: the failing one comes first in its
cells_per_task = 2               # task, and its task-mate must still run
"""


def sweep_file(tmp_path: Path, name: str, extra: str = "", labels='["healthy", "tumour"]',
               gen_epochs: int = 1) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(BASE.format(name=name, labels=labels, gen_epochs=gen_epochs) + extra)
    return path


def sweep(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brainhpc.sweep", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def job_ids(run_dir: Path) -> list[str]:
    return [r["job_id"] for r in rundir.read_jobs(run_dir) if r["executor"] == "slurm"]


def wait_sweep(run_dir: Path, timeout: float = WAIT_S) -> None:
    """Until none of the run's jobs is in the queue; cancel them and fail on timeout."""
    ids = job_ids(run_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T"],
                              capture_output=True, text=True, timeout=30).stdout.split("\n")
        if not any(line.strip() for line in left):
            return
        time.sleep(2)
    subprocess.run(["scancel", *ids], timeout=30)
    pytest.fail(f"sweep jobs {ids} not finished after {timeout} s; cancelled them")


def markers(run_dir: Path, stage: str) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in sorted((run_dir / stage).glob("*/cell.json"))}


@needs_cluster
def test_unknown_partition_lists_the_real_ones(tmp_path):
    s = load_sweep(sweep_file(tmp_path, "p"), partition="nope")
    info = slurm.cluster_info()
    assert info["cluster"] == "brainhpc" and "debug" in info["partitions"]
    with pytest.raises(BrainhpcError, match=r"partition 'nope'.*sinfo lists: debug, gpu"):
        slurm.check_cluster(s, ["generate"], info)
    out = sweep(str(tmp_path / "p.toml"), "--partition", "nope", "--run-dir",
                str(tmp_path / "run"))
    assert out.returncode == 2 and "sinfo lists" in out.stderr
    assert not (tmp_path / "run" / "jobs.json").exists()


@needs_cluster
@pytest.mark.slow
def test_sweep_completes_reports_failed_cell_and_reruns_only_it(tmp_path):
    run = tmp_path / "run"
    path = sweep_file(tmp_path, "e2e", CLASSIFY)
    t0 = time.monotonic()
    out = sweep(str(path), "--run-dir", str(run))
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 120, "the sweep command must return after submitting"
    assert "python -m brainhpc.sweep status" in out.stdout
    recs = rundir.read_jobs(run)
    assert [r["stage"] for r in recs] == ["prepare", "generate", "classify", "aggregate"]
    ids = [r["job_id"] for r in recs]
    assert recs[2]["after"] == ids[:2] and recs[3]["after"] == ids[:3]
    assert recs[2]["pack"] == 2 and len(recs[2]["cells"]) == 4  # two array tasks
    # --dry-run and the golden files show the very scripts submitit submitted
    sw = load_sweep(path)
    for r in recs:
        tasks = -(-len(r["cells"]) // r.get("pack", 1))
        dep = "afterany:" + ":".join(r["after"]) if r["after"] else None
        submitted = (run / "logs" / r["stage"] / f"{r['job_id']}_submission.sh").read_text()
        assert submitted == slurm.sbatch_script(sw, r["stage"], run.resolve(), tasks, dep), r
    wait_sweep(run)

    cls = markers(run, "classify")
    expected = {"cnn-real-s0", "cnn-synthetic_vae-s0", "vae-mixed_vae-s0", "cnn-real-s1"}
    assert set(cls) == expected
    assert {k: v["status"] for k, v in cls.items()} == {
        **{k: "done" for k in expected}, "cnn-real-s1": "failed"}
    bad = cls["cnn-real-s1"]
    assert "batch" in bad["error"] and Path(bad["log"]).exists()
    assert "fewer than one batch" in Path(bad["log"]).read_text()
    assert all(m["status"] == "done" for m in markers(run, "generate").values())

    rows = [r for r in csv.DictReader((run / "results" / "metrics.csv").open())
            if r["model"] != "baseline"]
    assert {r["cell"] for r in rows} == expected
    for r in rows:
        if r["cell"] == "cnn-real-s1":
            assert r["status"] == "failed"
        else:
            assert r["status"] == "done" and r["config_hash"], r
            assert 0.0 <= float(r["balanced_accuracy"]) <= 1.0, r
    assert "giaem" in {r["technique"] for r in rows if r["cell"] == "vae-mixed_vae-s0"}
    assert "cnn-real-s1" in (run / "results" / "table.md").read_text()
    assert (run / "results" / "by_train_data.png").stat().st_size > 1000

    status = sweep("status", str(run))
    assert status.returncode == 1  # a failed cell
    assert "failed" in status.stdout and bad["log"] in status.stdout
    assert "cnn-real-s1" in status.stdout

    again = sweep(str(path), "--run-dir", str(run))  # only the failed cell (+ aggregate)
    assert again.returncode == 0, again.stderr
    new = rundir.read_jobs(run)[len(recs):]
    assert [(r["stage"], r["cells"]) for r in new] == [("classify", ["cnn-real-s1"]),
                                                       ("aggregate", ["results"])]
    wait_sweep(run)
    other = sweep(str(sweep_file(tmp_path, "other")), "--run-dir", str(run))
    assert other.returncode == 2 and "created by sweep 'e2e'" in other.stderr


@needs_cluster
@pytest.mark.slow
def test_two_task_ddp_cell_under_srun_then_rerun_submits_nothing(tmp_path):
    run = tmp_path / "run"
    path = sweep_file(tmp_path, "ddp", '[resources.generate]\ntasks_per_node = 2\n',
                      labels='["healthy"]')
    out = sweep(str(path), "--run-dir", str(run))
    assert out.returncode == 0, out.stderr
    wait_sweep(run)
    cell = markers(run, "generate")["vae-healthy"]
    assert cell["status"] == "done" and cell["tasks"] == 2, cell
    card = json.loads((run / "generate" / "vae-healthy" / "card.json").read_text())
    assert card["world_size"] == 2 and card["status"] == "done"
    log = Path(cell["log"]).read_text()
    assert "with gloo" in log or "gloo" in log
    again = sweep(str(path), "--run-dir", str(run))
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout
    assert len(rundir.read_jobs(run)) == 3  # prepare, generate, aggregate: no new submission


def _weights(folder: Path) -> dict:
    state = torch.load(folder / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    return state["models"]


def wait_for(what: str, cond, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    pytest.fail(f"not within {timeout} s: {what}")


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@needs_cluster
@pytest.mark.slow
def test_containerised_cell_is_requeued_from_the_host_and_resumes(tmp_path):
    """A cell in a stand-in container (no Slurm client inside), submitted with --force, gets
    SIGUSR2 (time limit ahead) and later SIGTERM (preemption) mid-training: each time it
    saves, leaves the flag, the sbatch teardown requeues it on the host, and it resumes (not
    forced again) to end equal to an uninterrupted run."""
    run = tmp_path / "run"
    prefix = f"bash {STANDIN} --bind {{binds}} {sys.executable}"
    path = sweep_file(tmp_path, "requeue", f'[container]\nprefix = "{prefix}"\n',
                      labels='["healthy"]', gen_epochs=60)
    out = sweep(str(path), "--run-dir", str(run), "--force")
    assert out.returncode == 0, out.stderr
    assert "container: brainhpc 0.1.0, submitit" in out.stdout  # the image check ran
    gen_job = next(r["job_id"] for r in rundir.read_jobs(run) if r["stage"] == "generate")
    folder = run / "generate" / "vae-healthy"
    metrics = folder / "metrics.jsonl"
    wait_for("training started", lambda: _lines(metrics) > 0)
    subprocess.run(["scancel", "--signal=USR2", gen_job], check=True, timeout=30)
    at_signal = _lines(metrics)
    wait_for("the requeued task trains again", lambda: (
        (markers(run, "generate").get("vae-healthy") or {}).get("restarts", 0) >= 1
        and _lines(metrics) > at_signal + 1))
    subprocess.run(["scancel", "--signal=TERM", gen_job], check=True, timeout=30)
    # the uninterrupted reference: the same cell through SLURM (same CPU threads per task)
    ref = tmp_path / "ref"
    done = sweep(str(path), "--run-dir", str(ref))
    assert done.returncode == 0, done.stdout + done.stderr
    wait_sweep(run)
    wait_sweep(ref)
    assert markers(ref, "generate")["vae-healthy"]["restarts"] == 0
    cell = markers(run, "generate")["vae-healthy"]
    assert cell["status"] == "done" and cell["restarts"] >= 2, cell
    card = json.loads((folder / "card.json").read_text())
    assert card["resumed"], "the requeued task started over instead of resuming"
    log = Path(cell["log"]).read_text()
    assert "container_standin: binds " + str(run) in log  # the cell ran through the prefix
    assert log.count("brainhpc: requeued job") >= 2, log[-3000:]  # by the host's teardown
    assert "SIGUSR2: asking the trainer" in log and "SIGTERM" in log
    assert log.count("resumed from") >= 2, "a restart did not resume (--force survived?)"
    a, b = _weights(folder), _weights(ref / "generate" / "vae-healthy")
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}.{key} differs"
    sa = load_split(folder / "shards").images
    sb = load_split(ref / "generate" / "vae-healthy" / "shards").images
    assert np.array_equal(sa, sb)


@needs_cluster
@pytest.mark.slow
def test_cancelled_cell_is_not_requeued(tmp_path):
    """scancel sends SIGTERM too: the cell checkpoints and leaves its flag, but the teardown sees
    the job is no longer RUNNING and does not requeue it (a user must be able to cancel)."""
    run = tmp_path / "run"
    path = sweep_file(tmp_path, "cancel", labels='["healthy"]', gen_epochs=60)
    assert sweep(str(path), "--run-dir", str(run)).returncode == 0
    gen_job = next(r["job_id"] for r in rundir.read_jobs(run) if r["stage"] == "generate")
    metrics = run / "generate" / "vae-healthy" / "metrics.jsonl"
    wait_for("training started", lambda: _lines(metrics) > 0)
    subprocess.run(["scancel", gen_job], check=True, timeout=30)
    wait_sweep(run)
    state = subprocess.run(["scontrol", "-o", "show", "job", gen_job], capture_output=True,
                           text=True, timeout=30).stdout
    assert "JobState=CANCELLED" in state and "Restarts=0" in state, state
    cell = markers(run, "generate")["vae-healthy"]
    assert cell["status"] != "done" and cell["restarts"] == 0, cell
    log = Path(cell["log"]).read_text()
    assert "not requeued: no longer running" in log, log[-2000:]


GPU_PROFILE = """
name = "local-gpu"
cluster = "brainhpc"
[resources]
partition = "gpu"          # the local cluster's fake GPUs
cpu_partition = "debug"
gpus_per_node = {gpus}
time_min = 15
array_parallelism = 2
"""
GPU_SWEEP = """
name = "gpu"
profile = "{profile}"
[data]
phantom = 120
size = 32
[generate]
archs = ["vae"]
labels = ["healthy"]
epochs = 1
batch_size = 8
n_samples = 48
min_images = 16
quality = false
[[classify.cells]]
model = "cnn"
train_data = ["real"]
epochs = 1
batch_size = 16
"""


def _gpu_sweep(tmp_path: Path, gpus: int) -> Path:
    profile = tmp_path / f"local-gpu{gpus}.toml"
    profile.write_text(GPU_PROFILE.format(gpus=gpus))
    path = tmp_path / f"gpu{gpus}.toml"
    path.write_text(GPU_SWEEP.format(profile=profile))
    return path


@needs_cluster
def test_gpu_profile_dry_run_is_checked_against_sinfo(tmp_path):
    out = sweep(str(_gpu_sweep(tmp_path, 1)), "--dry-run", "--run-dir", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    assert "checked against cluster brainhpc (sinfo)" in out.stdout
    scripts = out.stdout.split("--- sbatch script (")[1:]
    by_stage = {s.split(")", 1)[0]: s for s in scripts}
    for stage in ("generate", "classify"):
        assert "#SBATCH --gpus-per-node=1\n" in by_stage[stage]
        assert "#SBATCH --partition=gpu\n" in by_stage[stage]
    for stage in ("prepare", "aggregate"):
        assert "#SBATCH --gpus" not in by_stage[stage]
        assert "#SBATCH --partition=debug\n" in by_stage[stage]
    too_many = sweep(str(_gpu_sweep(tmp_path, 3)), "--dry-run", "--run-dir", str(tmp_path / "r"))
    assert too_many.returncode == 2
    assert "gpus_per_node = 3: partition 'gpu' has at most 2 GPUs per node" in too_many.stderr
    assert not (tmp_path / "r").exists()


@needs_cluster
@pytest.mark.slow
def test_gpu_cells_fail_loudly_without_cuda_and_the_rest_runs(tmp_path):
    """On the fake GPUs the jobs get CUDA_VISIBLE_DEVICES but torch sees no CUDA: the GPU cells
    must fail saying so (not train on the CPU); prepare and aggregate run on the CPU partition."""
    run = tmp_path / "run"
    out = sweep(str(_gpu_sweep(tmp_path, 1)), "--run-dir", str(run))
    assert out.returncode == 0, out.stderr
    wait_sweep(run)
    recs = {r["stage"]: r["job_id"] for r in rundir.read_jobs(run)}
    for stage, partition in (("generate", "gpu"), ("prepare", "debug")):
        info = subprocess.run(["scontrol", "-o", "show", "job", recs[stage]],
                              capture_output=True, text=True, timeout=30).stdout
        assert f"Partition={partition} " in info, info
        assert ("gres:gpu:1" in info) == (stage == "generate"), info
    assert markers(run, "prepare")["data"]["status"] == "done"
    for stage in ("generate", "classify"):
        (m,) = markers(run, stage).values()
        assert m["status"] == "failed" and m["device"] == "cuda", m
        assert "GPUs were requested (device=cuda)" in m["error"], m["error"]
        assert "CUDA_VISIBLE_DEVICES=0" in m["error"], m["error"]
    assert markers(run, "aggregate")["results"]["status"] == "done"
    assert "failed" in (run / "results" / "metrics.csv").read_text()


@needs_cluster
def test_rejected_sbatch_then_rerun_waits_for_queued_jobs(tmp_path):
    """sbatch refuses the classify array (a reservation that does not exist): the error names
    what was submitted; the re-run submits the rest, waiting for the still-queued (held) jobs."""
    run = tmp_path / "run"
    held = "[resources.prepare]\nslurm_extra = { hold = true }\n" \
           "[resources.generate]\nslurm_extra = { hold = true }\n"
    path = sweep_file(tmp_path, "reject", CLASSIFY.replace(
        "cells_per_task = 2", 'cells_per_task = 2\nreservation = "no-such-reservation"') + held)
    try:
        out = sweep(str(path), "--run-dir", str(run))
        assert out.returncode == 2, out.stdout + out.stderr
        first = rundir.read_jobs(run)
        assert [r["stage"] for r in first] == ["prepare", "generate"]
        assert "sbatch refused the classify array (4 cells)" in out.stderr
        assert "Requested reservation is invalid" in out.stderr
        assert (f"already submitted in this run: prepare job {first[0]['job_id']} (1 cells); "
                f"generate job {first[1]['job_id']} (2 cells)") in out.stderr
        assert "Traceback" not in out.stderr
        path.write_text(path.read_text().replace('reservation = "no-such-reservation"', ""))
        again = sweep(str(path), "--run-dir", str(run))
        assert again.returncode == 0, again.stderr
        assert "0 done, 3 still queued" in again.stdout
        recs = rundir.read_jobs(run)
        ids = [r["job_id"] for r in first]
        assert [(r["stage"], r["after"]) for r in recs[2:]] == [
            ("classify", ids), ("aggregate", ids + [recs[2]["job_id"]])]
        dep = subprocess.run(["scontrol", "-o", "show", "job", recs[2]["job_id"]],
                             capture_output=True, text=True, timeout=30).stdout
        assert all(f"afterany:{i}" in dep for i in ids), dep
    finally:
        left = [r["job_id"] for r in rundir.read_jobs(run)]
        if left:
            subprocess.run(["scancel", *left], timeout=30)


@needs_cluster
def test_srun_kills_the_other_ranks_when_one_fails(tmp_path):
    """The sweep's srun arguments (--kill-on-bad-exit=1): a crashed rank ends the step instead
    of leaving the others waiting (in NCCL, for 30 minutes)."""
    s = load_sweep(sweep_file(tmp_path, "kill"))
    args = " ".join(slurm.slurm_params(s, "generate", tmp_path)["srun_args"])
    out = tmp_path / "out.txt"
    job = subprocess.run(
        ["sbatch", "--parsable", "-n", "2", "-p", "debug", "-t", "5", "-o", str(out), "--wrap",
         f"srun -n 2 {args} bash -c 'if [ $SLURM_PROCID = 1 ]; then exit 3; fi; "
         "sleep 120; echo rank0 survived'"],
        capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    wait_for(f"job {job} to end", lambda: not subprocess.run(
        ["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=30).stdout.strip(),
        timeout=300)
    text = out.read_text()
    assert "rank0 survived" not in text, text
    assert "exit code 3" in text, text


DATASETS = """
name = "{name}"
profile = "local"
[data.br35h]
phantom = 100
size = 32
[data.lgg]
phantom = 100
size = 32
seed = 1
[classify]
epochs = 1
batch_size = 16
[[classify.cells]]
model = "cnn"
train_data = ["real"]
[[segment.cells]]
train_data = ["real"]
datasets = ["lgg"]
epochs = 1
batch_size = 16
options = {{ channels = [8, 16], strides = [2] }}
[[evaluate]]
name = "ext"
path = "{ext}"
[resources]
partition = "debug"
time_min = 15
array_parallelism = 2
"""


@needs_cluster
@pytest.mark.slow
def test_two_datasets_segment_and_external_set_through_slurm(tmp_path):
    """Two phantom datasets (cell ids br35h/..., lgg/...), a U-Net on one of them and an
    external raw folder with masks: every stage runs as its own array in order, the evaluate
    cells score their dataset's models, and the aggregate has the external columns and the
    segmentation table. A re-run finds nothing to do."""
    import cv2

    from brainhpc.data import phantom

    ext = tmp_path / "ext"
    for p in phantom.generate(24, seed=99):
        folder = ext / ("yes" if p.label else "no")
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / p.name), p.image)
        cv2.imwrite(str(folder / p.name.replace(".png", "_mask.png")), p.mask * 255)
    path = tmp_path / "two.toml"
    path.write_text(DATASETS.format(name="two", ext=ext))
    run = tmp_path / "run"
    out = sweep(str(path), "--run-dir", str(run))
    assert out.returncode == 0, out.stderr
    recs = rundir.read_jobs(run)
    assert [(r["stage"], r["cells"]) for r in recs] == [
        ("prepare", ["br35h", "lgg"]), ("classify", ["br35h/cnn-real-s0", "lgg/cnn-real-s0"]),
        ("segment", ["lgg/unet-real-s0"]), ("evaluate", ["br35h/ext", "lgg/ext"]),
        ("aggregate", ["results"])]
    job = {r["stage"]: r["job_id"] for r in recs}
    assert recs[2]["after"] == [job["prepare"]]  # segment does not wait for classify
    assert recs[3]["after"] == [job["classify"], job["segment"]]
    wait_sweep(run)

    status = sweep("status", str(run))
    assert status.returncode == 0, status.stdout
    for cid in ("br35h", "lgg", "br35h/cnn-real-s0", "lgg/unet-real-s0", "lgg/ext", "results"):
        assert re.search(rf"^\w+ +{re.escape(cid)} +done ", status.stdout, re.M), status.stdout
    assert status.stdout.strip().splitlines()[-1] == "8 done"
    assert (run / "prepare" / "lgg" / "prepared" / "manifest.json").exists()
    lgg = json.loads((run / "evaluate" / "lgg" / "ext" / "summary.json").read_text())
    assert [s["cell"] for s in lgg["scored"]["classify"]] == ["lgg/cnn-real-s0"]
    assert [s["cell"] for s in lgg["scored"]["segment"]] == ["lgg/unet-real-s0"]
    assert lgg["not_finished"] == [] and lgg["dataset"] == "lgg"
    br35h = json.loads((run / "evaluate" / "br35h" / "ext" / "summary.json").read_text())
    assert [s["cell"] for s in br35h["scored"]["classify"]] == ["br35h/cnn-real-s0"]
    assert br35h["scored"]["segment"] == []
    scores = run / "evaluate" / "lgg" / "ext" / "segment" / "lgg" / "unet-real-s0"
    assert json.loads((scores / "metrics.json").read_text())["n"] == 24

    rows = list(csv.DictReader((run / "results" / "metrics.csv").open()))
    cnn = {r["cell"]: r for r in rows if r["model"] == "cnn"}
    assert set(cnn) == {"br35h/cnn-real-s0", "lgg/cnn-real-s0"}
    for cid, r in cnn.items():
        assert r["dataset"] == cid.split("/")[0] and r["status"] == "done", r
        assert 0.0 <= float(r["ext_balanced_accuracy"]) <= 1.0 and r["ext_n"] == "24", r
    seg = list(csv.DictReader((run / "results" / "segmentation.csv").open()))
    assert [(r["dataset"], r["cell"], r["status"]) for r in seg] == [
        ("lgg", "lgg/unet-real-s0", "done")]
    assert 0.0 <= float(seg[0]["ext_dice_patient"]) <= 1.0
    table = (run / "results" / "table.md").read_text()
    assert "### br35h: test split" in table and "### lgg: test split" in table
    assert "ext: bal. acc" in table and "ext: Dice per patient" in table
    assert "empty: Dice" not in table and "intensity: Dice" not in table  # baselines, not sets
    again = sweep("aggregate", str(run))  # the same files, here and now
    assert again.returncode == 0 and "1 segment rows" in again.stdout, again.stderr

    rerun = sweep(str(path), "--run-dir", str(run))
    assert rerun.returncode == 0 and "nothing to submit" in rerun.stdout, rerun.stderr
