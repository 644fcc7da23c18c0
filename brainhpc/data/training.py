"""Training sets of every training stage: real, synthetic and mixed, with or without masks.

A spec string names where the training images come from; validation and test are always the
real prepared splits. Forms:

* ``real``                   the prepared train split;
* ``synthetic:<generator>``  that generator's tumour and healthy shards, nothing real;
* ``mixed:<generator>``      the real train split plus all of that generator's shards;
* ``mixed:<generator>:<p>``  a constant total (= the real train size) of which a fraction ``p`` is
  synthetic (``p`` in [0, 1]); each class keeps its real train count, so every ``p`` on the
  real/synthetic proportion curve has the same size and class balance and only the source changes.

Synthetic images are read from the generate cells' layout ``SYN_DIR/<generator>-<label>/shards/``.

``training_data(spec, prepared, synthetic_dir, seed, masks=...)`` draws the same images for the
classifiers and, with ``masks=True``, the segmenter (same parts, same per-class subsample streams),
so a U-Net and a CNN on ``mixed:dcgan:0.25`` see the same slices. With masks, a synthetic healthy
part without masks (a generator trained on images alone) gets all-zero masks (a healthy slice has
no tumour to delineate); a synthetic tumour part without masks is refused, naming the generate
cell to re-run with ``--with-masks``; so is a real split without masks. Masks come back as
N x 1 x H x W uint8 0/1.

Class balance: ``class_weights`` gives inverse-frequency weights for a weighted cross-entropy
loss; that is what the CNN uses, because a weighted loss composes with DDP's DistributedSampler
while a WeightedRandomSampler does not. ``sample_weights`` (per-image weights for a
WeightedRandomSampler) exists for single-process use and gives the same expected class balance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from brainhpc.data import preprocess
from brainhpc.data.prepared import check_size
from brainhpc.data.shards import (
    LABEL_NAMES,
    LABELS,
    MASK_LAYOUTS,
    OPTIONAL,
    ShardData,
    load_split,
)
from brainhpc.errors import BrainhpcError

GENERATORS = ("vae", "dcgan", "wgan-gp", "ddpm", "ldm")  # brainhpc.models.ARCHS
KINDS = ("real", "synthetic", "mixed")
VALID_FORMS = ("real", "synthetic:<generator>", "mixed:<generator>", "mixed:<generator>:<p>")
SPEC_HELP = "real | synthetic:<gen> | mixed:<gen> | mixed:<gen>:<p>"


@dataclass(frozen=True)
class TrainSpec:
    """A parsed training-data spec; ``p`` is set only for the constant-total mixed form."""

    kind: str
    generator: str | None = None
    p: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise BrainhpcError(
                f"training data kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.kind == "real" and (self.generator is not None or self.p is not None):
            raise BrainhpcError("training data 'real' takes no generator or fraction")
        if self.kind != "real" and self.generator not in GENERATORS:
            raise BrainhpcError(
                f"training data {self.kind}: unknown generator {self.generator!r}; "
                f"valid generators: {', '.join(GENERATORS)}")
        if self.p is not None and (self.kind != "mixed" or not 0.0 <= self.p <= 1.0):
            raise BrainhpcError(
                f"training data: fraction p={self.p!r} is only valid as mixed:<generator>:<p> "
                "with p in [0, 1]")

    def __str__(self) -> str:
        if self.kind == "real":
            return "real"
        return f"{self.kind}:{self.generator}" + ("" if self.p is None else f":{self.p:g}")


def _bad_spec(text: str, why: str) -> BrainhpcError:
    return BrainhpcError(
        f"training data spec {text!r}: {why}; valid forms: {', '.join(VALID_FORMS)} "
        f"(generators: {', '.join(GENERATORS)}; p a number in [0, 1])")


def _fraction(text: str, part: str) -> float:
    try:
        p = float(part)
    except ValueError:
        raise _bad_spec(text, f"fraction {part!r} is not a number") from None
    if not np.isfinite(p) or not 0.0 <= p <= 1.0:
        raise _bad_spec(text, f"fraction {part!r} is outside [0, 1]")
    return p


def parse_train_spec(text: str) -> TrainSpec:
    """``"mixed:dcgan:0.25"`` -> TrainSpec("mixed", "dcgan", 0.25); bad input lists valid forms."""
    if not isinstance(text, str) or not text.strip():
        raise _bad_spec(str(text), "empty")
    parts = text.strip().lower().split(":")
    kind = parts[0]
    if kind == "real":
        if len(parts) != 1:
            raise _bad_spec(text, "'real' takes no generator")
        return TrainSpec("real")
    if kind not in KINDS:
        raise _bad_spec(text, f"unknown kind {kind!r}")
    if len(parts) < 2 or not parts[1]:
        raise _bad_spec(text, f"{kind!r} needs a generator")
    if parts[1] not in GENERATORS:
        raise _bad_spec(text, f"unknown generator {parts[1]!r}")
    if kind == "synthetic":
        if len(parts) != 2:
            raise _bad_spec(text, "'synthetic' takes a generator and nothing else")
        return TrainSpec("synthetic", parts[1])
    if len(parts) == 2:
        return TrainSpec("mixed", parts[1])
    if len(parts) != 3:
        raise _bad_spec(text, "too many ':' parts")
    return TrainSpec("mixed", parts[1], _fraction(text, parts[2]))


def check_spec(train_data: str, synthetic_dir) -> str:
    """The normalised spec string of ``train_data``; one with synthetic parts needs the folder
    of the generate cells' outputs."""
    spec = parse_train_spec(train_data)
    if synthetic_dir is None and spec.kind != "real":
        raise BrainhpcError(
            f"training data {spec} needs --synthetic-dir: the folder holding the generate "
            f"cells' outputs ({spec.generator}-healthy/ and {spec.generator}-tumour/)")
    return str(spec)


