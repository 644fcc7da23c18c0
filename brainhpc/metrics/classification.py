"""Binary classification metrics (0 healthy, 1 tumour) as one JSON-ready dict.

Every classifier and technique reports through ``classification_metrics`` so metrics.json files
from different cells have identical keys and can be tabulated by the aggregate stage. Balanced
accuracy and ROC-AUC come first: on an unbalanced test split (72% tumour on brain-tumor-mri)
plain accuracy and F1 reward "call everything tumour". So every block also carries

* ``recall_per_class`` (healthy recall = specificity, tumour recall = sensitivity);
* ``degenerate``: True when one class takes ``DEGENERATE_SHARE`` (95%) or more of the
  predictions, i.e. the threshold collapsed and the numbers describe the class balance;
* ``baselines``: what trivial rules score on the same labels (majority class; "all tumour",
  whose F1 is 2p / (1 + p) for a tumour share p), so no reader mistakes them for a result.

A split holding one class only (a folder of tumour scans, say) gets the metrics that exist for
it: recall of that class, the score distribution; balanced accuracy and ROC-AUC are ``None``.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from brainhpc.errors import BrainhpcError

DEGENERATE_SHARE = 0.95
LEAD = ("balanced_accuracy", "roc_auc")  # the metrics tables and plots lead with


def baselines(y_true) -> dict:
    """Scores of the trivial rules on these labels."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = float(y.mean()) if len(y) else 0.0
    return {"majority_class": "tumour" if p >= 0.5 else "healthy",
            "majority_accuracy": max(p, 1 - p), "majority_balanced_accuracy": 0.5,
            "all_tumour_f1": 2 * p / (1 + p) if p > 0 else 0.0, "tumour_share": p}


def score_summary(score) -> dict:
    s = np.asarray(score, dtype=np.float64)
    q = np.quantile(s, (0.05, 0.25, 0.5, 0.75, 0.95)) if len(s) else [None] * 5
    return {"mean": float(s.mean()) if len(s) else None,
            **{f"q{int(k * 100):02d}": (None if v is None else float(v))
               for k, v in zip((0.05, 0.25, 0.5, 0.75, 0.95), q, strict=True)}}


def classification_metrics(y_true, y_pred, score=None) -> dict:
    """Balanced accuracy, ROC-AUC, per-class recall, accuracy, precision, recall, F1, confusion
    matrix, n per class, the degenerate flag and the trivial baselines (module docstring).

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
    both = len(np.unique(y_true)) == 2
    if score is not None:
        score = np.asarray(score, dtype=np.float64).ravel()
        if score.shape != y_true.shape:
            raise BrainhpcError(f"metrics: {len(y_true)} labels but {len(score)} scores")
        if not np.all(np.isfinite(score)):
            raise BrainhpcError("metrics: scores contain NaN or infinity")
        if both:
            roc_auc = float(skm.roc_auc_score(y_true, score))
    recall = {name: (float(cm[k, k] / cm[k].sum()) if cm[k].sum() else None)
              for k, name in enumerate(("healthy", "tumour"))}
    predicted_tumour = float(y_pred.mean())
    out = {
        "balanced_accuracy": float(skm.balanced_accuracy_score(y_true, y_pred)) if both else None,
        "roc_auc": roc_auc,
        "recall_per_class": recall,
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "confusion_matrix": cm.astype(int).tolist(),
        "n": int(len(y_true)),
        "n_per_class": {"healthy": int(np.sum(y_true == 0)), "tumour": int(np.sum(y_true == 1))},
        "predicted_tumour_share": predicted_tumour,
        "degenerate": bool(max(predicted_tumour, 1 - predicted_tumour) >= DEGENERATE_SHARE),
        "baselines": baselines(y_true),
    }
    if score is not None:
        out["score_summary"] = score_summary(score)
    return out


def percent(v) -> str:
    """A share as a percentage with one decimal ("-" when missing)."""
    return "-" if v is None else f"{100 * v:.1f}%"


def number(v) -> str:
    """A metric with three decimals ("-" when missing)."""
    return "-" if v is None else f"{v:.3f}"
