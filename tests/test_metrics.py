"""The metrics block every cell writes: balanced accuracy first, degenerate flag, baselines."""

from __future__ import annotations

import pytest

from brainhpc.metrics.classification import classification_metrics


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
