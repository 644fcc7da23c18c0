"""Sweep files with several datasets ([data.<name>]), segment blocks and [[evaluate]] entries:
validation naming the key, cell ids, params and folders, --data NAME=PATH, re-run selection
(a dataset's evaluate cells and the aggregate follow its new models), status of prefixed ids.
No training here: the stage functions run in test_sweep_external.py and test_sweep_slurm.py."""

import json
import re
from pathlib import Path

import pytest

from brainhpc.errors import BrainhpcError
from brainhpc.stages import NAMES as STAGES
from brainhpc.sweep import rundir, slurm
from brainhpc.sweep.cli import main
from brainhpc.sweep.config import load_sweep
from brainhpc.sweep.plan import Cell, dataset_of, expand, stage_config
from brainhpc.sweep.resources import REPO
from brainhpc.sweep.status import cell_states

MULTI = """
name = "multi"
profile = "local"
[data.br35h]
phantom = 100
size = 32
[data.lgg]
phantom = 80
size = 32
seed = 1
[generate]
archs = ["vae"]
epochs = 1
with_masks = ["lgg"]
[classify]
epochs = 1
[[classify.cells]]
model = "cnn"
train_data = ["real", "synthetic:vae"]
[[classify.cells]]
model = "vae"
techniques = ["giaem"]
train_data = ["real"]
datasets = ["br35h"]
[segment]
epochs = 2
options = { channels = [8, 16], strides = [2] }
[[segment.cells]]
train_data = ["real", "mixed:vae"]
datasets = ["lgg"]
seeds = [0, 1]
[[evaluate]]
name = "ext"
path = "EXT"
labels = ["tumour=yes", "healthy=no"]
"""