def synthetic_shard_dir(synthetic_dir: str | os.PathLike, generator: str, label: str) -> Path:
    """Where the generate cell ``<generator>-<label>`` writes its shards."""
    return Path(synthetic_dir) / f"{generator}-{label}" / "shards"


def check_synthetic_size(synthetic_dir: str | os.PathLike, generator: str, size: int) -> None:
    """A readable size mismatch before the shards are concatenated with anything."""
    for name in LABELS:
        folder = synthetic_shard_dir(synthetic_dir, generator, name)
        first = sorted(folder.glob("shard-*.h5"))[:1] if folder.is_dir() else []
        if not first:
            continue  # load_synthetic says which generate cell must run
        with h5py.File(first[0], "r") as f:
            shape = tuple(f["images"].shape[-2:])
        if shape != (size, size):
            raise BrainhpcError(
                f"{folder}: synthetic images are {shape[0]}x{shape[1]} px but the prepared data "
                f"is {size}x{size} px; re-run generate cell {generator}-{name} on this prepared "
                f"data (or re-prepare at --size {shape[0]})")


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


def load_real(prepared: str | os.PathLike, split: str, masks: bool = False) -> ShardData:
    """A real prepared split (with 0/1 masks, required, when ``masks``)."""
    data = load_split(prepared, split)
    return require_masks(data, f"prepared dataset {prepared}, split {split}") if masks else data


def _with_masks(data: ShardData, folder: Path, generator: str, label: int) -> ShardData:
    name = LABEL_NAMES[label]
    if data.masks is None and label == LABELS["healthy"]:
        data.masks = np.zeros_like(data.images)
    elif data.masks is None:
        raise BrainhpcError(
            f"{folder}: synthetic tumour images without masks; segmentation trains on "
            f"image+mask pairs. Re-run generate cell {generator}-{name} with --with-masks "
            f"(brainhpc generate --arch {generator} --label {name} --with-masks ... --force)")
    return require_masks(data, f"synthetic shards {folder}")


def load_synthetic(synthetic_dir: str | os.PathLike | None, generator: str,
                   masks: bool = False) -> dict[int, ShardData]:
    """Both labels of one generator's output, keyed by label; a missing cell names what to run."""
    if synthetic_dir is None:
        raise BrainhpcError(
            f"training data with generator {generator!r} needs the generate cells' output folder "
            "(--synthetic-dir)")
    out = {}
    for name, label in LABELS.items():
        folder = synthetic_shard_dir(synthetic_dir, generator, name)
        if not folder.is_dir() or not any(folder.glob("shard-*.h5")):
            raise BrainhpcError(
                f"no synthetic shards in {folder}: generate cell {generator}-{name} must run first "
                f"(brainhpc generate --arch {generator} --label {name} ...)")
        data = load_split(folder, label=label)
        if len(data) == 0:
            raise BrainhpcError(f"{folder}: holds no {name} images (label {label}); re-run "
                                f"generate cell {generator}-{name}")
        if data.brain is None:  # generated slices: the brain mask prepare would have drawn
            data.brain = np.stack([preprocess.brain_mask(im[0]) for im in data.images])[:, None]
        out[label] = _with_masks(data, folder, generator, label) if masks else data
    return out


