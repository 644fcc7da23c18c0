"""The ``segment`` cell: a 2D U-Net (MONAI) trained on real, synthetic or mixed image+mask pairs,
its epoch and decision rule chosen on the real validation split, scored on the real test split.

``segment(SegmentConfig) -> dict`` writes into ``cfg.out``::

    config.json           the cell's identity, written first (an unfinished run is recognised)
    checkpoints/last.pt   trainer resume state; checkpoints/best.pt the best validation epoch
    metrics.jsonl         training log (train records; one val record per epoch)
    model.pt              best-epoch weights, what rebuilds the U-Net, the frozen rule
                          (probability threshold, minimum area): ``load_segmenter``
    overlays.png          real test slices, truth outline green, prediction red, both yellow
    metrics.json          written last (the completion marker): ``test`` and ``val`` blocks
                          (``brainhpc.segment.metrics``), ``chosen`` values, ``baselines``,
                          training counts, seed, times, device, config

Model and loss: MONAI ``UNet`` (2D, one input channel, one logit channel) and ``DiceCELoss``
(sigmoid) with ``batch=True``: the Dice term is taken over the whole batch, because per-image Dice
on the many tumour-free slices is undefined (MONAI smooths it to a constant that pulls towards
empty predictions). Augmentation flips and shifts image and mask together (one 2-channel tensor
through ``brainhpc.classify.run.augment_batch``). Training runs in ``precision`` (``auto``: bf16
autocast + channels_last only where measured faster, see ``brainhpc.train.precision``; the
resolved choice is recorded in metrics.json); validation and test predictions are fp32.

Selection (no test peeking): best.pt is the epoch with the highest mean per-patient validation
Dice at probability 0.5. The probability threshold stays fixed at ``threshold`` (0.5 by default:
one less knob to overfit a small validation split). The minimum area (a slice whose predicted
tumour has fewer pixels counts as tumour-free in slice detection; the masks that Dice and HD95
score are left as predicted) is chosen on validation to maximise detection balanced accuracy,
unless ``min_area`` fixes it (1 = any pixel counts).

Baselines in metrics.json, scored like the model so a degenerate model cannot pass for a result:
``empty`` (predict no tumour anywhere) and ``intensity`` (tumour = pixels at or above a uint8 cut
chosen on validation by per-patient Dice; tumours are bright on FLAIR and on the phantoms).

Re-runs: same config and finished -> skipped; different config -> refused without ``force``
(which starts over); interrupted or failed -> resumed from the trainer checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch import nn

from brainhpc import __version__
from brainhpc.classify.data import parse_train_spec
from brainhpc.classify.run import _check_synthetic_size, augment_batch, check_prepared, check_size
from brainhpc.data.shards import ShardData
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import atomic_path, config_hash, sha256_file, write_bytes, write_json
from brainhpc.images import render_grid
from brainhpc.segment import metrics as sm
from brainhpc.segment.data import load_real, require_masks, training_data
from brainhpc.train import TrainConfig, Trainer, init_distributed
from brainhpc.train.distributed import DEVICES, barrier, teardown
from brainhpc.train.precision import PRECISIONS

log = logging.getLogger(__name__)

MODEL_FORMAT = 1
EVAL_BATCH = 64
LOSSES = {"dicece": (1.0, 1.0), "dice": (1.0, 0.0), "ce": (0.0, 1.0)}  # (lambda_dice, lambda_ce)
OVERLAY_TUMOUR, OVERLAY_HEALTHY = 8, 4  # test slices shown in overlays.png
OVERLAY_MIN_PX = 128  # tiles are upscaled (nearest) to at least this, so outlines stay visible


@dataclass
class SegmentConfig:
    """One segment cell; the defaults are sized for CPUs (see benchmarks/bench_segment.py)."""

    train_data: str  # real | synthetic:<gen> | mixed:<gen> | mixed:<gen>:<p>
    data: Path  # prepared dataset with masks (val and test always come from here)
    out: Path
    synthetic_dir: Path | None = None  # holds the generate cells' <gen>-<label>/ folders
    epochs: int = 30
    seed: int = 0
    batch_size: int = 16
    lr: float = 1e-3  # Adam
    channels: tuple[int, ...] = (16, 32, 64, 128)  # U-Net feature maps per level
    strides: tuple[int, ...] = (2, 2, 2)  # one per down-sampling; len(channels) - 1
    res_units: int = 0  # residual units per U-Net block (MONAI num_res_units); 0: plain U-Net
    dropout: float = 0.0
    loss: str = "dicece"  # dicece | dice | ce (MONAI DiceCELoss lambdas)
    augment: bool = True
    threshold: float = 0.5  # on the sigmoid probability
    min_area: int | None = None  # None: chosen on validation; 1: any predicted pixel counts
    precision: str = "auto"  # auto | bf16 | fp32 (training; brainhpc.train.precision)
    val_every: int = 1  # epochs between validations (the last epoch is always validated)
    force: bool = False
    checkpoint_every: int = 500
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self):
        spec = parse_train_spec(self.train_data)
        self.train_data = str(spec)
        self.data, self.out = Path(self.data), Path(self.out)
        if self.synthetic_dir is not None:
            self.synthetic_dir = Path(self.synthetic_dir)
        elif spec.kind != "real":
            raise BrainhpcError(
                f"training data {spec} needs --synthetic-dir: the folder holding the generate "
                f"cells' outputs ({spec.generator}-healthy/ and {spec.generator}-tumour/)")
        for key in ("epochs", "batch_size", "val_every"):
            _int(key, getattr(self, key), 1)
        for key in ("res_units", "checkpoint_every", "num_workers"):
            _int(key, getattr(self, key), 0)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise BrainhpcError(f"segment: seed must be an integer, got {self.seed!r}")
        self.channels, self.strides = tuple(self.channels), tuple(self.strides)
        if len(self.channels) < 2:
            raise BrainhpcError(f"segment: channels needs at least 2 levels, got {self.channels}")
        for c in self.channels:
            _int("channels entry", c, 1)
        for s in self.strides:
            _int("strides entry", s, 1)
        if len(self.strides) != len(self.channels) - 1:
            raise BrainhpcError(
                f"segment: strides {self.strides} must have one entry per down-sampling, i.e. "
                f"len(channels) - 1 = {len(self.channels) - 1} for channels {self.channels}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise BrainhpcError(f"segment: lr must be a number > 0, got {self.lr!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise BrainhpcError(f"segment: dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.threshold, (int, float)) and 0.0 < self.threshold < 1.0):
            raise BrainhpcError(f"segment: threshold must be in (0, 1), got {self.threshold!r}")
        if self.min_area is not None:
            _int("min_area", self.min_area, 1)
        if self.precision not in PRECISIONS:
            raise BrainhpcError(f"segment: unknown precision {self.precision!r}; valid: "
                                f"{', '.join(PRECISIONS)}")
        if self.loss not in LOSSES:
            raise BrainhpcError(f"segment: unknown loss {self.loss!r}; valid: {', '.join(LOSSES)}")
        if self.device not in DEVICES:
            raise BrainhpcError(
                f"segment: unknown device {self.device!r}; valid: {', '.join(DEVICES)}")

    def hparams(self) -> dict:
        """What rebuilds the U-Net (stored in model.pt)."""
        return {"channels": list(self.channels), "strides": list(self.strides),
                "res_units": self.res_units, "dropout": self.dropout}

    def identity(self) -> dict:
        """What defines the outputs (a finished run with the same identity is skipped)."""
        d = asdict(self)
        # how to run, not what: precision sits with device (auto resolves per device, as in
        # generate); the resolved precision is recorded in metrics.json
        for key in ("force", "device", "precision", "num_workers", "progress",
                    "checkpoint_every", "out"):
            d.pop(key)
        d["data"] = str(self.data.resolve())
        real = self.train_data == "real"  # then where synthetic shards live does not matter
        d["synthetic_dir"] = None if self.synthetic_dir is None or real else \
            str(self.synthetic_dir.resolve())
        return json.loads(json.dumps(d))  # tuples -> lists: compares equal to a re-read JSON


def _int(key: str, v, lo: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise BrainhpcError(f"segment: {key} must be an integer >= {lo}, got {v!r}")


def build_unet(hparams: dict) -> UNet:
    return UNet(spatial_dims=2, in_channels=1, out_channels=1,
                channels=tuple(hparams["channels"]), strides=tuple(hparams["strides"]),
                num_res_units=int(hparams["res_units"]), dropout=float(hparams["dropout"]))


def init_prior(model: UNet, prior: float) -> float:
    """Set the output bias to logit(prior), the training masks' tumour-pixel share: a U-Net that
    starts at p = 0.5 everywhere needs over a thousand Adam steps just to learn that tumour is
    rare (measured on the phantoms), and the slow, DiceCE-dominated start often ends predicting
    everything. The same prior-probability start as Lin et al.'s focal-loss detector."""
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    last = convs[-1]  # MONAI builds the top up-block last: the layer that emits the logit
    if last.out_channels != 1 or last.bias is None:
        raise BrainhpcError(f"U-Net output layer {last} is not a one-channel conv with a bias")
    p = float(np.clip(prior, 1e-4, 0.5))
    with torch.no_grad():
        last.bias.fill_(math.log(p / (1 - p)))
    return math.log(p / (1 - p))


