"""Sweep files: validation naming the key, matrix expansion with stable ids, run-dir rules,
re-run selection, sbatch scripts against golden files (submitit's own test style)."""

import json
import os
import re
import sys
from pathlib import Path

import pytest

from brainhpc.errors import BrainhpcError
from brainhpc.sweep import submit as sub
from brainhpc.sweep.cells import expand
from brainhpc.sweep.cli import dry_run, main
from brainhpc.sweep.config import REPO, load_sweep

GOLDEN = Path(__file__).parent / "golden"

TINY = """
name = "tiny"
[data]
phantom = 100
size = 32
[generate]
archs = ["vae"]
epochs = 1
[[classify.cells]]
model = "cnn"
train_data = ["real", "synthetic:vae"]
[[classify.cells]]
model = "vae"
techniques = ["giaem", "dbscan"]
train_data = ["real"]
seeds = [0, 1]
"""


def write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_expand_gives_stable_ids_and_layout(tmp_path):
    sweep = load_sweep(write(tmp_path, TINY))
    plan = expand(sweep, tmp_path / "run")
    assert [c.id for c in plan["prepare"]] == ["data"]
    assert [c.id for c in plan["generate"]] == ["vae-healthy", "vae-tumour"]
    assert [c.id for c in plan["classify"]] == [
        "cnn-real-s0", "cnn-synthetic_vae-s0", "vae-giaem-real-s0", "vae-giaem-real-s1",
        "vae-dbscan-real-s0", "vae-dbscan-real-s1"]
    assert plan["generate"][0].folder == (tmp_path / "run" / "generate" / "vae-healthy").resolve()
    # the same file expands to the same hashes; a changed value changes only that cell's hash
    again = expand(load_sweep(write(tmp_path, TINY)), tmp_path / "run")
    assert [c.hash for c in again["classify"]] == [c.hash for c in plan["classify"]]
    changed = expand(load_sweep(write(tmp_path, TINY.replace("epochs = 1", "epochs = 2"))),
                     tmp_path / "run")
    assert [c.hash for c in changed["generate"]] != [c.hash for c in plan["generate"]]
    assert [c.hash for c in changed["classify"]] == [c.hash for c in plan["classify"]]


@pytest.mark.parametrize(("old", "new", "message"), [
    ("epochs = 1", "epochz = 1", "unknown key generate.epochz"),
    ('archs = ["vae"]', 'archs = ["vae", "stylegan"]', "unknown generator 'stylegan'"),
    ('"synthetic:vae"', '"synthetic:dcgan"', "needs generator 'dcgan'"),
    ('"dbscan"', '"kmeans"', "unknown technique 'kmeans'"),
    ("size = 32", 'size = "big"', "data.size must be int"),
    ("phantom = 100", "phantom = 0", "data.phantom must be >= 1"),
    ('model = "cnn"', 'model = "resnet"', "unknown model 'resnet'"),
    ("[data]", "[resources]\ncpus_per_tusk = 2\n[data]", "unknown key resources.cpus_per_tusk"),
    ("[data]", "[resources.generate]\nmem_gb = -1\n[data]", "resources.generate.mem_gb"),
    ("[data]", "[container]\nimage = 'x.sif'\n[data]", "unknown key container.image"),
    ("[generate]", "[generate.options.vae]\nlatentz = 3\n[generate]", None),
])
def test_bad_sweep_files_name_the_key(tmp_path, old, new, message):
    assert old in TINY
    path = write(tmp_path, TINY.replace(old, new, 1))
    with pytest.raises(BrainhpcError) as err:
        expand(load_sweep(path), tmp_path / "run")
    if message:
        assert message in str(err.value)
    if "generate.options" in new:
        assert "latentz" in str(err.value)


def test_missing_data_and_profile_are_clear(tmp_path):
    with pytest.raises(BrainhpcError, match="data.path .* is not a folder"):
        load_sweep(write(tmp_path, TINY.replace("phantom = 100", 'path = "nowhere"')))
    with pytest.raises(BrainhpcError, match="profile 'mars' not found.*local"):
        load_sweep(write(tmp_path, 'profile = "mars"\n' + TINY))
    with pytest.raises(BrainhpcError, match="does not exist"):
        load_sweep(tmp_path / "absent.toml")


def test_shipped_sweep_files_validate():
    for name in ("smoke", "paper", "full"):
        sweep = load_sweep(REPO / "jobs" / f"{name}.toml", data=REPO / "slurm")
        plan = expand(sweep, Path("/tmp/unused"))
        assert plan["generate"] and plan["classify"], name
    paper = expand(load_sweep(REPO / "jobs" / "paper.toml", data=REPO / "slurm"), Path("/x"))
    ids = {c.id for c in paper["classify"]}
    for tech in ("giaem", "dbscan", "kmeans-single", "kmeans-global"):
        for train in ("real", "synthetic_vae", "mixed_dcgan"):
            assert f"vae-{tech}-{train}-s0" in ids
    assert {"cnn-real-s0", "cnn-synthetic_dcgan-s0", "cnn-mixed_vae-s0"} <= ids


