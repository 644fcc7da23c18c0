"""What the VAE anomaly detector looks at: standardised brains, brain-limited residual maps,
how well those maps localise tumours, and the intensity-threshold baseline they must beat.

* ``Standardiser``: Nyul-style piecewise-linear histogram standardisation (Nyul, Udupa & Zhang
  2000) inside the brain mask: the intensity landmarks (percentiles ``LANDMARKS``) of each image
  are mapped onto standard landmarks averaged over the **healthy training slices** (the only
  images the detector may learn from), pixels outside the brain become 0. Scans of one contrast
  from different sites then share an intensity scale, which a residual threshold needs.
* ``residual_maps``: |x - x_hat| (or, with ``residual="ssim"``, (1 - SSIM) / 2 from MONAI's
  ``compute_ssim_and_cs``, a structural residual less sensitive to blur), median-filtered
  (odd kernel of ~size/32 px: removes the speckle of single-pixel misfits, keeps lesions), and
  limited to the brain mask eroded once more by that kernel: the skull rim, the background and
  the artificial edge where the input was cut to 0 never count.
* ``localisation``: pixel-level AUPRC of the residual inside the brain (average precision, the
  honest metric at a lesion share of ~1%), and the best Dice a single pixel threshold reaches:
  chosen on validation tumour slices, frozen, then scored on test (pooled over pixels and as the
  mean over tumour slices).
* ``intensity_baseline``: the baseline of Baur et al. (2021) and Meissen et al. (2022): on FLAIR
  lesions a plain threshold on standardised intensity inside the brain beats dense autoencoders.
  One threshold, chosen on validation, gives the pixel Dice; the image score is the share of
  brain pixels above it (higher = more anomalous, by construction). ``intensity_threshold`` and
  ``intensity_masks`` are that pixel rule alone, and ``IntensityRule`` the frozen rule with its
  standardiser: the segment stage scores this same baseline (``INTENSITY_DEFINITION``).

Every score here is "higher = more anomalous" by construction; no direction is ever chosen on
validation (that would turn a detector into a supervised classifier of image source).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from brainhpc.errors import BrainhpcError

log = logging.getLogger(__name__)

LANDMARKS = (1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 99)
RESIDUALS = ("abs", "ssim")
PIXEL_SAMPLE = 2_000_000  # brain pixels per split for AUPRC (strided, deterministic)
DICE_GRID = 64  # thresholds tried for the best Dice


def brain_masks(brain: np.ndarray | None, images: np.ndarray) -> np.ndarray:
    """Boolean N x H x W brain masks (all True when the data has none)."""
    if brain is None:
        return np.ones((len(images), *images.shape[-2:]), bool)
    return np.asarray(brain).reshape(len(images), *images.shape[-2:]) > 0


@dataclass
class Standardiser:
    """Piecewise-linear intensity standardisation inside the brain (see module docstring)."""

    standard: np.ndarray  # len(LANDMARKS) standard intensities in [0, 1]

    @staticmethod
    def landmarks(image: np.ndarray, brain: np.ndarray) -> np.ndarray | None:
        values = image[brain]
        if values.size < 32:
            return None
        return np.percentile(values.astype(np.float32), LANDMARKS)

    @classmethod
    def fit(cls, images: np.ndarray, brain: np.ndarray | None, what: str = "training data"
            ) -> Standardiser:
        """Average the healthy training slices' landmarks, each mapped so p1 -> 0, p99 -> 1."""
        if brain is None:
            log.warning("intensity standardisation of %s: no brain masks, landmarks taken over "
                        "the whole image (background included)", what)
        masks = brain_masks(brain, images)
        rows = []
        for img, m in zip(images.reshape(len(images), *images.shape[-2:]), masks, strict=True):
            lm = cls.landmarks(img, m)
            if lm is not None and lm[-1] > lm[0]:
                rows.append((lm - lm[0]) / (lm[-1] - lm[0]))
        if not rows:
            raise BrainhpcError(f"intensity standardisation of {what}: no slice has a brain mask "
                                "of usable size (>= 32 pixels)")
        return cls(np.mean(rows, axis=0))

    def apply(self, images: np.ndarray, brain: np.ndarray | None) -> np.ndarray:
        """N x 1 x H x W uint8 -> float32 in [0, 1]: landmarks mapped, 0 outside the brain."""
        masks = brain_masks(brain, images)
        n, h, w = len(images), *images.shape[-2:]
        out = np.zeros((n, 1, h, w), np.float32)
        for i, (img, m) in enumerate(zip(images.reshape(n, h, w), masks, strict=True)):
            lm = self.landmarks(img, m)
            if lm is None:  # no usable brain: an all-zero input (and no residual) for it
                continue
            lm = lm + np.arange(len(lm)) * 1e-4  # strictly increasing for np.interp
            mapped = np.interp(img.astype(np.float32), lm, self.standard)
            # above p99 keep the slope of the last segment (hyperintense lesions live there)
            top = img > lm[-1]
            slope = (self.standard[-1] - self.standard[-2]) / max(lm[-1] - lm[-2], 1e-3)
            mapped[top] = self.standard[-1] + (img[top] - lm[-1]) * slope
            out[i, 0] = np.where(m, np.clip(mapped, 0.0, 1.0), 0.0)
        return out

    def state(self) -> dict:
        return {"standard": torch.from_numpy(np.asarray(self.standard, np.float64))}

    @classmethod
    def from_state(cls, state: dict) -> Standardiser:
        return cls(torch.as_tensor(state["standard"]).double().numpy())


