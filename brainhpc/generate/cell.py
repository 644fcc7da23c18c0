"""The ``generate`` cell: train one generator for one label, then write synthetic shards.

``generate(GenerateConfig) -> dict`` writes into ``cfg.out``::

    checkpoints/last.pt   trainer checkpoint (resume state; the weights the samples came from)
    metrics.jsonl         training metrics
    shards/shard-*.h5     n_samples synthetic images, same format as prepared data (label set;
                          attrs: generator, label, checkpoint + sha256, seed, step, data)
    samples.png           the first 64 synthetic images; real.png: 64 real train images beside it
    memorisation.png      top synthetic / nearest-train pairs (see brainhpc.metrics.realism)
    card.json             model card: architecture, label, data, epochs, seed, wall time,
                          realism (written last: the completion marker)

``with_masks`` (tumour label only): the generator trains on image+mask pairs, the tumour mask as
a second channel (``brainhpc.models``), and the shards also carry ``masks`` (N x 1 x H x W uint8
0/255, as prepare writes them; ``brainhpc.generate.masks``). samples.png and real.png then show
the masks as red outlines, and card.json's ``masks`` block compares the synthetic masks with the
real ones. FID/KID and the memorisation check look at the image channel only.

Skip, refuse, resume and ``force`` are the cell lifecycle's (``brainhpc.cell``). Under
torchrun/SLURM tasks every rank trains, rank 0 alone samples and writes.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from brainhpc import models
from brainhpc.cell import Context, Outputs, Training, out_option, run_cell
from brainhpc.data.prepared import check_prepared, check_size, dataset_key
from brainhpc.data.shards import LABELS, ShardData, load_split, write_shards
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import config_hash, sha256_file
from brainhpc.generate.masks import MASK_MIN_PIXELS, binarise_masks, check_masks, mask_report
from brainhpc.images import save_grid
from brainhpc.metrics import realism
from brainhpc.options import check, option
from brainhpc.train import TrainConfig, run_training

log = logging.getLogger(__name__)

LABEL_ALIASES = {"tumor": "tumour"}
GRID = 64  # images in samples.png / real.png
OUTPUTS = Outputs(result="card.json", wipe=("checkpoints", "shards", ".shards.tmp",
                                            "metrics.jsonl", "progress.json", "samples.png",
                                            "real.png", "memorisation.png"))


@dataclass
class GenerateConfig(Training):
    stage: ClassVar[str] = "generate"

    arch: str = option(help="generator architecture", choices=tuple(models.ARCHS))
    label: str = option(help="tumour (or tumor) | healthy", choices=tuple(LABELS))
    data: Path = option(help="prepared dataset folder")
    out: Path = out_option()
    epochs: int | None = option(None, "training epochs (default: per architecture)", min=1)
    steps: int | None = option(None, "training steps instead of epochs: as many epochs as they "
                               "take, the last cut short (one size for labels of different "
                               "image counts)", min=1)
    n_samples: int = option(1500, "synthetic images to write", min=1)
    seed: int = option(0, "seed of training and sampling", min=0)
    batch_size: int | None = option(None, "global batch (default: per architecture)", min=1)
    options: dict = option(factory=dict, flag="opt",
                           help="architecture option, e.g. --opt ema=0 --opt diffaugment=\"\" "
                                "(see brainhpc/models/<arch>.py Config)")
    min_images: int = option(64, "refuse to train on fewer train images of the label", min=1)
    quality: bool = option(True, "FID/KID and the memorisation check")
    feature_steps: int = option(realism.FeatureConfig.steps, "training steps of the realism "
                                "feature network (cached per dataset)", min=1)
    with_masks: bool = option(False, "tumour label only: train on image+mask pairs (prepared "
                              "data with masks: phantom, LGG, X_mask files) and write synthetic "
                              "masks with the images")

    def __post_init__(self):
        self.label = LABEL_ALIASES.get(self.label, self.label)
        check(self)
        if self.with_masks and self.label != "tumour":
            raise BrainhpcError(
                f"generate: --with-masks draws tumour masks, and a {self.label} generator has "
                "nothing to draw (its slices hold no tumour; the segment stage gives healthy "
                "synthetic shards all-zero masks). Run the healthy cell without --with-masks")
        if self.steps is not None and (self.epochs is not None or "epochs" in self.options):
            raise BrainhpcError(f"generate: give steps ({self.steps}) or epochs, not both")
        arch_cfg = models.make_config(self.arch, 64, self.options)  # bad options, now
        first_phase = getattr(arch_cfg, "ae_steps", None)  # the LDM trains its autoencoder first
        if self.steps is not None and first_phase is not None and self.steps <= first_phase:
            raise BrainhpcError(
                f"generate: steps {self.steps} <= ae_steps {first_phase}: the {self.arch} "
                "diffusion model would never train; raise steps or lower ae_steps")


def generate(cfg: GenerateConfig) -> dict:
    """Train ``cfg.arch`` on ``cfg.label``'s train split, sample, write shards, grids and card."""
    return run_cell(cfg, _generate, OUTPUTS, distributed=True)


