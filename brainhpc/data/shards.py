"""HDF5 image shards: the one on-disk format for prepared and synthetic images.

A shard is ``shard-NNNNN.h5`` holding

* ``images``  N x 1 x H x W uint8, chunked one image per chunk (fast random access, no compression:
  brain slices compress poorly and compressed multi-image chunks kill random reads);
* ``labels``  N int8 (0 healthy, 1 tumour);
* ``sources`` N UTF-8 strings (source file relative to the dataset root, or a synthetic id);
* optional per-image datasets (``OPTIONAL``), each present only when the writer knows it:
  ``masks`` N x 1 x H x W uint8 tumour masks (0/255: phantom, LGG, any layout with ``X_mask``
  files); ``brain`` N x 1 x H x W uint8 brain masks (0/255) from pre-processing (the head's
  filled largest component, eroded to drop the skull rim: what anomaly scores are limited to);
  ``patients`` N strings, the patient of each image (LGG case folders; without it every image
  is its own patient, see ``patient_ids``); ``thumbs`` N x 32 x 32 uint8 size-independent
  thumbnails and ``sha256`` N strings (the source file's hash): the fingerprints that external
  evaluation uses to drop copies of training images (``brainhpc.data.duplicates``); ``groups``
  N strings, the leakage group of each image (copies and one patient's slices share one; named
  after the group's first source): the unit that splits, folds and intervals resample;
* attributes: ``format``, ``size``, ``seed``, ``version``, ``config_hash`` and whatever
  the writer adds
  (a generator writes its architecture, checkpoint and seed).

Images are stored as uint8 and scaled to [0, 1] floats on read, by ``ShardDataset``/``as_float``.
Shards are written to a temporary name and renamed, so a shard under its final name is always whole.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from brainhpc import __version__
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import atomic_path

log = logging.getLogger(__name__)

SHARD_FORMAT = 1
SPLITS = ("train", "val", "test")
EVAL_SPLITS = (*SPLITS, "all")  # what evaluation may score: one split, or all three
LABELS = {"healthy": 0, "tumour": 1}
LABEL_NAMES = {v: k for k, v in LABELS.items()}
DEFAULT_SHARD_SIZE = 4096
# load a split into RAM below this size (a 128 px split of 30k images is 0.5 GB)
IN_MEMORY_LIMIT_BYTES = 4 << 30


# optional per-image datasets: name -> kind ("array": N x ... uint8, "strings": N strings)
OPTIONAL = {"masks": "array", "brain": "array", "patients": "strings", "thumbs": "array",
            "sha256": "strings", "groups": "strings"}

# where tumour masks come from (named by errors of the stages that need them)
MASK_LAYOUTS = ("phantom data (brainhpc prepare --phantom N), the LGG FLAIR layout "
                "(<case>/<slice>_mask.tif) and any layout with X_mask files beside the images")


@dataclass
class ShardData:
    """All images of one or more shards, in memory (optional parts are None when absent)."""

    images: np.ndarray  # N x 1 x H x W uint8
    labels: np.ndarray  # N int64
    sources: list[str]
    masks: np.ndarray | None = None  # N x 1 x H x W uint8 tumour masks
    attrs: dict = field(default_factory=dict)
    brain: np.ndarray | None = None  # N x 1 x H x W uint8 brain masks
    patients: list[str] | None = None  # patient id per image
    thumbs: np.ndarray | None = None  # N x 32 x 32 uint8 fingerprint thumbnails
    sha256: list[str] | None = None  # source-file hashes
    groups: list[str] | None = None  # leakage group (duplicates, a patient's slices) per image

    def patient_ids(self) -> list[str]:
        """The patient of every image; without patient grouping each image is its own."""
        return list(self.patients) if self.patients is not None else list(self.sources)

    def group_ids(self) -> list[str]:
        """The unit of resampling of every image: its leakage group (``prepare`` records it),
        else its patient, else the image itself (datasets prepared before groups were kept)."""
        return list(self.groups) if self.groups is not None else self.patient_ids()

    def optional(self) -> dict:
        return {k: getattr(self, k) for k in OPTIONAL}

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, index: np.ndarray) -> ShardData:
        """A subset by integer indices or a boolean mask."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        extras = {k: None if v is None else (v[idx] if OPTIONAL[k] == "array"
                                             else [v[i] for i in idx])
                  for k, v in self.optional().items()}
        return ShardData(self.images[idx], self.labels[idx], [self.sources[i] for i in idx],
                         attrs=dict(self.attrs), **extras)


