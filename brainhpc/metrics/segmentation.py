"""Segmentation metrics for binary tumour masks: Dice per slice and per patient, HD95, slice-level
detection, the validation-chosen minimum predicted area, and the per-slice and per-patient rows
of ``predictions.csv`` / ``patients.csv`` (``brainhpc.metrics.predictions``) they average.
(The intensity baseline's rule lives in ``brainhpc.anomaly.residuals``: one definition for
segmentation and anomaly localisation.)

Dice and HD95 come from MONAI (``compute_dice``, ``compute_hausdorff_distance`` at the 95th
percentile), the field's reference implementations; only counting and grouping live here.

Empty masks, which every definition has to decide about:

* per-slice Dice is averaged over **tumour slices** (non-empty truth) only; a tumour slice with an
  empty prediction scores 0. Healthy slices show up in detection instead.
* per-patient Dice stacks all slices of a patient into one volume (3D Dice: sums over the
  volume, so slice order does not matter) and is averaged over patients whose volume holds
  tumour; patients without tumour are counted, with how many of them got any predicted pixel.
  A dataset without patient ids counts each image as its patient (then it equals per-slice).
* HD95 (pixels at the prepared size; images are resized, so there is no physical spacing) is
  computed per slice where truth and prediction are both non-empty; ``n_hd95`` says how many
  slices that is and ``n_missed`` how many tumour slices had no prediction at all.
* detection: a slice counts as true tumour when its truth mask is non-empty (not its label) and
  as predicted tumour when its predicted mask has at least ``min_area`` pixels (a rule chosen on
  validation; it does not touch the masks Dice and HD95 score); ``detection_any_pixel`` is the
  same with any predicted pixel.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from brainhpc.errors import BrainhpcError

# candidate minimum predicted areas (pixels) for the detection rule, cut at size*size/64
AREA_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def binary(masks: np.ndarray, what: str = "masks") -> np.ndarray:
    """N x 1 x H x W or N x H x W masks (0/1, 0/255 or bool) -> N x H x W bool."""
    a = np.asarray(masks)
    if a.ndim == 4:
        if a.shape[1] != 1:
            raise BrainhpcError(f"{what}: expected one channel, got shape {a.shape}")
        a = a[:, 0]
    if a.ndim != 3:
        raise BrainhpcError(f"{what}: expected N x 1 x H x W or N x H x W, got shape {a.shape}")
    return a > 0


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float()[:, None]  # N x 1 x H x W


def dice_per_slice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Dice of each slice; NaN where the truth is empty (MONAI ``ignore_empty``)."""
    if len(pred) == 0:
        return np.zeros(0)
    d = compute_dice(_t(pred), _t(truth), include_background=True, ignore_empty=True)
    return d[:, 0].double().numpy()


def hd95_per_slice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """95th-percentile symmetric Hausdorff distance (pixels) of each slice; NaN unless truth and
    prediction are both non-empty (the distance is undefined or infinite otherwise)."""
    out = np.full(len(pred), np.nan)
    both = np.flatnonzero(pred.any((1, 2)) & truth.any((1, 2)))
    if len(both):
        with warnings.catch_warnings():  # MONAI's own deprecated-argument notice, not ours
            warnings.simplefilter("ignore", FutureWarning)
            hd = compute_hausdorff_distance(_t(pred[both]), _t(truth[both]),
                                            include_background=True, percentile=95)
        out[both] = hd[:, 0].double().numpy()
    return out


