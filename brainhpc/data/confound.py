"""The confound check: how well trivial image statistics alone predict the label.

A classifier is only interesting where it beats what acquisition alone gives away. On the
brain-tumor-mri data mean intensity alone separates tumour from healthy with AUC ~0.24 (the
classes come from different scanners), so a 98% CNN there may be a scanner detector. ``prepare``
runs this check on every dataset and records it in the manifest; the aggregate table shows its
test-split row ("image statistics only") beside the models.

Statistics per pre-processed image: mean, std and percentiles of the whole square, the mean
inside the brain mask, sharpness (variance of the Laplacian), the brain mask's share of the
image and the aspect (height / width) of the brain crop before padding. Reported: each
statistic's own ROC-AUC on the training split (0.5 = useless; far from 0.5 either way = the label
leaks; a warning names every statistic above ``WARN_HIGH`` or below ``WARN_LOW``), the
cross-validated ROC-AUC of a logistic regression on all of them (folds keep duplicate groups and
patients together), and that regression, fitted on the train split, scored on the test split.
"""

from __future__ import annotations

import logging
import warnings

import cv2
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

log = logging.getLogger(__name__)

STATISTICS = ("mean", "std", "p05", "p25", "p50", "p75", "p95", "brain_mean", "sharpness",
              "brain_fraction", "aspect")
WARN_HIGH, WARN_LOW = 0.75, 0.25
FOLDS = 5


def image_statistics(images: np.ndarray, brain: np.ndarray | None,
                     aspect: np.ndarray | None) -> np.ndarray:
    """N x len(STATISTICS) float64 matrix (N x 1 x H x W uint8 images; brain masks 0/255)."""
    n = len(images)
    flat = images.reshape(n, -1).astype(np.float32)
    out = np.zeros((n, len(STATISTICS)))
    out[:, 0] = flat.mean(1)
    out[:, 1] = flat.std(1)
    out[:, 2:7] = np.percentile(flat, (5, 25, 50, 75, 95), axis=1).T
    if brain is not None:
        b = brain.reshape(n, -1) > 0
        area = b.sum(1)
        out[:, 7] = np.where(area > 0, (flat * b).sum(1) / np.maximum(area, 1), 0.0)
        out[:, 9] = area / b.shape[1]
    for i in range(n):
        out[i, 8] = cv2.Laplacian(images[i].reshape(images.shape[-2:]), cv2.CV_32F).var()
    out[:, 10] = 1.0 if aspect is None else aspect
    return out


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    if len(np.unique(y)) < 2 or np.ptp(score) == 0:
        return None if len(np.unique(y)) < 2 else 0.5
    return float(roc_auc_score(y, score))


def _model():
    return make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced",
                                                              max_iter=2000))


def confound_check(train_stats: np.ndarray, train_labels: np.ndarray, train_groups: np.ndarray,
                   test_stats: np.ndarray, test_labels: np.ndarray, seed: int = 0) -> dict:
    """The manifest's ``confound`` block (see the module docstring)."""
    y = np.asarray(train_labels)
    per_stat = {name: _auc(y, train_stats[:, k]) for k, name in enumerate(STATISTICS)}
    warn = [f"{name} alone gives ROC-AUC {auc:.2f} for the label"
            for name, auc in per_stat.items()
            if auc is not None and (auc > WARN_HIGH or auc < WARN_LOW)]
    result: dict = {"statistics": list(STATISTICS),
                    "per_statistic_auc": {k: None if v is None else round(v, 4)
                                          for k, v in per_stat.items()},
                    "cv_auc": None, "test": None, "warnings": warn}
    if len(np.unique(y)) < 2:
        return result
    folds = min(FOLDS, int(np.bincount(y).min()), len(np.unique(train_groups)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if folds >= 2:
            oof = np.full(len(y), np.nan)
            cv = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
            for tr, te in cv.split(train_stats, y, train_groups):
                if len(np.unique(y[tr])) == 2:  # a one-class fold predicts nothing
                    oof[te] = _model().fit(train_stats[tr], y[tr]).predict_proba(
                        train_stats[te])[:, 1]
            ok = ~np.isnan(oof)
            if len(np.unique(y[ok])) == 2:
                result["cv_auc"] = round(float(roc_auc_score(y[ok], oof[ok])), 4)
        model = _model().fit(train_stats, y)
        score = model.predict_proba(test_stats)[:, 1]
    yt = np.asarray(test_labels)
    pred = (score > 0.5).astype(int)
    result["test"] = {
        "roc_auc": None if len(np.unique(yt)) < 2 else round(float(roc_auc_score(yt, score)), 4),
        "balanced_accuracy": None if len(np.unique(yt)) < 2 else
        round(float(balanced_accuracy_score(yt, pred)), 4),
        "accuracy": round(float((pred == yt).mean()), 4), "n": int(len(yt))}
    cv = result["cv_auc"]
    if cv is not None and (cv > WARN_HIGH or cv < WARN_LOW):
        warn.append(f"a logistic regression on image statistics alone reaches cross-validated "
                    f"ROC-AUC {cv:.2f}: the label is predictable without looking at a tumour")
    for w in warn:
        log.warning("confound check: %s", w)
    return result
