"""The ``generate`` cell: train one generator for one label, then write synthetic shards.

``generate(GenerateConfig) -> dict`` writes into ``cfg.out``::

    checkpoints/last.pt   trainer checkpoint (resume state; the weights the samples came from)
    metrics.jsonl         training metrics
    shards/shard-*.h5     n_samples synthetic images, same format as prepared data (label set;
                          attrs: generator, label, checkpoint + sha256, seed, step, data)
    samples.png           the first 64 synthetic images; real.png: 64 real train images beside it
    memorisation.png      top synthetic / nearest-train pairs (see brainhpc.quality)
    card.json             model card: architecture, label, data, epochs, seed, wall time, quality

``with_masks`` (tumour label only): the generator trains on image+mask pairs, the tumour mask as
a second channel (``brainhpc.models``), and the shards also carry ``masks`` (N x 1 x H x W uint8
0/255, as prepare writes them): the sampled mask channel cut at its midpoint, with specks under
``MASK_MIN_PIXELS`` removed. samples.png and real.png then show the masks as red outlines, and
card.json's ``masks`` block compares the synthetic masks with the real ones (share non-empty,
mean area, image brightness inside vs outside). FID/KID and the memorisation check look at the
image channel only.

Re-runs: a finished run with the same config is skipped; a different config needs ``force``
(which starts over); an interrupted or failed run resumes from its last checkpoint. Under
torchrun/SLURM tasks every rank trains, rank 0 alone samples and writes.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from brainhpc import __version__, models
from brainhpc import quality as qa
from brainhpc.cli import parse_option
from brainhpc.data.shards import (
    LABELS,
    MASK_LAYOUTS,
    SHARD_FORMAT,
    load_split,
    write_shards,
)
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import config_hash, sha256_file, write_json
from brainhpc.images import save_grid
from brainhpc.train import TrainConfig, Trainer, init_distributed
from brainhpc.train.distributed import barrier, teardown
from brainhpc.train.precision import PRECISIONS

log = logging.getLogger(__name__)

LABEL_ALIASES = {"tumor": "tumour"}
GRID = 64  # images in samples.png / real.png
MASK_MIN_PIXELS = 4  # sampled mask components smaller than this are dropped (binarise_masks)
HEAD_LEVEL = 0.05  # pixels brighter than this count as head in the masks' brightness check


@dataclass
class GenerateConfig:
    arch: str
    label: str
    data: Path  # a prepared dataset (DIR/{train,val,test}/shard-*.h5 + manifest.json)
    out: Path
    epochs: int | None = None  # None: the architecture's default
    n_samples: int = 1500
    seed: int = 0
    batch_size: int | None = None  # global batch; None: the architecture's default
    force: bool = False
    options: dict = field(default_factory=dict)  # architecture options (brainhpc.models.<arch>)
    min_images: int = 64  # refuse to train on fewer train images of the label
    quality: bool = True
    feature_steps: int = qa.FeatureConfig.steps
    checkpoint_every: int = 500
    device: str = "auto"
    precision: str = "auto"  # auto | bf16 | fp32 (brainhpc.train.precision); card.json: resolved
    num_workers: int = 0
    progress: bool = True
    with_masks: bool = False  # train on image+mask pairs (tumour only); shards carry ``masks``

    def __post_init__(self):
        self.label = LABEL_ALIASES.get(self.label, self.label)
        if not isinstance(self.with_masks, bool):
            raise BrainhpcError(f"generate: with_masks must be true or false, got "
                                f"{self.with_masks!r}")
        if self.precision not in PRECISIONS:
            raise BrainhpcError(f"generate: precision {self.precision!r} is not one of "
                                f"{', '.join(PRECISIONS)}")
        if self.arch not in models.ARCHS:
            raise BrainhpcError(f"unknown architecture {self.arch!r}; valid: "
                                f"{', '.join(models.ARCHS)}")
        if self.label not in LABELS:
            raise BrainhpcError(f"unknown label {self.label!r}; valid: {', '.join(LABELS)} "
                                f"(or {', '.join(LABEL_ALIASES)})")
        if self.with_masks and self.label != "tumour":
            raise BrainhpcError(
                f"generate: --with-masks draws tumour masks, and a {self.label} generator has "
                "nothing to draw (its slices hold no tumour; the segment stage gives healthy "
                "synthetic shards all-zero masks). Run the healthy cell without --with-masks")
        self.data, self.out = Path(self.data), Path(self.out)
        for key in ("n_samples", "min_images", "feature_steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise BrainhpcError(f"generate: {key} must be an integer >= 1, "
                                    f"got {getattr(self, key)!r}")
        for key in ("epochs", "batch_size"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise BrainhpcError(f"generate: {key} must be an integer >= 1, got {v!r}")
        names = models.option_names(self.arch)
        bad = sorted(set(self.options) - set(names))
        if bad:
            raise BrainhpcError(f"{self.arch}: unknown option(s) {', '.join(bad)}; "
                                f"valid: {', '.join(names)}")

    def identity(self) -> dict:
        """What defines the outputs (a finished run with the same identity is skipped)."""
        d = asdict(self)
        for key in ("force", "device", "precision", "num_workers", "progress", "checkpoint_every",
                    "out"):
            d.pop(key)
        d["data"] = str(self.data.resolve())
        if not self.with_masks:
            d.pop("with_masks")  # image-only runs keep the identity they had before masks
        return d


def check_prepared(data: Path) -> dict:
    """The prepared dataset's manifest, or a BrainhpcError saying what is wrong with ``data``."""
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
    (``MASK_MIN_PIXELS``): single-pixel speckle of a half-trained generator is not a lesion."""
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
    """card.json's ``masks`` block: the synthetic masks beside the real train tumour masks, so a
    reader sees at a glance whether the generator draws masks at all, of a plausible size, and
    on the bright lesions (tumours are bright on FLAIR and on the phantoms) rather than anywhere."""
    syn, ref = _mask_stats(synth, masks), _mask_stats(real, real_masks)
    ratio = syn["mean_area_px"] / ref["mean_area_px"] if ref["mean_area_px"] else None
    return {"min_component_pixels": MASK_MIN_PIXELS, "synthetic": syn, "real_train": ref,
            "area_ratio": None if ratio is None else round(ratio, 4)}


def _card_path(cfg: GenerateConfig) -> Path:
    return cfg.out / "card.json"


def _previous(cfg: GenerateConfig, ident: dict) -> dict | None:
    """The finished card to skip with, or None to (re)run; raises if the outputs conflict."""
    path = _card_path(cfg)
    if not path.exists():
        return None
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BrainhpcError(f"{path}: unreadable model card ({e}); use --force to start "
                            "over") from e
    old = card.get("config", {})
    if old == ident:
        return card if card.get("status") == "done" else None
    diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
    shown = "; ".join(f"{k}: {old.get(k)!r} -> {ident.get(k)!r}" for k in diff)
    if card.get("status") == "done":
        raise BrainhpcError(f"{cfg.out} holds a finished run with a different config ({shown}); "
                            "use --force to overwrite it or choose another --out")
    # an unfinished run: the trainer resumes it if the checkpoint fits, and refuses otherwise
    log.info("%s: unfinished run with a different config (%s); resuming if the checkpoint "
             "fits", cfg.out, shown)
    return None


def _wipe(out: Path) -> None:
    for name in ("checkpoints", "shards", ".shards.tmp"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "samples.png", "real.png", "memorisation.png", "card.json"):
        (out / name).unlink(missing_ok=True)


def generate(cfg: GenerateConfig) -> dict:
    """Train ``cfg.arch`` on ``cfg.label``'s train split, sample, write shards, grids and card."""
    t_start = time.time()
    ident = cfg.identity()
    manifest = check_prepared(cfg.data)
    info = init_distributed(cfg.device)
    try:
        return _generate(cfg, ident, manifest, info, t_start)
    finally:
        teardown(info)  # a no-op when the trainer already closed the group