def patient_groups(patients: list[str]) -> dict[str, np.ndarray]:
    """Patient id -> indices of its slices, in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(patients):
        groups.setdefault(p, []).append(i)
    return {p: np.asarray(ix) for p, ix in groups.items()}


def dice_per_patient(pred: np.ndarray, truth: np.ndarray, patients: list[str]) -> dict:
    """Patient -> 3D Dice over its stacked slices (NaN for a patient without tumour)."""
    if len(patients) != len(pred):
        raise BrainhpcError(f"{len(patients)} patient ids for {len(pred)} slices")
    groups = patient_groups(patients)
    if len(groups) == len(pred):  # one slice per patient: the per-slice Dice, in one call
        return dict(zip(groups, dice_per_slice(pred, truth)[np.concatenate(
            list(groups.values()))].tolist(), strict=True)) if len(pred) else {}
    out = {}
    for p, ix in groups.items():
        vol_p, vol_t = _t(pred[ix])[:, 0][None, None], _t(truth[ix])[:, 0][None, None]
        d = compute_dice(vol_p, vol_t, include_background=True, ignore_empty=True)  # 1x1xDxHxW
        out[p] = float(d[0, 0])
    return out


def detection(pred_any: np.ndarray, truth_any: np.ndarray) -> dict:
    """Slice-level detection counts, sensitivity, specificity (None when undefined)."""
    tp = int(np.sum(pred_any & truth_any))
    fn = int(np.sum(~pred_any & truth_any))
    fp = int(np.sum(pred_any & ~truth_any))
    tn = int(np.sum(~pred_any & ~truth_any))
    sens = tp / (tp + fn) if tp + fn else None
    spec = tn / (tn + fp) if tn + fp else None
    bal = None if sens is None or spec is None else (sens + spec) / 2
    return {"sensitivity": sens, "specificity": spec, "balanced_accuracy": bal,
            "tp": tp, "fn": fn, "fp": fp, "tn": tn}


def _stats(values: np.ndarray, prefix: str) -> dict:
    v = values[np.isfinite(values)]
    if not len(v):
        return {f"{prefix}_mean": None, f"{prefix}_median": None, f"{prefix}_std": None}
    return {f"{prefix}_mean": float(v.mean()), f"{prefix}_median": float(np.median(v)),
            f"{prefix}_std": float(v.std())}


def segmentation_metrics(pred: np.ndarray, truth: np.ndarray, patients: list[str],
                         min_area: int = 1, hd95: bool = True) -> dict:
    """Every number of a segmenter on one split, as one JSON-ready dict (see module doc).

    Dice and HD95 score the masks as given; ``min_area`` is the detection rule only (a slice is
    predicted tumour when at least that many pixels are), ``detection_any_pixel`` is min_area 1.
    """
    pred, truth = binary(pred, "predicted masks"), binary(truth, "truth masks")
    if pred.shape != truth.shape:
        raise BrainhpcError(f"predicted masks {pred.shape} and truth masks {truth.shape} differ")
    truth_any, pred_any = truth.any((1, 2)), pred.any((1, 2))
    per_slice = dice_per_slice(pred, truth)
    per_patient = dice_per_patient(pred, truth, patients)
    groups = patient_groups(patients)
    healthy_patients = [p for p, ix in groups.items() if not truth_any[ix].any()]
    out = {
        "n_slices": int(len(pred)), "n_tumour_slices": int(truth_any.sum()),
        **_stats(per_slice, "dice_slice"),
        "n_patients": len(groups), "n_tumour_patients": len(groups) - len(healthy_patients),
        **_stats(np.array(list(per_patient.values()), dtype=float), "dice_patient"),
        "fp_healthy_patients": int(sum(pred_any[groups[p]].any() for p in healthy_patients)),
    }
    if hd95:
        h = hd95_per_slice(pred, truth)
        out.update(_stats(h, "hd95"))
        out["n_hd95"] = int(np.isfinite(h).sum())
        out["n_missed"] = int(np.sum(truth_any & ~pred_any))
        out["hd95_unit"] = "px"
    out["detection"] = {"min_area": int(min_area),
                        **detection(pred.sum((1, 2)) >= min_area, truth_any)}
    out["detection_any_pixel"] = detection(pred_any, truth_any)
    return out


# ------------------------------------------------------------------------------ chosen rules

def choose_min_area(pred: np.ndarray, truth: np.ndarray, size: int) -> tuple[int, float | None]:
    """The minimum predicted area (pixels) that maximises validation detection balanced accuracy
    (Youden's J), smallest on ties; ``(1, None)`` when validation lacks tumour or healthy slices
    (nothing to trade off). Candidates: ``AREA_GRID`` up to size*size/64."""
    pred, truth = binary(pred, "predicted masks"), binary(truth, "truth masks")
    area, truth_any = pred.sum((1, 2)), truth.any((1, 2))
    if truth_any.all() or not truth_any.any():
        return 1, None
    best, best_bal = 1, -1.0
    for a in AREA_GRID:
        if a > max(1, size * size // 64):
            break
        bal = detection(area >= a, truth_any)["balanced_accuracy"]
        if bal > best_bal + 1e-12:
            best, best_bal = a, bal
    return best, best_bal


# ------------------------------------------------------------------------------ the rows

def prediction_rows(arm: str, pred: np.ndarray, truth: np.ndarray, sources: list[str],
                    patients: list[str], groups: list[str]) -> tuple[list[dict], list[dict]]:
    """(slice rows, patient rows) of one arm, the columns of ``SLICE_COLUMNS`` and
    ``PATIENT_COLUMNS``: the very Dice values ``segmentation_metrics`` averages (NaN without
    tumour), so the files reproduce metrics.json and the aggregate can resample patients."""
    pred, truth = binary(pred, "predicted masks"), binary(truth, "truth masks")
    n = len(pred)
    for name, part in (("truth masks", truth), ("sources", sources), ("patients", patients),
                       ("groups", groups)):
        if len(part) != n:
            raise BrainhpcError(f"predictions of {arm}: {len(part)} {name} for {n} slices")
    inter = (pred & truth).sum((1, 2))
    pred_n, true_n = pred.sum((1, 2)), truth.sum((1, 2))
    dice = dice_per_slice(pred, truth)
    slices = [{"arm": arm, "source": sources[i], "patient": patients[i], "group": groups[i],
               "tumour": int(true_n[i] > 0), "dice": float(dice[i]),
               "intersection": int(inter[i]), "pred_area": int(pred_n[i]),
               "true_area": int(true_n[i])} for i in range(n)]
    per_patient = dice_per_patient(pred, truth, patients)
    rows = [{"arm": arm, "patient": p, "group": groups[ix[0]], "slices": len(ix),
             "dice": float(per_patient[p]), "intersection": int(inter[ix].sum()),
             "pred_area": int(pred_n[ix].sum()), "true_area": int(true_n[ix].sum())}
            for p, ix in patient_groups(patients).items()]
    return slices, rows
