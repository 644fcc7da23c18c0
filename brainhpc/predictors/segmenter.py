"""A saved segmenter (a segment cell's ``model.pt``): loading, predicting, scoring with its frozen
rule, and the overlay figure of predictions against the truth.

``model.pt`` holds the best-epoch U-Net weights, what rebuilds the network (``hparams``), and the
rule chosen on validation: the probability ``threshold`` and the ``min_area`` below which a
slice counts as tumour-free in slice detection; and ``intensity_baseline`` (the standard
landmarks and threshold of ``brainhpc.anomaly.residuals.IntensityRule``), so that wherever the
U-Net is scored its intensity baseline is scored on the same slices, frozen as well.

Every scoring writes ``predictions.csv`` and ``patients.csv`` (``write_predictions``): one row
per (arm, slice) and per (arm, patient) for the arms ``unet``, ``empty`` and ``intensity``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from brainhpc.anomaly.residuals import IntensityRule
from brainhpc.data.prepared import check_size
from brainhpc.data.shards import ShardData
from brainhpc.data.training import require_masks
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import write_bytes
from brainhpc.images import render_grid
from brainhpc.metrics import segmentation as sm
from brainhpc.metrics.predictions import (
    PATIENT_COLUMNS,
    PATIENTS,
    PREDICTIONS,
    SLICE_COLUMNS,
    write_rows,
)
from brainhpc.models.unet import build_unet

MODEL_FORMAT = 1
EVAL_BATCH = 64
OVERLAY_TUMOUR, OVERLAY_HEALTHY = 8, 4  # slices shown in overlays.png
OVERLAY_MIN_PX = 128  # tiles are upscaled (nearest) to at least this, so outlines stay visible


def truth_masks(data: ShardData) -> np.ndarray:
    """Boolean N x H x W tumour masks of ``data``."""
    return data.masks[:, 0] > 0


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


def load_segmenter(path: str | Path, state: dict | None = None) -> dict:
    """``model.pt`` (or a segment cell folder holding one) -> its contents plus the built U-Net
    (``module``)."""
    from brainhpc.predictors import read_saved

    state = state or read_saved(path)
    if state.get("format") != MODEL_FORMAT or state.get("kind") != "segmenter":
        raise BrainhpcError(f"{state['path']}: not a brainhpc segmenter checkpoint (format "
                            f"{MODEL_FORMAT}, written by `brainhpc segment` as model.pt)")
    model = build_unet(state["hparams"])
    model.load_state_dict(state["state_dict"])
    state["module"] = model.eval()
    return state


def predict_masks(seg: dict, images: np.ndarray, device: torch.device | str = "cpu"):
    """(binary masks N x H x W at the frozen threshold, probabilities) of a loaded segmenter."""
    device = torch.device(device)
    probs = predict_probs(seg["module"].to(device), images, device)
    return probs > seg["threshold"], probs


def baseline_masks(seg: dict, data: ShardData) -> dict[str, np.ndarray]:
    """The baselines' masks on ``data``: ``empty``, and ``intensity`` where the saved model
    carries its frozen rule (models saved before it did have none)."""
    out = {"empty": np.zeros((len(data), *data.images.shape[-2:]), bool)}
    if seg.get("intensity_baseline") is not None:
        rule = IntensityRule.from_state(seg["intensity_baseline"])
        out["intensity"] = rule.masks(data.images, data.brain)
    return out


def score_segmenter(seg: dict, data: ShardData, device: torch.device | str = "cpu",
                    what: str = "data") -> tuple[dict, dict[str, np.ndarray]]:
    """A loaded segmenter on slices with masks, frozen rule: the ``segmentation_metrics`` block
    plus the baselines' (``baseline_empty``, ``baseline_intensity``) on the same slices, and
    every arm's masks (``unet`` and the baselines: what ``write_predictions`` takes)."""
    require_masks(data, what)
    size = int(seg["image_size"])
    check_size(data.images, size, what,
               f"the segmenter takes {size}x{size} px (brainhpc prepare --size {size})")
    pred, _ = predict_masks(seg, data.images, device)
    truth, patients = truth_masks(data), data.patient_ids()
    arms = {"unet": pred, **baseline_masks(seg, data)}
    baselines = {f"baseline_{arm}": sm.segmentation_metrics(masks, truth, patients)
                 for arm, masks in arms.items() if arm != "unet"}
    return {**sm.segmentation_metrics(pred, truth, patients, int(seg["min_area"])),
            **baselines, "threshold": seg["threshold"], "min_area": seg["min_area"],
            "checkpoint": str(seg.get("path", ""))}, arms


def write_predictions(out: Path, arms: dict[str, np.ndarray], data: ShardData
                      ) -> tuple[Path, Path]:
    """``out/predictions.csv`` and ``out/patients.csv`` (atomic): every arm's rows on ``data``,
    the units the aggregate's intervals resample (``group``: the leakage group)."""
    truth, patients, groups = truth_masks(data), data.patient_ids(), data.group_ids()
    slices, per_patient = [], []
    for arm, masks in arms.items():
        s, p = sm.prediction_rows(arm, masks, truth, list(data.sources), patients, groups)
        slices += s
        per_patient += p
    out = Path(out)
    return (write_rows(out / PREDICTIONS, slices, SLICE_COLUMNS),
            write_rows(out / PATIENTS, per_patient, PATIENT_COLUMNS))


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


def _overlay_picks(truth: np.ndarray, pred: np.ndarray, dice: np.ndarray) -> list[int]:
    """Tumour slices at evenly spaced Dice ranks (best to worst), then the healthy slices with
    the largest false-positive areas."""
    tumour = np.flatnonzero(truth.any((1, 2)))
    tumour = tumour[np.argsort(-np.nan_to_num(dice[tumour], nan=0.0), kind="stable")]
    if len(tumour) > OVERLAY_TUMOUR:
        tumour = tumour[np.linspace(0, len(tumour) - 1, OVERLAY_TUMOUR).round().astype(int)]
    healthy = np.flatnonzero(~truth.any((1, 2)))
    healthy = healthy[np.argsort(-pred[healthy].sum((1, 2)), kind="stable")][:OVERLAY_HEALTHY]
    return [*tumour.tolist(), *healthy.tolist()]


def save_overlays(path: Path, images: np.ndarray, truth: np.ndarray, pred: np.ndarray,
                  dice: np.ndarray, title: str) -> Path | None:
    """Chosen slices (``_overlay_picks``) with outlines; a colour PNG laid out by
    ``render_grid`` channel by channel."""
    picks = _overlay_picks(truth, pred, dice)
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