def check_divisible(size: int, strides, what: str) -> None:
    """MONAI's U-Net needs the image size divisible by the product of its strides."""
    f = int(np.prod(strides))
    if size % f:
        raise BrainhpcError(f"{what}: {size} px images cannot pass a U-Net with strides "
                            f"{tuple(strides)} (size must be divisible by {f}); use fewer or "
                            f"smaller strides, or re-prepare at a size divisible by {f}")


# ------------------------------------------------------------------------------ predicting

@torch.no_grad()
def predict_probs(model: torch.nn.Module, images: np.ndarray, device: torch.device,
                  batch: int = EVAL_BATCH) -> np.ndarray:
    """Sigmoid tumour probability per pixel (N x H x W float32), model in eval mode."""
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(images), batch):
            x = torch.from_numpy(images[i:i + batch]).to(device).float().div_(255.0)
            out.append(torch.sigmoid(model(x).float())[:, 0].cpu())
    finally:
        model.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, *images.shape[-2:]), np.float32)


def _masks(data: ShardData) -> np.ndarray:
    return data.masks[:, 0] > 0


class SegTask:
    """MONAI U-Net with DiceCE on image+mask batches; validation = mean per-patient Dice."""

    def __init__(self, cfg: SegmentConfig, val: ShardData, prior: float):
        self.cfg, self.val, self.prior = cfg, val, prior
        self.val_truth, self.val_patients = _masks(val), val.patient_ids()
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


