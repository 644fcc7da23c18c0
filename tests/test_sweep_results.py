"""Aggregate and status on a run directory whose cells left known outputs (written here by
hand; the real cells are exercised in test_sweep_slurm.py), and a debug-executor cell."""

import csv
import json
from pathlib import Path

import pytest

from brainhpc.errors import BrainhpcError
from brainhpc.fsio import write_json
from brainhpc.sweep.aggregate import REFERENCE, aggregate, report
from brainhpc.sweep.config import load_sweep
from brainhpc.sweep.plan import Cell, expand
from brainhpc.sweep.runner import CellRunner
from brainhpc.sweep.status import cell_states, table

SWEEP = """
name = "res"
[data]
phantom = 100
size = 32
[generate]
archs = ["vae"]
[[classify.cells]]
model = "cnn"
train_data = ["real", "mixed:vae:0.5", "mixed:vae:1"]
[[classify.cells]]
model = "vae"
techniques = ["giaem"]
train_data = ["real"]
seeds = [0, 1]
"""


def _run_dir(tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "s.toml"
    path.write_text(SWEEP)
    run = tmp_path / "run"
    plan = expand(load_sweep(path), run)
    write_json(run / "sweep.json", {"name": "res", "source": str(path)})
    write_json(run / "plan.json", {s: [{"id": c.id, "params": c.params} for c in cells]
                                   for s, cells in plan.items()})
    return run, plan


def _done(cell: Cell, metrics: dict | None = None, card: dict | None = None) -> None:
    write_json(cell.marker, {"status": "done", "config_hash": cell.hash, "wall_seconds": 1.5,
                             "log": "", "job_id": "9"})
    if metrics is not None:
        write_json(cell.folder / "metrics.json", {"status": "done", **metrics})
    if card is not None:
        write_json(cell.folder / "card.json", {"status": "done", **card})


def block(bal, auc, acc=0.6, f1=0.5, degenerate=False, n=20):
    """A metrics block as classification_metrics writes it."""
    return {"balanced_accuracy": bal, "roc_auc": auc, "accuracy": acc, "precision": 0.5,
            "recall": 0.5, "f1": f1, "degenerate": degenerate, "n": n,
            "recall_per_class": {"healthy": bal, "tumour": bal}}


def test_aggregate_writes_every_planned_row(tmp_path):
    run, plan = _run_dir(tmp_path)
    gen = {c.id: c for c in plan["generate"]}
    _done(gen["vae-healthy"], card={"epochs": 3, "steps": 30, "n_train": 50, "n_samples": 64,
                                     "quality": {"fid": 12.5, "kid": 0.01,
                                                 "memorisation": {"near_copy_share": 0.0}}})
    write_json(gen["vae-tumour"].marker, {"status": "failed", "error": "BrainhpcError: boom",
                                          "log": "/logs/7_1_0_log.out"})
    write_json(run / "prepare" / "data" / "prepared" / "manifest.json", {
        "layout": "br35h",  # the reference study's columns appear beside Br35H rows only
        "confound": {"cv_auc": 0.55, "test": {"balanced_accuracy": 0.52, "roc_auc": 0.56,
                                              "n": 20}}})
    cls = {c.id: c for c in plan["classify"]}
    common = {"n_train": {"total": 70}, "epochs": 1, "brainhpc": "0.1", "config_hash": "abc"}
    _done(cls["cnn-real-s0"], {**block(0.95, 0.99), **common})
    _done(cls["cnn-mixed_vae_0.5-s0"], {**block(0.7, 0.8), **common})
    _done(cls["cnn-mixed_vae_1-s0"], {**block(0.5, 0.5, degenerate=True), **common})
    for seed, bal in ((0, 0.6), (1, 0.8)):
        _done(cls[f"vae-real-s{seed}"], {
            "techniques": {"giaem": {"test": block(bal, 0.7), "localisation": {"dice_mean": 0.3}}},
            "localisation": {"pixel_auprc": 0.2},
            "baselines": {"intensity_threshold": {"test": block(0.55, 0.6),
                                                  "localisation": {"best_dice_mean": 0.25}}},
            **common})
    res = aggregate(run)
    assert res["failed"] == ["vae-tumour"]
    out = run / "results"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    # CNN cells one row each; a VAE cell one row per technique plus its intensity baseline; the
    # dataset's image-statistics row last
    assert [(r["cell"], r["technique"]) for r in rows] == [
        ("cnn-real-s0", ""), ("cnn-mixed_vae_0.5-s0", ""), ("cnn-mixed_vae_1-s0", ""),
        ("vae-real-s0", "giaem"), ("vae-real-s0", "intensity threshold"),
        ("vae-real-s1", "giaem"), ("vae-real-s1", "intensity threshold"),
        ("data/image-statistics", "image statistics only")]
    assert list(rows[0])[11:15] == ["balanced_accuracy", "roc_auc", "recall_healthy",
                                    "recall_tumour"]
    assert rows[1]["kind"] == "mixed" and rows[1]["generator"] == "vae" and rows[1]["p"] == "0.5"
    assert rows[2]["degenerate"] == "True" and rows[3]["dice"] == "0.3"
    assert rows[3]["ref_accuracy"] == str(REFERENCE[("vae", "giaem", "real")][0] / 100)
    gens = list(csv.DictReader((out / "generators.csv").open()))
    assert gens[0]["fid"] == "12.5" and gens[1]["status"] == "failed"
    md = (out / "table.md").read_text()
    ref = REFERENCE[("vae", "giaem", "real")]
    assert (f"| VAE (GIAEM) | real | 70.0 ± 14.1 | 0.700 ± 0.000 | 70.0 ± 14.1 | 70.0 ± 14.1 | "
            f"60.0 ± 0.0 | 50.0 ± 0.0 | 0 | 2/2 | {ref[0]:.2f} | {ref[3]:.2f} |") in md
    assert "| Image statistics only (baseline) | real | 52.0 | 0.560 |" in md
    assert "| Intensity threshold (baseline) | real | 55.0 ± 0.0 | 0.600 ± 0.000 |" in md
    assert "CNN trained on real data reaches balanced accuracy 95.0%" in md
    assert "learns (>= 90%)" in md and "image statistics only 52.0%" in md
    (gen["vae-healthy"].folder / "samples.png").write_bytes(b"png")  # a cell's figure ...
    aggregate(run)
    assert (out / "figures" / "generate" / "vae-healthy-samples.png").read_bytes() == b"png"
    assert (out / "proportion.png").stat().st_size > 1000
    assert (out / "by_train_data.png").stat().st_size > 1000
    # the README's tables come from the CSVs alone, and say what table.md says
    tables = report(out)
    for part in tables.split("\n\n"):
        assert part.strip() in md, part
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["sweep"] == "res" and prov["command"].startswith("python -m brainhpc.sweep ")
    assert prov["cells_done"] >= 6 and prov["brainhpc"]


def test_aggregate_keeps_rows_of_cells_that_never_ran(tmp_path):
    run, plan = _run_dir(tmp_path)
    aggregate(run)
    rows = list(csv.DictReader((run / "results" / "metrics.csv").open()))
    assert len(rows) == 5 and {r["status"] for r in rows} == {"missing"}
    assert [r["technique"] for r in rows] == ["", "", "", "giaem", "giaem"]
    assert "Cells without results" in (run / "results" / "table.md").read_text()
    with pytest.raises(BrainhpcError, match="plan.json"):
        aggregate(tmp_path / "elsewhere")


def test_status_table_shows_queue_states_and_failures(tmp_path):
    run, plan = _run_dir(tmp_path)
    cls = plan["classify"]
    _done(cls[0], {"f1": 1})
    write_json(cls[1].marker, {"status": "failed", "error": "BrainhpcError: no shards",
                               "log": "/run/logs/classify/5_1_0_log.out"})
    write_json(cls[2].marker, {"status": "running", "log": "x"})  # its job is gone: lost
    write_json(run / "jobs.json", [{"stage": "classify", "job_id": "5", "executor": "slurm",
                                    "cells": [c.id for c in cls]}])
    rows = cell_states(run, queued={"5_3": "RUNNING", "5_4": "PENDING"})
    states = {r["cell"]: r["state"] for r in rows}
    assert states == {cls[0].id: "done", cls[1].id: "failed", cls[2].id: "lost",
                      cls[3].id: "running", cls[4].id: "pending"}
    text = table(rows)
    assert "error: BrainhpcError: no shards" in text
    assert "log:   /run/logs/classify/5_1_0_log.out" in text
    assert text.splitlines()[-1] == "1 done, 1 running, 1 pending, 1 failed, 1 lost"
    with pytest.raises(BrainhpcError, match="not a sweep run directory"):
        cell_states(tmp_path)


def test_cell_runner_marks_failure_with_the_error(tmp_path):
    run, plan = _run_dir(tmp_path)
    cell = plan["generate"][0]  # no prepared data in this run dir
    with pytest.raises(BrainhpcError, match="does not exist"):
        CellRunner()(cell)
    marker = json.loads(cell.marker.read_text())
    assert marker["status"] == "failed" and "prepared dataset" in marker["error"]
    assert marker["user_error"] is True and marker["config_hash"] == cell.hash


def test_segmentation_table_columns_are_external_sets_not_baselines():
    """empty_/intensity_dice_patient are the baselines' columns: they are rows of the table,
    never external-set columns (an [[evaluate]] set named "ext" is one)."""
    from brainhpc.sweep.aggregate import segmentation_table

    row = {"dataset": "lgg", "cell": "lgg/unet-real-s0", "status": "done", "train_data": "real",
           "kind": "real", "dice_patient": 0.7, "dice_slice": 0.6, "hd95": 4.0,
           "sensitivity": 0.8, "specificity": 0.9, "empty_dice_patient": 0.0,
           "intensity_dice_patient": 0.1, "ext_dice_patient": 0.5}
    head = segmentation_table([row]).splitlines()[2]
    assert "ext: Dice per patient" in head
    assert "empty:" not in head and "intensity:" not in head
    assert "| lgg | baseline: intensity threshold | 0.100 |" in segmentation_table([row])