def concat(parts: list[ShardData], attrs: dict | None = None) -> ShardData:
    """One ShardData from several; an optional part (masks, brain, ...) survives only if every
    part has it (patient ids: parts without them count one patient per image)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        raise BrainhpcError("no training images to concatenate")
    shapes = {p.images.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise BrainhpcError(
            f"training images differ in size {sorted(shapes)}: synthetic shards must be generated "
            "at the prepared dataset's size (re-run the generate cells on this prepared data)")
    extras = {}
    for key, kind in OPTIONAL.items():
        got = [getattr(p, key) for p in parts]
        if key == "patients" and any(g is not None for g in got):
            extras[key] = [s for p in parts for s in p.patient_ids()]  # ungrouped: one each
        elif all(g is not None for g in got):
            extras[key] = np.concatenate(got) if kind == "array" else [s for g in got for s in g]
    return ShardData(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]).astype(np.int64),
        sources=[s for p in parts for s in p.sources],
        attrs=dict(attrs if attrs is not None else parts[0].attrs),
        **extras)


def subsample(data: ShardData, n: int, seed: int | list[int]) -> ShardData:
    """``n`` images drawn without replacement, the same ones for the same seed (kept in order)."""
    if n > len(data):
        raise BrainhpcError(f"cannot draw {n} images from {len(data)}")
    idx = np.sort(np.random.default_rng(seed).choice(len(data), size=n, replace=False))
    return data.select(idx)


def _mix(spec: TrainSpec, real: ShardData, syn: dict[int, ShardData], seed: int) -> list:
    """``mixed:<g>:<p>``: each class c keeps its real train count n_c, round((1 - p) * n_c) real
    images and the rest synthetic, drawn with independent, reproducible streams."""
    parts = []
    for label in (0, 1):
        real_c = real.select(real.labels == label)
        n_real = int(round((1.0 - spec.p) * len(real_c)))
        n_syn = len(real_c) - n_real
        if n_syn > len(syn[label]):
            raise BrainhpcError(
                f"training data {spec}: needs {n_syn} synthetic {LABEL_NAMES[label]} images but "
                f"generate cell {spec.generator}-{LABEL_NAMES[label]} wrote {len(syn[label])}; "
                "generate more (--n-samples) or lower p")
        parts.append(subsample(real_c, n_real, [seed, label, 0]))
        parts.append(subsample(syn[label], n_syn, [seed, label, 1]))
    return parts


def training_data(spec: TrainSpec | str, prepared: str | os.PathLike,
                  synthetic_dir: str | os.PathLike | None = None, seed: int = 0,
                  masks: bool = False) -> ShardData:
    """The training images for ``spec`` (see the module docstring); ``masks``: with 0/1 masks."""
    if isinstance(spec, str):
        spec = parse_train_spec(spec)
    attrs = {"train_spec": str(spec), "seed": int(seed)}
    if spec.kind == "real":
        real = load_real(prepared, "train", masks)
        return concat([real], {**real.attrs, **attrs})
    syn = load_synthetic(synthetic_dir, spec.generator, masks)
    if spec.kind == "synthetic":
        return concat([syn[0], syn[1]], attrs)
    real = load_real(prepared, "train", masks)
    if spec.p is None:
        return concat([real, syn[0], syn[1]], attrs)
    return concat(_mix(spec, real, syn, seed), attrs)


def count_sources(data: ShardData) -> dict:
    """Real and synthetic image counts (generate's source ids start with ``synthetic/``)."""
    n_syn = sum(s.startswith("synthetic/") for s in data.sources)
    return {"total": len(data), "real": int(len(data) - n_syn), "synthetic": int(n_syn)}


def healthy_only(data: ShardData, what: str = "training data") -> ShardData:
    """The healthy images the VAE trains on; an empty set is an error, not an empty epoch."""
    out = data.select(data.labels == LABELS["healthy"])
    if len(out) == 0:
        raise BrainhpcError(
            f"{what}: no healthy images (label 0) among {len(data)}; the VAE anomaly detector "
            "trains on healthy images only")
    return out


def class_counts(labels: np.ndarray) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=2)[:2]


def two_classes(data: ShardData, what: str) -> None:
    """Both classes present: thresholds are chosen on validation and scored on test."""
    counts = class_counts(data.labels)
    if np.any(counts == 0):
        raise BrainhpcError(f"{what}: {int(counts[0])} healthy and {int(counts[1])} tumour "
                            "images; both classes are needed to choose thresholds and score")


def class_weights(labels: np.ndarray) -> np.ndarray:
    """Inverse-frequency weights n / (2 n_c) per class (1, 1 when balanced) for a weighted loss."""
    counts = class_counts(labels)
    if np.any(counts == 0):
        missing = [LABEL_NAMES[c] for c in (0, 1) if counts[c] == 0]
        raise BrainhpcError(
            f"training data has no {' or '.join(missing)} images: a classifier needs both classes")
    return (counts.sum() / (2.0 * counts)).astype(np.float32)


def sample_weights(labels: np.ndarray) -> np.ndarray:
    """Per-image weights for torch's WeightedRandomSampler: each class drawn equally often."""
    labels = np.asarray(labels, dtype=np.int64)
    return class_weights(labels)[labels].astype(np.float64)


def cell_data(spec: TrainSpec, prepared: str | os.PathLike,
              synthetic_dir: str | os.PathLike | None, seed: int, size: int,
              masks: bool = False) -> tuple[ShardData, ShardData, ShardData]:
    """(train, val, test) of a training cell, every part checked to be ``size`` px: the
    training set of ``spec`` and the real validation and test splits."""
    hint = f"re-prepare the data at one size (brainhpc prepare --size {size})"
    if spec.kind != "real":
        check_synthetic_size(synthetic_dir, spec.generator, size)
    train = training_data(spec, prepared, synthetic_dir, seed=seed, masks=masks)
    check_size(train.images, size, f"training data {spec}", hint)
    val, test = load_real(prepared, "val", masks), load_real(prepared, "test", masks)
    for name, split in (("val", val), ("test", test)):
        check_size(split.images, size, f"{prepared}/{name}", hint)
    return train, val, test
