"""Sweep files: validation naming the key, matrix expansion with stable ids, run-dir rules,
re-run selection, sbatch scripts against golden files (submitit's own test style)."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import submitit

from brainhpc.errors import BrainhpcError
from brainhpc.stages import NAMES as STAGES
from brainhpc.stages import TABLE
from brainhpc.sweep import rundir, slurm
from brainhpc.sweep.cli import dry_run, main
from brainhpc.sweep.config import load_sweep
from brainhpc.sweep.plan import expand
from brainhpc.sweep.resources import REPO

GOLDEN = Path(__file__).parent / "golden"

TINY = """
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
        "cnn-real-s0", "cnn-synthetic_vae-s0", "vae-real-s0", "vae-real-s1"]
    assert plan["classify"][2].params["techniques"] == ["giaem", "dbscan"]  # one VAE, both
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
    ("phantom = 100", "phantom = 0", "prepare/data: phantom must be an integer >= 10"),
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
        load_sweep(write(tmp_path, TINY.replace('"local"', '"mars"')))
    with pytest.raises(BrainhpcError, match="does not exist"):
        load_sweep(tmp_path / "absent.toml")


def paper_sweep(home: Path, monkeypatch, **kw):
    """jobs/paper.toml (make submit-all) with its data folders under a stand-in $HOME."""
    monkeypatch.setenv("HOME", str(home))
    for folder in ("br35h", "lgg-flair", "brain-tumor-mri/Training"):
        (home / "data" / folder).mkdir(parents=True, exist_ok=True)
    return load_sweep(REPO / "jobs" / "paper.toml", **kw)


def test_shipped_sweep_files_validate(tmp_path, monkeypatch):
    for name in ("smoke", "full"):
        sweep = load_sweep(REPO / "jobs" / f"{name}.toml", data=REPO / "slurm")
        plan = expand(sweep, Path("/tmp/unused"))
        assert plan["generate"] and plan["classify"], name
    paper = expand(paper_sweep(tmp_path, monkeypatch), Path("/x"))
    ids = {c.id for c in paper["classify"]}
    for fold in range(5):  # every arm on every fold of the cross-validation
        for train in ("real", "synthetic_ldm", "mixed_vae"):
            assert {f"br35h/f{fold}/vae-{train}-s0", f"lgg/f{fold}/vae-{train}-s0"} <= ids
    vae = next(c for c in paper["classify"] if c.id == "br35h/f0/vae-real-s0")
    assert vae.params["techniques"] == ["giaem", "dbscan", "kmeans-single", "kmeans-global"]
    assert {"br35h/f0/cnn-real-s2", "lgg/f3/cnn-synthetic_ddpm-s0",
            "br35h/f4/cnn-mixed_ldm-s1"} <= ids


def test_run_dir_of_another_sweep_is_refused(tmp_path):
    a = load_sweep(write(tmp_path, TINY, "a.toml"))
    b = load_sweep(write(tmp_path, TINY.replace('"tiny"', '"other"'), "b.toml"))
    run = tmp_path / "run"
    rundir.claim_run_dir(a, run, force=False)
    rundir.claim_run_dir(a, run, force=False)  # the same sweep again: fine
    with pytest.raises(BrainhpcError, match="created by sweep 'tiny'.*--force"):
        rundir.claim_run_dir(b, run, force=False)
    rundir.claim_run_dir(b, run, force=True)
    assert json.loads((run / "sweep.json").read_text())["name"] == "other"