def _train_set(cfg: GenerateConfig, size: int) -> tuple[ShardData, np.ndarray]:
    """The label's train images, and what the generator trains on (with masks: 2 channels)."""
    train = load_split(cfg.data, "train", label=LABELS[cfg.label])
    if len(train):
        check_size(train.images, size, f"{cfg.data}/train", "the manifest says otherwise; "
                   "re-run brainhpc prepare")
    if len(train) < cfg.min_images:
        raise BrainhpcError(f"{cfg.data}/train has {len(train)} {cfg.label} images, fewer than "
                            f"the {cfg.min_images} needed to train a generator (min_images)")
    if not cfg.with_masks:
        return train, train.images
    check_masks(train, cfg.data)
    masks = np.where(train.masks > 0, 255, 0).astype(np.uint8)
    return train, np.concatenate([train.images, masks], axis=1)


def _arch_config(cfg: GenerateConfig, size: int, channels: int, n_train: int):
    options = dict(cfg.options)
    if cfg.epochs is not None:
        options["epochs"] = cfg.epochs
    if cfg.batch_size is not None:
        options["batch_size"] = cfg.batch_size
    arch_cfg = models.make_config(cfg.arch, size, options, image_channels=channels)
    if arch_cfg.batch_size > n_train:
        raise BrainhpcError(f"batch_size {arch_cfg.batch_size} exceeds the {n_train} "
                            f"{cfg.label} train images; pass a smaller --batch-size")
    if cfg.steps is not None:  # the sampler drops the last partial batch of an epoch
        options["epochs"] = -(-cfg.steps // (n_train // arch_cfg.batch_size))
        arch_cfg = models.make_config(cfg.arch, size, options, image_channels=channels)
    return arch_cfg


def _sample(cfg: GenerateConfig, task, trainer) -> tuple[np.ndarray, np.ndarray | None, float]:
    """n_samples images (uint8, N x 1 x H x W), their masks (with_masks) and the seconds taken;
    from the EMA copy where the architecture keeps one."""
    name = task.sample_model
    model = trainer.ema.get(name, trainer.raw(name))
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    with torch.random.fork_rng(devices=[]):
        samples = task.sample(model, cfg.n_samples, gen).cpu().numpy()
    synth = (samples[:, :1] * 255.0 + 0.5).astype(np.uint8)
    masks = binarise_masks(samples[:, 1:]) if cfg.with_masks else None
    return synth, masks, round(time.time() - t0, 3)


def _write_samples(ctx: Context, synth: np.ndarray, masks, trainer, result: dict,
                   size: int) -> dict:
    """The synthetic shards (staged, then renamed) and what they record of their origin."""
    cfg, ckpt, task = ctx.cfg, trainer.last_path, trainer.task
    ema = getattr(task, "sample_ema", task.sample_model in trainer.ema)  # ldm keeps its own
    attrs = {"generator": cfg.arch, "label": cfg.label, "checkpoint": str(ckpt.resolve()),
             "checkpoint_sha256": sha256_file(ckpt), "seed": cfg.seed, "step": result["step"],
             "size": size, "data": str(cfg.data.resolve()), "data_key": dataset_key(cfg.data),
             "config_hash": config_hash(ctx.ident), "ema": ema}
    if cfg.with_masks:
        attrs.update(with_masks=True, mask_min_pixels=MASK_MIN_PIXELS)
    tmp = cfg.out / ".shards.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_shards(tmp, synth, np.full(len(synth), LABELS[cfg.label], np.int64),
                 [f"synthetic/{cfg.arch}/{cfg.label}/seed{cfg.seed}/{i:05d}"
                  for i in range(len(synth))], masks=masks, attrs=attrs)
    shutil.rmtree(cfg.out / "shards", ignore_errors=True)
    tmp.rename(cfg.out / "shards")
    return attrs


