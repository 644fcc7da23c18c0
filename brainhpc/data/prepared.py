"""A prepared dataset as the other stages see it: its manifest, its size, its identity.

``brainhpc prepare`` writes ``DIR/{train,val,test}/shard-*.h5`` and ``DIR/manifest.json``; every
later stage reads them through these checks, so a wrong folder, an old format or a size mismatch
is one clear error, the same in every stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from brainhpc.data.shards import SHARD_FORMAT, load_split
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import config_hash


def check_prepared(data: str | os.PathLike) -> dict:
    """The prepared dataset's manifest, or a BrainhpcError saying what is wrong with ``data``."""
    data = Path(data)
    if not data.is_dir():
        raise BrainhpcError(f"prepared dataset {data} does not exist (run `brainhpc prepare`)")
    path = data / "manifest.json"
    if not path.exists():
        raise BrainhpcError(f"{data} is not a prepared dataset: {path.name} is missing "
                            "(run `brainhpc prepare`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BrainhpcError(f"{path}: not valid JSON ({e})") from e
    cfg = manifest.get("config") if isinstance(manifest, dict) else None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("size"), int):
        raise BrainhpcError(f"{path}: no 'config' with an integer 'size' (incompatible prepared "
                            "dataset; re-run `brainhpc prepare` with this version)")
    fmt = manifest.get("format", SHARD_FORMAT)
    if fmt != SHARD_FORMAT:
        raise BrainhpcError(f"{path}: prepared with format {fmt!r}, this brainhpc reads format "
                            f"{SHARD_FORMAT}; re-run `brainhpc prepare` with this version")
    return manifest


def prepared_size(data: str | os.PathLike) -> int:
    """The image side of a prepared dataset (checked as ``check_prepared`` does)."""
    return int(check_prepared(data)["config"]["size"])


def is_prepared(path: str | os.PathLike) -> bool:
    return (Path(path) / "manifest.json").exists()


def check_size(images: np.ndarray, size: int, what: str, hint: str) -> None:
    """Images of ``size`` x ``size`` px, or an error naming ``what`` and how to fix it."""
    if images.shape[-2:] != (size, size):
        raise BrainhpcError(f"{what}: images are {images.shape[-2]}x{images.shape[-1]} px but "
                            f"{size}x{size} px are expected; {hint}")


def dataset_key(prepared: str | os.PathLike) -> str:
    """The prepared dataset's identity: its manifest's config hash."""
    path = Path(prepared) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BrainhpcError(f"{path}: cannot read the prepared dataset manifest ({e})") from e
    if manifest.get("config_hash"):
        return str(manifest["config_hash"])
    if "config" not in manifest:
        raise BrainhpcError(f"{path}: no 'config' key (not a prepared brainhpc dataset)")
    return config_hash(manifest["config"])


def development_fingerprints(prepared: str | os.PathLike) -> dict | None:
    """Fingerprints of every image that shaped a model trained on ``prepared``: the train split
    (directly, or through the generators of synthetic training data) and the validation split
    (epoch and threshold choice). Evaluation drops copies and near-copies of these
    (``brainhpc.data.duplicates``); None for a dataset prepared before fingerprints existed."""
    parts = [load_split(prepared, s) for s in ("train", "val")]
    if any(p.thumbs is None or p.sha256 is None for p in parts):
        return None
    return {"sha256": [h for p in parts for h in p.sha256],
            "thumbs": torch.from_numpy(np.concatenate([p.thumbs for p in parts]))}


def image_statistics_baseline(prepared: str | os.PathLike) -> dict | None:
    """The prepared dataset's "image statistics only" row (its manifest's confound check)."""
    confound = check_prepared(prepared).get("confound") or {}
    if not confound:
        return None
    return {"cv_auc": confound.get("cv_auc"), **(confound.get("test") or {}),
            "warnings": confound.get("warnings", [])}
