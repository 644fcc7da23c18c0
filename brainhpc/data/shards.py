"""HDF5 image shards: the one on-disk format for prepared and synthetic images.

A shard is ``shard-NNNNN.h5`` holding

* ``images``  N x 1 x H x W uint8, chunked one image per chunk (fast random access, no compression:
  brain slices compress poorly and compressed multi-image chunks kill random reads);
* ``labels``  N int8 (0 healthy, 1 tumour);
* ``sources`` N UTF-8 strings (source file relative to the dataset root, or a synthetic id);
* ``masks``   N x 1 x H x W uint8 tumour masks (0/255), only when ground truth exists (phantom,
  LGG, any layout with ``X_mask`` files);
* ``brain``   N x 1 x H x W uint8 brain masks (0/255) from pre-processing: the head's largest
  component, filled, eroded to drop the skull rim (what anomaly scores are limited to);
* ``patients`` N UTF-8 strings, the patient (or volume) of each image, only for layouts that
  know it (LGG case folders); without it every image is its own patient (``patient_ids``);
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
LABELS = {"healthy": 0, "tumour": 1}
LABEL_NAMES = {v: k for k, v in LABELS.items()}
DEFAULT_SHARD_SIZE = 4096
# load a split into RAM below this size (a 128 px split of 30k images is 0.5 GB)
IN_MEMORY_LIMIT_BYTES = 4 << 30


@dataclass
class ShardData:
    """All images of one or more shards, in memory."""

    images: np.ndarray  # N x 1 x H x W uint8
    labels: np.ndarray  # N int64
    sources: list[str]
    masks: np.ndarray | None = None  # N x 1 x H x W uint8 or None
    attrs: dict = field(default_factory=dict)
    brain: np.ndarray | None = None  # N x 1 x H x W uint8 brain masks or None
    patients: list[str] | None = None  # patient id per image, None when unknown

    def patient_ids(self) -> list[str]:
        """The patient of every image; without patient grouping each image is its own."""
        return list(self.patients) if self.patients is not None else list(self.sources)

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, index: np.ndarray) -> ShardData:
        """A subset by integer indices or a boolean mask."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        pick = (lambda a: None if a is None else a[idx])  # noqa: E731
        patients = None if self.patients is None else [self.patients[i] for i in idx]
        return ShardData(self.images[idx], self.labels[idx], [self.sources[i] for i in idx],
                         pick(self.masks), dict(self.attrs), pick(self.brain), patients)


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
    brain: np.ndarray | None = None,
    patients: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``images`` into ``out_dir/shard-NNNNN.h5`` files of at most ``shard_size`` images."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or images.shape[1] != 1 or images.dtype != np.uint8:
        raise ValueError(f"images must be N x 1 x H x W uint8, got {images.shape} {images.dtype}")
    if not (len(images) == len(labels) == len(sources)):
        raise ValueError(
            f"images ({len(images)}), labels ({len(labels)}) and sources ({len(sources)}) differ"
        )
    for name, extra in (("masks", masks), ("brain", brain)):
        if extra is not None and extra.shape != images.shape:
            raise ValueError(f"{name} shape {extra.shape} differs from images {images.shape}")
    if patients is not None and len(patients) != len(images):
        raise ValueError(f"{len(patients)} patient ids for {len(images)} images")
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
            _write_one(tmp, images[lo:hi], labels[lo:hi], list(sources[lo:hi]),
                       None if masks is None else masks[lo:hi], attrs,
                       None if brain is None else brain[lo:hi],
                       None if patients is None else list(patients[lo:hi]))
        paths.append(final)
    return paths


def _write_one(path: Path, images, labels, sources, masks, attrs, brain=None,
               patients=None) -> None:
    n, _, h, w = images.shape
    chunks = (1, 1, h, w) if n else None
    strings = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images, chunks=chunks)
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int8))
        f.create_dataset("sources", data=np.array(sources, dtype=object), dtype=strings)
        if masks is not None:
            f.create_dataset("masks", data=masks, chunks=chunks)
        if brain is not None:
            f.create_dataset("brain", data=brain, chunks=chunks)
        if patients is not None:
            f.create_dataset("patients", data=np.array(patients, dtype=object), dtype=strings)
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

    ``masks``, ``brain`` and ``patients`` survive only when every shard has them.
    """
    images, labels, sources, attrs = [], [], [], {}
    extras: dict[str, list] = {"masks": [], "brain": [], "patients": []}
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
                    elif key == "patients":
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
        elif key == "patients":
            joined[key] = [s for g in got for s in g]
        else:
            joined[key] = np.concatenate(got)
    return ShardData(
        images=np.concatenate(images),
        labels=np.concatenate(labels),
        sources=sources,
        masks=joined["masks"],
        attrs=attrs,
        brain=joined["brain"],
        patients=joined["patients"],
    )


def load_split(root: str | os.PathLike, split: str | None = None,
               label: int | None = None) -> ShardData:
    """All images of a prepared split (``root/split``) or of a synthetic folder (``split=None``)."""
    return read_shards(find_shards(root, split), label=label)


class ShardDataset(torch.utils.data.Dataset):
    """Torch dataset over the shards of one split: ``(image float 1xHxW in [0,1], label int)``.

    ``in_memory=None`` loads everything when it fits under ``IN_MEMORY_LIMIT_BYTES`` (the usual
    case: a 128 px split of 3,000 images is 49 MB); otherwise each DataLoader worker opens the
    shards lazily and reads one chunk (= one image) per item.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None,
                 label: int | None = None, in_memory: bool | None = None):
        self.paths = find_shards(root, split)
        index, nbytes = [], 0
        for k, p in enumerate(self.paths):
            with h5py.File(p, "r") as f:
                _read_attrs(f, p)
                lab = f["labels"][:].astype(np.int64)
                rows = np.flatnonzero(lab == label) if label is not None else np.arange(len(lab))
                index.extend((k, int(r), int(lab[r])) for r in rows)
                nbytes += int(np.prod(f["images"].shape[1:])) * len(rows)
        self.index = index
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

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.data is not None:
            img, lab = self.data.images[i], int(self.data.labels[i])
        else:
            k, row, lab = self.index[i]
            img = self._file(k)["images"][row]
        return as_float(img), lab

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"], state["_pid"] = {}, None
        return state
