"""A saved classifier (a classify cell's ``model.pt``): what it holds, how it is loaded, how it
scores images, and the error-map figure of the VAE detector.

``model.pt`` holds the best-epoch weights and the frozen decision rule chosen on validation:
the CNN's score threshold, or the VAE detector's standardiser, residual settings and every
fitted technique; plus the fingerprints of its development images (so evaluation can drop their
copies) and the identity of the prepared dataset it was developed on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brainhpc.anomaly import residuals
from brainhpc.anomaly.techniques import FittedTechnique
from brainhpc.data.shards import ShardData
from brainhpc.errors import BrainhpcError
from brainhpc.images import save_grid
from brainhpc.metrics.predictions import (
    LOCALISATION,
    LOCALISATION_COLUMNS,
    localisation_rows,
    write_rows,
)
from brainhpc.models.classifiers import CLASSIFIERS, build_classifier

MODEL_FORMAT = 1
EVAL_BATCH = 256
EXAMPLES = 4  # per outcome (TP, FP, FN, TN) in error_maps.png


def _unit(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


@torch.no_grad()
def cnn_scores(model: torch.nn.Module, images: np.ndarray, device: torch.device,
               batch: int = EVAL_BATCH) -> np.ndarray:
    """P(tumour) per image (softmax of the two logits), model in eval mode."""
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(images), batch):
            x = _unit(torch.from_numpy(images[i:i + batch]).to(device))
            out.append(torch.softmax(model(x).float(), dim=1)[:, 1].cpu())
    finally:
        model.train(was)
    return torch.cat(out).double().numpy() if out else np.zeros(0)


@dataclass
class Detector:
    """What turns uint8 slices into residual maps: the standardiser, the VAE, the residual."""

    model: torch.nn.Module
    standardiser: residuals.Standardiser | None
    residual: str = "abs"
    median: int | None = None

    def inputs(self, data: ShardData) -> np.ndarray:
        """The VAE's input: standardised brains (0 outside), or plain [0, 1] images."""
        if self.standardiser is None:
            return data.images.astype(np.float32) / 255.0
        return self.standardiser.apply(data.images, data.brain)

    @torch.no_grad()
    def maps(self, data: ShardData, device: torch.device, batch: int = EVAL_BATCH,
             inputs: np.ndarray | None = None) -> np.ndarray:
        """Residual maps (N x H x W float32 in [0, 1]), zero outside the brain mask."""
        x = self.inputs(data) if inputs is None else inputs
        was = self.model.training
        self.model.eval()
        out = []
        try:
            for i in range(0, len(x), batch):
                xb = torch.from_numpy(x[i:i + batch]).to(device)
                x_hat = self.model.decode(self.model.encode(xb)[0])
                brain = residuals.brain_masks(
                    None if data.brain is None else data.brain[i:i + batch],
                    data.images[i:i + batch])
                out.append(residuals.residual_maps(xb, x_hat, brain, self.residual, self.median))
        finally:
            self.model.train(was)
        if not out:
            return np.zeros((0, *data.images.shape[-2:]), np.float32)
        return np.concatenate(out)


def load_classifier(path: str | Path, state: dict | None = None) -> dict:
    """``model.pt`` (or a classify cell folder holding one) -> its contents plus a built model
    (``module``), and for the VAE its fitted techniques and ``detector``."""
    from brainhpc.predictors import read_saved

    state = state or read_saved(path)
    path = state["path"]
    if state.get("format") != MODEL_FORMAT or state.get("model") not in CLASSIFIERS:
        raise BrainhpcError(f"{path}: not a brainhpc classifier checkpoint (format "
                            f"{MODEL_FORMAT}, written by `brainhpc classify` as model.pt)")
    missing = [k for k in ("techniques", "residual") if state["model"] == "vae" and k not in state]
    if missing:  # a one-technique VAE from before the four-technique detector
        raise BrainhpcError(f"{path}: a VAE classifier from an older brainhpc (no "
                            f"{', '.join(missing)}); re-run its classify cell to score it")
    model = build_classifier(state["model"], int(state["image_size"]), state["hparams"])
    model.load_state_dict(state["state_dict"])
    state["module"] = model.eval()
    if state["model"] == "vae":
        state["fitted"] = {name: FittedTechnique.from_state(t)
                           for name, t in state["techniques"].items()}
        std = state.get("standardiser")
        state["detector"] = Detector(model, None if std is None else
                                     residuals.Standardiser.from_state(std), state["residual"],
                                     state.get("median"))
    return state


