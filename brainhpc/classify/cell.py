"""The ``classify`` cell: train BrainCNN or a VAE anomaly detector on one training-data variant,
choose every threshold on the real validation split, and score the real test split.

``classify(ClassifyConfig) -> dict`` writes into ``cfg.out``::

    config.json           the cell's identity and status (brainhpc.cell)
    checkpoints/last.pt   trainer resume state; checkpoints/best.pt the best validation epoch
    metrics.jsonl         training log (train records, one val record per epoch)
    model.pt              the classifier for ``brainhpc evaluate`` (brainhpc.predictors.classifier):
                          best-epoch weights plus the frozen decision rule (CNN score threshold,
                          or the VAE's standardiser and every fitted technique), and its
                          development-image fingerprints
    error_maps.png        VAE only: test slices, their residual maps, tumour masks (where the
                          data has them) and each technique's detected region
    metrics.json          written last (the completion marker). CNN: test metrics at the top
                          level. VAE: one block per technique under ``techniques``, the
                          localisation of the residual maps, the intensity-threshold baseline.
                          Both: ``val`` metrics, ``chosen`` values, the dataset's image-statistics
                          baseline, seed, times, version

The VAE detector (``model="vae"``) trains **once** per (training data, seed) on healthy slices
and scores every technique (GIAEM, DBSCAN, single-image and global KMeans) from the same
residual maps; what it looks at is in ``brainhpc.anomaly.residuals`` (intensity standardisation
fitted on healthy training slices, residuals limited to the brain mask and median-filtered, an
SSIM residual option). ``vae_arch`` picks the paper's BrainCVAE or the spatial-latent VAE.

Leakage: the CNN's best epoch (``best_metric``) and its score threshold, and the VAE's best
epoch (healthy validation loss) and technique thresholds, are chosen on the validation split;
the test split is scored once, with everything frozen.

Class balance (CNN): ``balance="weighted"`` (default) weights the cross-entropy by inverse class
frequency (``brainhpc.data.training.class_weights``), which composes with DDP; ``"none"`` uses
plain cross-entropy. The VAE trains on healthy images only, so balance does not apply to it.

Augmentation (``augment``, default on): CNN batches get random left-right flips and random
shifts of up to size/16 pixels (zero fill); VAE batches get flips only (shifting healthy
anatomy would teach it to reconstruct misplaced brains).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from brainhpc import __version__
from brainhpc.anomaly import residuals
from brainhpc.anomaly.techniques import CRITERIA, TECHNIQUES, TechniqueConfig, best_cut
from brainhpc.cell import Context, Outputs, Training, out_option, run_cell
from brainhpc.classify.report import baseline, predictions, summary_lines, vae_report
from brainhpc.classify.tasks import CNNTask, VAETask, vae_hparams
from brainhpc.data.prepared import (
    dataset_key,
    development_fingerprints,
    image_statistics_baseline,
    prepared_size,
)
from brainhpc.data.shards import ShardData, load_split
from brainhpc.data.training import (
    SPEC_HELP,
    cell_data,
    check_spec,
    class_counts,
    class_weights,
    count_sources,
    healthy_only,
    parse_train_spec,
    two_classes,
)
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import config_hash, sha256_file
from brainhpc.metrics.classification import classification_metrics
from brainhpc.metrics.predictions import (
    CLASSIFY_COLUMNS,
    LOCALISATION,
    PREDICTIONS,
    write_rows,
)
from brainhpc.models.classifiers import CLASSIFIERS, VAE_ARCHS
from brainhpc.options import check, option
from brainhpc.predictors import save_predictor
from brainhpc.predictors.classifier import MODEL_FORMAT, Detector, cnn_scores
from brainhpc.train import TrainConfig, run_training

log = logging.getLogger(__name__)

BALANCE = ("weighted", "none")
DEFAULT_EPOCHS = {"cnn": 20, "vae": 30}
DEFAULT_LR = 1e-3
# TechniqueConfig fields the cell sets itself (technique, criterion, seed come from the config)
_OWN_TECHNIQUE_KEYS = ("technique", "criterion", "seed")
OUTPUTS = Outputs(result="metrics.json", wipe=("checkpoints", "model.pt", "metrics.jsonl",
                                               "progress.json", "error_maps.png",
                                               PREDICTIONS, LOCALISATION))


@dataclass
class ClassifyConfig(Training):
    stage: ClassVar[str] = "classify"

    model: str = option(help="cnn | vae", choices=CLASSIFIERS)
    train_data: str = option(help=SPEC_HELP, metavar="SPEC")
    data: Path = option(help="prepared dataset folder (val and test always come from here)")
    out: Path = out_option()
    techniques: tuple[str, ...] | str | None = option(
        None, f"vae only, repeatable or comma-separated: {' | '.join(TECHNIQUES)} (default: all "
        "four, scored from one trained VAE)", flag="technique", metavar="NAME")
    synthetic_dir: Path | None = option(None, "folder of the generate cells' outputs, "
                                        "<gen>-<label>/shards/")
    epochs: int | None = option(None, f"training epochs (default: cnn {DEFAULT_EPOCHS['cnn']}, "
                                f"vae {DEFAULT_EPOCHS['vae']})", min=1)
    seed: int = option(0, "seed of the training data draw and of training", min=0)
    batch_size: int = option(32, "global batch", min=1)
    lr: float | None = option(None, f"Adam learning rate (default {DEFAULT_LR:g})", gt=0)
    dropout: float = option(0.5, "cnn dropout", min=0, lt=1)
    latent_dim: int = option(128, "vae (paper): latent size", min=1)
    kl_weight: float = option(1.0, "vae KL weight", min=0)
    vae_arch: str = option("paper", "vae: paper (BrainCVAE, as specified) | spatial "
                           "(convolutional latent)", choices=VAE_ARCHS)
    latent_channels: int = option(8, "vae (spatial): latent channels per grid cell", min=1)
    residual: str = option("abs", "vae: abs | ssim (MONAI SSIM residual)",
                           choices=residuals.RESIDUALS)
    standardise: bool = option(True, "vae: histogram standardisation inside the brain mask")
    median: int | None = option(None, "vae: median filter side (odd; 1 = off; default about "
                                "size/32)", min=1, odd=True)
    augment: bool = option(True, "random flips (and, for the cnn, shifts)")
    balance: str = option("weighted", "cnn: weighted | none", choices=BALANCE)
    # on a tumour-heavy split F1 rewards "call everything tumour": balanced accuracy by default
    criterion: str = option("balanced_accuracy", "what thresholds and the best epoch maximise "
                            "on validation", choices=CRITERIA)
    technique_options: dict = option(factory=dict, flag="opt",
                                     help="technique option, e.g. --opt eps=3 --opt "
                                          "thresholds=[0.1,0.2] (TechniqueConfig in "
                                          "brainhpc/anomaly/techniques.py)")
    val_every: int = option(1, "validate every K epochs (and after the last)", min=1,
                            metavar="K")

    def __post_init__(self):
        check(self)
        self._check_techniques()
        self.train_data = check_spec(self.train_data, self.synthetic_dir)
        if self.epochs is None:
            self.epochs = DEFAULT_EPOCHS[self.model]
        if self.lr is None:
            self.lr = DEFAULT_LR
        self._check_technique_options()

    def _check_techniques(self) -> None:
        if self.model == "cnn":
            if self.techniques:
                raise BrainhpcError(
                    f"techniques {list(self.techniques)} are VAE anomaly-detection techniques; "
                    "the cnn model takes none (drop --technique, or use --model vae)")
            self.techniques = ()
            return
        self.techniques = tuple(self.techniques or TECHNIQUES)
        bad = [t for t in self.techniques if t not in TECHNIQUES]
        if bad or len(set(self.techniques)) != len(self.techniques):
            raise BrainhpcError(f"model vae: techniques {list(self.techniques)} invalid or "
                                f"repeated; valid: {', '.join(TECHNIQUES)}")

    def _check_technique_options(self) -> None:
        if not self.technique_options:
            return
        if self.model != "vae":
            raise BrainhpcError("classify: technique options apply to --model vae only, got "
                                f"{sorted(self.technique_options)}")
        names = [f.name for f in dataclasses.fields(TechniqueConfig)
                 if f.name not in _OWN_TECHNIQUE_KEYS]
        bad = sorted(set(self.technique_options) - set(names))
        if bad:
            raise BrainhpcError(f"classify: unknown technique option(s) {', '.join(bad)}; "
                                f"valid: {', '.join(names)}")
        self.technique_options = {k: tuple(v) if isinstance(v, list) else v  # grids: tuples
                                  for k, v in self.technique_options.items()}
        for t in self.techniques:
            self.technique_config(t)  # validates the values

    def train_arch(self) -> str:
        """The model class the trainer resolves ``auto`` precision for (``cell.Training``)."""
        if self.model == "cnn":
            return "BrainCNN"
        return {"paper": "BrainCVAE", "spatial": "SpatialVAE"}[self.vae_arch]

    def technique_config(self, technique: str) -> TechniqueConfig:
        return TechniqueConfig(technique=technique, criterion=self.criterion, seed=self.seed,
                               **self.technique_options)


def classify(cfg: ClassifyConfig) -> dict:
    """Train, select on validation, score test; returns the metrics dict (also metrics.json).

    ``{"status": "interrupted", ...}`` when training was stopped (SIGTERM or a request);
    re-running the same config resumes. Every rank trains; rank 0 alone evaluates and writes.
    """
    return run_cell(cfg, _classify, OUTPUTS, distributed=True)


@dataclass
class _Setup:
    """What the trainer needs for one model kind, and what scoring needs afterwards."""

    task: object
    dataset: torch.utils.data.Dataset
    best_metric: str
    best_mode: str
    weights: np.ndarray | None = None
    standardiser: residuals.Standardiser | None = None
    n_trained: int | None = None


def _cnn_setup(cfg: ClassifyConfig, size: int, train: ShardData, val: ShardData) -> _Setup:
    weights = class_weights(train.labels)  # also refuses a single-class training set
    if cfg.balance != "weighted":
        weights = None
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(train.images),
                                             torch.from_numpy(train.labels))
    return _Setup(CNNTask(cfg, size, weights, val), dataset, f"val_{cfg.criterion}", "max",
                  weights=weights)


def _vae_setup(cfg: ClassifyConfig, size: int, spec, train: ShardData,
               val: ShardData) -> _Setup:
    healthy = healthy_only(train, f"training data {spec}")
    if healthy.brain is None and val.brain is not None:
        raise BrainhpcError(f"training data {spec}: no brain masks, but {cfg.data}/val has "
                            "them: the VAE would train on other inputs than it is scored on")
    std = residuals.Standardiser.fit(healthy.images, healthy.brain, f"training data {spec}") \
        if cfg.standardise else None
    prep = Detector(torch.nn.Identity(), std)  # the inputs only; the VAE comes later
    task = VAETask(cfg, size, prep.inputs(healthy_only(val, f"{cfg.data}/val")))
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(prep.inputs(healthy)))
    return _Setup(task, dataset, "val_loss", "min", standardiser=std, n_trained=len(healthy))


def _score_cnn(cfg: ClassifyConfig, model, setup: _Setup, val: ShardData, test: ShardData,
               device) -> tuple[dict, dict, dict]:
    """(model.pt additions, report, chosen): the threshold chosen on val, test scored once."""
    val_score = cnn_scores(model, val.images, device)
    threshold, value = best_cut(val_score, val.labels, cfg.criterion)
    test_score = cnn_scores(model, test.images, device)  # scored with everything frozen
    decision = test_score > threshold
    report = {"test": classification_metrics(test.labels, decision, test_score),
              "val": classification_metrics(val.labels, val_score > threshold, val_score),
              "predictions": predictions("cnn", test, test_score, decision)}
    chosen = {"threshold": threshold, "criterion": cfg.criterion,
              f"val_{cfg.criterion}": value, "balance": cfg.balance,
              "class_weights": None if setup.weights is None else setup.weights.tolist()}
    return {"threshold": threshold}, report, chosen


def _score_vae(cfg: ClassifyConfig, model, setup: _Setup, val: ShardData, test: ShardData,
               device, spec) -> tuple[dict, dict, dict]:
    std = setup.standardiser
    report = vae_report(cfg, Detector(model, std, cfg.residual, cfg.median), val, test, device,
                        spec)
    saved = {"techniques": report.pop("fitted"), "residual": cfg.residual, "median": cfg.median,
             "standardiser": None if std is None else std.state(), "rules": report.pop("rules")}
    return saved, report, report.pop("chosen")


def _saved(cfg: ClassifyConfig, ctx: Context, model, size: int) -> dict:
    hparams = {"dropout": cfg.dropout} if cfg.model == "cnn" else vae_hparams(cfg)
    return {"format": MODEL_FORMAT, "kind": "classifier", "model": cfg.model,
            "image_size": size, "hparams": hparams,
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "train_data": cfg.train_data, "seed": cfg.seed, "config_hash": config_hash(ctx.ident),
            "development_images": development_fingerprints(cfg.data),
            "data_key": dataset_key(cfg.data), "brainhpc": __version__}


def _metrics(cfg: ClassifyConfig, report: dict, chosen: dict, n_train: dict, result: dict,
             size: int, device, info, ckpt: Path) -> dict:
    test_block = report.pop("test") if cfg.model == "cnn" else {}
    return {"model": cfg.model, "techniques": report.pop("techniques", None),
            "train_data": cfg.train_data, "data": str(cfg.data), "image_size": size,
            **test_block, "val": report.pop("val", None), "chosen": chosen, **report,
            "image_statistics_baseline": image_statistics_baseline(cfg.data),
            "split": "test", "n_train": n_train, "seed": cfg.seed, "epochs": cfg.epochs,
            "steps": result["step"], "train_seconds": result["train_seconds"],
            "resumed": result["resumed"], "device": str(device), "world_size": info.world_size,
            "train_precision": result["precision"], "threads": result["threads"],
            "checkpoint": str(ckpt), "checkpoint_sha256": sha256_file(ckpt)}


def _baselines(cfg: ClassifyConfig, report: dict, val: ShardData, test: ShardData) -> None:
    """The trivial baselines on this cell's test split, fitted on the real training split with
    cuts chosen on validation (as the models' are), into ``report`` and its predictions. The
    brain-area baseline (slice position) where slices come from patients' stacks."""
    train = load_split(cfg.data, "train")
    names = ["image statistics"] + (["brain area"] if test.patients is not None else [])
    for name in names:
        block, rows = baseline(name, train, val, test, cfg.criterion)
        report.setdefault("baselines", {})[name.replace(" ", "_")] = block
        report["predictions"] += rows


def _classify(ctx: Context) -> dict:
    cfg = ctx.cfg
    size, spec = prepared_size(cfg.data), parse_train_spec(cfg.train_data)
    train, val, test = cell_data(spec, cfg.data, cfg.synthetic_dir, cfg.seed, size)
    for name, split in (("val", val), ("test", test)):
        two_classes(split, f"{cfg.data}/{name}")
    counts = class_counts(train.labels)
    n_train = {**count_sources(train), "healthy": int(counts[0]), "tumour": int(counts[1])}
    setup = _cnn_setup(cfg, size, train, val) if cfg.model == "cnn" else \
        _vae_setup(cfg, size, spec, train, val)
    if setup.n_trained is not None:
        n_train["vae_trained_on"] = setup.n_trained
    if len(setup.dataset) < cfg.batch_size:
        raise BrainhpcError(f"training data {spec}: {len(setup.dataset)} usable images are "
                            f"fewer than one batch of {cfg.batch_size}; lower --batch-size")
    tcfg = TrainConfig.for_cell(cfg, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                best_metric=setup.best_metric, best_mode=setup.best_mode,
                                val_every=cfg.val_every)
    fingerprint = {"cell": "classify", "model": cfg.model, "size": size,
                   "config_hash": config_hash(ctx.ident)}
    trainer, result = run_training(setup.task, setup.dataset, tcfg, fingerprint, ctx.info)
    if result["status"] != "done":
        return {"status": result["status"], "step": result["step"], "out": str(cfg.out)}
    if not ctx.info.is_main:
        return {"status": "worker", "rank": ctx.info.rank}
    model, device = trainer.best_module(cfg.model), trainer.device
    if cfg.model == "cnn":
        extra, report, chosen = _score_cnn(cfg, model, setup, val, test, device)
    else:
        extra, report, chosen = _score_vae(cfg, model, setup, val, test, device, spec)
    _baselines(cfg, report, val, test)
    write_rows(cfg.out / PREDICTIONS, report.pop("predictions"), CLASSIFY_COLUMNS)
    best = result["best"]
    chosen.update(best_epoch=best.get("epoch"), best_step=best.get("step"),
                  best_metric=setup.best_metric, best_value=best.get("value"))
    ckpt = save_predictor(cfg.out / "model.pt", {**_saved(cfg, ctx, model, size), **extra})
    metrics = ctx.finish(_metrics(cfg, report, chosen, n_train, result, size, device, ctx.info,
                                  ckpt))
    for line in summary_lines(metrics):
        log.info("%s", line)
    return metrics
