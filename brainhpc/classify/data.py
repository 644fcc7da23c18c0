"""Training-data specs for the classifiers: real, synthetic and mixed training sets.

A spec string names where the training images come from; validation and test are always the
real prepared splits. Forms:

* ``real``                   the prepared train split;
* ``synthetic:<generator>``  that generator's tumour and healthy shards, nothing real;
* ``mixed:<generator>``      the real train split plus all of that generator's shards;
* ``mixed:<generator>:<p>``  a constant total (= the real train size) of which a fraction ``p`` is
  synthetic (``p`` in [0, 1]); each class keeps its real train count, so every ``p`` on the
  real/synthetic proportion curve has the same size and class balance and only the source changes.

Synthetic images are read from the generate cells' layout ``SYN_DIR/<generator>-<label>/shards/``.

Class balance: ``class_weights`` gives inverse-frequency weights for a weighted cross-entropy
loss; that is what the CNN uses, because a weighted loss composes with DDP's DistributedSampler
while a WeightedRandomSampler does not. ``sample_weights`` (per-image weights for a
WeightedRandomSampler) exists for single-process use and gives the same expected class balance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainhpc.data import preprocess
from brainhpc.data.shards import LABEL_NAMES, LABELS, OPTIONAL, ShardData, load_split
from brainhpc.errors import BrainhpcError

GENERATORS = ("vae", "dcgan", "wgan-gp", "ddpm")
KINDS = ("real", "synthetic", "mixed")
VALID_FORMS = ("real", "synthetic:<generator>", "mixed:<generator>", "mixed:<generator>:<p>")


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
                f"valid generators: {', '.join(GENERATORS)}"
            )
        if self.p is not None and (self.kind != "mixed" or not 0.0 <= self.p <= 1.0):
            raise BrainhpcError(
                f"training data: fraction p={self.p!r} is only valid as mixed:<generator>:<p> "
                "with p in [0, 1]"
            )

    def __str__(self) -> str:
        if self.kind == "real":
            return "real"
        return f"{self.kind}:{self.generator}" + ("" if self.p is None else f":{self.p:g}")


def _bad_spec(text: str, why: str) -> BrainhpcError:
    return BrainhpcError(
        f"training data spec {text!r}: {why}; valid forms: {', '.join(VALID_FORMS)} "
        f"(generators: {', '.join(GENERATORS)}; p a number in [0, 1])"
    )


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
    try:
        p = float(parts[2])
    except ValueError:
        raise _bad_spec(text, f"fraction {parts[2]!r} is not a number") from None
    if not np.isfinite(p) or not 0.0 <= p <= 1.0:
        raise _bad_spec(text, f"fraction {parts[2]!r} is outside [0, 1]")
    return TrainSpec("mixed", parts[1], p)


def synthetic_shard_dir(synthetic_dir: str | os.PathLike, generator: str, label: str) -> Path:
    """Where the generate cell ``<generator>-<label>`` writes its shards."""
    return Path(synthetic_dir) / f"{generator}-{label}" / "shards"


def load_synthetic(synthetic_dir: str | os.PathLike | None, generator: str) -> dict[int, ShardData]:
    """Both labels of one generator's output, keyed by label; a missing cell names what to run."""
    if synthetic_dir is None:
        raise BrainhpcError(
            f"training data with generator {generator!r} needs the generate cells' output folder "
            "(--synthetic-dir)"
        )
    out = {}
    for name, label in LABELS.items():
        folder = synthetic_shard_dir(synthetic_dir, generator, name)
        if not folder.is_dir() or not any(folder.glob("shard-*.h5")):
            raise BrainhpcError(
                f"no synthetic shards in {folder}: generate cell {generator}-{name} must run first "
                f"(brainhpc generate --arch {generator} --label {name} ...)"
            )
        data = load_split(folder, label=label)
        if len(data) == 0:
            raise BrainhpcError(
                f"{folder}: holds no {name} images (label {label}); re-run generate cell "
                f"{generator}-{name}"
            )
        if data.brain is None:  # generated slices: the brain mask prepare would have drawn
            data.brain = np.stack([preprocess.brain_mask(im[0]) for im in data.images])[:, None]
        out[label] = data
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
            "at the prepared dataset's size (re-run the generate cells on this prepared data)"
        )
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
        **extras,
    )


