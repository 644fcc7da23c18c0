"""The ``evaluate`` cell: score a trained classifier (a classify cell's ``model.pt``) on another
dataset, with every threshold frozen as the classify cell chose it on its own validation split.

``evaluate(EvaluateConfig) -> dict`` writes ``metrics.json`` (and, for the VAE,
``error_maps.png``) into ``cfg.out``. The data is either a prepared dataset (its ``test`` split by
default; ``--split train|val|all`` must be asked for) or a raw image folder, which goes through
the same pre-processing as ``brainhpc prepare`` (``brainhpc.data.prepare.read_folder``) at the
checkpoint's image size. A prepared dataset of another size is refused (re-prepare it).

External validation is only honest on images the model has not seen: the checkpoint carries the
fingerprints of its development images (train and validation splits), and every external image
that is a byte-identical copy or a near-duplicate of one of them (``brainhpc.data.duplicates``,
flips and rotations included) is dropped before scoring and counted in ``overlap`` (Br35H's
healthy slices reappear, resized, in brain-tumor-mri's ``notumor/``). A folder holding one class
only (``--labels tumour=scans``) is scored with the metrics that exist for it: that class's
recall and the score distribution. Re-runs with the same config (and the same checkpoint file)
are skipped; a different one in the same folder needs ``force``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from brainhpc import __version__
from brainhpc.classify.data import concat
from brainhpc.classify.metrics import classification_metrics
from brainhpc.classify.run import (
    check_size,
    load_classifier,
    percent,
    save_error_maps,
    score_with,
)
from brainhpc.classify.techniques import localisation
from brainhpc.data.duplicates import copies_of
from brainhpc.data.shards import SPLITS, ShardData, load_split
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import config_hash, sha256_file, write_json
from brainhpc.generate import check_prepared as read_manifest
from brainhpc.quality import dataset_key
from brainhpc.train.distributed import DEVICES

log = logging.getLogger(__name__)

EVAL_SPLITS = (*SPLITS, "all")


@dataclass
class EvaluateConfig:
    checkpoint: Path  # model.pt or the classify cell folder holding it
    data: Path  # prepared dataset (has manifest.json) or raw image folder
    out: Path
    split: str = "test"  # prepared data only: train | val | test | all
    labels: str | None = None  # raw folders: "tumour=yes healthy=no" (None: auto-detect)
    device: str = "auto"
    workers: int | None = None  # raw-folder pre-processing processes
    force: bool = False

    def __post_init__(self):
        self.checkpoint, self.data, self.out = Path(self.checkpoint), Path(self.data), \
            Path(self.out)
        if self.split not in EVAL_SPLITS:
            raise BrainhpcError(f"evaluate: unknown split {self.split!r}; valid: "
                                f"{', '.join(EVAL_SPLITS)}")
        if self.device not in DEVICES:
            raise BrainhpcError(
                f"evaluate: unknown device {self.device!r}; valid: {', '.join(DEVICES)}")
        if not self.data.exists():
            raise BrainhpcError(f"evaluate: data {self.data} does not exist")
        if self.labels is not None and self.prepared:
            raise BrainhpcError(f"evaluate: --labels applies to raw image folders; {self.data} "
                                "is a prepared dataset (its labels are stored)")

    @property
    def prepared(self) -> bool:
        return (self.data / "manifest.json").exists()


def load_data(cfg: EvaluateConfig, size: int):
    """(ShardData, skipped files, description) at the checkpoint's ``size``."""
    if cfg.prepared:
        psize = int(read_manifest(cfg.data)["config"]["size"])
        if psize != size:
            raise BrainhpcError(
                f"{cfg.data} is prepared at {psize}x{psize} px but the classifier "
                f"{cfg.checkpoint} takes {size}x{size} px; re-prepare it with --size {size} "
                "(or pass the raw image folder, which is pre-processed at the right size)")
        splits = SPLITS if cfg.split == "all" else (cfg.split,)
        data = concat([load_split(cfg.data, s) for s in splits])
        check_size(data.images, size, f"{cfg.data} ({cfg.split})",
                   f"re-prepare it with --size {size}")
        return data, [], f"prepared:{cfg.split}"
    if not cfg.data.is_dir():
        raise BrainhpcError(f"evaluate: {cfg.data} is neither a prepared dataset (no "
                            "manifest.json) nor an image folder")
    from brainhpc.data.prepare import read_folder

    data, skipped = read_folder(cfg.data, size, labels=cfg.labels, workers=cfg.workers,
                                one_class=True)
    return data, skipped, "raw folder"


def drop_overlap(data: ShardData, clf: dict, own: bool = False) -> tuple[ShardData, dict]:
    """``data`` without copies and near-copies of the classifier's development images, and the
    counts (with a few examples) of what was dropped. ``own``: ``data`` is a split of the very
    dataset the model was developed on, whose splits prepare already grouped (its test split is
    scored as the classify cell scored it)."""
    if own:
        return data, {"checked": False, "reason": "a split of the classifier's own prepared "
                      "dataset: prepare's duplicate and patient groups already separate it"}
    dev = clf.get("development_images")
    if dev is None or data.thumbs is None or data.sha256 is None:
        why = ("the checkpoint has no development fingerprints (trained before they existed)"
               if dev is None else "the data has no fingerprints (re-prepare it)")
        log.warning("evaluate: overlap with the training data NOT checked: %s", why)
        return data, {"checked": False, "reason": why}
    exact, near = copies_of(data.sha256, data.thumbs, dev["sha256"],
                            dev["thumbs"].numpy())
    drop = exact | near
    info = {"checked": True, "n_before": len(data), "exact_copies": int(exact.sum()),
            "near_copies": int(near.sum()), "dropped": int(drop.sum()),
            "examples": [data.sources[i] for i in np.flatnonzero(drop)[:10]]}
    if drop.all():
        raise BrainhpcError(f"evaluate: all {len(data)} images are copies or near-copies of the "
                            "classifier's training/validation images; nothing external is left")
    if drop.any():
        log.warning("evaluate: dropped %d of %d images that copy the classifier's development "
                    "images (%d byte-identical, %d near-duplicates)", info["dropped"], len(data),
                    info["exact_copies"], info["near_copies"])
    return data.select(~drop), info


