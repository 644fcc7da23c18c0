"""The metrics block every cell writes: balanced accuracy first, degenerate flag, baselines;
and the per-slice / per-patient rows a segmenter's intervals are resampled from."""

from __future__ import annotations

import numpy as np
import pytest

from brainhpc.data.shards import ShardData
from brainhpc.errors import BrainhpcError
from brainhpc.metrics.classification import classification_metrics
from brainhpc.metrics.predictions import (
    PATIENT_COLUMNS,
    PATIENTS,
    PREDICTIONS,
    SLICE_COLUMNS,
    read_rows,
)
from brainhpc.metrics.segmentation import prediction_rows, segmentation_metrics
from brainhpc.predictors.segmenter import write_predictions


def test_all_tumour_is_flagged_and_matches_its_baseline():
    y = [1] * 72 + [0] * 28  # brain-tumor-mri's balance
    m = classification_metrics(y, [1] * 100, score=[0.9] * 100)
    assert m["degenerate"] and m["predicted_tumour_share"] == 1.0
    assert m["balanced_accuracy"] == 0.5 and m["roc_auc"] == 0.5
    # the F1 of "call everything tumour" is exactly the all-tumour baseline: no result
    assert m["f1"] == pytest.approx(m["baselines"]["all_tumour_f1"]) == pytest.approx(144 / 172)
    assert m["baselines"]["majority_accuracy"] == 0.72 and m["baselines"]["majority_class"] == \
        "tumour"
    assert m["recall_per_class"] == {"healthy": 0.0, "tumour": 1.0}


def test_a_real_classifier_is_not_degenerate():
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    m = classification_metrics(y, [0, 0, 0, 1, 1, 1, 1, 0], score=[.1, .2, .3, .6, .7, .8, .9, .4])
    assert not m["degenerate"] and m["balanced_accuracy"] == 0.75
    assert m["recall_per_class"] == {"healthy": 0.75, "tumour": 0.75}
    assert list(m)[:2] == ["balanced_accuracy", "roc_auc"]


def test_one_class_labels_get_the_metrics_that_exist():
    m = classification_metrics([1, 1, 1], [1, 0, 1], score=[0.8, 0.2, 0.9])
    assert m["balanced_accuracy"] is None and m["roc_auc"] is None
    assert m["recall_per_class"] == {"healthy": None, "tumour": pytest.approx(2 / 3)}
    assert m["score_summary"]["q50"] == pytest.approx(0.8)


# ------------------------------------------------------------------------------ segmentation rows

def _seg_case():
    """4 slices, patients x (two tumour slices) and y (healthy), with leakage groups."""
    truth = np.zeros((4, 16, 16), bool)
    truth[0, 2:8, 2:8] = truth[1, 4:10, 4:10] = True  # 36 px each
    pred = np.zeros_like(truth)
    pred[0, 2:8, 5:11] = True  # 6x3 overlap of 36 + 36: slice Dice 0.5
    pred[2, 0:2, 0:2] = True  # a false positive on a healthy slice of patient y
    data = ShardData(np.zeros((4, 1, 16, 16), np.uint8), np.array([1, 1, 0, 0]),
                     ["a.png", "b.png", "c.png", "d.png"], masks=truth[:, None].astype(np.uint8),
                     patients=["x", "x", "y", "y"], groups=["gx", "gx", "gy", "gy"])
    return pred, truth, data


def test_segmentation_rows_reproduce_the_metrics(tmp_path):
    pred, truth, data = _seg_case()
    arms = {"unet": pred, "empty": np.zeros_like(truth)}
    write_predictions(tmp_path, arms, data)
    assert (tmp_path / PREDICTIONS).read_text().splitlines()[0] == ",".join(SLICE_COLUMNS)
    assert (tmp_path / PATIENTS).read_text().splitlines()[0] == ",".join(PATIENT_COLUMNS)
    rows, patients = read_rows(tmp_path / PREDICTIONS), read_rows(tmp_path / PATIENTS)
    assert [r["arm"] for r in rows] == ["unet"] * 4 + ["empty"] * 4
    unet = rows[:4]
    assert [r["dice"] for r in unet[:2]] == [0.5, 0.0]
    assert np.isnan(unet[2]["dice"]) and np.isnan(unet[3]["dice"])  # empty truth: empty cell
    assert [r["tumour"] for r in unet] == [1, 1, 0, 0]
    assert (unet[0]["intersection"], unet[0]["pred_area"], unet[0]["true_area"]) == (18, 36, 36)
    assert unet[2]["pred_area"] == 4 and unet[2]["group"] == "gy" and unet[2]["patient"] == "y"
    assert [(p["arm"], p["patient"], p["group"], p["slices"]) for p in patients] == [
        ("unet", "x", "gx", 2), ("unet", "y", "gy", 2), ("empty", "x", "gx", 2),
        ("empty", "y", "gy", 2)]
    x = patients[0]  # 3D Dice over x's two slices: 2 * 18 / (36 + 72)
    assert x["dice"] == pytest.approx(2 * 18 / 108, rel=1e-5) and np.isnan(patients[1]["dice"])
    assert (x["intersection"], x["pred_area"], x["true_area"]) == (18, 36, 72)
    for arm, masks in arms.items():
        m = segmentation_metrics(masks, truth, data.patient_ids())
        slices = [r["dice"] for r in rows if r["arm"] == arm and r["tumour"]]
        pats = [p["dice"] for p in patients if p["arm"] == arm and np.isfinite(p["dice"])]
        assert np.mean(slices) == pytest.approx(m["dice_slice_mean"], rel=1e-5, abs=1e-9)
        assert np.mean(pats) == pytest.approx(m["dice_patient_mean"], rel=1e-5, abs=1e-9)


def test_segmentation_rows_refuse_mismatched_ids_and_fall_back_to_patients():
    pred, truth, data = _seg_case()
    with pytest.raises(BrainhpcError, match="predictions of unet: 3 groups for 4 slices"):
        prediction_rows("unet", pred, truth, data.sources, data.patient_ids(), ["g"] * 3)
    data.groups = None  # a dataset prepared before groups were kept: the patient is the unit
    rows, patients = prediction_rows("unet", pred, truth, data.sources, data.patient_ids(),
                                     data.group_ids())
    assert [r["group"] for r in rows] == ["x", "x", "y", "y"]
    assert [p["group"] for p in patients] == ["x", "y"]