def score_with(clf: dict, data: ShardData, device: torch.device) -> dict:
    """A loaded classifier on uint8 slices: ``{"cnn": (pred, score)}``, or for the VAE one
    ``(pred, score)`` per technique plus ``"maps"`` (residuals) and ``"inputs"``."""
    model = clf["module"].to(device)
    if clf["model"] == "cnn":
        s = cnn_scores(model, data.images, device)
        return {"cnn": ((s > clf["threshold"]).astype(np.int64), s)}
    det = clf["detector"]
    inputs = det.inputs(data)
    maps = det.maps(data, device, inputs=inputs)
    out = {name: f.predict(maps) for name, f in clf["fitted"].items()}
    return {**out, "maps": maps, "inputs": inputs}


def save_error_maps(path: Path, data: ShardData, inputs: np.ndarray, maps: np.ndarray,
                    fitted: dict, title: str, n: int = 2 * EXAMPLES) -> None:
    """Rows of slices (tumour first, then healthy): the VAE's input, the residual map, the
    tumour mask (where the data has one) and each technique's detected region, with its score."""
    y = data.labels
    picks = np.concatenate([np.flatnonzero(y == 1)[:n - n // 2], np.flatnonzero(y == 0)[:n // 2]])
    if not len(picks):
        return
    shown = maps[picks]
    vmax = float(max(np.quantile(shown[shown > 0], 0.999) if (shown > 0).any() else 0, 1e-6))
    regions = {name: f.regions(maps[picks]) for name, f in fitted.items()}
    scores = {name: f.scores(maps[picks]) for name, f in fitted.items()}
    tiles, captions = [], []
    for k, i in enumerate(picks):
        tiles += [inputs[i, 0], np.clip(maps[i] / vmax, 0, 1)]
        captions += [f"{'tumour' if y[i] else 'healthy'} {data.sources[i][-14:]}", "residual"]
        if data.masks is not None:
            tiles.append((data.masks[i, 0] > 0).astype(np.float32))
            captions.append("mask")
        for name in fitted:
            tiles.append(regions[name][k].astype(np.float32))
            captions.append(f"{name} {scores[name][k]:.3g}")
    save_grid(np.stack(tiles).astype(np.float32), path, ncols=len(tiles) // len(picks),
              captions=captions, title=f"{title}; residual scaled to 0..{vmax:.3f}")


def write_localisation(out: Path, data: ShardData, maps: np.ndarray, inputs: np.ndarray,
                       brain: np.ndarray, fitted: dict, rules: dict | None) -> None:
    """``localisation.csv`` of a VAE detector on ``data`` (with masks): per tumour slice, the
    Dice of each technique's region, of the residual map at its frozen threshold and of the
    intensity rule, so the aggregate can put intervals over patients on them."""
    if data.masks is None or not (data.masks > 0).any():
        return
    src, grp = data.sources, data.group_ids()
    rows = [r for name, f in fitted.items()
            for r in localisation_rows(name, f.regions(maps), data.masks, src, grp)]
    rules = rules or {}
    b = brain.reshape(maps.shape) > 0
    if rules.get("residual_threshold") is not None:
        rows += localisation_rows("residual maps", (maps > rules["residual_threshold"]) & b,
                                  data.masks, src, grp)
    if rules.get("intensity"):
        x = np.asarray(inputs).reshape(b.shape)
        rows += localisation_rows("intensity threshold",
                                  (x > rules["intensity"]["threshold"]) & b, data.masks, src,
                                  grp)
    write_rows(out / LOCALISATION, rows, LOCALISATION_COLUMNS)