def as_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 tensor in [0, 1] (the scaling promised by the format)."""
    t = torch.as_tensor(images)
    return t.float().div_(255.0)


def write_shards(
    out_dir: str | os.PathLike,
    images: np.ndarray,
    labels: np.ndarray,
    sources: Sequence[str],
    masks: np.ndarray | None = None,
    attrs: dict | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    **extras,
) -> list[Path]:
    """Write ``images`` into ``out_dir/shard-NNNNN.h5`` files of at most ``shard_size`` images.

    ``extras``: further ``OPTIONAL`` per-image datasets (brain, patients, thumbs, sha256).
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.shape[1] != 1 or images.dtype != np.uint8:
        raise ValueError(f"images must be N x 1 x H x W uint8, got {images.shape} {images.dtype}")
    if not (len(images) == len(labels) == len(sources)):
        raise ValueError(
            f"images ({len(images)}), labels ({len(labels)}) and sources ({len(sources)}) differ"
        )
    unknown = sorted(set(extras) - set(OPTIONAL))
    if unknown:
        raise ValueError(f"unknown shard dataset(s) {unknown}; known: {sorted(OPTIONAL)}")
    extras = {"masks": masks, **{k: v for k, v in extras.items() if v is not None}}
    extras = {k: v for k, v in extras.items() if v is not None}
    for name, value in extras.items():
        if len(value) != len(images):
            raise ValueError(f"{name}: {len(value)} entries for {len(images)} images")
        if name in ("masks", "brain") and np.asarray(value).shape != images.shape:
            raise ValueError(f"{name} shape {np.asarray(value).shape} differs from images "
                             f"{images.shape}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    attrs = {"format": SHARD_FORMAT, "version": __version__, **(attrs or {})}
    paths = []
    n_shards = max(1, -(-len(images) // shard_size))
    for k in range(n_shards):
        lo, hi = k * shard_size, min(len(images), (k + 1) * shard_size)
        final = out_dir / f"shard-{k:05d}.h5"
        with atomic_path(final) as tmp:
            _write_one(tmp, images[lo:hi], labels[lo:hi], list(sources[lo:hi]), attrs,
                       {name: value[lo:hi] for name, value in extras.items()})
        paths.append(final)
    return paths


def _write_one(path: Path, images, labels, sources, attrs, extras: dict) -> None:
    n, _, h, w = images.shape
    strings = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, chunks=(1, 1, h, w) if n else None)
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int8))
        f.create_dataset("sources", data=np.array(sources, dtype=object), dtype=strings)
        for name, value in extras.items():
            if OPTIONAL[name] == "strings":
                f.create_dataset(name, data=np.array(list(value), dtype=object), dtype=strings)
            else:
                value = np.asarray(value, dtype=np.uint8)
                f.create_dataset(name, data=value,
                                 chunks=(1, *value.shape[1:]) if n else None)
        for key, value in attrs.items():
            f.attrs[key] = value


def find_shards(root: str | os.PathLike, split: str | None = None) -> list[Path]:
    """Shard files of ``root/split`` (a prepared dataset) or of ``root`` (synthetic output)."""
    root = Path(root)
    folder = root / split if split else root
    if not folder.is_dir():
        what = f"split {split!r} of prepared dataset {root}" if split else f"shard folder {root}"
        raise BrainhpcError(f"{what}: folder {folder} does not exist")
    paths = sorted(folder.glob("shard-*.h5"))
    if not paths:
        raise BrainhpcError(f"{folder}: no shard-NNNNN.h5 files (expected prepared or "
                            f"synthetic shards)")
    return paths


def _read_attrs(f: h5py.File, path: Path) -> dict:
    attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    if attrs.get("format") != SHARD_FORMAT:
        raise BrainhpcError(
            f"{path}: shard format {attrs.get('format')!r}, this brainhpc reads format "
            f"{SHARD_FORMAT}; "
            "re-run `brainhpc prepare` with this version"
        )
    return attrs


