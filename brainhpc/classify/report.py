"""What a classify cell reports beyond the CNN's one block: the VAE detector's techniques, its
localisation and the intensity baseline from one set of residual maps, and the summary lines
the cell logs (one per row of its results)."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from brainhpc.anomaly import residuals
from brainhpc.anomaly.techniques import best_cut, select_and_apply
from brainhpc.data import confound
from brainhpc.data.shards import ShardData
from brainhpc.metrics.classification import classification_metrics, number, percent
from brainhpc.metrics.predictions import classification_rows
from brainhpc.predictors.classifier import Detector, save_error_maps, write_localisation

# the features of each trivial baseline (brainhpc.data.confound.STATISTICS); "brain area" is
# the slice position of a patient's stack (where image statistics get their signal on LGG)
BASELINE_FEATURES = {"image statistics": confound.STATISTICS[:-1],
                     "brain area": ("brain_fraction",)}


def _fmt(block: dict, loc: dict | None = None) -> str:
    parts = [f"balanced acc {percent(block.get('balanced_accuracy'))}",
             f"ROC-AUC {number(block.get('roc_auc'))}"]
    if loc:
        parts += [f"pixel AUPRC {number(loc.get('pixel_auprc'))}",
                  f"Dice {number(loc.get('dice_mean', loc.get('best_dice_mean')))}"]
    if block.get("degenerate"):
        parts.append("DEGENERATE (one class predicted)")
    return ", ".join(parts)


def summary_lines(m: dict) -> list[str]:
    """One line per row of the cell's results (the CNN, or each technique and baseline)."""
    where = f"{m['model']} on {m['train_data']}, test split"
    if m["model"] == "cnn":
        return [f"{where}: {_fmt(m)}"]
    lines = [f"{where}: {name:<14} {_fmt(b['test'], b.get('localisation'))}"
             for name, b in m["techniques"].items()]
    if m.get("localisation"):
        loc = m["localisation"]
        lines.append(f"{where}: residual maps   pixel AUPRC {number(loc.get('pixel_auprc'))}, "
                     f"best Dice {number(loc.get('best_dice_mean'))} (threshold from val)")
    base = m.get("baselines", {}).get("intensity_threshold")
    if base:
        lines.append(f"{where}: intensity threshold (baseline) "
                     f"{_fmt(base['test'], base.get('localisation'))}")
    stats = m.get("image_statistics_baseline")
    if stats:
        lines.append(f"{where}: image statistics only (baseline) balanced acc "
                     f"{percent(stats.get('balanced_accuracy'))}, "
                     f"ROC-AUC {number(stats.get('roc_auc'))}")
    return lines


def vae_report(cfg, det: Detector, val: ShardData, test: ShardData, device: torch.device,
               spec) -> dict:
    """Every technique from one set of residual maps, their localisation, the baselines, and
    error_maps.png; thresholds chosen on validation, then frozen for test."""
    val_in, test_in = det.inputs(val), det.inputs(test)
    val_maps = det.maps(val, device, inputs=val_in)
    test_maps = det.maps(test, device, inputs=test_in)
    val_b = residuals.brain_masks(val.brain, val.images)
    test_b = residuals.brain_masks(test.brain, test.images)
    techniques, fitted, rows = {}, {}, []
    for name in cfg.techniques:
        applied = select_and_apply(cfg.technique_config(name), val_maps, val.labels, test_maps,
                                   test.labels, test.masks)
        fitted[name] = applied.fitted
        techniques[name] = applied.report
        rows += predictions(name, test, applied.score, applied.pred)
    report: dict = {"techniques": techniques,
                    "fitted": {n: f.state() for n, f in fitted.items()},
                    "chosen": {"criterion": cfg.criterion, "residual": cfg.residual,
                               "standardise": cfg.standardise, "vae_arch": cfg.vae_arch,
                               "median": cfg.median or residuals.median_kernel(
                                   val.images.shape[-1])}}
    base, pred, score = residuals.intensity_baseline(val_in, val.labels, val_b, test_in,
                                                     test.labels, test_b, val.masks, test.masks,
                                                     cfg.criterion)
    report["baselines"] = {"intensity_threshold": base}
    report["predictions"] = rows + predictions("intensity threshold", test, score, pred)
    # frozen into model.pt, so evaluate scores external sets with masks by the same rules
    report["rules"] = {"intensity": {"threshold": base["intensity_threshold"],
                                     "image_cut": base["image_cut"]},
                       "residual_threshold": None}
    if test.masks is not None and val.masks is not None and (val.masks > 0).any():
        report["localisation"] = residuals.localisation(val_maps, val.masks, val_b, test_maps,
                                                        test.masks, test_b)
        report["localisation"]["empty_mask_dice"] = 0.0  # predicting nothing on tumour slices
        report["rules"]["residual_threshold"] = report["localisation"]["best_dice_threshold"]
    save_error_maps(cfg.out / "error_maps.png", test, test_in, test_maps, fitted,
                    f"vae ({cfg.vae_arch}) on {spec}, test split")
    write_localisation(cfg.out, test, test_maps, test_in, test_b, fitted, report["rules"])
    return report


def predictions(arm: str, test: ShardData, score, decision) -> list[dict]:
    """predictions.csv rows of one arm on the test split (``brainhpc.metrics.predictions``)."""
    return classification_rows(arm, test.sources, test.group_ids(), test.labels, score,
                               decision)


def _features(data: ShardData, names: tuple[str, ...]) -> np.ndarray:
    stats = confound.image_statistics(data.images, data.brain, None)
    return stats[:, [confound.STATISTICS.index(n) for n in names]]


def baseline(name: str, train: ShardData, val: ShardData, test: ShardData,
             criterion: str) -> tuple[dict, list[dict]]:
    """A trivial baseline as fair as the models: a logistic regression on image statistics
    fitted on the real training split, its cut chosen on validation by ``criterion``, the test
    split scored once. (The crop aspect of ``prepare``'s confound check is not stored in the
    shards, so it is left out here.) Returns (metrics block, predictions rows)."""
    names = BASELINE_FEATURES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = confound._model().fit(_features(train, names), train.labels)
        val_score = model.predict_proba(_features(val, names))[:, 1]
        test_score = model.predict_proba(_features(test, names))[:, 1]
    cut, _ = best_cut(val_score, val.labels, criterion)
    pred = (test_score > cut).astype(np.int64)
    block = {"features": list(names), "cut": float(cut), "criterion": criterion,
             "test": classification_metrics(test.labels, pred, test_score),
             "val": classification_metrics(val.labels, val_score > cut, val_score)}
    return block, predictions(name, test, test_score, pred)