# ------------------------------------------------------------------------------ saved segmenter

def load_segmenter(path: str | Path) -> dict:
    """``model.pt`` (or a segment cell folder holding one) -> its contents plus the built U-Net."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise BrainhpcError(f"segmenter checkpoint {path} does not exist (a finished segment "
                            "cell writes OUT/model.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BrainhpcError(f"{path}: corrupt or unreadable segmenter checkpoint "
                            f"({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT \
            or state.get("kind") != "segmenter":
        raise BrainhpcError(f"{path}: not a brainhpc segmenter checkpoint (format "
                            f"{MODEL_FORMAT}, written by `brainhpc segment` as model.pt)")
    model = build_unet(state["hparams"])
    model.load_state_dict(state["state_dict"])
    state["path"] = path
    state["module"] = model.eval()
    return state


def predict_masks(seg: dict, images: np.ndarray, device: torch.device | str = "cpu"):
    """(binary masks N x H x W at the frozen threshold, probabilities) of a loaded segmenter."""
    device = torch.device(device)
    probs = predict_probs(seg["module"].to(device), images, device)
    return probs > seg["threshold"], probs


def evaluate_segmenter(model_pt: str | Path | dict, data: ShardData,
                       device: torch.device | str = "cpu", what: str = "data") -> dict:
    """Score a saved segmenter on another dataset with masks (external validation), frozen rule:
    the ``segmentation_metrics`` block plus the empty-mask baseline on the same slices."""
    seg = model_pt if isinstance(model_pt, dict) else load_segmenter(model_pt)
    require_masks(data, what)
    size = int(seg["image_size"])
    check_size(data.images, size, what,
               f"the segmenter takes {size}x{size} px (brainhpc prepare --size {size})")
    pred, _ = predict_masks(seg, data.images, device)
    truth, patients = _masks(data), data.patient_ids()
    return {**sm.segmentation_metrics(pred, truth, patients, int(seg["min_area"])),
            "baseline_empty": sm.segmentation_metrics(np.zeros_like(truth), truth, patients),
            "threshold": seg["threshold"], "min_area": seg["min_area"],
            "checkpoint": str(seg.get("path", ""))}


# ------------------------------------------------------------------------------ overlays

def _outlined(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, scale: int) -> np.ndarray:
    """One BGR tile: the slice with the truth outline green, the prediction's red, both yellow."""
    def up(a):
        return cv2.resize(a, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)

    def outline(mask):
        contours, _ = cv2.findContours(up(mask.astype(np.uint8)), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_NONE)
        canvas = np.zeros((image.shape[0] * scale, image.shape[1] * scale), np.uint8)
        return cv2.drawContours(canvas, contours, -1, 1, 1).astype(bool)
    tile = cv2.cvtColor(up(image), cv2.COLOR_GRAY2BGR)
    t, p = outline(truth), outline(pred)
    tile[t & ~p] = (0, 220, 0)
    tile[p & ~t] = (0, 0, 255)
    tile[t & p] = (0, 230, 230)
    return tile