def evaluate(cfg: EvaluateConfig, loaded: dict | None = None) -> dict:
    """Score the classifier on ``cfg.data``; returns the metrics dict (also metrics.json).

    ``loaded`` is a cache {image size: (ShardData, skipped, kind)} shared by callers that score
    many classifiers on one external set (the sweep's evaluate stage): the folder is read and
    pre-processed once per image size.
    """
    t_start = time.time()
    clf = load_classifier(cfg.checkpoint)
    ident = {"checkpoint": str(clf["path"].resolve()),
             "checkpoint_sha256": sha256_file(clf["path"]), "data": str(cfg.data.resolve()),
             "split": cfg.split if cfg.prepared else None, "labels": cfg.labels}
    path = cfg.out / "metrics.json"
    if path.exists() and not cfg.force:
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BrainhpcError(f"{path}: unreadable ({e}); use --force to overwrite") from e
        if old.get("config") == ident and old.get("status") == "done":
            log.info("%s: finished (metrics.json), skipping; use --force to redo", cfg.out)
            return {**old, "skipped": True}
        diff = sorted(k for k in set(old.get("config", {})) | set(ident)
                      if old.get("config", {}).get(k) != ident.get(k))
        raise BrainhpcError(f"{cfg.out} holds an evaluation with a different config "
                            f"({', '.join(diff)} differ); use --force to overwrite it or choose "
                            "another --out")
    size = int(clf["image_size"])
    if loaded is not None and size in loaded:
        data, skipped, kind = loaded[size]
    else:
        data, skipped, kind = load_data(cfg, size)
        if loaded is not None:
            loaded[size] = (data, skipped, kind)
    own = cfg.prepared and clf.get("data_key") is not None and \
        dataset_key(cfg.data) == clf["data_key"]
    data, overlap = drop_overlap(data, clf, own)
    if own and cfg.split != "test":  # asked for: scoring the model on what it learned from
        overlap["reason"] = (f"split {cfg.split!r} of the classifier's own prepared dataset: "
                             "it holds the development images, scored as asked (nothing "
                             "dropped)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise BrainhpcError("evaluate: device 'cuda' requested but torch sees no CUDA device")
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    scored = score_with(clf, data, device)
    if clf["model"] == "cnn":
        metrics = classification_metrics(data.labels, *scored["cnn"])
        extra = {"chosen": {"threshold": clf["threshold"]}}
    else:
        metrics, techniques = {}, {}
        for name, fitted in clf["fitted"].items():
            block = classification_metrics(data.labels, *scored[name])
            block["chosen"] = fitted.chosen()
            if data.masks is not None:
                block["localisation"] = localisation(fitted.regions(scored["maps"]), data.masks)
            techniques[name] = block
        extra = {"techniques": techniques}
        cfg.out.mkdir(parents=True, exist_ok=True)
        save_error_maps(cfg.out / "error_maps.png", data, scored["inputs"], scored["maps"],
                        clf["fitted"], f"vae on {cfg.data.name} ({kind})")
    result = {
        "status": "done", "model": clf["model"], "train_data": clf.get("train_data"),
        "data": str(cfg.data), "data_kind": kind, "split": ident["split"], "image_size": size,
        **metrics, **extra, "frozen": True, "overlap": overlap, "n_skipped": len(skipped),
        "skipped": skipped[:100],
        "wall_seconds": round(time.time() - t_start, 3), "device": str(device),
        "brainhpc": __version__, "config_hash": config_hash(ident), "config": ident,
    }
    write_json(path, result)
    for block_name, block in ([("cnn", result)] if clf["model"] == "cnn"
                              else result["techniques"].items()):
        rec = block["recall_per_class"]
        log.info("evaluate %s (%s) on %s: balanced acc %s, ROC-AUC %s, recall healthy %s "
                 "tumour %s (n %d)", clf["path"], block_name, cfg.data,
                 percent(block["balanced_accuracy"]),
                 "-" if block["roc_auc"] is None else f"{block['roc_auc']:.3f}",
                 percent(rec["healthy"]), percent(rec["tumour"]), block["n"])
    return result


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score a trained classifier on another dataset (thresholds frozen)",
        description="Score a classify cell's model.pt on a prepared dataset or a raw image "
                    "folder, with its validation-chosen thresholds frozen.")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="a classify cell's model.pt, or the cell folder")
    p.add_argument("--data", required=True, type=Path,
                   help="prepared dataset folder or raw image folder")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--split", default="test",
                   help=f"prepared data: {' | '.join(EVAL_SPLITS)} (default test; the others "
                        "must be asked for)")
    p.add_argument("--labels", nargs="+", metavar="LABEL=DIR[,DIR]",
                   help="raw folders: explicit mapping, e.g. --labels tumour=yes healthy=no; "
                        "one label alone scores a one-class folder (--labels tumour=.)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--workers", type=int, help="pre-processing processes (raw folders)")
    p.add_argument("--force", action="store_true", help="overwrite a different evaluation")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = EvaluateConfig(checkpoint=args.checkpoint, data=args.data, out=args.out,
                         split=args.split, labels=" ".join(args.labels) if args.labels else None,
                         device=args.device, workers=args.workers, force=args.force)
    evaluate(cfg)
    return 0