SCORED_FLOOR = np.float32(1e-6)  # the least residual of a scored pixel (0 = outside the brain)


def median_kernel(size: int) -> int:
    """Odd median-filter side for an image side: 3 px at 64, 5 px at 128."""
    return max(3, (size // 32) | 1)


def residual_maps(x: torch.Tensor, x_hat: torch.Tensor, brain: np.ndarray, kind: str = "abs",
                  median: int | None = None) -> np.ndarray:
    """N x H x W float32 residuals in [0, 1], median-filtered, zero outside the brain."""
    if kind not in RESIDUALS:
        raise BrainhpcError(f"residual {kind!r}: expected one of {', '.join(RESIDUALS)}")
    x, x_hat = x.float().cpu(), x_hat.float().cpu().clamp(0, 1)
    if kind == "abs":
        r = (x - x_hat).abs()
    else:
        from monai.metrics.regression import compute_ssim_and_cs

        k = 7
        ssim, _ = compute_ssim_and_cs(x_hat, x, spatial_dims=2, kernel_size=(k, k),
                                      kernel_sigma=(1.5, 1.5), data_range=1.0)
        pad = (x.shape[-1] - ssim.shape[-1]) // 2
        ssim = torch.nn.functional.pad(ssim, (pad, pad, pad, pad), mode="replicate")
        r = ((1 - ssim) / 2).clamp(0, 1)
    maps = r[:, 0].numpy().astype(np.float32)
    k = median if median is not None else median_kernel(maps.shape[-1])
    if k > 1:
        for i in range(len(maps)):
            maps[i] = cv2.medianBlur(maps[i], k) if k <= 5 else \
                cv2.medianBlur((maps[i] * 255).astype(np.uint8), k).astype(np.float32) / 255
    # exact 0 means "not scored" to the techniques (scored_area, KMeans, threshold grids): a
    # perfectly reconstructed pixel, or one the 8-bit median path rounds down, stays above it
    return np.where(score_masks(brain.reshape(maps.shape), k), np.maximum(maps, SCORED_FLOOR),
                    0.0).astype(np.float32)


def score_masks(brain: np.ndarray, k: int) -> np.ndarray:
    """The brain masks eroded by the median kernel: the VAE's input is cut to 0 at the brain
    mask's edge, and that artificial step reconstructs as a blurred ring of residual."""
    masks = np.asarray(brain) > 0
    if k <= 1:
        return masks
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    return np.stack([cv2.erode(m.astype(np.uint8), kernel) > 0 for m in masks])


# ----------------------------------------------------------------------------- localisation

def _pixels(values: np.ndarray, masks: np.ndarray, brain: np.ndarray):
    b = brain.reshape(values.shape).astype(bool)
    v, t = values[b], (masks.reshape(values.shape) > 0)[b]
    step = max(1, v.size // PIXEL_SAMPLE)
    return v[::step], t[::step]


def auprc(values: np.ndarray, masks: np.ndarray, brain: np.ndarray) -> float | None:
    """Average precision of per-pixel ``values`` for tumour pixels, inside the brain."""
    v, t = _pixels(values, masks, brain)
    if not t.any() or t.all():
        return None
    return float(average_precision_score(t, v))


def dice_scores(pred: np.ndarray, masks: np.ndarray) -> dict:
    """Dice of predicted pixels vs tumour masks over the tumour slices: pooled and per slice."""
    p = pred.reshape(len(pred), -1).astype(bool)
    m = masks.reshape(len(masks), -1) > 0
    has = m.any(1)
    if not has.any():
        return {"n_tumour_slices": 0, "dice_pooled": None, "dice_mean": None}
    p, m = p[has], m[has]
    inter = (p & m).sum(1).astype(np.float64)
    denom = p.sum(1) + m.sum(1)
    return {"n_tumour_slices": int(has.sum()),
            "dice_pooled": float(2 * inter.sum() / max(denom.sum(), 1)),
            "dice_mean": float(np.mean(2 * inter / np.maximum(denom, 1)))}


def best_dice_threshold(values: np.ndarray, masks: np.ndarray, brain: np.ndarray) -> float:
    """The pixel threshold with the best pooled Dice on (validation) tumour slices."""
    has = (masks.reshape(len(masks), -1) > 0).any(1)
    if not has.any():
        raise BrainhpcError("best Dice: no tumour slice with a mask to choose a threshold on")
    v, m, b = values[has], masks[has], brain[has]
    inside = v[b.reshape(v.shape).astype(bool)]
    grid = np.unique(np.quantile(inside, np.linspace(0.5, 0.9995, DICE_GRID)))
    best, best_t = -1.0, float(grid[-1])
    for t in grid:
        d = dice_scores((v > t) & b.reshape(v.shape).astype(bool), m)["dice_pooled"]
        if d > best:
            best, best_t = d, float(t)
    return best_t


def localisation(val_values, val_masks, val_brain, test_values, test_masks, test_brain) -> dict:
    """Pixel AUPRC on test and the validation-chosen best-Dice threshold scored on test."""
    t = best_dice_threshold(val_values, val_masks, val_brain)
    return {**frozen_localisation(test_values, test_masks, test_brain, t),
            "pixel_auprc_val": auprc(val_values, val_masks, val_brain)}


def frozen_localisation(values: np.ndarray, masks: np.ndarray, brain: np.ndarray,
                        threshold: float | None) -> dict:
    """Pixel AUPRC of ``values`` and the Dice of a threshold chosen elsewhere (on the model's
    own validation split), as ``localisation`` reports them; without a threshold (the model's
    validation had no masks) the Dice keys are None, never a threshold chosen on these masks."""
    out = {"pixel_auprc": auprc(values, masks, brain), "best_dice_threshold": threshold}
    if threshold is None:
        has = int((masks.reshape(len(masks), -1) > 0).any(1).sum())
        return {**out, "n_tumour_slices": has, "best_dice_pooled": None, "best_dice_mean": None}
    pred = (values > threshold) & (brain.reshape(values.shape) > 0)
    return {**out, **{f"best_{k}" if k.startswith("dice") else k: v
                      for k, v in dice_scores(pred, masks).items()}}


# ----------------------------------------------------------------------------- the baseline

INTENSITY_DEFINITION = ("standardised intensity inside the brain mask, threshold chosen on val "
                        "(best pooled Dice over the val tumour slices)")


def intensity_threshold(val_x: np.ndarray, val_masks: np.ndarray, val_brain: np.ndarray
                        ) -> float:
    """The baseline's pixel threshold on (standardised) intensities: the best pooled Dice on
    validation tumour slices, inside the brain, the criterion of the residual maps' too."""
    brain = brain_masks(val_brain, val_x)
    return best_dice_threshold(np.asarray(val_x).reshape(brain.shape), val_masks, brain)


def intensity_masks(x: np.ndarray, brain: np.ndarray | None, threshold: float) -> np.ndarray:
    """N x H x W bool: pixels above ``threshold`` inside the brain (outside never counts)."""
    b = brain_masks(brain, x)
    return (np.asarray(x).reshape(b.shape) > threshold) & b


@dataclass
class IntensityRule:
    """The intensity baseline frozen as a segmenter: standardise (or scale to [0, 1] without a
    standardiser), then ``intensity_masks`` at the validation-chosen threshold."""

    standardiser: Standardiser | None
    threshold: float

    @staticmethod
    def inputs(std: Standardiser | None, images: np.ndarray, brain: np.ndarray | None
               ) -> np.ndarray:
        """What the rule thresholds: the detector's inputs (``Detector.inputs``) exactly."""
        return images.astype(np.float32) / 255.0 if std is None else std.apply(images, brain)

    @classmethod
    def fit(cls, std: Standardiser | None, val_images: np.ndarray, val_brain: np.ndarray | None,
            val_masks: np.ndarray) -> IntensityRule:
        x = cls.inputs(std, val_images, val_brain)
        return cls(std, intensity_threshold(x, val_masks, brain_masks(val_brain, val_images)))

    def masks(self, images: np.ndarray, brain: np.ndarray | None) -> np.ndarray:
        return intensity_masks(self.inputs(self.standardiser, images, brain), brain,
                               self.threshold)

    def state(self) -> dict:
        std = None if self.standardiser is None else self.standardiser.state()["standard"]
        return {"standard": std, "threshold": float(self.threshold)}

    @classmethod
    def from_state(cls, state: dict) -> IntensityRule:
        std = state.get("standard")
        return cls(None if std is None else Standardiser.from_state({"standard": std}),
                   float(state["threshold"]))


def intensity_baseline(val_x: np.ndarray, val_y: np.ndarray, val_brain: np.ndarray,
                       test_x: np.ndarray, test_y: np.ndarray, test_brain: np.ndarray,
                       val_masks: np.ndarray | None = None,
                       test_masks: np.ndarray | None = None, criterion: str = "balanced_accuracy"
                       ) -> tuple[dict, np.ndarray, np.ndarray]:
    """Threshold standardised intensity inside the brain; see the module docstring.

    The pixel threshold maximises the validation pixel Dice where masks exist, else the
    validation ROC-AUC of the image score; the image cut is the best ``criterion`` cut of the
    validation scores. Returns (report, test predictions, test scores).
    """
    from brainhpc.anomaly.techniques import best_cut
    from brainhpc.metrics.classification import classification_metrics

    vx = val_x.reshape(len(val_x), -1)
    vb = val_brain.reshape(vx.shape) > 0

    def image_score(x, b, thr):  # share of the brain above the threshold
        return ((x > thr) & b).sum(1) / np.maximum(b.sum(1), 1)

    if val_masks is not None and (val_masks > 0).any():
        thr = intensity_threshold(val_x, val_masks, val_brain)
    else:
        grid = np.unique(np.quantile(vx[vb], np.linspace(0.8, 0.999, 32)))
        aucs = [roc_auc_score(val_y, image_score(vx, vb, g)) if len(np.unique(val_y)) == 2
                else 0.5 for g in grid]
        thr = float(grid[int(np.argmax(aucs))])
    vs = image_score(vx, vb, thr)
    cut, _ = best_cut(vs, val_y, criterion)
    block, pred, ts = frozen_intensity(test_x, test_y, test_brain, test_masks, thr, cut)
    report = {"intensity_threshold": thr, "image_cut": cut, **block,
              "val": classification_metrics(val_y, vs > cut, vs)}
    return report, pred, ts


def frozen_intensity(x: np.ndarray, y: np.ndarray, brain: np.ndarray, masks: np.ndarray | None,
                     threshold: float, cut: float) -> tuple[dict, np.ndarray, np.ndarray]:
    """The intensity baseline with its pixel threshold and image cut frozen (chosen on a
    validation split): ``{"test": metrics, "localisation": ...}`` (localisation where ``masks``
    exist), the image decisions and the image scores (share of the brain above the threshold).
    ``x`` is what the detector takes as input, ``brain`` the brain masks (``brain_masks``)."""
    from brainhpc.metrics.classification import classification_metrics

    b = brain.reshape(len(x), -1) > 0
    score = ((x.reshape(len(x), -1) > threshold) & b).sum(1) / np.maximum(b.sum(1), 1)
    pred = (score > cut).astype(np.int64)
    block = {"test": classification_metrics(y, pred, score)}
    if masks is not None:
        block["localisation"] = frozen_localisation(x.reshape(brain.shape), masks, brain,
                                                    threshold)
        block["localisation"].pop("best_dice_threshold")
    return block, pred, score
