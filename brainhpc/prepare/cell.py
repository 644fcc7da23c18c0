"""The ``prepare`` cell: a labelled image folder (or phantom data) -> a prepared HDF5 dataset.

Output, built in a staging folder beside ``out`` and renamed into place only when whole::

    OUT/train/shard-00000.h5 ...   images N x 1 x H x W uint8 (scaled to [0, 1] on read),
    OUT/val/...  OUT/test/...      labels (0 healthy, 1 tumour), sources, brain masks,
                                   fingerprints; tumour masks and patient ids where known
    OUT/manifest.json              counts, duplicate groups and the split audit, the confound
                                   check, skipped files, shard checksums, config (written last)
    OUT/preview.png                a labelled grid of pre-processed training images

Leakage (``brainhpc.data.duplicates``): byte-identical files, near-duplicates (two detectors
over 8 flips/rotations of a size-independent thumbnail) and slices of one patient are joined
into groups, and a group is never split across train/val/test (``brainhpc.data.split``). The
split is stratified by label and fixed by the seed, and does not depend on ``size``. The
manifest's ``confound`` block says how well trivial image statistics alone predict the label
(``brainhpc.data.confound``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import numpy as np

from brainhpc import __version__
from brainhpc.cell import (
    Config,
    Context,
    Outputs,
    force_option,
    out_option,
    progress_option,
    run_cell,
)
from brainhpc.data import duplicates, layouts
from brainhpc.data.confound import confound_check, image_statistics
from brainhpc.data.folder import Items, default_workers, gather_folder, gather_phantom
from brainhpc.data.phantom import LESIONS
from brainhpc.data.shards import DEFAULT_SHARD_SIZE, LABEL_NAMES, LABELS, SPLITS, write_shards
from brainhpc.data.split import check_splits, fold_split, group_names, split_counts, split_groups
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import config_hash, sha256_file, write_json
from brainhpc.images import save_grid
from brainhpc.options import check, option

log = logging.getLogger(__name__)

MIN_PER_LABEL = 3  # images of each label, at least (check_splits checks each split after)
PREVIEW_IMAGES = 32
OUTPUTS = Outputs(result="manifest.json", swap=True)


@dataclass
class PrepareConfig(Config):
    stage: ClassVar[str] = "prepare"

    out: Path = out_option("output folder: the prepared dataset")
    data: Path | None = option(None, "labelled image folder (br35h, brain-tumor-mri, lgg, or any "
                               "layout with --labels)")
    phantom: int | None = option(None, "N procedural phantom slices instead of --data", min=10,
                                 metavar="N")
    phantom_lesions: str = option("standard", "phantom lesions: standard (faint and small at "
                                  "64 px) | visible", choices=LESIONS)
    size: int = option(128, "image side in pixels", min=16, max=1024)
    seed: int = option(0, "split (and phantom) seed", min=0)
    split: tuple[float, float, float] = option((0.7, 0.2, 0.1), "train,val,test fractions "
                                               "(with --folds: train:val only)", gt=0)
    folds: int | None = option(None, "grouped K-fold cross-validation: deal the groups into K "
                               "folds, test on fold --fold", min=2, max=50, metavar="K")
    fold: int = option(0, "with --folds: the fold that is the test part (0..K-1)", min=0)
    labels: str | None = option(None, "explicit folder mapping, e.g. --labels tumour=a,b "
                                "healthy=c", nargs="+", metavar="LABEL=DIR[,DIR]")
    shard_size: int = option(DEFAULT_SHARD_SIZE, "max images per shard file", min=1)
    near_dup_bits: int = option(duplicates.NEAR_DUP_BITS, "near-duplicate hash distance",
                                min=0, max=32)
    near_dup_corr: float = option(duplicates.NEAR_DUP_CORR, "near-duplicate correlation",
                                  gt=0, max=1)
    force: bool = force_option()
    workers: int | None = option(None, "threads (default: every usable core)", min=1, run=True)
    progress: bool = progress_option()

    def __post_init__(self):
        check(self)
        if (self.data is None) == (self.phantom is None):
            raise BrainhpcError("prepare: give exactly one of --data PATH or --phantom N")
        if len(self.split) != 3 or abs(sum(self.split) - 1) > 1e-6:
            raise BrainhpcError(f"prepare: split must be three positive fractions train,val,test "
                                f"summing to 1, got {self.split!r}")
        self.split = tuple(float(x) for x in self.split)
        if self.folds is None and self.fold:
            raise BrainhpcError(f"prepare: --fold {self.fold} needs --folds K")
        if self.folds is not None and self.fold >= self.folds:
            raise BrainhpcError(f"prepare: fold must be an integer in 0..{self.folds - 1} "
                                f"(--folds {self.folds}), got {self.fold}")
        if self.labels and self.data is None:
            raise BrainhpcError("prepare: --labels only applies to --data")
        if self.labels:
            layouts.parse_labels(self.labels, one_class=True)  # fail now, not after the scan


def prepare(cfg: PrepareConfig) -> dict:
    """Build the prepared dataset in ``cfg.out``; returns the manifest (also when skipped)."""
    return run_cell(cfg, _prepare, OUTPUTS)


def _check_out(out: Path, force: bool) -> None:
    """A folder that is neither empty nor a prepared dataset is nobody's to overwrite, unless
    ``force`` (the new dataset replaces it whole)."""
    if out.exists() and not out.is_dir():
        raise BrainhpcError(f"--out {out} exists and is not a folder")
    if force:
        return
    if out.is_dir() and any(out.iterdir()) and not (out / OUTPUTS.result).exists():
        raise BrainhpcError(f"{out} exists and is not empty (and holds no manifest.json); "
                            "pass --force to replace it, or choose another --out")


def _gather(cfg: PrepareConfig, workers: int) -> Items:
    if cfg.phantom is not None:
        return gather_phantom(cfg.phantom, cfg.size, cfg.seed, cfg.phantom_lesions, workers,
                              cfg.progress)
    return gather_folder(cfg.data, cfg.size, cfg.labels, workers, cfg.progress)


def _check_counts(cfg: PrepareConfig, items: Items) -> None:
    for name, value in LABELS.items():
        n = int((items.labels == value).sum())
        if n < MIN_PER_LABEL:
            reasons = "; ".join(f"{s['source']}: {s['reason']}" for s in items.skipped[:5])
            raise BrainhpcError(
                f"{cfg.data}: only {n} usable {name} image(s), need at least {MIN_PER_LABEL} "
                f"(one per split); {len(items.skipped)} file(s) skipped"
                + (f", e.g. {reasons}" if reasons else ""))
    if items.skipped:
        log.warning("%d file(s) skipped (reasons in manifest.json), e.g. %s: %s",
                    len(items.skipped), items.skipped[0]["source"], items.skipped[0]["reason"])


def _split(cfg: PrepareConfig, items: Items) -> tuple[np.ndarray, np.ndarray, dict, list]:
    """(split per image, group per image, duplicate statistics with the audit, listed groups)."""
    groups, stats, pairs = duplicates.duplicate_groups(
        items.sha, items.thumbs, items.labels, items.patients, cfg.near_dup_bits,
        cfg.near_dup_corr)
    listed = [sorted(items.sources[i] for i in np.flatnonzero(groups == g))
              for g in np.unique(groups) if (groups == g).sum() > 1]
    if cfg.folds is None:
        split = split_groups(groups, items.labels, cfg.split, cfg.seed)
    else:
        split = fold_split(groups, items.labels, cfg.folds, cfg.fold, cfg.split, cfg.seed)
    stats["audit"] = duplicates.audit(pairs, split, items.labels, items.patients,
                                      rule_bits=cfg.near_dup_bits, rule_corr=cfg.near_dup_corr)
    check_splits(items.labels, split, str(cfg.data or "phantom data"))
    log.info("%d images, %d duplicate groups (%d exact), largest %d: kept within one split; "
             "%d near pairs at the audit thresholds still cross splits",
             len(items.labels), stats["groups"], stats["exact_groups"],
             stats["largest_group"], stats["audit"]["cross_split_audit_pairs"])
    return split, groups, stats, listed


def _preview(path: Path, images: np.ndarray, labels: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    per = PREVIEW_IMAGES // 2
    pick = np.concatenate([rng.permutation(np.flatnonzero(labels == v))[:per] for v in (1, 0)])
    save_grid(images[pick], path, ncols=8, captions=[LABEL_NAMES[int(v)] for v in labels[pick]],
              title=f"{len(labels)} training images (first rows tumour, then healthy)")


def _write_splits(staging: Path, cfg: PrepareConfig, items: Items, split: np.ndarray,
                  groups: list[str], attrs: dict) -> list[dict]:
    """One shard folder per split, sorted by source; returns the shard list of the manifest."""
    shards = []
    for k, name in enumerate(SPLITS):
        idx = np.flatnonzero(split == k)
        idx = idx[np.argsort([items.sources[i] for i in idx], kind="stable")]
        part = items.data(attrs, groups).select(idx)
        paths = write_shards(staging / name, part.images, part.labels, part.sources,
                             attrs={**attrs, "split": name}, shard_size=cfg.shard_size,
                             **part.optional())
        shards += [{"path": p.relative_to(staging).as_posix(), "sha256": sha256_file(p),
                    "images": int(min(cfg.shard_size, len(idx) - j * cfg.shard_size))}
                   for j, p in enumerate(paths)]
    return shards


def _manifest(ctx: Context, items: Items, split: np.ndarray, dup: tuple, confound: dict,
              shards: list, timing: dict) -> dict:
    stats, listed, groups = dup
    return {
        "format": 1, "status": "done", "version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": ctx.ident, "config_hash": config_hash(ctx.ident), "layout": items.layout,
        "size": ctx.cfg.size, "counts": split_counts(items.labels, split),
        "folds": None if ctx.cfg.folds is None else {"k": ctx.cfg.folds, "fold": ctx.cfg.fold},
        "groups_per_split": {name: len(set(groups[split == k].tolist()))
                             for k, name in enumerate(SPLITS)},
        "total": int(len(items.labels)), "has_masks": items.masks is not None,
        "patients": None if items.patients is None else len(set(items.patients)),
        "duplicates": stats, "confound": confound, "duplicate_groups": listed,
        "skipped": items.skipped, "notices": items.notices, "shards": shards, "timing": timing,
        "code": ctx.code,
    }


def _staging(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    except OSError as e:
        raise BrainhpcError(f"cannot write --out {out} ({e.strerror or e}); give a writable "
                            f"folder (in a container, mount one, e.g. -v \"$PWD/out:/out\")"
                            ) from e


def _prepare(ctx: Context) -> dict:
    cfg, t0 = ctx.cfg, time.perf_counter()
    _check_out(cfg.out, cfg.force)
    workers = cfg.workers or default_workers()
    items = _gather(cfg, workers)
    t_processed = time.perf_counter()
    _check_counts(cfg, items)
    split, groups, stats, listed = _split(cfg, items)
    features = image_statistics(items.images, items.brain, items.aspect)
    train, test = split == 0, split == 2
    confound = confound_check(features[train], items.labels[train], groups[train],
                              features[test], items.labels[test], cfg.seed)
    staging = _staging(cfg.out)
    try:
        attrs = {"size": cfg.size, "seed": cfg.seed, "config_hash": config_hash(ctx.ident),
                 "source": "phantom" if cfg.data is None else str(cfg.data)}
        shards = _write_splits(staging, cfg, items, split,
                               group_names(groups, items.sources), attrs)
        _preview(staging / "preview.png", items.images[train], items.labels[train], cfg.seed)
        n_seen = len(items.labels) + len(items.skipped)
        timing = {"wall_s": round(time.perf_counter() - t0, 3), "workers": workers,
                  "images_per_s": round(n_seen / max(t_processed - t0, 1e-9), 1)}
        manifest = _manifest(ctx, items, split, (stats, listed, groups), confound, shards,
                             timing)
        write_json(staging / OUTPUTS.result, manifest)
        _swap_into_place(staging, cfg.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _log_summary(cfg.out, manifest)
    return manifest


def _log_summary(out: Path, m: dict) -> None:
    d, c = m["duplicates"], m["confound"]
    log.info("prepared %s: %s; %d duplicate groups (%d byte-identical), %d near pairs across "
             "splits; %d skipped (%.1f s)", out,
             ", ".join(f"{s} {n['total']}" for s, n in m["counts"].items()), d["groups"],
             d["exact_groups"], d["audit"]["cross_split_near_pairs"], len(m["skipped"]),
             m["timing"]["wall_s"])
    if c.get("cv_auc") is not None:
        log.info("image statistics alone: cross-validated ROC-AUC %.3f%s", c["cv_auc"],
                 "".join(f"; WARNING: {w}" for w in c["warnings"]))


def _swap_into_place(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging`` with renames: at any moment one whole dataset is in place."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)