def _grids(cfg: GenerateConfig, synth: np.ndarray, masks, train: ShardData, step: int) -> None:
    """samples.png beside real.png (mask outlines with ``with_masks``)."""
    k = min(GRID, len(synth))
    shown = " and mask outlines" if cfg.with_masks else ""
    save_grid(synth[:k], cfg.out / "samples.png", ncols=8,
              masks=None if masks is None else masks[:k],
              title=f"synthetic {cfg.label}{shown} - {cfg.arch}, step {step}, seed {cfg.seed}")
    pick = np.sort(np.random.default_rng(cfg.seed).choice(len(train), min(GRID, len(train)),
                                                          replace=False))
    save_grid(train.images[pick], cfg.out / "real.png", ncols=8,
              masks=train.masks[pick] if cfg.with_masks else None,
              title=f"real {cfg.label}{shown} (train split of {cfg.data.name})")


def _card(cfg: GenerateConfig, size: int, train: ShardData, arch_cfg, result: dict,
          info) -> dict:
    arch = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(arch_cfg).items()}
    return {"arch": cfg.arch, "label": cfg.label, "data": str(cfg.data),
            "data_key": dataset_key(cfg.data), "size": size, "n_train": len(train),
            "epochs": arch_cfg.epochs, "batch_size": arch_cfg.batch_size, "seed": cfg.seed,
            "with_masks": cfg.with_masks, "model": arch, "steps": result["step"],
            "train_seconds": result["train_seconds"], "train_precision": result["precision"],
            "threads": result["threads"], "resumed": result["resumed"],
            "world_size": info.world_size}


def _generate(ctx: Context) -> dict:
    cfg = ctx.cfg
    size = int(check_prepared(cfg.data)["config"]["size"])
    train, pairs = _train_set(cfg, size)
    arch_cfg = _arch_config(cfg, size, pairs.shape[1], len(train))
    task = models.module(cfg.arch).Task(arch_cfg)
    fingerprint = {"arch": cfg.arch, "label": cfg.label, "data": dataset_key(cfg.data),
                   "size": size, "model": {k: v for k, v in asdict(arch_cfg).items()
                                           if k not in ("epochs", "image_channels")},
                   "with_masks": cfg.with_masks}
    tcfg = TrainConfig.for_cell(cfg, epochs=arch_cfg.epochs, batch_size=arch_cfg.batch_size,
                                max_steps=cfg.steps)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(pairs))
    trainer, result = run_training(task, dataset, tcfg, fingerprint, ctx.info)
    if result["status"] != "done":
        return {"status": result["status"], "step": result["step"]}
    if not ctx.info.is_main:
        return {"status": "worker", "rank": ctx.info.rank}
    card = _card(cfg, size, train, arch_cfg, result, ctx.info)
    synth, masks, card["sample_seconds"] = _sample(cfg, task, trainer)
    card["sample_seconds_per_1000"] = round(1000 * card["sample_seconds"] / len(synth), 3)
    attrs = _write_samples(ctx, synth, masks, trainer, result, size)
    _grids(cfg, synth, masks, train, result["step"])
    if cfg.with_masks:
        card["masks"] = mask_report(synth, masks, train.images, train.masks)
    if cfg.quality:
        card["quality"] = realism.report(
            cfg.data, cfg.label, synth, cfg.out,
            feature_cfg=realism.FeatureConfig(steps=cfg.feature_steps, seed=0),
            device=trainer.device)
    card.update(checkpoint=str(trainer.last_path), checkpoint_sha256=attrs["checkpoint_sha256"],
                n_samples=len(synth), shards=str(cfg.out / "shards"))
    _log_card(cfg, card)
    return ctx.finish(card)


def _log_card(cfg: GenerateConfig, card: dict) -> None:
    log.info("%s %s: %d samples in %s (train %.0f s)", cfg.arch, cfg.label, card["n_samples"],
             card["shards"], card["train_seconds"])
    m = card.get("masks")
    if m:
        log.info("synthetic masks: %.0f%% non-empty, mean area %.1f px (real: %.0f%%, %.1f px)",
                 100 * m["synthetic"]["nonempty_share"], m["synthetic"]["mean_area_px"],
                 100 * m["real_train"]["nonempty_share"], m["real_train"]["mean_area_px"])
    q = card.get("quality") or {}
    if q.get("fid") is not None:
        log.info("FID %.3f, KID %.5f (n %d vs %d), near-copies %.1f%%", q["fid"], q["kid"],
                 q["n_synthetic"], q["n_real"], 100 * q["memorisation"]["near_copy_share"])
