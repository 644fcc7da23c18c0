"""Error-map techniques: hand-computed answers on tiny maps, agreement with plain scikit-learn,
threshold selection that never looks at the test split, localisation and metrics."""

import numpy as np
import pytest
import torch
from sklearn.cluster import DBSCAN, KMeans

from brainhpc.anomaly.techniques import (
    TECHNIQUES,
    FittedTechnique,
    TechniqueConfig,
    alpha_cut,
    best_cut,
    dbscan_scores,
    fit_technique,
    giaem_scores,
    global_kmeans_fit,
    global_kmeans_margin,
    kmeans_single_scores,
    localisation,
    scaled_dbscan,
    select_and_apply,
    two_means_1d,
)
from brainhpc.errors import BrainhpcError
from brainhpc.metrics.classification import classification_metrics


def blob_maps(n, size=32, seed=0, noise=0.03, tumour_share=0.5):
    """Error maps: half-normal noise, tumour maps add a brighter disc -> maps, labels, masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    maps = np.abs(rng.normal(0, noise, (n, size, size)))
    labels = (rng.random(n) < tumour_share).astype(np.int64)
    labels[:2] = [0, 1]
    masks = np.zeros((n, size, size), np.uint8)
    for i in np.flatnonzero(labels):
        cy, cx = rng.uniform(size * 0.25, size * 0.75, 2)
        r = rng.uniform(size * 0.06, size * 0.15)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        masks[i] = m
        maps[i][m] += rng.uniform(0.15, 0.5)
    return np.clip(maps, 0, 1).astype(np.float32), labels, masks


def fitted(technique, **params):
    return FittedTechnique(TechniqueConfig(technique=technique), params, 0.0)


# ------------------------------------------------------------------------- hand-computed answers

def test_giaem_hand_computed():
    maps = np.full((3, 8, 8), 0.1, np.float32)
    maps[0, 0, :3] = 0.9  # 3 / 64 above 0.5
    maps[1, 2:4, 2:7] = 0.6  # 10 / 64 above 0.5
    maps[2, 5, 5] = 0.5  # equal to the threshold: not above it
    np.testing.assert_allclose(giaem_scores(maps, 0.5), [3 / 64, 10 / 64, 0.0])
    pred, score = fitted("giaem", anomaly_threshold=0.5, tumor_index=0.1).predict(maps)
    assert pred.tolist() == [0, 1, 0]
    np.testing.assert_allclose(score, [3 / 64, 10 / 64, 0.0])


def test_dbscan_parameters_scale_with_the_image():
    c = TechniqueConfig(technique="dbscan")  # eps 2, min_samples 5, max_points 4096 at 64 px
    assert scaled_dbscan(c, 64) == (2.0, 5, 4096)
    assert scaled_dbscan(c, 128) == (4.0, 20, 16384)
    assert scaled_dbscan(c, 32) == (1.0, 1, 1024)


def test_dbscan_hand_computed():
    maps = np.zeros((3, 8, 8), np.float32)
    maps[0, 1:4, 1:4] = 0.8  # a 3x3 block: one cluster of 9
    maps[0, 7, 7] = maps[0, 0, 7] = 0.8  # two isolated pixels: noise
    maps[1, 0:2, 0:2] = 0.7  # 4 pixels
    maps[1, 5:7, 2:5] = 0.7  # 6 pixels, 3 rows away: a separate, larger cluster
    maps[2, ::3, ::3] = 0.9  # scattered pixels 3 apart: nothing dense
    scores, regions = dbscan_scores(maps, 0.5, eps=1.5, min_samples=3, return_regions=True)
    # shares of the scored (non-zero) pixels: 11, 10 and 9 of them
    np.testing.assert_allclose(scores, [9 / 11, 6 / 10, 0.0])
    expect0 = np.zeros((8, 8), bool)
    expect0[1:4, 1:4] = True
    expect1 = np.zeros((8, 8), bool)
    expect1[5:7, 2:5] = True
    assert (regions[0] == expect0).all() and (regions[1] == expect1).all() and not regions[2].any()
    # config values mean 64 px images: at 8 px, eps=16 and min_samples=320 are 2 and 5
    f = FittedTechnique(TechniqueConfig(technique="dbscan", eps=16, min_samples=320),
                        {"anomaly_threshold": 0.5, "tumor_index": 0.7}, 0.0)
    assert f.predict(maps)[0].tolist() == [1, 0, 0]  # eps=2, min_samples=5: 9/11 and 6/10
    f = FittedTechnique(TechniqueConfig(technique="dbscan", eps=12, min_samples=320),
                        {"anomaly_threshold": 0.5, "tumor_index": 0.5}, 0.0)
    # eps 1.5: a 2x3 block's corner pixels have only 4 neighbours (self included), yet they are
    # border points of the two core pixels in the middle: the cluster keeps all 6
    assert f.predict(maps)[0].tolist() == [1, 1, 0]


def test_two_means_1d_hand_computed():
    # splits of [0, .1, .2, .9, 1]: between-SS is largest cutting after .2 (high cluster .9, 1)
    cut, size, mean = two_means_1d(np.array([[0.0, 0.1, 0.2, 0.9, 1.0], [0.3, 0.3, 0.3, 0.3, 0.3],
                                             [1.0, 0.0, 0.0, 0.0, 1.0]]))
    np.testing.assert_allclose(cut, [0.55, 0.3, 0.5])
    assert size.tolist() == [2, 0, 2]
    np.testing.assert_allclose(mean, [0.95, 0.0, 1.0])


def test_kmeans_single_hand_computed():
    maps = np.full((3, 8, 8), 0.05, np.float32)
    maps[0, :2, :4] = 0.6  # 8 high pixels: cluster centroid .6 > .3 -> score 8/64
    maps[1, :2, :4] = 0.2  # high cluster centroid .2 is below the threshold -> 0
    scores, regions = kmeans_single_scores(maps, 0.3, return_regions=True)  # map 2: constant -> 0
    np.testing.assert_allclose(scores, [8 / 64, 0.0, 0.0])
    assert regions[0].sum() == 8 and regions[0, :2, :4].all() and not regions[1:].any()


def test_kmeans_single_matches_sklearn_kmeans():
    maps, _, _ = blob_maps(12, size=16, seed=3)
    _, size, mean = two_means_1d(maps.reshape(12, -1))
    for i in range(12):
        km = KMeans(n_clusters=2, n_init=10, random_state=0).fit(maps[i].reshape(-1, 1))
        hi = int(np.argmax(km.cluster_centers_[:, 0]))
        assert np.sum(km.labels_ == hi) == size[i]
        assert km.cluster_centers_[hi, 0] == pytest.approx(mean[i], rel=1e-5)


def test_kmeans_global_hand_computed():
    maps = np.zeros((8, 8, 8), np.float32)
    maps[4:, 2:4, 2:4] = 0.9  # four tumour maps, the same 2x2 block; four empty maps
    centers, healthy = global_kmeans_fit(maps, 0.5, n_clusters=2, seed=0)
    assert centers[healthy].sum() == 0 and centers[1 - healthy].sum() == 4
    margin = global_kmeans_margin(maps, 0.5, centers, healthy)
    np.testing.assert_allclose(margin, [-4] * 4 + [4] * 4)  # d_h^2 - d_t^2 = 0 - 4 or 4 - 0
    assert alpha_cut(margin, 0.5) == 0.0  # 4 of 8 may be tumour: all four tumour maps
    assert alpha_cut(margin, 0.25) == 4.0  # 2 of 8, but the four margins tie: none
    f = FittedTechnique(TechniqueConfig(technique="kmeans-global"),
                        {"anomaly_threshold": 0.5, "alpha": 0.5, "tau": 0.0}, 0.0, centers, healthy)
    new = np.zeros((2, 8, 8), np.float32)
    new[1, 2:4, 2:3] = 0.7  # half the block: d_h^2 = 2, d_t^2 = 2 -> margin 0, not above tau
    new[0, 2:4, 2:4] = 0.7
    pred, score = f.predict(new)
    assert pred.tolist() == [1, 0] and score.tolist() == [4.0, 0.0]


def test_best_cut_hand_computed():
    s = np.array([0.1, 0.2, 0.3, 0.4])
    assert best_cut(s, np.array([0, 0, 1, 1])) == (pytest.approx(0.25), 1.0)
    # labels 0 1 0 1: F1 of top-1 2/3, top-2 1/2, top-3 0.8, all 2/3 -> cut between .1 and .2
    assert best_cut(s, np.array([0, 1, 0, 1]), "f1") == (pytest.approx(0.15), pytest.approx(0.8))
    # balanced accuracy (the default) ties at .75 for top-1 and top-3: fewer positives win
    cut, value = best_cut(s, np.array([0, 1, 0, 1]))
    assert cut == pytest.approx(0.35) and value == pytest.approx(0.75)
    # ties in score move together: no cut can split equal scores
    assert best_cut(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0]))[0] == pytest.approx(0.3)


def test_localisation_hand_computed():
    regions = np.zeros((3, 8, 8), bool)
    masks = np.zeros((3, 1, 8, 8), np.uint8)
    regions[0, :2, :2] = True
    masks[0, 0, :2, :3] = 1  # intersection 4, sizes 4 and 6
    masks[1, 0, 5:, 5:] = 1  # nothing detected: dice 0
    regions[2, :2, :2] = True  # no tumour in the mask: not counted
    out = localisation(regions, masks)
    assert out["n"] == 2
    assert out["dice_mean"] == pytest.approx((0.8 + 0.0) / 2)
    assert out["iou_mean"] == pytest.approx((4 / 6 + 0.0) / 2)
    assert out["dice_pooled"] == pytest.approx(2 * 4 / (4 + 6 + 9))
    assert localisation(regions[2:], masks[2:])["dice_mean"] is None


# ---------------------------------------------------------------- fast paths equal plain sklearn

def dbscan_reference(maps, thr, eps, min_samples, use_error=False, error_scale=10.0):
    """Plain scikit-learn DBSCAN, one call per map on all anomalous pixels."""
    out = []
    for m in maps:
        r, c = np.nonzero(m > thr)
        x = np.column_stack([r, c]).astype(float)
        if use_error:
            x = np.column_stack([x, error_scale * m[r, c].astype(float)])
        if len(x) == 0:
            out.append(0)
            continue
        lab = DBSCAN(eps=eps, min_samples=min_samples).fit(x).labels_
        out.append(np.bincount(lab[lab >= 0]).max() if (lab >= 0).any() else 0)
    return np.array(out) / maps[0].size


@pytest.mark.parametrize("use_error", [False, True])
@pytest.mark.parametrize("eps,min_samples", [(1.5, 3), (2.0, 5), (3.0, 8)])
def test_dbscan_fast_path_equals_per_map_sklearn(monkeypatch, use_error, eps, min_samples):
    import brainhpc.anomaly.techniques as tech

    monkeypatch.setattr(tech, "DBSCAN_BATCH_POINTS", 150)  # force several maps per batch
    maps, _, _ = blob_maps(16, size=24, seed=7, noise=0.08)
    ref = dbscan_reference(maps, 0.1, eps, min_samples, use_error, 5.0)
    for prefilter in (True, False):
        got = dbscan_scores(maps, 0.1, eps, min_samples, use_error, 5.0, prefilter=prefilter)
        np.testing.assert_allclose(got, ref)
    assert ref.max() > 0 and (ref == 0).sum() < len(ref)  # the case is not trivial


def test_dbscan_parallel_equals_serial(monkeypatch):
    import brainhpc.anomaly.techniques as tech

    monkeypatch.setattr(tech, "DBSCAN_BATCH_POINTS", 200)
    maps, _, _ = blob_maps(12, size=24, seed=2, noise=0.08)
    serial = dbscan_scores(maps, 0.1, return_regions=True)
    parallel = dbscan_scores(maps, 0.1, n_jobs=2, return_regions=True)
    np.testing.assert_array_equal(serial[0], parallel[0])
    np.testing.assert_array_equal(serial[1], parallel[1])


def test_dbscan_caps_pathological_maps():
    maps = np.full((2, 8, 8), 0.9, np.float32)  # every pixel anomalous
    maps[0, 0, 0] = 1.0
    stats = {}
    scores = dbscan_scores(maps, 0.5, eps=1.5, min_samples=3, max_points=10, stats=stats)
    assert stats["dbscan_capped_maps"] == 2
    assert scores.max() <= 10 / 64
    assert scores[1] > 0


# ---------------------------------------------------------------------------- selection on val

@pytest.mark.parametrize("technique", TECHNIQUES)
def test_thresholds_come_from_validation_only(technique):
    val_maps, val_y, _ = blob_maps(40, seed=1)
    test_maps, test_y, test_masks = blob_maps(40, seed=2)
    cfg = TechniqueConfig(technique=technique)
    alone = fit_technique(cfg, val_maps, val_y).chosen()
    base = select_and_apply(cfg, val_maps, val_y, test_maps, test_y, test_masks)
    assert base.report["chosen"] == alone
    rng = np.random.default_rng(0)
    variants = [
        (test_maps, rng.permutation(test_y)),  # shuffled test labels
        (test_maps, 1 - test_y),  # flipped test labels
        (np.clip(test_maps[::-1] * 1.7, 0, 1), test_y),  # different test maps altogether
    ]
    for maps, y in variants:
        other = select_and_apply(cfg, val_maps, val_y, maps, y)
        assert other.report["chosen"] == alone
        assert other.report["val"] == base.report["val"]
    # the test has teeth: test labels do change the reported test metrics, and choosing on the
    # test split would have chosen differently
    flipped = select_and_apply(cfg, val_maps, val_y, test_maps, 1 - test_y)
    assert flipped.report["test"]["confusion_matrix"] != base.report["test"]["confusion_matrix"]
    peeked = fit_technique(cfg, test_maps, 1 - test_y).chosen()
    assert peeked != alone


def test_selection_finds_the_planted_signal_and_localises():
    val_maps, val_y, _ = blob_maps(60, seed=4)
    test_maps, test_y, test_masks = blob_maps(60, seed=5)
    for technique in ("giaem", "dbscan", "kmeans-single"):
        out = select_and_apply(TechniqueConfig(technique=technique), val_maps, val_y, test_maps,
                               test_y, test_masks).report
        assert out["test"]["f1"] > 0.9, technique
        assert out["test"]["roc_auc"] > 0.9, technique
        assert out["localisation"]["dice_mean"] > 0.5, technique
        assert out["chosen"]["criterion"] == "balanced_accuracy"
        assert "anomaly_threshold" in out["chosen"]


def test_explicit_grids_and_balanced_accuracy():
    val_maps, val_y, _ = blob_maps(30, seed=6)
    cfg = TechniqueConfig(technique="giaem", criterion="balanced_accuracy",
                          thresholds=(0.05, 0.12, 0.3), tumor_indices=(0.001, 0.01, 0.5))
    f = fit_technique(cfg, val_maps, val_y)
    assert f.params["anomaly_threshold"] in (0.05, 0.12, 0.3)
    assert f.params["tumor_index"] in (0.001, 0.01, 0.5)
    # the chosen pair is the best of the 9 by brute force
    best = max(
        classification_metrics(val_y, giaem_scores(val_maps, t) > i)["balanced_accuracy"]
        for t in (0.05, 0.12, 0.3) for i in (0.001, 0.01, 0.5))
    assert f.val_value == pytest.approx(best)


def test_fitted_state_round_trips_through_torch_save(tmp_path):
    val_maps, val_y, _ = blob_maps(30, seed=8)
    f = fit_technique(TechniqueConfig(technique="kmeans-global"), val_maps, val_y)
    torch.save(f.state(), tmp_path / "t.pt")
    g = FittedTechnique.from_state(torch.load(tmp_path / "t.pt", weights_only=True))
    for a, b in zip(f.predict(val_maps), g.predict(val_maps), strict=True):
        np.testing.assert_array_equal(a, b)
    assert g.chosen() == f.chosen()


# ------------------------------------------------------------------------------------ bad input

def test_bad_technique_config_is_refused():
    with pytest.raises(BrainhpcError, match="giaem, dbscan, kmeans-single, kmeans-global"):
        TechniqueConfig(technique="kmeans")
    with pytest.raises(BrainhpcError, match="balanced_accuracy, f1"):
        TechniqueConfig(criterion="accuracy")
    with pytest.raises(BrainhpcError, match="alphas"):
        TechniqueConfig(technique="kmeans-global", alphas=(0.0, 2.0))
    with pytest.raises(BrainhpcError, match="thresholds"):
        TechniqueConfig(thresholds=(1.5,))


def test_bad_maps_and_labels_are_refused():
    maps, y, _ = blob_maps(10)
    cfg = TechniqueConfig()
    with pytest.raises(BrainhpcError, match=r"within \[0, 1\]"):
        fit_technique(cfg, maps * 3, y)
    with pytest.raises(BrainhpcError, match="N x H x W"):
        fit_technique(cfg, maps[0], y)
    with pytest.raises(BrainhpcError, match="10 error maps but 9 labels"):
        fit_technique(cfg, maps, y[:9])
    with pytest.raises(BrainhpcError, match="healthy and tumour"):
        fit_technique(cfg, maps, np.zeros(10, int))


# -------------------------------------------------------------------------------------- metrics

def test_metrics_hand_computed():
    y = [0, 0, 0, 1, 1, 1, 1]
    p = [0, 1, 0, 1, 1, 0, 1]  # tn 2, fp 1, fn 1, tp 3
    m = classification_metrics(y, p, score=[0.1, 0.6, 0.2, 0.9, 0.8, 0.3, 0.7])
    assert m["confusion_matrix"] == [[2, 1], [1, 3]]
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["precision"] == pytest.approx(3 / 4) and m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(3 / 4)
    assert m["roc_auc"] == pytest.approx(11 / 12)  # one of 12 (tumour, healthy) pairs misordered
    assert m["n_per_class"] == {"healthy": 3, "tumour": 4} and m["n"] == 7
    none = classification_metrics([1, 1], [0, 0])
    assert none["roc_auc"] is None and none["precision"] == 0.0
    with pytest.raises(BrainhpcError, match="2 labels but 3 predictions"):
        classification_metrics([0, 1], [0, 1, 1])