def test_run_dir_of_another_sweep_is_refused(tmp_path):
    a = load_sweep(write(tmp_path, TINY, "a.toml"))
    b = load_sweep(write(tmp_path, TINY.replace('"tiny"', '"other"'), "b.toml"))
    run = tmp_path / "run"
    sub.claim_run_dir(a, run, force=False)
    sub.claim_run_dir(a, run, force=False)  # the same sweep again: fine
    with pytest.raises(BrainhpcError, match="created by sweep 'tiny'.*--force"):
        sub.claim_run_dir(b, run, force=False)
    sub.claim_run_dir(b, run, force=True)
    assert json.loads((run / "sweep.json").read_text())["name"] == "other"


def test_todo_skips_done_and_queued_and_refuses_changed(tmp_path):
    sweep = load_sweep(write(tmp_path, TINY))
    run = tmp_path / "run"
    plan = expand(sweep, run)
    stages = ["prepare", "generate", "classify", "aggregate"]
    cells, skipped = sub.todo(plan, run, stages, False, {})
    assert sum(map(len, cells.values())) == 1 + 2 + 6 + 1
    done = plan["generate"][0]
    done.marker.parent.mkdir(parents=True)
    done.marker.write_text(json.dumps({"status": "done", "config_hash": done.hash}))
    failed = plan["classify"][0]
    failed.marker.parent.mkdir(parents=True)
    failed.marker.write_text(json.dumps({"status": "failed", "config_hash": failed.hash}))
    (run / "jobs.json").write_text(json.dumps([{"stage": "classify", "job_id": "77",
                                                "executor": "slurm",
                                                "cells": [c.id for c in plan["classify"]]}]))
    cells, skipped = sub.todo(plan, run, stages, False, {"77_1": "PENDING"})
    assert skipped["done"] == ["generate/vae-healthy"]
    assert skipped["queued"] == ["classify/cnn-synthetic_vae-s0 (job 77_1 PENDING)"]
    assert [c.id for c in cells["generate"]] == ["vae-tumour"]
    assert "cnn-real-s0" in [c.id for c in cells["classify"]]  # failed: submitted again
    done.marker.write_text(json.dumps({"status": "done", "config_hash": "stale"}))
    with pytest.raises(BrainhpcError, match="config changed.*generate/vae-healthy.*--force"):
        sub.todo(plan, run, stages, False, {})
    cells, _ = sub.todo(plan, run, stages, True, {})
    assert len(cells["generate"]) == 2


def test_arrays_split_at_max_array_size(tmp_path):
    plan = expand(load_sweep(write(tmp_path, TINY)), tmp_path)
    parts = sub.chunks(plan["classify"], 4)
    assert [len(p) for p in parts] == [4, 2]
    assert [c.id for p in parts for c in p] == [c.id for c in plan["classify"]]


def test_no_sbatch_on_path_suggests_local(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM client here
    rc = main([str(write(tmp_path, TINY)), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "sbatch is not on PATH" in err and "--executor local" in err
    assert "make cluster-up" in err
    assert not (tmp_path / "run" / "jobs.json").exists()


def _normalise(text: str, run_dir: Path) -> str:
    text = text.replace(str(run_dir), "RUN_DIR")
    return text.replace(sys.executable, "PYTHON")


@pytest.mark.parametrize("case", ["smoke", "gpu-cluster"])
def test_sbatch_scripts_match_golden(tmp_path, case):
    """The generated sbatch scripts, paths normalised; UPDATE_GOLDEN=1 rewrites the files."""
    if case == "smoke":
        sweep = load_sweep(REPO / "jobs" / "smoke.toml")
    else:  # a GPU site: DDP tasks per GPU, apptainer prefix, module setup lines
        sweep = load_sweep(REPO / "jobs" / "smoke.toml", profile="gpu-cluster",
                           partition="gpu")
    run = tmp_path / "run"
    plan = expand(sweep, run)
    text = _normalise(dry_run(sweep, plan, run.resolve(), ["prepare", "generate", "classify",
                                                           "aggregate"]), run.resolve())
    text = re.sub(r"^sweep smoke \(.*?\)", "sweep smoke (SWEEP_FILE)", text)
    golden = GOLDEN / f"sweep-{case}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text + "\n")
    assert text + "\n" == golden.read_text(), f"differs from {golden} (UPDATE_GOLDEN=1 to accept)"
    if case == "gpu-cluster":
        assert "apptainer exec --nv --bind $PWD /shared/containers/brainhpc.sif python -u -m " \
               "submitit.core._submit" in text
        assert "#SBATCH --gpus-per-node=4" in text and "#SBATCH --ntasks-per-node=4" in text
        assert "module load apptainer" in text
