"""The ``segment`` cell: a 2D U-Net (MONAI) trained on real, synthetic or mixed image+mask pairs,
its epoch and decision rule chosen on the real validation split, scored on the real test split.

``segment(SegmentConfig) -> dict`` writes into ``cfg.out``::

    config.json           the cell's identity and status (brainhpc.cell)
    checkpoints/last.pt   trainer resume state; checkpoints/best.pt the best validation epoch
    metrics.jsonl         training log (train records; one val record per epoch)
    model.pt              best-epoch weights, what rebuilds the U-Net, the frozen rule
                          (probability threshold, minimum area) and the intensity baseline's
                          rule: brainhpc.predictors.segmenter
    overlays.png          real test slices, truth outline green, prediction red, both yellow
    predictions.csv       one row per (arm, test slice): Dice and pixel counts of ``unet`` and
                          of the baselines ``empty`` and ``intensity``; patients.csv one row per
                          (arm, test patient), 3D Dice (brainhpc.metrics.predictions): the units
                          the aggregate's intervals resample; their means are metrics.json's
    metrics.json          written last (the completion marker): ``test`` and ``val`` blocks
                          (``brainhpc.metrics.segmentation``), ``chosen`` values, ``baselines``,
                          training counts, seed, times, device, config

Model and loss: MONAI ``UNet`` (2D, one input channel, one logit channel) and ``DiceCELoss``
(sigmoid) with ``batch=True``: the Dice term is taken over the whole batch, because per-image Dice
on the many tumour-free slices is undefined (MONAI smooths it to a constant that pulls towards
empty predictions). Augmentation flips and shifts image and mask together (one 2-channel tensor
through ``brainhpc.train.augment``). Training runs in ``precision`` (``auto``: bf16 autocast +
channels_last only where measured faster, see ``brainhpc.train.precision``; the resolved choice is
recorded in metrics.json); validation and test predictions are fp32.

Selection (no test peeking): best.pt is the epoch with the highest mean per-patient validation
Dice at probability 0.5. The probability threshold stays fixed at ``threshold`` (0.5 by default:
one less knob to overfit a small validation split). The minimum area (a slice whose predicted
tumour has fewer pixels counts as tumour-free in slice detection; the masks that Dice and HD95
score are left as predicted) is chosen on validation to maximise detection balanced accuracy,
unless ``min_area`` fixes it (1 = any pixel counts).

Baselines in metrics.json, scored like the model so a degenerate model cannot pass for a result:
``empty`` (predict no tumour anywhere) and ``intensity``: the classify stage's VAE localisation
baseline, one definition (``brainhpc.anomaly.residuals.IntensityRule``): intensities standardised
inside the brain mask (Nyul landmarks fitted on the healthy slices of the prepared dataset's real
training split, whatever the cell trains on, so every cell of a dataset faces the same
baseline), tumour = brain pixels above one threshold chosen on validation by the best pooled
Dice over the tumour slices. Tumours are bright on FLAIR and on the phantoms; a bright pixel
outside the brain (skull, fat) never counts. The rule is saved in model.pt, so ``brainhpc
evaluate`` scores it beside the U-Net.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from monai.losses import DiceCELoss

from brainhpc import __version__
from brainhpc.anomaly.residuals import (
    INTENSITY_DEFINITION,
    IntensityRule,
    Standardiser,
    dice_scores,
)
from brainhpc.cell import Context, Outputs, Training, out_option, run_cell
from brainhpc.data.prepared import dataset_key, development_fingerprints, prepared_size
from brainhpc.data.shards import ShardData, load_split
from brainhpc.data.training import (
    LABELS,
    SPEC_HELP,
    cell_data,
    check_spec,
    count_sources,
    parse_train_spec,
)
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import config_hash, sha256_file
from brainhpc.metrics import segmentation as sm
from brainhpc.metrics.predictions import PATIENTS, PREDICTIONS
from brainhpc.models.unet import build_unet, check_divisible, init_prior
from brainhpc.options import check, option
from brainhpc.predictors import save_predictor
from brainhpc.predictors.segmenter import (
    MODEL_FORMAT,
    baseline_masks,
    predict_masks,
    predict_probs,
    save_overlays,
    truth_masks,
    write_predictions,
)
from brainhpc.train import TrainConfig, run_training
from brainhpc.train.augment import augment_batch, intensity_batch

log = logging.getLogger(__name__)

LOSSES = {"dicece": (1.0, 1.0), "dice": (1.0, 0.0), "ce": (0.0, 1.0)}  # (lambda_dice, lambda_ce)
OUTPUTS = Outputs(result="metrics.json", wipe=("checkpoints", "model.pt", "metrics.jsonl",
                                               "progress.json", "overlays.png", PREDICTIONS,
                                               PATIENTS))


@dataclass
class SegmentConfig(Training):
    """One segment cell; the defaults are sized for CPUs (see benchmarks/bench_segment.py)."""

    stage: ClassVar[str] = "segment"

    train_data: str = option(help=SPEC_HELP, metavar="SPEC")
    data: Path = option(help="prepared dataset with masks (val and test always come from here)")
    out: Path = out_option()
    synthetic_dir: Path | None = option(None, "folder of the generate cells' outputs, "
                                        "<gen>-<label>/shards/")
    epochs: int = option(30, "training epochs", min=1)
    seed: int = option(0, "seed of the training data draw and of training", min=0)
    batch_size: int = option(16, "global batch", min=1)
    lr: float = option(1e-3, "Adam learning rate", gt=0)
    channels: tuple[int, ...] = option((16, 32, 64, 128), "U-Net feature maps per level", min=1)
    strides: tuple[int, ...] = option((2, 2, 2), "U-Net strides, one per down-sampling "
                                      "(len(channels) - 1)", min=1)
    res_units: int = option(0, "residual units per U-Net block (0: plain U-Net, 2-2.5x faster on "
                            "CPU)", min=0)
    dropout: float = option(0.0, "U-Net dropout", min=0, lt=1)
    loss: str = option("dicece", "dicece | dice | ce (MONAI DiceCELoss weights)",
                       choices=tuple(LOSSES))
    augment: bool = option(True, "random flips and shifts of image and mask together")
    intensity: bool = option(False, "random gamma, contrast, sharpening and noise of the image "
                             "(not the mask): for training on synthetic images")
    threshold: float = option(0.5, "probability cut", gt=0, lt=1)
    min_area: int | None = option(None, "fixed minimum predicted area in px for slice detection "
                                  "(default: chosen on validation; 1: any pixel)", min=1)
    val_every: int = option(1, "epochs between validations (best epoch among these; the last "
                            "always)", min=1)

    def __post_init__(self):
        check(self)
        self.train_data = check_spec(self.train_data, self.synthetic_dir)
        if len(self.channels) < 2:
            raise BrainhpcError(f"segment: channels needs at least 2 levels, got {self.channels}")
        if len(self.strides) != len(self.channels) - 1:
            raise BrainhpcError(
                f"segment: strides {self.strides} must have one entry per down-sampling, i.e. "
                f"len(channels) - 1 = {len(self.channels) - 1} for channels {self.channels}")

    def train_arch(self) -> str:
        """The model class the trainer resolves ``auto`` precision for (``cell.Training``)."""
        return "UNet"

    def hparams(self) -> dict:
        """What rebuilds the U-Net (stored in model.pt)."""
        return {"channels": list(self.channels), "strides": list(self.strides),
                "res_units": self.res_units, "dropout": self.dropout}


class SegTask:
    """MONAI U-Net with DiceCE on image+mask batches; validation = mean per-patient Dice."""

    def __init__(self, cfg: SegmentConfig, val: ShardData, prior: float):
        self.cfg, self.val, self.prior = cfg, val, prior
        self.val_truth, self.val_patients = truth_masks(val), val.patient_ids()
        lam_dice, lam_ce = LOSSES[cfg.loss]
        self.loss = DiceCELoss(sigmoid=True, batch=True, lambda_dice=lam_dice, lambda_ce=lam_ce)

    def models(self):
        model = build_unet(self.cfg.hparams())
        init_prior(model, self.prior)
        return {"unet": model}

    def optimizers(self, models):
        return {"unet": torch.optim.Adam(models["unet"].parameters(), lr=self.cfg.lr)}

    def training_step(self, t, batch):
        images, masks = batch
        x = torch.cat([images.float().div_(255.0), (masks > 0).float()], 1)
        if self.cfg.augment:  # one tensor: image and mask get the same flip and shift
            x = augment_batch(x, shift=True)
        x, y = x[:, :1], x[:, 1:]
        if self.cfg.intensity:
            x = intensity_batch(x)
        with t.autocast():
            logits = t.models["unet"](x)
        loss = self.loss(logits.float(), y)
        opt = t.optimizers["unet"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach()}

    def validate(self, t) -> dict:
        pred = predict_probs(t.raw("unet"), self.val.images, t.device) > self.cfg.threshold
        m = sm.segmentation_metrics(pred, self.val_truth, self.val_patients, hd95=False)
        out = {"val_dice": m["dice_patient_mean"], "val_dice_slice": m["dice_slice_mean"]}
        for key in ("sensitivity", "specificity"):
            if m["detection"][key] is not None:
                out[f"val_{key}"] = m["detection"][key]
        return out


def segment(cfg: SegmentConfig) -> dict:
    """Train, select on validation, score test; returns the metrics dict (also metrics.json).

    ``{"status": "interrupted", ...}`` when training was stopped (SIGTERM or a request);
    re-running the same config resumes. Every rank trains; rank 0 alone evaluates and writes.
    """
    check_divisible(prepared_size(cfg.data), cfg.strides, f"prepared dataset {cfg.data}")
    return run_cell(cfg, _segment, OUTPUTS, distributed=True)


def _data(cfg: SegmentConfig, spec, size: int) -> tuple[ShardData, ShardData, ShardData, dict]:
    train, val, test = cell_data(spec, cfg.data, cfg.synthetic_dir, cfg.seed, size, masks=True)
    for name, split in (("val", val), ("test", test)):
        if not split.masks.any():
            raise BrainhpcError(f"prepared dataset {cfg.data}, split {name}: all {len(split)} "
                                "masks are empty; Dice needs tumour slices to score")
    if len(train) < cfg.batch_size:
        raise BrainhpcError(f"training data {spec}: {len(train)} images are fewer than one batch "
                            f"of {cfg.batch_size}; lower --batch-size")
    n_train = {**count_sources(train),
               "tumour_slices": int(truth_masks(train).any((1, 2)).sum()),
               "tumour_label": int(np.sum(train.labels == 1)),
               "tumour_pixel_share": float(np.mean(train.masks > 0))}
    return train, val, test, n_train


def _rule(cfg: SegmentConfig, model, val: ShardData, size: int, device) -> dict:
    """The frozen rule, on validation only: threshold, minimum area, the intensity baseline."""
    truth, patients = truth_masks(val), val.patient_ids()
    pred = predict_probs(model, val.images, device) > cfg.threshold
    if cfg.min_area is None:
        min_area, val_bal = sm.choose_min_area(pred, truth, size)
    else:
        min_area, val_bal = cfg.min_area, None
    intensity, intensity_info = intensity_rule(cfg.data, val)
    return {"pred": pred, "min_area": min_area, "val_balanced_accuracy": val_bal,
            "intensity": intensity, "intensity_info": intensity_info,
            "val": sm.segmentation_metrics(pred, truth, patients, min_area)}


def intensity_rule(data: Path, val: ShardData) -> tuple[IntensityRule, dict]:
    """The intensity baseline (module doc) fitted without the test split: the standardiser on
    the healthy slices of ``data``'s real training split, the threshold on ``val``; and what
    metrics.json records of it."""
    train = load_split(data, "train")
    healthy = train.select(train.labels == LABELS["healthy"])
    if len(healthy) == 0:
        raise BrainhpcError(f"prepared dataset {data}, split train: no healthy slices (label 0) "
                            "to fit the intensity baseline's standardisation on")
    std = Standardiser.fit(healthy.images, healthy.brain, f"{data}/train (healthy slices)")
    rule = IntensityRule.fit(std, val.images, val.brain, val.masks)
    val_pred = rule.masks(val.images, val.brain)
    val_m = sm.segmentation_metrics(val_pred, truth_masks(val), val.patient_ids(), hd95=False)
    return rule, {"definition": INTENSITY_DEFINITION, "threshold": rule.threshold,
                  "standardiser": f"fitted on the {len(healthy)} healthy slices of the real "
                                  "training split", "brain_masks": val.brain is not None,
                  "val_dice_pooled": dice_scores(val_pred, val.masks)["dice_pooled"],
                  "val_dice_patient": val_m["dice_patient_mean"]}


def _test(cfg: SegmentConfig, seg: dict, rule: dict, test: ShardData, device,
          spec) -> tuple[dict, dict]:
    """The test split, once, everything frozen: the model and its baselines; overlays.png."""
    truth, patients = truth_masks(test), test.patient_ids()
    pred, _ = predict_masks(seg, test.images, device)
    arms = {"unet": pred, **baseline_masks(seg, test)}
    baselines = {
        "empty": sm.segmentation_metrics(arms["empty"], truth, patients),
        "intensity": {**rule["intensity_info"],
                      **sm.segmentation_metrics(arms["intensity"], truth, patients)},
    }
    write_predictions(cfg.out, arms, test)
    save_overlays(cfg.out / "overlays.png", test.images, truth, pred,
                  sm.dice_per_slice(pred, truth),
                  f"U-Net on {spec}, test: truth green, prediction red, both yellow")
    return sm.segmentation_metrics(pred, truth, patients, rule["min_area"]), baselines


def _saved(cfg: SegmentConfig, ctx: Context, model, rule: dict, size: int) -> dict:
    return {"format": MODEL_FORMAT, "kind": "segmenter", "image_size": size,
            "hparams": cfg.hparams(), "threshold": float(cfg.threshold),
            "min_area": rule["min_area"], "intensity_baseline": rule["intensity"].state(),
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "train_data": cfg.train_data, "seed": cfg.seed, "config_hash": config_hash(ctx.ident),
            "development_images": development_fingerprints(cfg.data),
            "data_key": dataset_key(cfg.data), "brainhpc": __version__}


def _segment(ctx: Context) -> dict:
    cfg = ctx.cfg
    size, spec = prepared_size(cfg.data), parse_train_spec(cfg.train_data)
    train, val, test, n_train = _data(cfg, spec, size)
    task = SegTask(cfg, val, n_train["tumour_pixel_share"])
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(train.images),
                                             torch.from_numpy(train.masks))
    tcfg = TrainConfig.for_cell(cfg, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                best_metric="val_dice", best_mode="max", val_every=cfg.val_every)
    fingerprint = {"cell": "segment", "size": size, "config_hash": config_hash(ctx.ident)}
    trainer, result = run_training(task, dataset, tcfg, fingerprint, ctx.info)
    if result["status"] != "done":
        return {"status": result["status"], "step": result["step"], "out": str(cfg.out)}
    if not ctx.info.is_main:
        return {"status": "worker", "rank": ctx.info.rank}
    model, device = trainer.best_module("unet"), trainer.device
    rule = _rule(cfg, model, val, size, device)
    saved = _saved(cfg, ctx, model, rule, size)
    ckpt = save_predictor(cfg.out / "model.pt", saved)
    test_block, baselines = _test(cfg, {**saved, "module": model}, rule, test, device, spec)
    best = result["best"]
    chosen = {"threshold": float(cfg.threshold), "min_area": rule["min_area"],
              "min_area_chosen_on_val": cfg.min_area is None,
              "val_balanced_accuracy": rule["val_balanced_accuracy"],
              "best_epoch": best.get("epoch"), "best_step": best.get("step"),
              "best_metric": "val_dice", "best_value": best.get("value")}
    metrics = ctx.finish({
        "train_data": cfg.train_data, "data": str(cfg.data), "image_size": size,
        "test": test_block, "val": rule["val"], "chosen": chosen, "baselines": baselines,
        "n_train": n_train, "seed": cfg.seed, "epochs": cfg.epochs, "steps": result["step"],
        "train_seconds": result["train_seconds"], "resumed": result["resumed"],
        "device": str(device), "world_size": ctx.info.world_size,
        "train_precision": result.get("precision"), "threads": result.get("threads"),
        "checkpoint": str(ckpt), "checkpoint_sha256": sha256_file(ckpt)})
    t = metrics["test"]
    log.info("segment on %s: test Dice per patient %.4f, per slice %.4f, HD95 %s px (%s)", spec,
             t["dice_patient_mean"] or 0.0, t["dice_slice_mean"] or 0.0, t.get("hd95_mean"),
             cfg.out)
    return metrics