def test_todo_skips_done_and_queued_and_refuses_changed(tmp_path):
    sweep = load_sweep(write(tmp_path, TINY))
    run = tmp_path / "run"
    plan = expand(sweep, run)
    stages = ["prepare", "generate", "classify", "aggregate"]
    cells, skipped, waiting = rundir.todo(plan, run, stages, False, {})
    assert sum(map(len, cells.values())) == 1 + 2 + 4 + 1
    assert not any(waiting.values())
    done = plan["generate"][0]
    done.marker.parent.mkdir(parents=True)
    done.marker.write_text(json.dumps({"status": "done", "config_hash": done.hash}))
    failed = plan["classify"][0]
    failed.marker.parent.mkdir(parents=True)
    failed.marker.write_text(json.dumps({"status": "failed", "config_hash": failed.hash}))
    (run / "jobs.json").write_text(json.dumps([{"stage": "classify", "job_id": "77",
                                                "executor": "slurm",
                                                "cells": [c.id for c in plan["classify"]]}]))
    cells, skipped, waiting = rundir.todo(plan, run, stages, False, {"77_1": "PENDING"})
    assert skipped["done"] == ["generate/vae-healthy"]
    assert skipped["queued"] == ["classify/cnn-synthetic_vae-s0 (job 77_1 PENDING)"]
    assert waiting["classify"] == ["77"]  # later stages (aggregate) wait for it
    assert [c.id for c in cells["generate"]] == ["vae-tumour"]
    assert "cnn-real-s0" in [c.id for c in cells["classify"]]  # failed: submitted again
    done.marker.write_text(json.dumps({"status": "done", "config_hash": "stale"}))
    with pytest.raises(BrainhpcError, match="config changed.*generate/vae-healthy.*--force"):
        rundir.todo(plan, run, stages, False, {})
    cells, _, _ = rundir.todo(plan, run, stages, True, {})
    assert len(cells["generate"]) == 2


def test_arrays_split_at_max_array_size(tmp_path):
    plan = expand(load_sweep(write(tmp_path, TINY)), tmp_path)
    parts = rundir.chunks(plan["classify"], 3)
    assert [len(p) for p in parts] == [3, 1]
    assert [c.id for p in parts for c in p] == [c.id for c in plan["classify"]]


