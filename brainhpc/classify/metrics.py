"""Binary classification metrics (0 healthy, 1 tumour) as one JSON-ready dict.

Every classifier and technique reports through ``classification_metrics`` so metrics.json files
from different cells have identical keys and can be tabulated by the aggregate stage.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from brainhpc.errors import BrainhpcError


def classification_metrics(y_true, y_pred, score=None) -> dict:
    """Accuracy, precision, recall, F1, balanced accuracy, ROC-AUC, confusion matrix, n per class.

    ``score`` is a continuous tumour score (higher = more tumour-like); ROC-AUC is ``None`` when
    no score is given or ``y_true`` holds a single class (AUC is undefined there). Precision and
    recall that divide by zero are reported as 0. ``confusion_matrix`` is ``[[tn, fp], [fn, tp]]``
    (rows true, columns predicted, label order healthy, tumour).
    """
    y_true = np.asarray(y_true).astype(np.int64).ravel()
    y_pred = np.asarray(y_pred).astype(np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise BrainhpcError(f"metrics: {len(y_true)} labels but {len(y_pred)} predictions")
    if len(y_true) == 0:
        raise BrainhpcError("metrics: no samples to score")
    for name, arr in (("labels", y_true), ("predictions", y_pred)):
        bad = set(np.unique(arr).tolist()) - {0, 1}
        if bad:
            raise BrainhpcError(
                f"metrics: {name} must be 0 (healthy) or 1 (tumour), got {sorted(bad)}")
    cm = skm.confusion_matrix(y_true, y_pred, labels=[0, 1])
    roc_auc = None
    if score is not None:
        score = np.asarray(score, dtype=np.float64).ravel()
        if score.shape != y_true.shape:
            raise BrainhpcError(f"metrics: {len(y_true)} labels but {len(score)} scores")
        if not np.all(np.isfinite(score)):
            raise BrainhpcError("metrics: scores contain NaN or infinity")
        if len(np.unique(y_true)) == 2:
            roc_auc = float(skm.roc_auc_score(y_true, score))
    both = len(np.unique(y_true)) == 2
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)) if both else None,
        "roc_auc": roc_auc,
        "confusion_matrix": cm.astype(int).tolist(),
        "n": int(len(y_true)),
        "n_per_class": {"healthy": int(np.sum(y_true == 0)), "tumour": int(np.sum(y_true == 1))},
    }
