"""What a classify cell reports beyond the CNN's one block: the VAE detector's techniques, its
localisation and the intensity baseline from one set of residual maps, and the summary lines
the cell logs (one per row of its results)."""

from __future__ import annotations

import torch

from brainhpc.anomaly import residuals
from brainhpc.anomaly.techniques import select_and_apply
from brainhpc.data.shards import ShardData
from brainhpc.metrics.classification import number, percent
from brainhpc.predictors.classifier import Detector, save_error_maps


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
    techniques, fitted = {}, {}
    for name in cfg.techniques:
        applied = select_and_apply(cfg.technique_config(name), val_maps, val.labels, test_maps,
                                   test.labels, test.masks)
        fitted[name] = applied.fitted
        techniques[name] = applied.report
    report: dict = {"techniques": techniques,
                    "fitted": {n: f.state() for n, f in fitted.items()},
                    "chosen": {"criterion": cfg.criterion, "residual": cfg.residual,
                               "standardise": cfg.standardise, "vae_arch": cfg.vae_arch,
                               "median": cfg.median or residuals.median_kernel(
                                   val.images.shape[-1])}}
    base, _, _ = residuals.intensity_baseline(val_in, val.labels, val_b, test_in, test.labels,
                                              test_b, val.masks, test.masks, cfg.criterion)
    report["baselines"] = {"intensity_threshold": base}
    if test.masks is not None and val.masks is not None and (val.masks > 0).any():
        report["localisation"] = residuals.localisation(val_maps, val.masks, val_b, test_maps,
                                                        test.masks, test_b)
        report["localisation"]["empty_mask_dice"] = 0.0  # predicting nothing on tumour slices
    save_error_maps(cfg.out / "error_maps.png", test, test_in, test_maps, fitted,
                    f"vae ({cfg.vae_arch}) on {spec}, test split")
    return report