def test_no_sbatch_on_path_suggests_local(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM client here
    rc = main([str(write(tmp_path, TINY)), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "sbatch is not on PATH" in err and "--executor local" in err
    assert "make cluster-up" in err
    assert not (tmp_path / "run" / "jobs.json").exists()


def _normalise(text: str, run_dir: Path, data: Path | None = None) -> str:
    text = text.replace(str(run_dir), "RUN_DIR")
    if data is not None:
        text = text.replace(str(data), "DATA_DIR")
    return text.replace(sys.executable, "PYTHON")


STUDY = GOLDEN / "study.toml"  # a frozen copy of jobs/smoke.toml


def _golden_sweep(case: str, tmp_path: Path, monkeypatch):
    """(sweep, data dir) of each golden case."""
    if case == "local":  # the local CPU profile
        return load_sweep(STUDY), None
    if case == "gpu-cluster":  # make submit-all: the paper sweep on the GPU profile
        return paper_sweep(tmp_path, monkeypatch, profile="gpu-cluster"), tmp_path / "data"
    if case == "cpu-cluster":
        return load_sweep(STUDY, profile="cpu-cluster"), None
    if case.startswith("datasets"):  # several datasets, segment and evaluate stages
        ext = tmp_path / "external"
        ext.mkdir()
        text = (GOLDEN / "datasets.toml").read_text().replace("EXT_DIR", str(ext))
        profile = "gpu-cluster" if case == "datasets-gpu" else None
        return load_sweep(write(tmp_path, text, "datasets.toml"), profile=profile), ext
    # packed: small classify cells three to an array task, on the local profile
    text = STUDY.read_text() + "\n[resources.classify]\ncells_per_task = 3\n"
    return load_sweep(write(tmp_path, text, "study.toml")), None


def _scripts(sweep, plan, run: Path, data: Path | None) -> dict[str, str]:
    """stage -> its sbatch script as --dry-run prints it, paths normalised."""
    out = {}
    for stage in STAGES:
        if not plan[stage]:
            continue
        r = sweep.resources[stage]
        before = [s for s in TABLE[stage].after if plan[s]]
        dep = f"afterany:<{', '.join(before)} job ids>" if before else None
        script = slurm.sbatch_script(sweep, stage, run, -(-len(plan[stage]) // r.cells_per_task),
                                     dep)
        out[stage] = _normalise(script.rstrip("\n") + "\n", run, data)
    return out


@pytest.mark.parametrize("case", ["local", "gpu-cluster", "cpu-cluster", "packed", "datasets",
                                  "datasets-gpu"])
def test_sbatch_scripts_match_golden(tmp_path, monkeypatch, case):
    """Each stage's sbatch script, one golden file each (tests/golden/sbatch/<case>/<stage>.sh),
    paths normalised; UPDATE_GOLDEN=1 rewrites the files."""
    sweep, data = _golden_sweep(case, tmp_path, monkeypatch)
    run = (tmp_path / "run").resolve()
    plan = expand(sweep, run)
    scripts = _scripts(sweep, plan, run, data)
    folder = GOLDEN / "sbatch" / case
    if os.environ.get("UPDATE_GOLDEN"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for stage, script in scripts.items():
            (folder / f"{stage}.sh").write_text(script)
    assert sorted(p.stem for p in folder.glob("*.sh")) == sorted(scripts)
    for stage, script in scripts.items():
        golden = folder / f"{stage}.sh"
        assert script == golden.read_text(), f"differs from {golden} (UPDATE_GOLDEN=1 to accept)"
    text = _normalise(dry_run(sweep, plan, run, list(STAGES)), run, data)
    for stage, script in scripts.items():
        assert "#SBATCH --requeue" in script and "--kill-on-bad-exit=1" in script, stage
        assert "--wckey" not in script, stage  # only when a profile sets wckey
        assert re.search(r"^srun .*--cpus-per-task=\d+ ", script, re.M), stage
        assert 'scontrol requeue "$task"' in script.split("# teardown")[1], stage
        assert script.rstrip() in text, stage  # --dry-run prints these very scripts
    if case == "gpu-cluster":
        for stage in ("generate", "classify", "segment"):
            assert "#SBATCH --gpus-per-node=1\n" in scripts[stage]
            assert "#SBATCH --partition=gpu\n" in scripts[stage]
            assert "#SBATCH --ntasks-per-node=1\n" in scripts[stage]
        for stage in ("prepare", "aggregate"):
            assert "--gpus" not in scripts[stage] and "#SBATCH --partition=cpu\n" in scripts[stage]
        assert "apptainer exec --nv --bind RUN_DIR,DATA_DIR/br35h:DATA_DIR/br35h:ro," \
               "DATA_DIR/lgg-flair:DATA_DIR/lgg-flair:ro" in text
        assert "module load apptainer" in text and "device: cuda" in text
        # the short GPU cells are packed (5 folds): 540 classify cells 4 to a task, 180
        # segment cells 3
        assert "#SBATCH --array=0-134%8\n" in scripts["classify"]
        assert "#SBATCH --array=0-59%8\n" in scripts["segment"]
        assert "#SBATCH --array=0-99%8\n" in scripts["generate"]  # long: one per task
        assert "cells_per_task=4" in text and "cells_per_task=3" in text
    if case == "packed":
        assert "#SBATCH --array=0-1%2" in scripts["classify"]  # 6 cells, 3 per task
    if case.startswith("datasets"):
        assert list(scripts) == list(STAGES)
        assert "  lgg/unet-mixed_vae-s0 " in text and "  br35h/external " in text
        assert "#SBATCH --dependency='afterany:<prepare, generate job ids>'" in scripts["segment"]
        assert "#SBATCH --dependency='afterany:<classify, segment job ids>'" in \
            scripts["evaluate"]
        assert "#SBATCH --array=0-1%" in scripts["evaluate"]  # one cell per dataset
        assert "#SBATCH --mem=512M\n" in scripts["evaluate"]
    if case == "datasets-gpu":
        assert "#SBATCH --gpus-per-node=1\n" in scripts["segment"]
        assert "--gpus" not in scripts["evaluate"]
        assert "#SBATCH --partition=cpu\n" in scripts["evaluate"]
        assert "--bind RUN_DIR,DATA_DIR:DATA_DIR:ro /shared" in text  # the external set


def test_gpu_profile_partitions_and_overrides(tmp_path, monkeypatch):
    """GPU stages take GPUs on the GPU partition, CPU stages none on the CPU partition;
    --partition moves only the GPU stages, --cpu-partition only the CPU ones."""
    s = paper_sweep(tmp_path, monkeypatch)
    paper = REPO / "jobs" / "paper.toml"
    assert s.profile == "gpu-cluster"
    got = {st: (r.partition, r.gpus_per_node, r.tasks, s.device(st))
           for st, r in s.resources.items()}
    assert got == {"prepare": ("cpu", 0, 1, "cpu"), "generate": ("gpu", 1, 1, "cuda"),
                   "classify": ("gpu", 1, 1, "cuda"), "segment": ("gpu", 1, 1, "cuda"),
                   "evaluate": ("cpu", 0, 1, "cpu"), "aggregate": ("cpu", 0, 1, "cpu")}
    s = load_sweep(paper, partition="a100", cpu_partition="short")
    assert {st: r.partition for st, r in s.resources.items()} == {
        "prepare": "short", "generate": "a100", "classify": "a100", "segment": "a100",
        "evaluate": "short", "aggregate": "short"}
    # the file's per-stage partition of a CPU stage is that stage's own
    text = paper.read_text() + '[resources.aggregate]\npartition = "login"\n'
    s = load_sweep(write(tmp_path, text))
    assert s.resources["aggregate"].partition == "login"
    assert s.resources["prepare"].partition == "cpu"
    # no GPUs in the profile: GPU stages run on the CPU
    assert load_sweep(write(tmp_path, TINY)).device("generate") == "cpu"


SITE = """
name = "site"
cluster = "brainhpc"
setup = ["module load x"]
[resources]
partition = "gpu"
cpu_partition = "debug"
gpus_per_node = 2
gpu_type = "a100"
qos = "high"
constraint = "a100&ib"
exclude = "node07"
reservation = "course"
account = "proj"
wckey = "mri"
max_num_timeout = 5
slurm_extra = { mail-type = "FAIL", exclusive = true }
srun_args = ["--mpi=none"]
[container]
prefix = "apptainer exec --nv --bind {binds} /img.sif"
binds = ["/scratch"]
"""


def test_site_knobs_reach_the_sbatch_script(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAINHPC_CACHE", str(tmp_path / "cache"))
    write(tmp_path, SITE, "site.toml")
    s = load_sweep(write(tmp_path, TINY.replace('"local"', '"site.toml"')))
    gen = slurm.sbatch_script(s, "generate", tmp_path / "run", 2)
    for line in ("--gpus-per-node=a100:2", "--ntasks-per-node=2", "--qos=high",
                 "--constraint='a100&ib'", "--exclude=node07", "--reservation=course",
                 "--account=proj", "--wckey=mri", "--mail-type=FAIL", "--exclusive",
                 "--partition=gpu"):
        assert f"#SBATCH {line}\n" in gen, line
    assert "--cpus-per-task=1 --kill-on-bad-exit=1 --mpi=none " in gen
    assert f"--bind {tmp_path}/run,{tmp_path / 'cache'},/scratch /img.sif python" in gen
    prep = slurm.sbatch_script(s, "prepare", tmp_path / "run", 1)
    assert "#SBATCH --partition=debug\n" in prep and "gpus" not in prep
    assert s.resources["generate"].max_num_timeout == 5
    gres = load_sweep(write(tmp_path, TINY.replace('"local"', '"site.toml"')
                            + '[resources.classify]\ngpu_flag = "gres"\n'))
    assert "#SBATCH --gres=gpu:a100:2\n" in slurm.sbatch_script(gres, "classify", tmp_path, 1)


def test_memory_grows_with_the_gpus_of_a_cell(tmp_path, monkeypatch):
    """mem_gb_per_gpu: a GPU stage asks for max(mem_gb, mem_gb_per_gpu x gpus_per_node); CPU
    stages keep mem_gb. gpu-cluster.toml sets 32 per GPU: one GPU 32G, four GPUs 128G."""
    s = paper_sweep(tmp_path, monkeypatch)
    assert {st: r.mem for st, r in s.resources.items()} == {
        "prepare": 32, "generate": 32, "classify": 32, "segment": 32, "evaluate": 32,
        "aggregate": 8}
    text = (REPO / "jobs" / "paper.toml").read_text() + (
        "[resources.generate]\ngpus_per_node = 4\n"
        "[resources.segment]\ngpus_per_node = 2\ncells_per_task = 1\nmem_gb = 100\n")
    s = load_sweep(write(tmp_path, text))
    run = tmp_path / "run"
    gen = slurm.sbatch_script(s, "generate", run, 2)
    assert "#SBATCH --mem=128G\n" in gen and "#SBATCH --ntasks-per-node=4\n" in gen
    assert "#SBATCH --mem=100G\n" in slurm.sbatch_script(s, "segment", run, 2)  # the larger
    assert "#SBATCH --mem=32G\n" in slurm.sbatch_script(s, "prepare", run, 1)
    half = load_sweep(write(tmp_path, TINY + "[resources]\ngpus_per_node = 2\nmem_gb = 1\n"
                            "mem_gb_per_gpu = 1.5\n"))
    assert "#SBATCH --mem=3G\n" in slurm.sbatch_script(half, "generate", run, 1)
    assert "#SBATCH --mem=1G\n" in slurm.sbatch_script(half, "prepare", run, 1)
    with pytest.raises(BrainhpcError, match="resources.mem_gb_per_gpu must be >= 0"):
        load_sweep(write(tmp_path, TINY + "[resources]\nmem_gb_per_gpu = -1\n"))


def test_nccl_knobs_are_exported_in_gpu_stages_only(tmp_path, monkeypatch):
    """nccl_p2p_disable / nccl_debug: opt-in export lines in the setup of the stages with GPUs
    (before the profile's own lines); nothing when unset; a typo is refused."""
    s = paper_sweep(tmp_path, monkeypatch)
    run = tmp_path / "run"
    assert "NCCL" not in slurm.sbatch_script(s, "generate", run, 1)
    text = (REPO / "jobs" / "paper.toml").read_text() + (
        '[resources]\nnccl_p2p_disable = true\nnccl_debug = "INFO"\n'
        '[resources.classify]\nnccl_debug = "WARN"\n')
    s = load_sweep(write(tmp_path, text))
    gen = slurm.sbatch_script(s, "generate", run, 1)
    setup = gen.split("# setup\n")[1].split("\n\n")[0].splitlines()
    assert setup[4:7] == ["export NCCL_P2P_DISABLE=1", "export NCCL_DEBUG=INFO", "module purge"]
    assert "export NCCL_DEBUG=WARN\n" in slurm.sbatch_script(s, "classify", run, 1)
    for stage in ("prepare", "evaluate", "aggregate"):
        assert "NCCL" not in slurm.sbatch_script(s, stage, run, 1), stage
    assert "NCCL_P2P_DISABLE=1 NCCL_DEBUG=INFO" in dry_run(s, expand(s, run), run, ["generate"])
    with pytest.raises(BrainhpcError, match="resources.nccl_debug must be one of VERSION, WARN, "
                                            "INFO, TRACE"):
        load_sweep(write(tmp_path, TINY + '[resources]\nnccl_debug = "info"\n'))
    with pytest.raises(BrainhpcError, match="resources.nccl_p2p_disable must be bool"):
        load_sweep(write(tmp_path, TINY + "[resources]\nnccl_p2p_disable = 1\n"))


def test_container_volumes_for_podman(tmp_path):
    data = tmp_path / "raw"
    data.mkdir()
    text = TINY.replace("phantom = 100", f'path = "{data}"') + \
        '[container]\nprefix = "podman run --rm {volumes} img"\n'
    s = load_sweep(write(tmp_path, text))
    assert slurm.python_command(s, tmp_path / "run") == (
        f"podman run --rm -v {tmp_path}/run:{tmp_path}/run -v {data}:{data}:ro img python")


@pytest.mark.parametrize(("where", "text", "message"), [
    ("[resources]", "nodes = 2", "multi-node cells are not supported"),
    ("[resources]", 'slurm_extra = { partition = "x" }', "use resources.partition"),
    ("[resources]", 'slurm_extra = { array = "0-3" }', "use resources.array_parallelism"),
    ("[resources]", 'gpu_flag = "gpus"', "gpu_flag must be one of"),
    ("[resources]", 'gpu_type = "a100"', "gpu_type = 'a100' needs gpus_per_node"),
    ("[resources.classify]", "cells_per_task = 2\ngpus_per_node = 2",
     "cells_per_task = 2 packs small"),
    ("[resources]", "max_num_timeout = -1", "resources.max_num_timeout must be >= 0"),
    ("[resources]", 'srun_args = "--x"\nqos = 3', "resources.qos must be str"),
    ("[container]", 'prefix = "apptainer exec --bind {bind} i"', "unknown placeholder {bind}"),
    ("[classify.options]", 'device = "cpu"', "device': the sweep sets it from the resources"),
])
def test_bad_site_knobs_name_the_key(tmp_path, where, text, message):
    path = write(tmp_path, TINY + f"\n{where}\n{text}\n")
    with pytest.raises(BrainhpcError, match=re.escape(message)):
        expand(load_sweep(path), tmp_path / "run")


INFO = {"cluster": "prod", "max_array_size": 1001, "partitions": slurm.parse_sinfo(
    "gpu|2-00:00:00|gpu:a100:4(S:0-1)\ngpu|2-00:00:00|gpu:v100:2\ncpu*|04:00:00|(null)\n")}


def test_sinfo_parsing():
    assert INFO["partitions"] == {
        "gpu": {"max_time_min": 2880, "gpus": {"a100": 4, "v100": 2, "": 4}},
        "cpu": {"max_time_min": 240, "gpus": {}}}
    assert [slurm.parse_minutes(t) for t in ("infinite", "1-00:00:00", "30:00", "2:00:00", "45",
                                           "1-12", "30:30")] == [None, 1440, 30, 120, 45,
                                                                 2160, 30]


def test_cluster_check_lists_every_problem(tmp_path, monkeypatch):
    ok = paper_sweep(tmp_path, monkeypatch)  # gpu-cluster: gpu + cpu
    slurm.check_cluster(ok, ["prepare", "generate", "classify", "aggregate"], INFO)
    text = (REPO / "jobs" / "paper.toml").read_text() + (
        "[resources.generate]\ngpus_per_node = 8\n[resources.classify]\ngpus_per_node = 1\n"
        'gpu_type = "h100"\n[resources.prepare]\ntime_min = 300\n[resources.aggregate]\n'
        'partition = "nope"\n')
    bad = load_sweep(write(tmp_path, text))
    with pytest.raises(BrainhpcError) as err:
        slurm.check_cluster(bad, ["prepare", "generate", "classify", "aggregate"], INFO)
    msg = str(err.value)
    assert "resources.prepare.time_min = 300 exceeds the MaxTime of partition 'cpu' (240 min)" \
        in msg
    assert "resources.generate.gpus_per_node = 8: partition 'gpu' has at most 4 GPUs" in msg
    assert "resources.classify.gpus_per_node = 1: partition 'gpu' has at most 0 GPUs of " \
           "type 'h100'" in msg and "a100: 4" in msg
    assert "resources.aggregate: partition 'nope'" in msg and "sinfo lists: cpu, gpu" in msg
    local = load_sweep(write(tmp_path, TINY))
    with pytest.raises(BrainhpcError, match="profile 'local' is written for cluster 'brainhpc'"
                       ", this is cluster 'prod'"):
        slurm.check_cluster(local, ["generate"], {**INFO, "partitions": {"debug": {
            "max_time_min": None, "gpus": {}}}})


def test_slurm_needs_a_named_profile(tmp_path, capsys):
    path = write(tmp_path, TINY.replace('profile = "local"\n', ""))
    assert main([str(path), "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 2
    assert "--executor slurm needs a site profile" in capsys.readouterr().err
    assert main([str(path), "--run-dir", str(tmp_path / "run"), "--dry-run",
                 "--executor", "local"]) == 0


def test_image_versions_are_compared_with_this_host(tmp_path):
    fake = tmp_path / "image.sh"
    fake.write_text("#!/bin/sh\necho '{\"brainhpc\": \"0.0.1\", \"submitit\": "
                    f"\"{submitit.__version__}\", \"torch\": \"x\", \"cuda\": \"12.6\"}}'\n")
    text = TINY + f'[container]\nprefix = "sh {fake}"\n'
    s = load_sweep(write(tmp_path, text))
    with pytest.raises(BrainhpcError, match=r"brainhpc 0\.0\.1 in the image, 0\.1\.0 here"):
        slurm.image_versions(s, tmp_path)
    standin = REPO / "tests" / "container_standin.sh"
    text = TINY + f'[container]\nprefix = "bash {standin} --bind {{binds}} {sys.executable}"\n'
    found = slurm.image_versions(load_sweep(write(tmp_path, text)), tmp_path)
    assert found["brainhpc"] == "0.1.0" and found["submitit"] == submitit.__version__
    broken = load_sweep(write(tmp_path, TINY + '[container]\nprefix = "/no/such/apptainer"\n'))
    with pytest.raises(BrainhpcError, match="could not read brainhpc/submitit versions"):
        slurm.image_versions(broken, tmp_path)


def test_dry_run_checks_every_cell_with_its_stage_config(tmp_path, capsys):
    """A value out of bounds fails --dry-run with the bounds the stage itself has (prepare's
    16..1024 px), before anything is submitted; the config's default fills a key left out."""
    path = write(tmp_path, TINY.replace("size = 32", "size = 8"))
    assert main([str(path), "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: prepare/data: size must be an integer in 16..1024, got 8" in err
    assert not (tmp_path / "run").exists()
    plan = expand(load_sweep(write(tmp_path, TINY.replace("size = 32\n", ""))), tmp_path / "r")
    from brainhpc.sweep.plan import stage_config

    assert "size" not in plan["prepare"][0].params
    assert stage_config(plan["prepare"][0]).size == 128  # PrepareConfig's own default


def test_dry_run_says_which_finished_cells_changed(tmp_path, capsys, no_slurm_client):
    from brainhpc.fsio import write_json

    path = write(tmp_path, TINY)
    run = tmp_path / "run"
    plan = expand(load_sweep(path), run)
    same, other = plan["generate"]
    write_json(same.marker, {"status": "done", "config_hash": same.hash})
    write_json(other.marker, {"status": "done", "config_hash": "an earlier config"})
    assert main([str(path), "--run-dir", str(run), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"  {same.id} +\[done\]", out)
    assert re.search(rf"  {other.id} +\[done, config changed: --force\]", out)


def test_generate_steps_per_architecture_beat_the_stage_wide_epochs(tmp_path):
    text = TINY.replace('archs = ["vae"]', 'archs = ["vae", "dcgan"]').replace(
        "epochs = 1\n", "epochs = 1\n[generate.options.vae]\nsteps = 300\nlatent = 16\n", 1)
    plan = expand(load_sweep(write(tmp_path, text)), tmp_path / "run")
    from brainhpc.sweep.plan import stage_config

    by_id = {c.id: stage_config(c) for c in plan["generate"]}
    vae, dcgan = by_id["vae-tumour"], by_id["dcgan-tumour"]
    assert (vae.steps, vae.epochs, vae.options) == (300, None, {"latent": 16})
    assert (dcgan.steps, dcgan.epochs) == (None, 1)


def test_only_the_folds_some_cell_uses_are_prepared(tmp_path):
    text = TINY.replace("size = 32\n", "size = 32\nfolds = 3\n").replace(
        "epochs = 1\n", "epochs = 1\nfolds = [0]\n", 1)
    plan = expand(load_sweep(write(tmp_path, text)), tmp_path / "run")
    assert {c.params.get("fold") for c in plan["generate"]} == {0}
    assert [c.id for c in plan["prepare"]] == ["data/f0", "data/f1", "data/f2"]  # classify: all
    text = text.replace('model = "cnn"\n', 'model = "cnn"\nfolds = [0, 2]\n').replace(
        'model = "vae"\n', 'model = "vae"\nfolds = [2]\n')
    plan = expand(load_sweep(write(tmp_path, text)), tmp_path / "run")
    assert [c.id for c in plan["prepare"]] == ["data/f0", "data/f2"]
    only = expand(load_sweep(write(tmp_path, text.split("[generate]")[0])), tmp_path / "run2")
    assert [c.id for c in only["prepare"]] == ["data/f0", "data/f1", "data/f2"]  # prepare only


def test_the_generator_comparison_file_plans_fold_0_sized_in_steps(tmp_path, monkeypatch):
    """jobs/generators.toml: five architectures x two labels x two datasets on fold 0 only
    (only fold 0 prepared), every cell sized in steps, beside real and synthetic-only arms."""
    paper_sweep(tmp_path, monkeypatch)  # the stand-in $HOME with the data folders
    plan = expand(load_sweep(REPO / "jobs" / "generators.toml"), tmp_path / "run")
    from brainhpc.sweep.plan import stage_config

    assert [c.id for c in plan["prepare"]] == ["br35h/f0", "lgg/f0"]
    gens = [stage_config(c) for c in plan["generate"]]
    assert len(gens) == 20 and all(g.steps and g.epochs is None for g in gens)
    assert {g.steps for g in gens if g.arch == "ldm"} == {3000}
    ids = {c.id for c in plan["segment"]}
    assert {"lgg/f0/unet-real-s0", "lgg/f0/unet-synthetic_ldm-s0"} <= ids and len(ids) == 6


TWO = """
name = "two"
[data.a]
phantom = 100
size = 32
[data.b]
phantom = 100
size = 32
[generate]
archs = ["vae", "ldm"]
steps = 20
arch_datasets = {{ ldm = {ldm} }}
[generate.options.ldm]
ae_steps = 10
[[classify.cells]]
model = "cnn"
train_data = ["real", "synthetic:vae"]
[[classify.cells]]
model = "cnn"
train_data = ["synthetic:ldm"]
datasets = {cnn_ldm}
"""


def test_an_architecture_can_run_on_some_datasets_only(tmp_path):
    text = TWO.format(ldm='["b"]', cnn_ldm='["b"]')
    plan = expand(load_sweep(write(tmp_path, text)), tmp_path / "run")
    assert [c.id for c in plan["generate"]] == [
        "a/vae-healthy", "a/vae-tumour", "b/vae-healthy", "b/vae-tumour", "b/ldm-healthy",
        "b/ldm-tumour"]
    assert "b/cnn-synthetic_ldm-s0" in {c.id for c in plan["classify"]}
    # a synthetic arm on a dataset where its generator does not run is refused, by name
    bad = TWO.format(ldm='["b"]', cnn_ldm='["a", "b"]')
    with pytest.raises(BrainhpcError, match=r"'synthetic:ldm' on dataset 'a' needs ldm "
                                            r"generator cells there.*arch_datasets.ldm is \['b'\]"):
        load_sweep(write(tmp_path, bad))
    for value, why in (('["c"]', "non-empty list of the generate stage's datasets"),
                       ("[]", "non-empty list")):
        with pytest.raises(BrainhpcError, match=why):
            load_sweep(write(tmp_path, TWO.format(ldm=value, cnn_ldm='["b"]')))
    unknown = text.replace("{ ldm = [", "{ dcgan = [").replace(
        'train_data = ["synthetic:ldm"]', 'train_data = ["real"]')
    assert "dcgan = [" in unknown
    with pytest.raises(BrainhpcError, match=r"arch_datasets.dcgan: 'dcgan' is not in "):
        load_sweep(write(tmp_path, unknown))


def test_dry_run_prints_its_plan_when_the_cluster_does_not_answer(tmp_path, capsys,
                                                                  monkeypatch):
    """A SLURM client whose cluster is down: the dry run says so and still succeeds; a real
    submission fails with the cluster's error."""
    import shutil

    from brainhpc.sweep import slurm

    def down():
        raise BrainhpcError("`scontrol show config` failed (1): slurmctld not responding")

    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(slurm, "cluster_info", down)
    path = write(tmp_path, TINY)
    assert main([str(path), "--run-dir", str(tmp_path / "run"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "== generate: 2 cell(s) ==" in out
    assert "not checked against a cluster: it did not answer (`scontrol show config` failed" in out
    assert main([str(path), "--run-dir", str(tmp_path / "run")]) != 0
    assert "slurmctld not responding" in capsys.readouterr().err
    assert not (tmp_path / "run" / "jobs.json").exists()  # nothing submitted