def write(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    ext = tmp_path / "ext"
    ext.mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_text(text.replace('"EXT"', f'"{ext}"'))
    return path


def ids(plan, stage):
    return [c.id for c in plan[stage]]


def test_several_datasets_prefix_ids_and_folders(tmp_path):
    sweep = load_sweep(write(tmp_path, MULTI))
    assert sweep.named and sweep.names == ("br35h", "lgg")
    run = tmp_path / "run"
    plan = expand(sweep, run)
    rd = run.resolve()
    assert ids(plan, "prepare") == ["br35h", "lgg"]
    assert ids(plan, "generate") == ["br35h/vae-healthy", "br35h/vae-tumour", "lgg/vae-healthy",
                                     "lgg/vae-tumour"]
    assert ids(plan, "classify") == ["br35h/cnn-real-s0", "br35h/cnn-synthetic_vae-s0",
                                     "br35h/vae-real-s0", "lgg/cnn-real-s0",
                                     "lgg/cnn-synthetic_vae-s0"]
    assert ids(plan, "segment") == ["lgg/unet-real-s0", "lgg/unet-real-s1",
                                    "lgg/unet-mixed_vae-s0", "lgg/unet-mixed_vae-s1"]
    assert ids(plan, "evaluate") == ["br35h/ext", "lgg/ext"]  # one per (dataset, entry)
    assert ids(plan, "aggregate") == ["results"]
    for stage in STAGES[:-1]:
        for cell in plan[stage]:
            assert cell.params["dataset"] == cell.id.split("/")[0] == dataset_of(cell), cell
    # with_masks on lgg's tumour generator only
    masks = {c.id: c.params.get("with_masks") for c in plan["generate"]}
    assert masks == {"br35h/vae-healthy": None, "br35h/vae-tumour": None,
                     "lgg/vae-healthy": None, "lgg/vae-tumour": True}
    # folders and the paths each stage function gets
    prep = stage_config(plan["prepare"][1])
    assert prep.out == rd / "prepare" / "lgg" / "prepared" and prep.seed == 1
    gen = stage_config(plan["generate"][3])
    assert gen.out == rd / "generate" / "lgg" / "vae-tumour" and gen.with_masks is True
    assert gen.data == rd / "prepare" / "lgg" / "prepared"
    cls = stage_config(plan["classify"][1])
    assert cls.out == rd / "classify" / "br35h" / "cnn-synthetic_vae-s0"
    assert cls.synthetic_dir == rd / "generate" / "br35h"
    assert cls.data == rd / "prepare" / "br35h" / "prepared"
    seg = stage_config(plan["segment"][2])
    assert seg.out == rd / "segment" / "lgg" / "unet-mixed_vae-s0"
    assert seg.synthetic_dir == rd / "generate" / "lgg" and seg.epochs == 2
    assert seg.channels == (8, 16) and seg.strides == (2,)
    ev = stage_config(plan["evaluate"][0])
    assert ev.out == rd / "evaluate" / "br35h" / "ext" and ev.dataset == "br35h"
    assert ev.data == tmp_path / "ext" and ev.labels == "tumour=yes healthy=no"
    assert "split" not in plan["evaluate"][0].params  # a raw folder is scored whole


SINGLE = """
name = "single"
profile = "local"
[data]
phantom = 100
size = 32
[generate]
archs = ["vae"]
epochs = 1
with_masks = true
[classify]
epochs = 1
[[classify.cells]]
model = "cnn"
train_data = ["real", "synthetic:vae"]
[[classify.cells]]
model = "vae"
techniques = ["giaem"]
train_data = ["real"]
datasets = ["data"]
[[segment.cells]]
train_data = ["real", "mixed:vae"]
[[evaluate]]
name = "ext"
path = "EXT"
"""


def test_single_data_table_keeps_its_layout_and_hashes(tmp_path):
    """A plain [data]: no prefix, no dataset param (older run directories stay valid)."""
    plan = expand(load_sweep(write(tmp_path, SINGLE)), tmp_path / "run")
    rd = (tmp_path / "run").resolve()
    assert ids(plan, "prepare") == ["data"]
    assert ids(plan, "generate") == ["vae-healthy", "vae-tumour"]
    assert plan["generate"][1].params["with_masks"] is True  # true: every dataset's tumour cell
    assert "with_masks" not in plan["generate"][0].params
    assert ids(plan, "classify") == ["cnn-real-s0", "cnn-synthetic_vae-s0", "vae-real-s0"]
    assert ids(plan, "segment") == ["unet-real-s0", "unet-mixed_vae-s0"]
    assert ids(plan, "evaluate") == ["ext"]
    assert all("dataset" not in c.params for s in STAGES for c in plan[s])
    cnn = plan["classify"][0]
    assert cnn.hash == Cell("classify", "cnn-real-s0", {"model": "cnn", "train_data": "real",
                                                       "seed": 0, "epochs": 1}, cnn.run_dir).hash
    assert stage_config(plan["prepare"][0]).out == rd / "prepare" / "data" / "prepared"
    seg = stage_config(plan["segment"][1])
    assert seg.synthetic_dir == rd / "generate" and seg.data == rd / "prepare" / "data" / \
        "prepared"
    ev = stage_config(plan["evaluate"][0])
    assert ev.out == rd / "evaluate" / "ext" and ev.dataset is None and ev.labels is None


def test_evaluate_entry_on_a_prepared_dataset_and_its_filter(tmp_path):
    prepared = tmp_path / "prep"
    prepared.mkdir()
    (prepared / "manifest.json").write_text("{}")
    text = MULTI + f'[[evaluate]]\nname = "prep"\npath = "{prepared}"\nsplit = "all"\n' \
        'datasets = ["lgg"]\n'
    plan = expand(load_sweep(write(tmp_path, text)), tmp_path / "run")
    assert ids(plan, "evaluate") == ["br35h/ext", "lgg/ext", "lgg/prep"]
    cfg = stage_config(plan["evaluate"][2])
    assert cfg.split == "all" and cfg.labels is None and cfg.data == prepared
    # default split of a prepared set: test
    plan = expand(load_sweep(write(tmp_path, text.replace('split = "all"\n', ""))), tmp_path)
    assert plan["evaluate"][2].params["split"] == "test"


def _swap(old: str, new: str) -> str:
    assert old in MULTI, old
    return MULTI.replace(old, new, 1)


@pytest.mark.parametrize(("text", "message"), [
    (_swap("[data.lgg]", "[data.lgg]\nphantum = 3"), "unknown key data.lgg.phantum"),
    (_swap("[data.br35h]", "[data]\nsize = 64\n[data.br35h]"),
     "data.size beside the dataset table(s) [data.br35h], [data.lgg]"),
    (_swap("[data.lgg]", "[data.'l g']"), "data.l g: 'l g' is not a valid name"),
    (_swap("phantom = 80\n", ""), "[data.lgg] needs exactly one of path or phantom "
                                  "(or pass --data lgg=PATH)"),
    (_swap('with_masks = ["lgg"]', 'with_masks = ["brats"]'),
     "generate.with_masks: 'brats' is not a dataset the generate stage runs on"),
    (_swap('with_masks = ["lgg"]', 'with_masks = ["lgg"]\nlabels = ["healthy"]'),
     "generate.with_masks draws tumour masks, but generate.labels (healthy) has no tumour"),
    (_swap('with_masks = ["lgg"]', 'with_masks = ["lgg"]\ndatasets = ["br35h"]'),
     "generate.with_masks: 'lgg' is not a dataset the generate stage runs on (br35h)"),
    (_swap('with_masks = ["lgg"]', 'with_masks = "lgg"'), "generate.with_masks must be bool or "
                                                         "list"),
    (_swap('datasets = ["br35h"]', 'datasets = ["brats"]'),
     "classify.cells[1].datasets: unknown dataset 'brats'; datasets of this sweep: br35h, lgg"),
    (_swap('datasets = ["br35h"]', "datasets = []"), "classify.cells[1].datasets is empty"),
    (_swap('with_masks = ["lgg"]', 'with_masks = ["lgg"]\ndatasets = ["lgg"]'),
     "classify.cells[0].train_data: 'synthetic:vae' on dataset 'br35h' needs generate cells "
     "there, but generate.datasets is ['lgg']"),
    (_swap('with_masks = ["lgg"]', "with_masks = false"),
     "segment.cells[0].train_data: 'mixed:vae' on dataset 'lgg' trains a segmenter on "
     "synthetic tumour images, which need masks: set generate.with_masks"),
    (_swap('train_data = ["real", "mixed:vae"]', 'train_data = ["mixed:dcgan"]'),
     "segment.cells[0].train_data: 'mixed:dcgan' needs generator 'dcgan'"),
    (_swap("seeds = [0, 1]", "seedz = [0, 1]"), "unknown key segment.cells[0].seedz"),
    (_swap("epochs = 2", "epochs = 0"), "segment/lgg/unet-real-s0: epochs must be an integer >= 1"),
    (_swap("seeds = [0, 1]", "seeds = [0, 1]\nbatch_size = 0"),
     "segment/lgg/unet-real-s0: batch_size must be an integer >= 1"),
    (_swap("[segment]", "[segment]\nworkers = 2"), "unknown key segment.workers"),
    (_swap('datasets = ["lgg"]\nseeds', 'datasets = "x"\nseeds'),
     "segment.cells[0].datasets: unknown dataset 'x'"),
    (_swap("options = { channels", "options = { chanels"),
     "segment/lgg/unet-real-s0: option 'chanels': no such field of SegmentConfig"),
    (_swap("options = { channels = [8, 16], strides = [2] }", "options = { out = 'x' }"),
     "option 'out': the sweep sets it"),
    (_swap("options = { channels = [8, 16], strides = [2] }", "options = { strides = [2] }"),
     "strides (2,) must have one entry per down-sampling"),
    (_swap('name = "ext"', 'name = "ext"\nsplit = "test"'),
     "evaluate[0].split: /"),
    (_swap('name = "ext"', 'name = "e x"'), "evaluate[0].name: 'e x' is not a valid name"),
    (_swap('name = "ext"\n', ""), "missing key evaluate[0].name"),
    (_swap('name = "ext"', 'name = "intensity"'),
     "evaluate[0].name: 'intensity' names a baseline column of the results"),
    (_swap('name = "ext"', 'name = "ext"\nlabel = "tumour=."'), "unknown key evaluate[0].label"),
    (_swap('labels = ["tumour=yes", "healthy=no"]', 'labels = ["tumor=yes", "sick=no"]'),
     "evaluate[0].labels: --labels: cannot read 'sick=no'"),
    (_swap('name = "ext"', 'name = "ext"\ndatasets = ["brats"]'),
     "evaluate[0].datasets: unknown dataset 'brats'"),
    (MULTI + '[[evaluate]]\nname = "ext"\npath = "EXT"\n',
     "evaluate: two entries are named 'ext'"),
    (MULTI.replace('path = "EXT"', 'path = "/no/such/folder"'),
     "evaluate[0].path /no/such/folder is not a folder"),
    (MULTI.replace('datasets = ["lgg"]\nseeds', 'datasets = ["br35h"]\nseeds')
     .replace('train_data = ["real", "mixed:vae"]', 'train_data = ["real"]')
     .replace('name = "ext"', 'name = "ext"\ndatasets = ["lgg"]')
     .replace("[[classify.cells]]\nmodel = \"cnn\"", "[[classify.cells]]\ndatasets = "
              "[\"br35h\"]\nmodel = \"cnn\""),
     "evaluate entry 'ext': no classify or segment cells on lgg to score"),
    (MULTI + '[[segment.cells]]\ntrain_data = ["real"]\ndatasets = ["lgg"]\nepochs = 3\n',
     "segment.cells[0] and segment.cells[1] both make cell unet-real-s0 of dataset lgg, "
     "with different settings"),
    (_swap("[segment]", '[[classify.cells]]\nmodel = "vae"\ntechniques = ["dbscan"]\n'
           'train_data = ["real"]\ndatasets = ["br35h"]\nepochs = 3\n[segment]'),
     "classify.cells[1] and classify.cells[2] both make cell vae-real-s0 of dataset br35h, "
     "with different settings"),
    (_swap("[data.br35h]", "[resources.segment]\nmem_gb = 0\n[data.br35h]"),
     "resources.segment.mem_gb must be > 0"),
    (_swap("[data.br35h]", "[resources.evaluate]\ngpus = 1\n[data.br35h]"),
     "unknown key resources.evaluate.gpus"),
])
def test_bad_multi_dataset_files_name_the_key(tmp_path, text, message):
    with pytest.raises(BrainhpcError) as err:
        expand(load_sweep(write(tmp_path, text)), tmp_path / "run")
    assert message in str(err.value)


def test_data_override_by_name(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    path = write(tmp_path, MULTI)
    s = load_sweep(path, data=[f"lgg={raw}"])
    assert [(d.name, d.path, d.phantom) for d in s.datasets] == [("br35h", None, 100),
                                                                  ("lgg", raw, None)]
    with pytest.raises(BrainhpcError, match=r"has 2 datasets \(br35h, lgg\); say which one: "
                                            r"--data NAME=PATH"):
        load_sweep(path, data=str(raw))
    with pytest.raises(BrainhpcError, match="has no dataset 'brats'; its datasets: br35h, lgg"):
        load_sweep(path, data=[f"brats={raw}"])
    # one plain [data]: --data PATH, as before (a '=' in a plain path is part of the path)
    odd = tmp_path / "a=b"
    odd.mkdir()
    single = write(tmp_path, "[data]\nphantom = 10\n", "single.toml")
    assert load_sweep(single, data=odd).datasets[0].path == odd
    assert load_sweep(single, data=[str(raw)]).datasets[0].path == raw
    # the cli: refused before anything is written
    rc = main([str(path), "--dry-run", "--executor", "local", "--data", str(raw)])
    assert rc == 2 and not (tmp_path / "run").exists()


def test_container_binds_every_dataset_and_external_set(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    s = load_sweep(write(tmp_path, MULTI), data=[f"br35h={raw}"])
    assert slurm.binds(s, tmp_path / "run")[:3] == [(str(tmp_path / "run"), False),
                                                  (str(raw), True),
                                                  (str(tmp_path / "ext"), True)]


def _mark(cell: Cell, status: str = "done") -> None:
    cell.marker.parent.mkdir(parents=True, exist_ok=True)
    cell.marker.write_text(json.dumps({"status": status, "config_hash": cell.hash}))


def test_evaluate_that_ran_before_its_models_finished_runs_again(tmp_path):
    """An evaluate cell still queued when new models were submitted can run first and list
    them as not finished; the next re-run scores them (and only that dataset's set)."""
    run = tmp_path / "run"
    plan = expand(load_sweep(write(tmp_path, MULTI)), run)
    for stage in STAGES:
        for cell in plan[stage]:
            _mark(cell)
    by_id = {c.id: c for s in STAGES for c in plan[s]}
    lgg_ext = by_id["lgg/ext"]
    (lgg_ext.folder / "summary.json").write_text(json.dumps(
        {"status": "done", "not_finished": ["classify/lgg/cnn-real-s0"]}))
    cells, skipped, _ = rundir.todo(plan, run, list(STAGES), False, {})
    assert {s: ids(cells, s) for s in STAGES if cells[s]} == {
        "evaluate": ["lgg/ext"], "aggregate": ["results"]}
    _mark(by_id["lgg/cnn-real-s0"], "failed")  # still unfinished: nothing new to score yet
    cells, skipped, _ = rundir.todo(plan, run, ["evaluate"], False, {})
    assert ids(cells, "evaluate") == []


def test_rerun_submits_a_datasets_evaluate_cells_with_its_new_models(tmp_path):
    run = tmp_path / "run"
    plan = expand(load_sweep(write(tmp_path, MULTI)), run)
    for stage in STAGES:
        for cell in plan[stage]:
            _mark(cell)
    cells, skipped, _ = rundir.todo(plan, run, list(STAGES), False, {})
    assert not any(cells.values()) and len(skipped["done"]) == sum(map(len, plan.values()))

    by_id = {c.id: c for s in STAGES for c in plan[s]}
    _mark(by_id["lgg/cnn-real-s0"], "failed")  # a model of lgg runs again
    cells, skipped, _ = rundir.todo(plan, run, list(STAGES), False, {})
    assert {s: ids(cells, s) for s in STAGES if cells[s]} == {
        "classify": ["lgg/cnn-real-s0"], "evaluate": ["lgg/ext"], "aggregate": ["results"]}
    assert "evaluate/lgg/ext" not in skipped["done"] and "evaluate/br35h/ext" in skipped["done"]

    (run / "jobs.json").write_text(json.dumps([{"stage": "evaluate", "job_id": "50",
                                                "executor": "slurm",
                                                "cells": ["br35h/ext", "lgg/ext"]}]))
    _mark(by_id["lgg/unet-real-s1"], "running")  # a segmenter too; lgg/ext is still queued
    cells, skipped, waiting = rundir.todo(plan, run, list(STAGES), False, {"50_1": "PENDING"})
    assert ids(cells, "segment") == ["lgg/unet-real-s1"] and ids(cells, "evaluate") == []
    assert skipped["queued"] == ["evaluate/lgg/ext (job 50_1 PENDING)"]
    assert waiting["evaluate"] == ["50"]

    # --only classify: evaluate is not among the selected stages, so it is left alone
    cells, _, _ = rundir.todo(plan, run, ["classify"], False, {})
    assert ids(cells, "classify") == ["lgg/cnn-real-s0"] and not cells["evaluate"]
    # nothing queued any more; a br35h classifier brings br35h/ext back too
    _mark(by_id["br35h/vae-real-s0"], "failed")
    cells, _, _ = rundir.todo(plan, run, list(STAGES), False, {})
    assert ids(cells, "evaluate") == ["br35h/ext", "lgg/ext"]


def test_status_lists_prefixed_cells_of_every_stage(tmp_path):
    run = tmp_path / "run"
    plan = expand(load_sweep(write(tmp_path, MULTI)), run)
    (run / "sweep.json").parent.mkdir(parents=True)
    (run / "sweep.json").write_text("{}")
    by_id = {c.id: c for s in STAGES for c in plan[s]}
    _mark(by_id["lgg/unet-real-s0"])
    _mark(by_id["br35h/ext"], "failed")
    _mark(by_id["lgg"])
    # an evaluate cell's scores of a model are no cells of their own
    (run / "evaluate" / "lgg" / "ext" / "segment" / "lgg" / "unet-real-s0").mkdir(parents=True)
    rows = {(r["stage"], r["cell"]): r["state"] for r in cell_states(run, queued={})}
    assert rows == {("prepare", "lgg"): "done", ("segment", "lgg/unet-real-s0"): "done",
                    ("evaluate", "br35h/ext"): "failed"}


@pytest.mark.parametrize("name", ["full"])
def test_shipped_evaluate_example_validates_when_uncommented(tmp_path, name):
    text = (REPO / "jobs" / f"{name}.toml").read_text()
    live = re.sub(r"^# (\[\[evaluate\]\]|name = |path = |labels = )", r"\1", text, flags=re.M)
    br35h = tmp_path / "br35h"
    br35h.mkdir()
    live = live.replace('"~/data/br35h"', f'"{br35h}"')
    assert live.count("[[evaluate]]") == 1
    plan = expand(load_sweep(write(tmp_path, live), data=tmp_path), tmp_path / "run")
    (cell,) = plan["evaluate"]
    assert cell.id == "br35h" and cell.params["data"] == str(br35h)
    assert cell.params["labels"] == "tumour=yes healthy=no" and "split" not in cell.params


def test_run_dir_key_sets_the_default_run_folder(tmp_path, monkeypatch, capsys, no_slurm_client):
    from brainhpc.sweep.cli import main

    path = tmp_path / "s.toml"
    path.write_text('name = "rd"\nprofile = "local"\nrun_dir = "~/runs-here/rd"\n'
                    '[data]\nphantom = 20\nsize = 32\n')
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_sweep(path).run_dir == tmp_path / "runs-here" / "rd"
    assert main([str(path), "--dry-run"]) == 0
    assert f"run dir {tmp_path / 'runs-here' / 'rd'}" in capsys.readouterr().out
    assert main([str(path), "--dry-run", "--run-dir", str(tmp_path / "other")]) == 0
    assert f"run dir {tmp_path / 'other'}" in capsys.readouterr().out


def test_evaluate_entry_of_fresh_phantom_slices(tmp_path):
    base = ('name = "ph"\nprofile = "local"\n[data]\nphantom = 40\nsize = 32\n'
            '[[classify.cells]]\nmodel = "cnn"\ntrain_data = ["real"]\n')
    path = tmp_path / "s.toml"
    path.write_text(base + '[[evaluate]]\nname = "fresh"\nphantom = 30\nseed = 7\n')
    plan = expand(load_sweep(path), tmp_path / "run")
    (cell,) = plan["evaluate"]
    assert cell.params["phantom"] == 30 and cell.params["seed"] == 7
    cfg = stage_config(cell)
    assert cfg.images == tmp_path / "run" / "evaluate" / "fresh" / "phantom-30-s7"
    for extra, match in (('path = "x"\n', "exactly one of path"),
                         ('labels = ["tumour=yes"]\n', "drop labels/split")):
        path.write_text(base + '[[evaluate]]\nname = "fresh"\nphantom = 30\n' + extra)
        with pytest.raises(BrainhpcError, match=match):
            load_sweep(path)
    path.write_text(base + '[[evaluate]]\nname = "fresh"\n')
    with pytest.raises(BrainhpcError, match="exactly one of path"):
        load_sweep(path)


@pytest.mark.parametrize("name", ["cpu-study", "cpu-study-2", "paper"])
def test_shipped_study_files_expand(tmp_path, monkeypatch, name):
    """The study (CPU, both editions) and its GPU version: two datasets, masks on LGG's tumour
    generators, a segment stage on LGG only, each dataset scored on the other and on
    brain-tumor-mri; the second edition and the GPU version over 5 folds, with the LDM."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for folder in ("br35h", "lgg-flair", "brain-tumor-mri/Training"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    sweep = load_sweep(REPO / "jobs" / f"{name}.toml")
    plan = expand(sweep, tmp_path / "run")
    assert {d.name for d in sweep.datasets} == {"br35h", "lgg"}
    folds = name != "cpu-study"
    f0 = "f0/" if folds else ""
    masked = {c.id for c in plan["generate"] if c.params.get("with_masks")}
    assert {m for m in masked if "/f" not in m or "/f0/" in m} == {
        f"lgg/{f0}{arch}-tumour" for arch in sweep.generate.archs}
    assert all(m.startswith("lgg/") and m.endswith("-tumour") for m in masked)
    assert {c.params["dataset"] for c in plan["segment"]} == {"lgg"}
    assert {c.id for c in plan["evaluate"]} == {"br35h/lgg", "lgg/br35h", "br35h/btm", "lgg/btm"}
    ids = {c.id for c in plan["classify"]}
    for ds in ("br35h", "lgg"):
        assert {f"{ds}/{f0}cnn-real-s0", f"{ds}/{f0}vae-real-s0"} <= ids
    if folds:  # the real arms on every fold, the LDM among the generators
        assert {f"lgg/f{k}/unet-real-s0" for k in range(5)} <= {c.id for c in plan["segment"]}
        assert {f"br35h/f{k}/vae-real-s0" for k in range(5)} <= ids
        assert "ldm" in sweep.generate.archs
    if name.startswith("cpu-study"):
        assert sweep.run_dir == tmp_path / "brainhpc-runs" / name
        assert {d.size for d in sweep.datasets} == {64}


def test_fresh_phantom_set_draws_the_datasets_lesion_style(tmp_path):
    """The smoke trains on visible lesions: its external phantoms must be visible ones too,
    not the standard (faint) style, in their own folder."""
    import cv2
    import numpy as np

    from brainhpc.data import phantom
    from brainhpc.evaluate.cell import write_phantom_folder

    path = tmp_path / "s.toml"
    path.write_text('name = "ph"\nprofile = "local"\n[data]\nphantom = 40\nsize = 32\n'
                    'phantom_lesions = "visible"\n[[classify.cells]]\nmodel = "cnn"\n'
                    'train_data = ["real"]\n[[evaluate]]\nname = "fresh"\nphantom = 6\n')
    (cell,) = expand(load_sweep(path), tmp_path / "run")["evaluate"]
    cfg = stage_config(cell)
    assert cfg.phantom_lesions == "visible"
    assert cfg.images == tmp_path / "run" / "evaluate" / "fresh" / "phantom-6-s1-visible"
    write_phantom_folder(cfg.images, cfg.phantom, cfg.seed, cfg.phantom_lesions)
    want = phantom.generate(6, seed=cfg.seed, lesions="visible")
    for p in want:
        got = cv2.imread(str(cfg.images / ("yes" if p.label else "no") / p.name),
                         cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(got, p.image), p.name