def _generate(cfg: GenerateConfig, ident: dict, manifest: dict, info, t_start: float) -> dict:
    if not cfg.force:
        done = _previous(cfg, ident)
        if done is not None:
            log.info("%s: finished (card.json), skipping; use --force to redo", cfg.out)
            return {**done, "skipped": True}
    else:
        if info.is_main:
            _wipe(cfg.out)
        barrier(info)  # no rank may see the old checkpoint after rank 0 decided to start over
    lab = LABELS[cfg.label]
    train = load_split(cfg.data, "train", label=lab)
    size = int(manifest["config"]["size"])
    if len(train) and train.images.shape[-2:] != (size, size):
        raise BrainhpcError(f"{cfg.data}/train: images are {train.images.shape[-2:]}, manifest "
                            f"says size {size}")
    if len(train) < cfg.min_images:
        raise BrainhpcError(f"{cfg.data}/train has {len(train)} {cfg.label} images, fewer than "
                            f"the {cfg.min_images} needed to train a generator (min_images)")
    pairs = train.images
    if cfg.with_masks:
        check_masks(train, cfg.data)
        pairs = np.concatenate([train.images, np.where(train.masks > 0, 255, 0).astype(np.uint8)],
                               axis=1)
    options = dict(cfg.options)
    if cfg.epochs is not None:
        options["epochs"] = cfg.epochs
    if cfg.batch_size is not None:
        options["batch_size"] = cfg.batch_size
    arch_cfg = models.make_config(cfg.arch, size, options, image_channels=pairs.shape[1])
    if arch_cfg.batch_size > len(train):
        raise BrainhpcError(f"batch_size {arch_cfg.batch_size} exceeds the {len(train)} "
                            f"{cfg.label} train images; pass a smaller --batch-size")
    task = models.module(cfg.arch).Task(arch_cfg)
    data_key = qa.dataset_key(cfg.data)
    arch_dict = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(arch_cfg).items()}
    # image_channels stays out of "model" and with_masks is added only when set, so image-only
    # checkpoints keep the fingerprint they had before masks (and resume)
    fingerprint = {"arch": cfg.arch, "label": cfg.label, "data": data_key, "size": size,
                   "model": {k: v for k, v in arch_dict.items()
                             if k not in ("epochs", "image_channels")},
                   **({"with_masks": True} if cfg.with_masks else {})}
    tcfg = TrainConfig(out=cfg.out, epochs=arch_cfg.epochs, batch_size=arch_cfg.batch_size,
                       seed=cfg.seed, checkpoint_every=cfg.checkpoint_every,
                       num_workers=cfg.num_workers, device=cfg.device, progress=cfg.progress,
                       precision=cfg.precision)
    card = {"status": "running", "arch": cfg.arch, "label": cfg.label, "data": str(cfg.data),
            "data_key": data_key, "size": size, "n_train": len(train), "epochs": arch_cfg.epochs,
            "batch_size": arch_cfg.batch_size, "seed": cfg.seed, "with_masks": cfg.with_masks,
            "model": arch_dict, "config": ident, "brainhpc": __version__}
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(pairs))
    trainer = Trainer(task, dataset, tcfg, fingerprint=fingerprint, dist_info=info)
    if info.is_main:
        write_json(_card_path(cfg), card)
    try:
        result = trainer.fit()
    except BrainhpcError as e:
        if info.is_main:
            write_json(_card_path(cfg), {**card, "status": "failed", "error": str(e)})
        raise
    finally:
        trainer.close()
    card.update(steps=result["step"], train_seconds=result["train_seconds"],
                precision=result["precision"], threads=result["threads"],
                resumed=result["resumed"], world_size=info.world_size)
    if result["status"] != "done":
        if info.is_main:
            write_json(_card_path(cfg), {**card, "status": result["status"]})
        log.warning("%s: training %s at step %d; re-run to resume", cfg.out, result["status"],
                    result["step"])
        return {**card, "status": result["status"]}
    if not info.is_main:
        return {"status": "worker", "rank": info.rank}

    name = task.sample_model
    model = trainer.ema.get(name, trainer.raw(name))
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        samples = task.sample(model, cfg.n_samples, gen)
    samples = samples.cpu().numpy()
    synth = (samples[:, :1] * 255.0 + 0.5).astype(np.uint8)
    masks = binarise_masks(samples[:, 1:]) if cfg.with_masks else None
    card["sample_seconds"] = round(time.time() - t0, 3)
    ckpt = trainer.last_path
    ckpt_sha = sha256_file(ckpt)
    attrs = {"generator": cfg.arch, "label": cfg.label, "checkpoint": str(ckpt.resolve()),
             "checkpoint_sha256": ckpt_sha, "seed": cfg.seed, "step": result["step"],
             "size": size, "data": str(cfg.data.resolve()), "data_key": data_key,
             "config_hash": config_hash(ident), "ema": name in trainer.ema}
    if cfg.with_masks:
        attrs.update(with_masks=True, mask_min_pixels=MASK_MIN_PIXELS)
    tmp = cfg.out / ".shards.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_shards(tmp, synth, np.full(len(synth), LABELS[cfg.label], np.int64),
                 [f"synthetic/{cfg.arch}/{cfg.label}/seed{cfg.seed}/{i:05d}"
                  for i in range(len(synth))], masks=masks, attrs=attrs)
    shutil.rmtree(cfg.out / "shards", ignore_errors=True)
    tmp.rename(cfg.out / "shards")

    k = min(GRID, len(synth))
    shown = " and mask outlines" if cfg.with_masks else ""
    save_grid(synth[:k], cfg.out / "samples.png", ncols=8,
              masks=None if masks is None else masks[:k],
              title=f"synthetic {cfg.label}{shown} - {cfg.arch}, step {result['step']}, "
                    f"seed {cfg.seed}")
    pick = np.sort(np.random.default_rng(cfg.seed).choice(len(train), min(GRID, len(train)),
                                                          replace=False))
    save_grid(train.images[pick], cfg.out / "real.png", ncols=8,
              masks=train.masks[pick] if cfg.with_masks else None,
              title=f"real {cfg.label}{shown} (train split of {cfg.data.name})")
    if cfg.with_masks:
        card["masks"] = mask_report(synth, masks, train.images, train.masks)
        log.info("synthetic masks: %.0f%% non-empty, mean area %.1f px (real: %.0f%%, %.1f px)",
                 100 * card["masks"]["synthetic"]["nonempty_share"],
                 card["masks"]["synthetic"]["mean_area_px"],
                 100 * card["masks"]["real_train"]["nonempty_share"],
                 card["masks"]["real_train"]["mean_area_px"])
    if cfg.quality:
        card["quality"] = qa.evaluate(
            cfg.data, cfg.label, synth, cfg.out,
            feature_cfg=qa.FeatureConfig(steps=cfg.feature_steps, seed=0),
            device=trainer.device)
    card.update(status="done", checkpoint=str(ckpt), checkpoint_sha256=ckpt_sha,
                n_samples=len(synth), shards=str(cfg.out / "shards"),
                wall_seconds=round(time.time() - t_start, 3))
    write_json(_card_path(cfg), card)
    log.info("%s %s: %d samples in %s (train %.0f s)", cfg.arch, cfg.label, len(synth),
             cfg.out / "shards", result["train_seconds"])
    return card


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="train a generator for one label and write synthetic shards",
        description=__doc__.splitlines()[0])
    p.add_argument("--arch", required=True, help=f"one of {', '.join(models.ARCHS)}")
    p.add_argument("--label", required=True, help="tumour (or tumor) | healthy")
    p.add_argument("--data", required=True, type=Path, help="prepared dataset folder")
    p.add_argument("--out", required=True, type=Path, help="output folder of this run")
    p.add_argument("--epochs", type=int, help="training epochs (default: per architecture)")
    p.add_argument("--n-samples", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="global batch (default: per architecture)")
    p.add_argument("--opt", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="architecture option, e.g. --opt ema=0 --opt diffaugment=\"\" "
                        "(see brainhpc/models/<arch>.py Config)")
    p.add_argument("--min-images", type=int, default=64)
    p.add_argument("--with-masks", action="store_true",
                   help="tumour label only: train on image+mask pairs (prepared data with masks: "
                        "phantom, LGG, X_mask files) and write synthetic masks with the images")
    p.add_argument("--no-quality", action="store_true", help="skip FID/KID/memorisation")
    p.add_argument("--feature-steps", type=int, default=qa.FeatureConfig.steps,
                   help="training steps of the quality feature network (cached per dataset)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto (bf16 where measured faster on this hardware) | bf16 | fp32")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--force", action="store_true", help="start over, replacing finished outputs")
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = GenerateConfig(
        arch=args.arch, label=args.label, data=args.data, out=args.out, epochs=args.epochs,
        n_samples=args.n_samples, seed=args.seed, batch_size=args.batch_size, force=args.force,
        options=dict(args.opt), min_images=args.min_images, quality=not args.no_quality,
        feature_steps=args.feature_steps, checkpoint_every=args.checkpoint_every,
        device=args.device, precision=args.precision, num_workers=args.workers,
        progress=not args.no_progress, with_masks=args.with_masks)
    card = generate(cfg)
    if card.get("status") in ("done", "worker"):
        q = card.get("quality") or {}
        if q.get("fid") is not None:
            mem = q["memorisation"]
            log.info("FID %.3f, KID %.5f (n %d vs %d), near-copies %.1f%%", q["fid"], q["kid"],
                     q["n_synthetic"], q["n_real"], 100 * mem["near_copy_share"])
        return 0
    return 3  # interrupted: re-run the same command to resume