def _strings(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_shards(paths: Sequence[str | os.PathLike], label: int | None = None) -> ShardData:
    """Read shards into memory, optionally keeping one label (0 healthy, 1 tumour).

    An optional dataset (``OPTIONAL``) survives only when every shard has it.
    """
    images, labels, sources, attrs = [], [], [], {}
    extras: dict[str, list] = {k: [] for k in OPTIONAL}
    for p in paths:
        p = Path(p)
        try:
            with h5py.File(p, "r") as f:
                attrs = attrs or _read_attrs(f, p)
                lab = f["labels"][:].astype(np.int64)
                keep = np.ones(len(lab), bool) if label is None else lab == label
                idx = np.flatnonzero(keep)
                whole = len(idx) == len(lab)
                images.append(f["images"][:] if whole else f["images"][:][idx])
                labels.append(lab[idx])
                sources.extend(_strings(f["sources"][:][idx]))
                for key, got in extras.items():
                    if key not in f:
                        got.append(None)
                    elif OPTIONAL[key] == "strings":
                        got.append(_strings(f[key][:][idx]))
                    else:
                        got.append(f[key][:] if whole else f[key][:][idx])
        except (OSError, KeyError) as e:
            raise BrainhpcError(f"{p}: not a readable brainhpc shard ({e})") from e
    if not images:
        raise BrainhpcError("no shards given")
    joined = {}
    for key, got in extras.items():
        if any(g is None for g in got):
            joined[key] = None
        elif OPTIONAL[key] == "strings":
            joined[key] = [s for g in got for s in g]
        else:
            joined[key] = np.concatenate(got)
    return ShardData(images=np.concatenate(images), labels=np.concatenate(labels),
                     sources=sources, attrs=attrs, **joined)


def load_split(root: str | os.PathLike, split: str | None = None,
               label: int | None = None) -> ShardData:
    """All images of a prepared split (``root/split``) or of a synthetic folder (``split=None``)."""
    return read_shards(find_shards(root, split), label=label)


class ShardDataset(torch.utils.data.Dataset):
    """Torch dataset over the shards of one split: ``(image float 1xHxW in [0,1], label int)``,
    or, with ``masks=True``, ``(image, label, tumour mask float 1xHxW in {0, 1})``.

    ``in_memory=None`` loads everything when it fits under ``IN_MEMORY_LIMIT_BYTES`` (the usual
    case: a 128 px split of 3,000 images is 49 MB); otherwise each DataLoader worker opens the
    shards lazily and reads one chunk (= one image) per item.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None,
                 label: int | None = None, in_memory: bool | None = None, masks: bool = False):
        self.paths = find_shards(root, split)
        index, nbytes = [], 0
        for k, p in enumerate(self.paths):
            with h5py.File(p, "r") as f:
                _read_attrs(f, p)
                if masks and "masks" not in f:
                    raise BrainhpcError(f"{p}: holds no tumour masks (masks come from phantom "
                                        "data, the LGG layout or X_mask files beside images)")
                lab = f["labels"][:].astype(np.int64)
                rows = np.flatnonzero(lab == label) if label is not None else np.arange(len(lab))
                index.extend((k, int(r), int(lab[r])) for r in rows)
                nbytes += int(np.prod(f["images"].shape[1:])) * len(rows) * (1 + masks)
        self.index = index
        self.with_masks = masks
        self.in_memory = nbytes <= IN_MEMORY_LIMIT_BYTES if in_memory is None else in_memory
        self.data = read_shards(self.paths, label=label) if self.in_memory else None
        self._files: dict[int, h5py.File] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> np.ndarray:
        return np.array([lab for _, _, lab in self.index], dtype=np.int64)

    def _file(self, k: int) -> h5py.File:
        if self._pid != os.getpid():  # a forked DataLoader worker must open its own handles
            self._files, self._pid = {}, os.getpid()
        if k not in self._files:
            self._files[k] = h5py.File(self.paths[k], "r")
        return self._files[k]

    def __getitem__(self, i: int):
        if self.data is not None:
            img, lab = self.data.images[i], int(self.data.labels[i])
            mask = self.data.masks[i] if self.with_masks else None
        else:
            k, row, lab = self.index[i]
            img = self._file(k)["images"][row]
            mask = self._file(k)["masks"][row] if self.with_masks else None
        if mask is None:
            return as_float(img), lab
        return as_float(img), lab, torch.as_tensor(mask > 0, dtype=torch.float32)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None
        return state
