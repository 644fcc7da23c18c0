"""Scoring one saved model on one image set, everything frozen as its own cell chose it.

The image set is a prepared dataset (its ``test`` split by default; ``train|val|all`` must be
asked for) or a raw image folder, which goes through the same pre-processing as ``brainhpc
prepare`` (``brainhpc.data.folder.read_folder``) at the model's image size. A prepared dataset of
another size is refused (re-prepare it).

External validation is only honest on images the model has not seen: a model file carries the
fingerprints of its development images (train and validation splits), and every image of the
set that is a byte-identical copy or a near-duplicate of one of them
(``brainhpc.data.duplicates``, flips and rotations included) is dropped before scoring and
counted in ``overlap`` (Br35H's healthy slices reappear, resized, in brain-tumor-mri's
``notumor/``). A split of the model's own prepared dataset is not checked: prepare's groups
already keep it apart. A folder holding one class only (``--labels tumour=scans``) is scored
with the metrics that exist for it: that class's recall and the score distribution.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from brainhpc.anomaly import residuals
from brainhpc.anomaly.techniques import localisation
from brainhpc.data.duplicates import copies_of, duplicate_groups
from brainhpc.data.folder import read_folder
from brainhpc.data.prepared import (
    check_size,
    dataset_key,
    development_fingerprints,
    is_prepared,
    prepared_size,
)
from brainhpc.data.shards import SPLITS, ShardData, load_split
from brainhpc.data.split import group_names
from brainhpc.data.training import concat
from brainhpc.errors import BrainhpcError
from brainhpc.metrics.classification import classification_metrics, percent
from brainhpc.metrics.predictions import (
    CLASSIFY_COLUMNS,
    PREDICTIONS,
    classification_rows,
    write_rows,
)
from brainhpc.metrics.segmentation import dice_per_slice
from brainhpc.predictors.classifier import save_error_maps, score_with, write_localisation
from brainhpc.predictors.segmenter import (
    save_overlays,
    score_segmenter,
    truth_masks,
    write_predictions,
)

log = logging.getLogger(__name__)
INTENSITY = "intensity threshold"  # the baseline's arm in predictions.csv, as classify names it

@dataclass
class ImageSet:
    """One image set to score models on, read once per model image size (``get``)."""

    path: Path
    split: str = "test"  # prepared datasets only
    labels: str | None = None  # raw folders: "tumour=yes healthy=no" (one label: one class)
    workers: int | None = None
    cache: dict = field(default_factory=dict)

    @property
    def prepared(self) -> bool:
        return is_prepared(self.path)

    def get(self, size: int) -> tuple[ShardData, list[dict], str]:
        """(images at ``size`` px, skipped files, what kind of set) for a model of ``size``."""
        if size not in self.cache:
            self.cache[size] = self._read(size)
        return self.cache[size]

    def _read(self, size: int) -> tuple[ShardData, list[dict], str]:
        if self.prepared:
            psize = prepared_size(self.path)
            if psize != size:
                raise BrainhpcError(
                    f"{self.path} is prepared at {psize}x{psize} px but the model takes "
                    f"{size}x{size} px; re-prepare it with --size {size} (or pass the raw image "
                    "folder, which is pre-processed at the right size)")
            splits = SPLITS if self.split == "all" else (self.split,)
            data = concat([load_split(self.path, s) for s in splits])
            check_size(data.images, size, f"{self.path} ({self.split})",
                       f"re-prepare it with --size {size}")
            return data, [], f"prepared:{self.split}"
        if not self.path.is_dir():
            raise BrainhpcError(f"evaluate: {self.path} is neither a prepared dataset (no "
                                "manifest.json) nor an image folder")
        data, skipped = read_folder(self.path, size, labels=self.labels, workers=self.workers,
                                    one_class=True)
        return with_groups(data), skipped, "raw folder"

    def without_development(self, model: dict) -> tuple[ShardData, dict]:
        """The set at the model's size minus copies of its development images (cached per
        developing dataset: every model of one run shares them)."""
        size = int(model["image_size"])
        data = self.get(size)[0]
        model = {**model, **development(model)}
        own = self.prepared and model.get("data_key") is not None and \
            dataset_key(self.path) == model["data_key"]
        key = ("without", size, model.get("data_key"), own)
        if key not in self.cache:
            self.cache[key] = drop_overlap(data, model, own)
        data, overlap = self.cache[key]
        if own and self.split != "test":  # asked for: scoring the model on what it learned from
            overlap = {**overlap, "reason": f"split {self.split!r} of the model's own prepared "
                       "dataset: it holds the development images, scored as asked (nothing "
                       "dropped)"}
        return data, overlap


def development(model: dict) -> dict:
    """``development_images`` and ``data_key`` of a saved model; a U-Net saved before its
    model.pt carried them gets them from the prepared dataset its cell's metrics.json names."""
    if model.get("development_images") is not None:
        return {}
    cell = Path(model.get("path", "")).parent
    try:
        prepared = Path(json.loads((cell / "metrics.json").read_text())["data"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not is_prepared(prepared):
        return {}
    return {"development_images": development_fingerprints(prepared),
            "data_key": dataset_key(prepared)}


def drop_overlap(data: ShardData, model: dict, own: bool = False) -> tuple[ShardData, dict]:
    """``data`` without copies and near-copies of the model's development images, and the
    counts (with a few examples) of what was dropped. ``own``: ``data`` is a split of the very
    dataset the model was developed on, whose splits prepare already grouped."""
    if own:
        return data, {"checked": False, "reason": "a split of the model's own prepared "
                      "dataset: prepare's duplicate and patient groups already separate it"}
    dev = model.get("development_images")
    if dev is None or data.thumbs is None or data.sha256 is None:
        why = ("the model has no development fingerprints (trained before they existed)"
               if dev is None else "the data has no fingerprints (re-prepare it)")
        log.warning("evaluate: overlap with the training data NOT checked: %s", why)
        return data, {"checked": False, "reason": why}
    exact, near = copies_of(data.sha256, data.thumbs, dev["sha256"], dev["thumbs"].numpy())
    drop = exact | near
    info = {"checked": True, "n_before": len(data), "exact_copies": int(exact.sum()),
            "near_copies": int(near.sum()), "dropped": int(drop.sum()),
            "examples": [data.sources[i] for i in np.flatnonzero(drop)[:10]]}
    if drop.all():
        raise BrainhpcError(f"evaluate: all {len(data)} images are copies or near-copies of the "
                            "model's training/validation images; nothing external is left")
    if drop.any():
        log.warning("evaluate: dropped %d of %d images that copy the model's development "
                    "images (%d byte-identical, %d near-duplicates)", info["dropped"], len(data),
                    info["exact_copies"], info["near_copies"])
    return data.select(~drop), info


def with_groups(data: ShardData) -> ShardData:
    """A raw folder's images with their duplicate groups (as ``prepare`` forms them), the unit
    that intervals on this set resample: copies of one scan are not independent draws."""
    if data.groups is not None or data.thumbs is None or data.sha256 is None or not len(data):
        return data
    groups, _, _ = duplicate_groups(data.sha256, data.thumbs, data.labels, data.patients)
    data.groups = group_names(groups, data.sources)
    return data


def _write_predictions(clf: dict, data: ShardData, scored: dict, out: Path) -> None:
    arms = ["cnn"] if clf["model"] == "cnn" else [a for a in (*clf["fitted"], INTENSITY)
                                                   if a in scored]
    rows = [r for arm in arms for r in classification_rows(
        arm, data.sources, data.group_ids(), data.labels, scored[arm][1], scored[arm][0])]
    write_rows(out / PREDICTIONS, rows, CLASSIFY_COLUMNS)


def detector_extras(clf: dict, data: ShardData, scored: dict, brain: np.ndarray) -> dict:
    """What a VAE detector reports on an image set beyond its techniques, every rule frozen in
    model.pt (``brain``: the set's brain masks): the residual maps' localisation (pixel
    AUPRC; Dice at the threshold chosen on its validation masks) where the set has masks, and
    the intensity baseline (image decisions, and its localisation where the set has masks).
    Adds the baseline's (decisions, scores) to ``scored`` for predictions.csv."""
    rules = clf.get("rules")
    out: dict = {}
    if data.masks is not None and (data.masks > 0).any():
        out["localisation"] = {**residuals.frozen_localisation(
            scored["maps"], data.masks, brain, (rules or {}).get("residual_threshold")),
            "empty_mask_dice": 0.0}
    if rules is None:
        out["baselines"] = {"note": "model.pt from before its rules were saved: re-run the "
                                    "classify cell for the intensity baseline"}
        return out
    rule = rules["intensity"]
    block, pred, score = residuals.frozen_intensity(
        scored["inputs"], data.labels, brain, data.masks if "localisation" in out else None,
        rule["threshold"], rule["image_cut"])
    scored[INTENSITY] = (pred, score)
    out["baselines"] = {"intensity_threshold": {**block, "intensity_threshold": rule["threshold"],
                                                "image_cut": rule["image_cut"]}}
    return out


def score_classifier(clf: dict, data: ShardData, device: torch.device, out: Path,
                     title: str) -> dict:
    """The CNN's metrics block, or one block per VAE technique (with localisation where the
    set has masks) and error_maps.png; predictions.csv, every image's score and decision."""
    scored = score_with(clf, data, device)
    out.mkdir(parents=True, exist_ok=True)
    if clf["model"] == "cnn":
        _write_predictions(clf, data, scored, out)
        return {**classification_metrics(data.labels, *scored["cnn"]),
                "chosen": {"threshold": clf["threshold"]}}
    brain = residuals.brain_masks(data.brain, data.images)
    extras = detector_extras(clf, data, scored, brain)
    _write_predictions(clf, data, scored, out)
    techniques = {}
    for name, fitted in clf["fitted"].items():
        block = classification_metrics(data.labels, *scored[name])
        block["chosen"] = fitted.chosen()
        if data.masks is not None:
            block["localisation"] = localisation(fitted.regions(scored["maps"]), data.masks)
        techniques[name] = block
    out.mkdir(parents=True, exist_ok=True)
    save_error_maps(out / "error_maps.png", data, scored["inputs"], scored["maps"],
                    clf["fitted"], title)
    write_localisation(out, data, scored["maps"], scored["inputs"], brain, clf["fitted"],
                       clf.get("rules"))
    return {"techniques": techniques, **extras}


def score_segmentation(seg: dict, data: ShardData, device: torch.device, out: Path,
                       title: str) -> dict:
    """Dice, HD95 and detection with the frozen rule, the baselines (empty; intensity where
    model.pt carries its rule), overlays.png, and predictions.csv / patients.csv: the slices
    and patients every interval of this scoring is resampled from."""
    block, arms = score_segmenter(seg, data, device, what=title)
    truth, pred = truth_masks(data), arms["unet"]
    save_overlays(out / "overlays.png", data.images, truth, pred, dice_per_slice(pred, truth),
                  f"{title}: truth green, prediction red, both yellow")
    write_predictions(out, arms, data)
    return {**block, "n": len(data)}


def log_scores(model: dict, result: dict, where: str) -> None:
    if model["kind"] == "segmenter":
        log.info("evaluate %s (segmenter) on %s: Dice per patient %s, per slice %s (n %d)",
                 model["path"], where, result.get("dice_patient_mean"),
                 result.get("dice_slice_mean"), result["n"])
        return
    blocks = [("cnn", result)] if model["model"] == "cnn" else result["techniques"].items()
    for name, block in blocks:
        rec = block["recall_per_class"]
        log.info("evaluate %s (%s) on %s: balanced acc %s, ROC-AUC %s, recall healthy %s "
                 "tumour %s (n %d)", model["path"], name, where,
                 percent(block["balanced_accuracy"]),
                 "-" if block["roc_auc"] is None else f"{block['roc_auc']:.3f}",
                 percent(rec["healthy"]), percent(rec["tumour"]), block["n"])
