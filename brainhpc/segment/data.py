"""Image+mask training sets for the segment cell, from the classifiers' training-data specs.

``training_data(spec, prepared, synthetic_dir, seed)`` draws exactly the images that
``brainhpc.classify.data.assemble_training_data`` draws for the same spec and seed (same parts,
same per-class subsample streams; a test keeps the two in step), so a segmenter and a classifier
on ``mixed:dcgan:0.25`` see the same slices. What differs is masks:

* a synthetic **healthy** part without masks (a generator trained on images alone) gets all-zero
  masks: a healthy slice has no tumour to delineate;
* a synthetic **tumour** part without masks is refused, naming the generate cell to re-run with
  ``--with-masks``; so is a real split without masks, naming the layouts that carry them.

Masks are returned as N x 1 x H x W uint8 0/1 (prepared data stores 0/255 or 0/1; > 0 is tumour).
"""

from __future__ import annotations

import os

import numpy as np

from brainhpc.classify.data import (
    TrainSpec,
    concat,
    load_synthetic,
    parse_train_spec,
    subsample,
    synthetic_shard_dir,
)
from brainhpc.data.shards import LABEL_NAMES, LABELS, MASK_LAYOUTS, ShardData, load_split
from brainhpc.errors import BrainhpcError


def require_masks(data: ShardData, what: str) -> ShardData:
    """``data`` with 0/1 masks, or an error naming ``what`` and the layouts that have masks."""
    if data.masks is None:
        raise BrainhpcError(f"{what}: the shards hold no tumour masks ('masks'); segmentation "
                            f"needs them. Prepared datasets with masks: {MASK_LAYOUTS}")
    if data.masks.shape != data.images.shape:
        raise BrainhpcError(f"{what}: masks {data.masks.shape} do not match images "
                            f"{data.images.shape}")
    data.masks = (data.masks > 0).astype(np.uint8)
    return data


def load_real(prepared: str | os.PathLike, split: str) -> ShardData:
    """A real prepared split with its masks (val and test are always these)."""
    return require_masks(load_split(prepared, split), f"prepared dataset {prepared}, split {split}")


def _synthetic_with_masks(synthetic_dir, generator: str) -> dict[int, ShardData]:
    syn = load_synthetic(synthetic_dir, generator)
    for label, data in syn.items():
        name = LABEL_NAMES[label]
        folder = synthetic_shard_dir(synthetic_dir, generator, name)
        if data.masks is None and label == LABELS["healthy"]:
            data.masks = np.zeros_like(data.images)
        elif data.masks is None:
            raise BrainhpcError(
                f"{folder}: synthetic tumour images without masks; segmentation trains on "
                f"image+mask pairs. Re-run generate cell {generator}-{name} with --with-masks "
                f"(brainhpc generate --arch {generator} --label {name} --with-masks ... --force)")
        require_masks(data, f"synthetic shards {folder}")
    return syn


def training_data(spec: TrainSpec | str, prepared: str | os.PathLike,
                  synthetic_dir: str | os.PathLike | None = None, seed: int = 0) -> ShardData:
    """Training images and 0/1 masks for ``spec`` (see the module docstring)."""
    if isinstance(spec, str):
        spec = parse_train_spec(spec)
    attrs = {"train_spec": str(spec), "seed": int(seed)}
    if spec.kind == "real":
        real = load_real(prepared, "train")
        return concat([real], {**real.attrs, **attrs})
    syn = _synthetic_with_masks(synthetic_dir, spec.generator)
    if spec.kind == "synthetic":
        return concat([syn[0], syn[1]], attrs)
    real = load_real(prepared, "train")
    if spec.p is None:
        return concat([real, syn[0], syn[1]], attrs)
    parts = []
    for label in (0, 1):  # mirrors assemble_training_data: same counts, same seeds
        real_c = real.select(real.labels == label)
        n_c = len(real_c)
        n_real = int(round((1.0 - spec.p) * n_c))
        n_syn = n_c - n_real
        if n_syn > len(syn[label]):
            raise BrainhpcError(
                f"training data {spec}: needs {n_syn} synthetic {LABEL_NAMES[label]} images but "
                f"generate cell {spec.generator}-{LABEL_NAMES[label]} wrote {len(syn[label])}; "
                "generate more (--n-samples) or lower p")
        parts.append(subsample(real_c, n_real, [seed, label, 0]))
        parts.append(subsample(syn[label], n_syn, [seed, label, 1]))
    return concat(parts, attrs)
