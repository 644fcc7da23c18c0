"""Synthetic tumour masks (``generate --with-masks``): the sampled mask channel made binary, and
the card's comparison of synthetic masks with the real ones.

A generator trained on image+mask pairs samples the mask as a second channel in [0, 1]; it is cut
at its midpoint and connected components under ``MASK_MIN_PIXELS`` are dropped (the speckle of a
half-trained generator is not a lesion). ``mask_report`` sets the synthetic masks beside the real
train tumour masks, so a reader sees at a glance whether the generator draws masks at all, of a
plausible size, and on the bright lesions (tumours are bright on FLAIR and on the phantoms).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from brainhpc.data.shards import MASK_LAYOUTS
from brainhpc.errors import BrainhpcError

MASK_MIN_PIXELS = 4  # sampled mask components smaller than this are dropped (binarise_masks)
HEAD_LEVEL = 0.05  # pixels brighter than this count as head in the masks' brightness check


def check_masks(train, data: Path) -> None:
    """Refuse --with-masks on tumour train images without usable masks, naming the dataset."""
    if train.masks is None:
        raise BrainhpcError(f"generate --with-masks: prepared dataset {data} holds no tumour "
                            f"masks (no 'masks' in {data}/train shards); layouts with masks: "
                            f"{MASK_LAYOUTS}. Prepare such data, or drop --with-masks")
    if train.masks.shape != train.images.shape:
        raise BrainhpcError(f"generate --with-masks: {data}/train masks are "
                            f"{train.masks.shape}, images {train.images.shape}")
    if not train.masks.any():
        raise BrainhpcError(f"generate --with-masks: every tumour mask in {data}/train is empty; "
                            "there is nothing to learn to draw (check the mask files)")


def binarise_masks(prob: np.ndarray, min_pixels: int | None = None) -> np.ndarray:
    """Sampled mask channel (N, 1, H, W) in [0, 1] -> 0/255 uint8 masks: cut at the midpoint
    0.5, then connected components (8-neighbour) of fewer than ``min_pixels`` pixels dropped
    (``MASK_MIN_PIXELS``)."""
    min_pixels = MASK_MIN_PIXELS if min_pixels is None else min_pixels
    out = (np.asarray(prob) >= 0.5).astype(np.uint8)
    for m in out[:, 0]:
        n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
        small = 1 + np.flatnonzero(stats[1:n, cv2.CC_STAT_AREA] < min_pixels)
        if len(small):
            m[np.isin(lab, small)] = 0
    return out * np.uint8(255)


def _mask_stats(images: np.ndarray, masks: np.ndarray) -> dict:
    m = masks[:, 0] > 0
    img = images[:, 0].astype(np.float64) / 255.0
    area = m.sum((1, 2))
    head = (img > HEAD_LEVEL) & ~m  # the head outside the mask (background is black)
    return {"n": int(len(m)), "nonempty_share": round(float((area > 0).mean()), 4),
            "mean_area_px": round(float(area.mean()), 2),
            "mean_area_px_nonempty": round(float(area[area > 0].mean()), 2) if area.any()
            else None,
            "mean_intensity_inside": round(float(img[m].mean()), 4) if m.any() else None,
            "mean_intensity_head_outside": round(float(img[head].mean()), 4) if head.any()
            else None}


def mask_report(synth: np.ndarray, masks: np.ndarray, real: np.ndarray,
                real_masks: np.ndarray) -> dict:
    """card.json's ``masks`` block: the synthetic masks beside the real train tumour masks."""
    syn, ref = _mask_stats(synth, masks), _mask_stats(real, real_masks)
    ratio = syn["mean_area_px"] / ref["mean_area_px"] if ref["mean_area_px"] else None
    return {"min_component_pixels": MASK_MIN_PIXELS, "synthetic": syn, "real_train": ref,
            "area_ratio": None if ratio is None else round(ratio, 4)}