def save_overlays(path: Path, images: np.ndarray, truth: np.ndarray, pred: np.ndarray,
                  dice: np.ndarray, title: str) -> Path | None:
    """Tumour slices at evenly spaced Dice ranks (best to worst), then the healthy slices with the
    largest false-positive areas; a colour PNG laid out by ``render_grid`` channel by channel."""
    tumour = np.flatnonzero(truth.any((1, 2)))
    tumour = tumour[np.argsort(-np.nan_to_num(dice[tumour], nan=0.0), kind="stable")]
    if len(tumour) > OVERLAY_TUMOUR:
        tumour = tumour[np.linspace(0, len(tumour) - 1, OVERLAY_TUMOUR).round().astype(int)]
    healthy = np.flatnonzero(~truth.any((1, 2)))
    healthy = healthy[np.argsort(-pred[healthy].sum((1, 2)), kind="stable")][:OVERLAY_HEALTHY]
    picks = [*tumour.tolist(), *healthy.tolist()]
    if not picks:
        return None
    scale = max(1, -(-OVERLAY_MIN_PX // images.shape[-1]))
    tiles = np.stack([_outlined(images[i, 0], truth[i], pred[i], scale) for i in picks])
    captions = [f"Dice {dice[i]:.2f}" if truth[i].any() else
                (f"FP {int(pred[i].sum())} px" if pred[i].any() else "healthy, TN")
                for i in picks]
    canvas = np.stack([render_grid(tiles[..., c], ncols=6, captions=captions, title=title)
                       for c in range(3)], axis=-1)
    ok, buf = cv2.imencode(".png", canvas)
    if not ok:
        raise BrainhpcError(f"{path}: cv2 could not encode the overlays as PNG")
    write_bytes(path, buf.tobytes())
    return path


# ------------------------------------------------------------------------------ the cell

def _previous(cfg: SegmentConfig, ident: dict) -> dict | None:
    """The finished metrics to skip with, or None to (re)run; raises if outputs conflict."""
    for name in ("metrics.json", "config.json"):
        path = cfg.out / name
        if not path.exists():
            continue
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BrainhpcError(f"{path}: unreadable ({e}); use --force to start over") from e
        old = rec.get("config", {})
        if old != ident:
            diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {ident.get(k)!r}" for k in diff)
            what = "a finished" if name == "metrics.json" else "an unfinished"
            raise BrainhpcError(f"{cfg.out} holds {what} segment run with a different config "
                                f"({shown}); use --force to overwrite it or choose another --out")
        if name == "metrics.json" and rec.get("status") == "done":
            return rec
    return None


def _wipe(out: Path) -> None:
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    for name in ("metrics.json", "config.json", "model.pt", "metrics.jsonl", "overlays.png"):
        (out / name).unlink(missing_ok=True)


def segment(cfg: SegmentConfig) -> dict:
    """Train, select on validation, score test; returns the metrics dict (also metrics.json).

    Returns ``{"status": "interrupted", ...}`` when training was stopped (SIGTERM or a request);
    re-running the same config resumes. Every rank trains; rank 0 alone evaluates and writes.
    """
    t_start = time.time()
    ident = cfg.identity()
    size = check_prepared(cfg.data)
    check_divisible(size, cfg.strides, f"prepared dataset {cfg.data}")
    info = init_distributed(cfg.device)
    try:
        return _segment(cfg, ident, size, info, t_start)
    finally:
        teardown(info)


def _segment(cfg: SegmentConfig, ident: dict, size: int, info, t_start: float) -> dict:
    if cfg.force:
        if info.is_main:
            _wipe(cfg.out)
        barrier(info)
    else:
        done = _previous(cfg, ident)
        if done is not None:
            log.info("%s: finished (metrics.json), skipping; use --force to redo", cfg.out)
            return {**done, "skipped": True}
    spec = parse_train_spec(cfg.train_data)
    hint = f"re-prepare the data at one size (brainhpc prepare --size {size})"
    if spec.kind != "real":
        _check_synthetic_size(cfg.synthetic_dir, spec.generator, size)
    train = training_data(spec, cfg.data, cfg.synthetic_dir, seed=cfg.seed)
    check_size(train.images, size, f"training data {spec}", hint)
    val, test = load_real(cfg.data, "val"), load_real(cfg.data, "test")
    for name, split in (("val", val), ("test", test)):
        check_size(split.images, size, f"{cfg.data}/{name}", hint)
        if not split.masks.any():
            raise BrainhpcError(f"prepared dataset {cfg.data}, split {name}: all {len(split)} "
                                "masks are empty; Dice needs tumour slices to score")
    if len(train) < cfg.batch_size:
        raise BrainhpcError(f"training data {spec}: {len(train)} images are fewer than one batch "
                            f"of {cfg.batch_size}; lower --batch-size")
    n_syn = sum(s.startswith("synthetic/") for s in train.sources)  # generate's source ids
    n_train = {"total": len(train), "real": int(len(train) - n_syn), "synthetic": int(n_syn),
               "tumour_slices": int(_masks(train).any((1, 2)).sum()),
               "tumour_label": int(np.sum(train.labels == 1))}
    n_train["tumour_pixel_share"] = float(np.mean(train.masks > 0))

    task = SegTask(cfg, val, n_train["tumour_pixel_share"])
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(train.images),
                                             torch.from_numpy(train.masks))
    fingerprint = {"cell": "segment", "size": size, "config_hash": config_hash(ident)}
    tcfg = TrainConfig(out=cfg.out, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                       checkpoint_every=cfg.checkpoint_every, num_workers=cfg.num_workers,
                       device=cfg.device, progress=cfg.progress, best_metric="val_dice",
                       best_mode="max", precision=cfg.precision, val_every=cfg.val_every)
    if info.is_main:
        write_json(cfg.out / "config.json", {"status": "running", "config": ident,
                                             "brainhpc": __version__})
    trainer = Trainer(task, dataset, tcfg, fingerprint=fingerprint, dist_info=info)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    if result["status"] != "done":
        log.warning("%s: training %s at step %d; re-run to resume", cfg.out, result["status"],
                    result["step"])
        return {"status": result["status"], "step": result["step"], "out": str(cfg.out)}
    if not info.is_main:
        return {"status": "worker", "rank": info.rank}

    device = trainer.device
    model = trainer.raw("unet")
    best = result["best"]
    if trainer.best_path.exists():
        state = torch.load(trainer.best_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["models"]["unet"])
    else:  # no finite validation value ever: keep the last weights, and say so
        log.warning("%s: no best checkpoint (validation never finite); using the last weights",
                    cfg.out)
    model.eval()

    # the rule, on validation only
    val_truth, val_patients = _masks(val), val.patient_ids()
    val_pred = predict_probs(model, val.images, device) > cfg.threshold
    if cfg.min_area is None:
        min_area, val_bal = sm.choose_min_area(val_pred, val_truth, size)
    else:
        min_area, val_bal = cfg.min_area, None
    cut, cut_dice = sm.choose_intensity_threshold(val.images, val_truth, val_patients)
    saved = {"format": MODEL_FORMAT, "kind": "segmenter", "image_size": size,
             "hparams": cfg.hparams(), "threshold": float(cfg.threshold), "min_area": min_area,
             "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
             "train_data": str(spec), "seed": cfg.seed, "config_hash": config_hash(ident),
             "brainhpc": __version__}
    ckpt = cfg.out / "model.pt"
    with atomic_path(ckpt) as tmp:
        torch.save(saved, tmp)

    # the test split, once, everything frozen
    seg = {**saved, "module": model}
    test_truth, test_patients = _masks(test), test.patient_ids()
    test_pred, _ = predict_masks(seg, test.images, device)
    report = {
        "test": sm.segmentation_metrics(test_pred, test_truth, test_patients, min_area),
        "val": sm.segmentation_metrics(val_pred, val_truth, val_patients, min_area),
    }
    baselines = {
        "empty": sm.segmentation_metrics(np.zeros_like(test_truth), test_truth, test_patients),
        "intensity": {"cut": cut, "val_dice_patient": cut_dice, **sm.segmentation_metrics(
            test.images[:, 0] >= cut, test_truth, test_patients)},
    }
    dice = sm.dice_per_slice(test_pred, test_truth)
    save_overlays(cfg.out / "overlays.png", test.images, test_truth, test_pred, dice,
                  f"U-Net on {spec}, test: truth green, prediction red, both yellow")
    chosen = {"threshold": float(cfg.threshold), "min_area": min_area,
              "min_area_chosen_on_val": cfg.min_area is None, "val_balanced_accuracy": val_bal,
              "best_epoch": best.get("epoch"), "best_step": best.get("step"),
              "best_metric": "val_dice", "best_value": best.get("value")}
    metrics = {
        "status": "done", "train_data": str(spec), "data": str(cfg.data), "image_size": size,
        **report, "chosen": chosen, "baselines": baselines, "n_train": n_train,
        "seed": cfg.seed, "epochs": cfg.epochs, "steps": result["step"],
        "train_seconds": result["train_seconds"],
        "wall_seconds": round(time.time() - t_start, 3), "resumed": result["resumed"],
        "device": str(device), "world_size": info.world_size,
        "precision": result.get("precision"), "threads": result.get("threads"),
        "checkpoint": str(ckpt), "checkpoint_sha256": sha256_file(ckpt),
        "brainhpc": __version__, "config_hash": config_hash(ident), "config": ident,
    }
    write_json(cfg.out / "metrics.json", metrics)  # last: the completion marker
    t = metrics["test"]
    log.info("segment on %s: test Dice per patient %.4f, per slice %.4f, HD95 %s px (%s)", spec,
             t["dice_patient_mean"] or 0.0, t["dice_slice_mean"] or 0.0, t.get("hd95_mean"),
             cfg.out)
    return metrics


# ------------------------------------------------------------------------------ command line

def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise BrainhpcError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "segment", help="train a U-Net tumour segmenter on real/synthetic/mixed image+mask pairs",
        description="Train a 2D U-Net (MONAI) on real, synthetic or mixed image+mask pairs; "
                    "choose the epoch and rule on the real validation split; score the real "
                    "test split (Dice per slice and per patient, HD95, slice detection).")
    p.add_argument("--train-data", required=True, metavar="SPEC",
                   help="real | synthetic:<gen> | mixed:<gen> | mixed:<gen>:<p>")
    p.add_argument("--data", required=True, type=Path, help="prepared dataset folder with masks")
    p.add_argument("--out", required=True, type=Path, help="output folder of this cell")
    p.add_argument("--synthetic-dir", type=Path,
                   help="folder of the generate cells' outputs, <gen>-<label>/shards/")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="global batch")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--channels", default="16,32,64,128", help="U-Net channels per level")
    p.add_argument("--strides", default="2,2,2", help="U-Net strides, len(channels) - 1")
    p.add_argument("--res-units", type=int, default=0,
                   help="residual units per U-Net block (0: plain U-Net, 2-2.5x faster on CPU)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--loss", default="dicece", help=" | ".join(LOSSES))
    p.add_argument("--threshold", type=float, default=0.5, help="probability cut")
    p.add_argument("--min-area", type=int,
                   help="fixed minimum predicted area in px (default: chosen on validation)")
    p.add_argument("--no-augment", action="store_true", help="no flips/shifts")
    p.add_argument("--precision", default="auto",
                   help="training precision: auto (bf16 where measured faster) | bf16 | fp32")
    p.add_argument("--val-every", type=int, default=1,
                   help="epochs between validations (best epoch among these; last always)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--force", action="store_true", help="start over, replacing finished outputs")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = SegmentConfig(
        train_data=args.train_data, data=args.data, out=args.out,
        synthetic_dir=args.synthetic_dir, epochs=args.epochs, seed=args.seed,
        batch_size=args.batch_size, lr=args.lr, channels=_ints(args.channels),
        strides=_ints(args.strides), res_units=args.res_units, dropout=args.dropout,
        loss=args.loss, threshold=args.threshold, min_area=args.min_area,
        augment=not args.no_augment, precision=args.precision, val_every=args.val_every,
        force=args.force, checkpoint_every=args.checkpoint_every,
        device=args.device, num_workers=args.workers, progress=not args.no_progress)
    metrics = segment(cfg)
    if metrics.get("status") in ("done", "worker"):
        return 0
    return 3  # interrupted: re-run the same command to resume