def subsample(data: ShardData, n: int, seed: int | list[int]) -> ShardData:
    """``n`` images drawn without replacement, the same ones for the same seed (kept in order)."""
    if n > len(data):
        raise BrainhpcError(f"cannot draw {n} images from {len(data)}")
    idx = np.sort(np.random.default_rng(seed).choice(len(data), size=n, replace=False))
    return data.select(idx)


def assemble_training_data(spec: TrainSpec | str, prepared: str | os.PathLike,
                           synthetic_dir: str | os.PathLike | None = None,
                           seed: int = 0) -> ShardData:
    """The training images for ``spec``: the real train split, synthetic shards, or a mix.

    For ``mixed:<g>:<p>`` each class c keeps its real train count n_c: round((1 - p) * n_c) real
    images and the rest synthetic, both drawn without replacement with ``seed``.
    """
    if isinstance(spec, str):
        spec = parse_train_spec(spec)
    attrs = {"train_spec": str(spec), "seed": int(seed)}
    if spec.kind == "real":
        real = load_split(prepared, "train")
        return concat([real], {**real.attrs, **attrs})
    syn = load_synthetic(synthetic_dir, spec.generator)
    if spec.kind == "synthetic":
        return concat([syn[0], syn[1]], attrs)
    real = load_split(prepared, "train")
    if spec.p is None:
        return concat([real, syn[0], syn[1]], attrs)
    parts = []
    for label in (0, 1):
        real_c = real.select(real.labels == label)
        n_c = len(real_c)
        n_real = int(round((1.0 - spec.p) * n_c))
        n_syn = n_c - n_real
        if n_syn > len(syn[label]):
            raise BrainhpcError(
                f"training data {spec}: needs {n_syn} synthetic {LABEL_NAMES[label]} images but "
                f"generate cell {spec.generator}-{LABEL_NAMES[label]} wrote {len(syn[label])}; "
                "generate more (--n-samples) or lower p"
            )
        # independent, reproducible streams per class and source
        parts.append(subsample(real_c, n_real, [seed, label, 0]))
        parts.append(subsample(syn[label], n_syn, [seed, label, 1]))
    return concat(parts, attrs)


def healthy_only(data: ShardData, what: str = "training data") -> ShardData:
    """The healthy images the VAE trains on; an empty set is an error, not an empty epoch."""
    out = data.select(data.labels == LABELS["healthy"])
    if len(out) == 0:
        raise BrainhpcError(
            f"{what}: no healthy images (label 0) among {len(data)}; the VAE anomaly detector "
            "trains on healthy images only"
        )
    return out


def class_counts(labels: np.ndarray) -> np.ndarray:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=2)[:2]


def class_weights(labels: np.ndarray) -> np.ndarray:
    """Inverse-frequency weights n / (2 n_c) per class (1, 1 when balanced) for a weighted loss."""
    counts = class_counts(labels)
    if np.any(counts == 0):
        missing = [LABEL_NAMES[c] for c in (0, 1) if counts[c] == 0]
        raise BrainhpcError(
            f"training data has no {' or '.join(missing)} images: a classifier needs both classes"
        )
    return (counts.sum() / (2.0 * counts)).astype(np.float32)


def sample_weights(labels: np.ndarray) -> np.ndarray:
    """Per-image weights for torch's WeightedRandomSampler: each class drawn equally often."""
    labels = np.asarray(labels, dtype=np.int64)
    return class_weights(labels)[labels].astype(np.float64)
