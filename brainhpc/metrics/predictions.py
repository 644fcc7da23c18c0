"""Per-image predictions, the files every interval and paired test is computed from.

A classify, segment or evaluate cell writes what it predicted for each test image, so the
aggregate can resample the units that are really independent (duplicate groups, patients)
without re-training anything:

``predictions.csv`` (classifiers): one row per (arm, image). ``arm`` names what predicted it:
``cnn``, a VAE technique (``giaem``...), or a baseline (``intensity threshold``, ``image
statistics``, ``brain area``); ``group`` is the image's duplicate group or patient (the unit of
the bootstrap); ``score`` is higher-means-tumour; ``decision`` is the frozen rule's 0/1.

``localisation.csv`` (VAE detectors, where the test set has masks): one row per (arm, tumour
slice) with its ``dice``: each technique's detected region (0 where it calls the slice
healthy), ``residual maps`` (the map at the threshold chosen on validation masks) and the
``intensity threshold`` baseline.

``predictions.csv`` (segmenters): one row per (arm, slice): ``tumour`` (the truth mask is not
empty), the slice ``dice`` (empty when the truth is empty, as in ``dice_per_slice``), and the
pixel counts ``intersection``, ``pred_area``, ``true_area``. ``patients.csv``: one row per
(arm, patient) with its 3-D Dice over the stacked slices (empty for a patient without tumour).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from brainhpc.errors import BrainhpcError
from brainhpc.fsio import write_text

CLASSIFY_COLUMNS = ("arm", "source", "group", "label", "score", "decision")
SLICE_COLUMNS = ("arm", "source", "patient", "group", "tumour", "dice", "intersection",
                 "pred_area", "true_area")
PATIENT_COLUMNS = ("arm", "patient", "group", "slices", "dice", "intersection", "pred_area",
                   "true_area")
LOCALISATION_COLUMNS = ("arm", "source", "group", "dice")
# the file names of a cell folder
PREDICTIONS, PATIENTS, LOCALISATION = "predictions.csv", "patients.csv", "localisation.csv"


def classification_rows(arm: str, sources, groups, labels, score, decision) -> list[dict]:
    """The rows of one arm: one per image, in the order given."""
    n = len(labels)
    score = np.full(n, np.nan) if score is None else np.asarray(score, float)
    for name, part in (("sources", sources), ("groups", groups), ("score", score),
                       ("decision", decision)):
        if len(part) != n:
            raise BrainhpcError(f"predictions of {arm}: {len(part)} {name} for {n} labels")
    return [{"arm": arm, "source": s, "group": g, "label": int(y), "score": float(v),
             "decision": int(d)}
            for s, g, y, v, d in zip(sources, groups, labels, score, decision, strict=True)]


def localisation_rows(arm: str, pred: np.ndarray, masks: np.ndarray, sources, groups
                      ) -> list[dict]:
    """One row per tumour slice (non-empty mask) of ``pred`` (N x H x W bool) against
    ``masks``: its Dice."""
    p = np.asarray(pred).reshape(len(pred), -1).astype(bool)
    m = np.asarray(masks).reshape(len(masks), -1) > 0
    inter = (p & m).sum(1).astype(np.float64)
    dice = 2 * inter / np.maximum(p.sum(1) + m.sum(1), 1)
    return [{"arm": arm, "source": sources[i], "group": groups[i], "dice": float(dice[i])}
            for i in np.flatnonzero(m.any(1))]


def write_rows(path: str | Path, rows: list[dict], columns: tuple[str, ...]) -> Path:
    """Write ``rows`` as CSV (atomic); floats with 6 significant digits, NaN/None as empty."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore",
                       lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _cell(r.get(k)) for k in columns})
    write_text(path, buf.getvalue())
    return Path(path)


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not np.isfinite(v) else f"{v:.6g}"
    return v


NUMERIC = frozenset({"label", "score", "decision", "tumour", "dice", "intersection",
                     "pred_area", "true_area", "slices"})


def read_rows(path: str | Path) -> list[dict]:
    """A predictions or patients file back as dicts; numeric columns as floats (NaN when
    empty), the rest as text. A missing file reads as no rows."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in NUMERIC & r.keys():
            r[k] = float(r[k]) if r[k] not in ("", None) else float("nan")
    return rows
