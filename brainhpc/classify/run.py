"""The ``classify`` cell: train BrainCNN or a VAE anomaly detector on one training-data variant,
choose every threshold on the real validation split, and score the real test split.

``classify(ClassifyConfig) -> dict`` writes into ``cfg.out``::

    config.json           the cell's identity, written first (an unfinished run is recognised)
    checkpoints/last.pt   trainer resume state; checkpoints/best.pt the best validation epoch
    metrics.jsonl         training log (train records, one val record per epoch)
    model.pt              the classifier for ``brainhpc evaluate``: best-epoch weights plus the
                          frozen decision rule (CNN score threshold, or the VAE's standardiser
                          and every fitted technique), and its development-image fingerprints
    error_maps.png        VAE only: test slices, their residual maps, tumour masks (where the
                          data has them) and each technique's detected region
    metrics.json          written last (the completion marker). CNN: test metrics at the top
                          level. VAE: one block per technique under ``techniques``, the
                          localisation of the residual maps, the intensity-threshold baseline.
                          Both: ``val`` metrics, ``chosen`` values, the dataset's image-statistics
                          baseline, seed, times, version

The VAE detector (``model="vae"``) trains **once** per (training data, seed) on healthy slices
and scores every technique (GIAEM, DBSCAN, single-image and global KMeans) from the same
residual maps; what it looks at is in ``brainhpc.classify.anomaly`` (intensity standardisation
fitted on healthy training slices, residuals limited to the brain mask and median-filtered, an
SSIM residual option). ``vae_arch`` picks the paper's BrainCVAE or the spatial-latent VAE.

Leakage: the CNN's best epoch (``best_metric``) and its score threshold, and the VAE's best
epoch (healthy validation loss) and technique thresholds, are chosen on the validation split;
the test split is scored once, with everything frozen.

Class balance (CNN): ``balance="weighted"`` (default) weights the cross-entropy by inverse class
frequency (``brainhpc.classify.data.class_weights``), which composes with DDP; ``"none"`` uses
plain cross-entropy. The VAE trains on healthy images only, so balance does not apply to it.

Augmentation (``augment``, default on): CNN batches get random left-right flips and random
shifts of up to size/16 pixels (zero fill); VAE batches get flips only (shifting healthy
anatomy would teach it to reconstruct misplaced brains).

Re-runs: same config and finished -> skipped; different config -> refused without ``force``
(which starts over); interrupted or failed -> resumed from the trainer checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from brainhpc import __version__
from brainhpc.classify import anomaly
from brainhpc.classify.data import (
    assemble_training_data,
    class_counts,
    class_weights,
    healthy_only,
    parse_train_spec,
    synthetic_shard_dir,
)
from brainhpc.classify.metrics import classification_metrics
from brainhpc.classify.models import BrainCNN, BrainCVAE, SpatialVAE, vae_loss
from brainhpc.classify.techniques import (
    CRITERIA,
    TECHNIQUES,
    FittedTechnique,
    TechniqueConfig,
    best_cut,
    select_and_apply,
)
from brainhpc.cli import parse_option
from brainhpc.data.shards import LABELS, ShardData, load_split
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import atomic_path, config_hash, sha256_file, write_json
from brainhpc.generate import check_prepared as read_manifest
from brainhpc.images import save_grid
from brainhpc.quality import dataset_key
from brainhpc.train import TrainConfig, Trainer, init_distributed
from brainhpc.train.distributed import DEVICES, barrier, teardown
from brainhpc.train.precision import PRECISIONS

log = logging.getLogger(__name__)

MODELS = ("cnn", "vae")
VAE_ARCHS = ("paper", "spatial")  # BrainCVAE as specified | SpatialVAE
BALANCE = ("weighted", "none")
DEFAULT_EPOCHS = {"cnn": 20, "vae": 30}
DEFAULT_LR = {"cnn": 1e-3, "vae": 1e-3}
MODEL_FORMAT = 1
EVAL_BATCH = 256
EXAMPLES = 4  # per outcome (TP, FP, FN, TN) in error_maps.png
# TechniqueConfig fields the cell sets itself (technique, criterion, seed come from the config)
_OWN_TECHNIQUE_KEYS = ("technique", "criterion", "seed")


@dataclass
class ClassifyConfig:
    model: str  # cnn | vae
    train_data: str  # real | synthetic:<gen> | mixed:<gen> | mixed:<gen>:<p>
    data: Path  # prepared dataset (val and test always come from here)
    out: Path
    # vae only: any of giaem, dbscan, kmeans-single, kmeans-global (a comma string is fine);
    # None: all four, scored from one trained VAE
    techniques: tuple[str, ...] | str | None = None
    synthetic_dir: Path | None = None  # holds the generate cells' <gen>-<label>/ folders
    epochs: int | None = None  # None: DEFAULT_EPOCHS[model]
    seed: int = 0
    batch_size: int = 32
    lr: float | None = None  # None: DEFAULT_LR[model] (Adam)
    dropout: float = 0.5  # cnn
    latent_dim: int = 128  # vae (paper): latent size
    kl_weight: float = 1.0  # vae
    vae_arch: str = "paper"  # vae: paper (BrainCVAE) | spatial (SpatialVAE)
    latent_channels: int = 8  # vae (spatial): latent channels per grid cell
    residual: str = "abs"  # vae: abs | ssim
    standardise: bool = True  # vae: histogram standardisation inside the brain mask
    median: int | None = None  # vae: median filter side (None: ~size/32, odd; 1: off)
    augment: bool = True
    balance: str = "weighted"  # cnn: weighted | none
    # what thresholds (and the CNN's best epoch) maximise on validation; balanced accuracy, not
    # F1, by default: on a tumour-heavy split F1 rewards "call everything tumour"
    criterion: str = "balanced_accuracy"
    technique_options: dict = field(default_factory=dict)  # TechniqueConfig fields (grids, eps..)
    force: bool = False
    checkpoint_every: int = 500
    val_every: int = 1  # epochs between validations (best-epoch candidates); the last always
    device: str = "auto"
    precision: str = "auto"  # auto | bf16 | fp32 (brainhpc.train.precision); metrics.json: resolved
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.model not in MODELS:
            raise BrainhpcError(f"unknown model {self.model!r}; valid: {', '.join(MODELS)}")
        if isinstance(self.techniques, str):
            self.techniques = tuple(t.strip() for t in self.techniques.split(",") if t.strip())
        if self.model == "cnn" and self.techniques:
            raise BrainhpcError(
                f"techniques {list(self.techniques)} are VAE anomaly-detection techniques; the "
                "cnn model takes none (drop --technique, or use --model vae)")
        if self.model == "vae":
            self.techniques = tuple(self.techniques or TECHNIQUES)
            bad = [t for t in self.techniques if t not in TECHNIQUES]
            if bad or len(set(self.techniques)) != len(self.techniques):
                raise BrainhpcError(f"model vae: techniques {list(self.techniques)} invalid or "
                                    f"repeated; valid: {', '.join(TECHNIQUES)}")
            if self.vae_arch not in VAE_ARCHS:
                raise BrainhpcError(f"classify: unknown vae_arch {self.vae_arch!r}; valid: "
                                    f"{', '.join(VAE_ARCHS)}")
            if self.residual not in anomaly.RESIDUALS:
                raise BrainhpcError(f"classify: unknown residual {self.residual!r}; valid: "
                                    f"{', '.join(anomaly.RESIDUALS)}")
            if self.median is not None and (not isinstance(self.median, int) or self.median < 1
                                            or self.median % 2 == 0):
                raise BrainhpcError(f"classify: median must be an odd integer >= 1, "
                                    f"got {self.median!r}")
        else:
            self.techniques = ()
        spec = parse_train_spec(self.train_data)
        self.train_data = str(spec)
        self.data, self.out = Path(self.data), Path(self.out)
        if self.synthetic_dir is not None:
            self.synthetic_dir = Path(self.synthetic_dir)
        elif spec.kind != "real":
            raise BrainhpcError(
                f"training data {spec} needs --synthetic-dir: the folder holding the generate "
                f"cells' outputs ({spec.generator}-healthy/ and {spec.generator}-tumour/)")
        if self.epochs is None:
            self.epochs = DEFAULT_EPOCHS[self.model]
        if self.lr is None:
            self.lr = DEFAULT_LR[self.model]
        for key in ("epochs", "batch_size", "latent_dim", "latent_channels", "val_every"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BrainhpcError(f"classify: {key} must be an integer >= 1, got {v!r}")
        for key in ("checkpoint_every", "num_workers"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise BrainhpcError(f"classify: {key} must be an integer >= 0, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise BrainhpcError(f"classify: seed must be an integer, got {self.seed!r}")
        if not (isinstance(self.lr, (int, float)) and np.isfinite(self.lr) and self.lr > 0):
            raise BrainhpcError(f"classify: lr must be a number > 0, got {self.lr!r}")
        if not (isinstance(self.kl_weight, (int, float)) and self.kl_weight >= 0):
            raise BrainhpcError(f"classify: kl_weight must be >= 0, got {self.kl_weight!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise BrainhpcError(f"classify: dropout must be in [0, 1), got {self.dropout!r}")
        if self.balance not in BALANCE:
            raise BrainhpcError(
                f"classify: unknown balance {self.balance!r}; valid: {', '.join(BALANCE)}")
        if self.criterion not in CRITERIA:
            raise BrainhpcError(
                f"classify: unknown criterion {self.criterion!r}; valid: {', '.join(CRITERIA)}")
        if self.device not in DEVICES:
            raise BrainhpcError(
                f"classify: unknown device {self.device!r}; valid: {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise BrainhpcError(f"classify: unknown precision {self.precision!r}; valid: "
                                f"{', '.join(PRECISIONS)}")
        if self.technique_options:
            if self.model != "vae":
                raise BrainhpcError("classify: technique options apply to --model vae only, got "
                                    f"{sorted(self.technique_options)}")
            names = [f.name for f in dataclasses.fields(TechniqueConfig)
                     if f.name not in _OWN_TECHNIQUE_KEYS]
            bad = sorted(set(self.technique_options) - set(names))
            if bad:
                raise BrainhpcError(f"classify: unknown technique option(s) {', '.join(bad)}; "
                                    f"valid: {', '.join(names)}")
            for t in self.techniques:
                self.technique_config(t)  # validates the values

    def technique_config(self, technique: str) -> TechniqueConfig:
        return TechniqueConfig(technique=technique, criterion=self.criterion, seed=self.seed,
                               **self.technique_options)

    def identity(self) -> dict:
        """What defines the outputs (a finished run with the same identity is skipped)."""
        d = asdict(self)
        for key in ("force", "device", "precision", "num_workers", "progress", "checkpoint_every",
                    "out"):
            d.pop(key)
        d["data"] = str(self.data.resolve())
        real = self.train_data == "real"  # then where synthetic shards live does not matter
        d["synthetic_dir"] = None if self.synthetic_dir is None or real else \
            str(self.synthetic_dir.resolve())
        return json.loads(json.dumps(d))  # tuples -> lists: compares equal to a re-read JSON


# ------------------------------------------------------------------------------ data checks

def check_prepared(data: Path) -> int:
    """The prepared dataset's image size, or a BrainhpcError saying what is wrong with it."""
    return int(read_manifest(Path(data))["config"]["size"])


def check_size(images: np.ndarray, size: int, what: str, hint: str) -> None:
    got = images.shape[-1]
    if images.shape[-2:] != (size, size):
        raise BrainhpcError(f"{what}: images are {images.shape[-2]}x{got} px but {size}x{size} px "
                            f"are expected; {hint}")


def _check_synthetic_size(synthetic_dir: Path, generator: str, size: int) -> None:
    """A readable size mismatch before the shards are concatenated with anything."""
    for name in LABELS:
        folder = synthetic_shard_dir(synthetic_dir, generator, name)
        first = sorted(folder.glob("shard-*.h5"))[:1] if folder.is_dir() else []
        if not first:
            continue  # assemble_training_data says which generate cell must run
        with h5py.File(first[0], "r") as f:
            shape = tuple(f["images"].shape[-2:])
        if shape != (size, size):
            raise BrainhpcError(
                f"{folder}: synthetic images are {shape[0]}x{shape[1]} px but the prepared data "
                f"is {size}x{size} px; re-run generate cell {generator}-{name} on this prepared "
                f"data (or re-prepare at --size {shape[0]})")


def _two_classes(data: ShardData, what: str) -> None:
    counts = class_counts(data.labels)
    if np.any(counts == 0):
        raise BrainhpcError(f"{what}: {int(counts[0])} healthy and {int(counts[1])} tumour images; "
                            "both classes are needed to choose thresholds and score")


# ------------------------------------------------------------------------------ tasks

def augment_batch(x: torch.Tensor, shift: bool) -> torch.Tensor:
    """Random left-right flips of half the batch, and (``shift``) integer shifts of up to
    size/16 pixels per image, zero fill (brain slices sit on black)."""
    flip = torch.rand(len(x), device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    m = x.shape[-1] // 16
    if not shift or m < 1:
        return x
    d = torch.randint(-m, m + 1, (len(x), 2)).tolist()
    padded = F.pad(x, (m, m, m, m))
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, m + dy:m + dy + h, m + dx:m + dx + w]
                        for i, (dy, dx) in enumerate(d)])


def _unit(images: torch.Tensor) -> torch.Tensor:
    return images.float().div_(255.0)


@torch.no_grad()
def cnn_scores(model: BrainCNN, images: np.ndarray, device: torch.device,
               batch: int = EVAL_BATCH) -> np.ndarray:
    """P(tumour) per image (softmax of the two logits), model in eval mode."""
    was = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(images), batch):
            x = _unit(torch.from_numpy(images[i:i + batch]).to(device))
            out.append(torch.softmax(model(x).float(), dim=1)[:, 1].cpu())
    finally:
        model.train(was)
    return torch.cat(out).double().numpy() if out else np.zeros(0)


@dataclass
class Detector:
    """What turns uint8 slices into residual maps: the standardiser, the VAE, the residual."""

    model: torch.nn.Module
    standardiser: anomaly.Standardiser | None
    residual: str = "abs"
    median: int | None = None

    def inputs(self, data: ShardData) -> np.ndarray:
        """The VAE's input: standardised brains (0 outside), or plain [0, 1] images."""
        if self.standardiser is None:
            return data.images.astype(np.float32) / 255.0
        return self.standardiser.apply(data.images, data.brain)

    @torch.no_grad()
    def maps(self, data: ShardData, device: torch.device, batch: int = EVAL_BATCH,
             inputs: np.ndarray | None = None) -> np.ndarray:
        """Residual maps (N x H x W float32 in [0, 1]), zero outside the brain mask."""
        x = self.inputs(data) if inputs is None else inputs
        was = self.model.training
        self.model.eval()
        out = []
        try:
            for i in range(0, len(x), batch):
                xb = torch.from_numpy(x[i:i + batch]).to(device)
                x_hat = self.model.decode(self.model.encode(xb)[0])
                brain = anomaly.brain_masks(None if data.brain is None else data.brain[i:i + batch],
                                       data.images[i:i + batch])
                out.append(anomaly.residual_maps(xb, x_hat, brain, self.residual, self.median))
        finally:
            self.model.train(was)
        if not out:
            return np.zeros((0, *data.images.shape[-2:]), np.float32)
        return np.concatenate(out)


class CNNTask:
    """BrainCNN with (optionally weighted) cross-entropy; validation = criterion at the best
    validation cut of P(tumour), so best.pt is the epoch whose tuned rule is best on val."""

    def __init__(self, cfg: ClassifyConfig, size: int, weights: np.ndarray | None,
                 val: ShardData):
        self.cfg, self.size, self.val = cfg, size, val
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)

    def models(self):
        return {"cnn": BrainCNN(self.size, dropout=self.cfg.dropout)}

    def optimizers(self, models):
        return {"cnn": torch.optim.Adam(models["cnn"].parameters(), lr=self.cfg.lr)}

    def training_step(self, t, batch):
        images, labels = batch
        x = _unit(images)
        if self.cfg.augment:
            x = augment_batch(x, shift=True)
        with t.autocast():
            logits = t.models["cnn"](x)
        w = None if self.weights is None else self.weights.to(logits.device)
        loss = F.cross_entropy(logits.float(), labels, weight=w)
        opt = t.optimizers["cnn"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (logits.argmax(1) == labels).float().mean()
        return {"loss": loss.detach(), "acc": acc.detach()}

    def validate(self, t) -> dict:
        s = cnn_scores(t.raw("cnn"), self.val.images, t.device)
        y = self.val.labels
        _, value = best_cut(s, y, self.cfg.criterion)
        p = np.clip(s, 1e-7, 1 - 1e-7)
        loss = float(-np.mean(np.where(y == 1, np.log(p), np.log(1 - p))))
        return {f"val_{self.cfg.criterion}": value, "val_loss": loss}


class VAETask:
    """A VAE on (standardised) healthy images; validation = the same loss on healthy validation
    images. Batches are float images already in [0, 1] (see ``Detector.inputs``)."""

    def __init__(self, cfg: ClassifyConfig, size: int, val_inputs: np.ndarray):
        self.cfg, self.size, self.val = cfg, size, val_inputs

    def models(self):
        return {"vae": build_model("vae", self.size, vae_hparams(self.cfg))}

    def optimizers(self, models):
        return {"vae": torch.optim.Adam(models["vae"].parameters(), lr=self.cfg.lr)}

    def training_step(self, t, batch):
        x = batch[0].float()
        if self.cfg.augment:
            x = augment_batch(x, shift=False)
        with t.autocast():
            x_hat, mu, logvar = t.models["vae"](x)
        loss, parts = vae_loss(x_hat, x, mu.float(), logvar.float(), self.cfg.kl_weight)
        opt = t.optimizers["vae"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "recon": parts["recon"], "kl": parts["kl"]}

    def validate(self, t) -> dict:
        model, total, n = t.raw("vae"), 0.0, len(self.val)
        for i in range(0, n, EVAL_BATCH):
            x = torch.from_numpy(self.val[i:i + EVAL_BATCH]).to(t.device)
            x_hat, mu, logvar = model(x)
            loss, _ = vae_loss(x_hat, x, mu, logvar, self.cfg.kl_weight)
            total += float(loss) * len(x)
        return {"val_loss": total / max(n, 1)}


# ------------------------------------------------------------------------------ saved classifier

def development_fingerprints(prepared: Path) -> dict | None:
    """Fingerprints of every image that shaped the model: the train split (directly, or through
    the generators of synthetic training data) and the validation split (epoch and threshold
    choice). External evaluation drops copies and near-copies of these (brainhpc.data.
    duplicates); None for a dataset prepared before fingerprints existed."""
    parts = [load_split(prepared, s) for s in ("train", "val")]
    if any(p.thumbs is None or p.sha256 is None for p in parts):
        return None
    return {"sha256": [h for p in parts for h in p.sha256],
            "thumbs": torch.from_numpy(np.concatenate([p.thumbs for p in parts]))}


def vae_hparams(cfg: ClassifyConfig) -> dict:
    return {"vae_arch": cfg.vae_arch, "latent_dim": cfg.latent_dim,
            "latent_channels": cfg.latent_channels}


def build_model(kind: str, size: int, hparams: dict) -> torch.nn.Module:
    if kind == "cnn":
        return BrainCNN(size, dropout=float(hparams.get("dropout", 0.5)))
    if hparams.get("vae_arch", "paper") == "spatial":
        return SpatialVAE(size, latent_channels=int(hparams["latent_channels"]))
    return BrainCVAE(size, latent_dim=int(hparams["latent_dim"]))


def load_classifier(path: str | Path) -> dict:
    """``model.pt`` (or a classify cell folder holding one) -> its contents plus a built model."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise BrainhpcError(f"classifier checkpoint {path} does not exist (a finished classify "
                            "cell writes OUT/model.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BrainhpcError(f"{path}: corrupt or unreadable classifier checkpoint "
                            f"({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT \
            or state.get("model") not in MODELS:
        raise BrainhpcError(f"{path}: not a brainhpc classifier checkpoint (format "
                            f"{MODEL_FORMAT}, written by `brainhpc classify` as model.pt)")
    missing = [k for k in ("techniques", "residual") if state["model"] == "vae" and k not in state]
    if missing:  # a one-technique VAE from before the four-technique detector
        raise BrainhpcError(f"{path}: a VAE classifier from an older brainhpc (no "
                            f"{', '.join(missing)}); re-run its classify cell to score it")
    model = build_model(state["model"], int(state["image_size"]), state["hparams"])
    model.load_state_dict(state["state_dict"])
    state["path"] = path
    state["module"] = model.eval()
    if state["model"] == "vae":
        state["fitted"] = {name: FittedTechnique.from_state(t)
                           for name, t in state["techniques"].items()}
        std = state.get("standardiser")
        state["detector"] = Detector(model, None if std is None else
                                     anomaly.Standardiser.from_state(std), state["residual"],
                                     state.get("median"))
    return state


def score_with(clf: dict, data: ShardData, device: torch.device) -> dict:
    """A loaded classifier on uint8 slices: ``{"cnn": (pred, score)}``, or for the VAE one
    ``(pred, score)`` per technique plus ``"maps"`` (residuals) and ``"inputs"``."""
    model = clf["module"].to(device)
    if clf["model"] == "cnn":
        s = cnn_scores(model, data.images, device)
        return {"cnn": ((s > clf["threshold"]).astype(np.int64), s)}
    det = clf["detector"]
    inputs = det.inputs(data)
    maps = det.maps(data, device, inputs=inputs)
    out = {name: f.predict(maps) for name, f in clf["fitted"].items()}
    return {**out, "maps": maps, "inputs": inputs}


def save_error_maps(path: Path, data: ShardData, inputs: np.ndarray, maps: np.ndarray,
                    fitted: dict, title: str, n: int = 2 * EXAMPLES) -> None:
    """Rows of test slices (tumour first, then healthy): the VAE's input, the residual map, the
    tumour mask (where the data has one) and each technique's detected region, with its score."""
    y = data.labels
    picks = np.concatenate([np.flatnonzero(y == 1)[:n - n // 2], np.flatnonzero(y == 0)[:n // 2]])
    if not len(picks):
        return
    shown = maps[picks]
    vmax = float(max(np.quantile(shown[shown > 0], 0.999) if (shown > 0).any() else 0, 1e-6))
    regions = {name: f.regions(maps[picks]) for name, f in fitted.items()}
    scores = {name: f.scores(maps[picks]) for name, f in fitted.items()}
    tiles, captions = [], []
    for k, i in enumerate(picks):
        tiles += [inputs[i, 0], np.clip(maps[i] / vmax, 0, 1)]
        captions += [f"{'tumour' if y[i] else 'healthy'} {data.sources[i][-14:]}", "residual"]
        if data.masks is not None:
            tiles.append((data.masks[i, 0] > 0).astype(np.float32))
            captions.append("mask")
        for name in fitted:
            tiles.append(regions[name][k].astype(np.float32))
            captions.append(f"{name} {scores[name][k]:.3g}")
    save_grid(np.stack(tiles).astype(np.float32), path, ncols=len(tiles) // len(picks),
              captions=captions, title=f"{title}; residual scaled to 0..{vmax:.3f}")


# ------------------------------------------------------------------------------ the cell

def _previous(cfg: ClassifyConfig, ident: dict) -> dict | None:
    """The finished metrics to skip with, or None to (re)run; raises if outputs conflict."""
    for name in ("metrics.json", "config.json"):
        path = cfg.out / name
        if not path.exists():
            continue
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BrainhpcError(f"{path}: unreadable ({e}); use --force to start over") from e
        old = rec.get("config", {})
        if old != ident:
            diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
            shown = "; ".join(f"{k}: {old.get(k)!r} -> {ident.get(k)!r}" for k in diff)
            what = "a finished" if name == "metrics.json" else "an unfinished"
            raise BrainhpcError(f"{cfg.out} holds {what} classify run with a different config "
                                f"({shown}); use --force to overwrite it or choose another --out")
        if name == "metrics.json" and rec.get("status") == "done":
            return rec
    return None


def _wipe(out: Path) -> None:
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    for name in ("metrics.json", "config.json", "model.pt", "metrics.jsonl", "error_maps.png"):
        (out / name).unlink(missing_ok=True)


def classify(cfg: ClassifyConfig) -> dict:
    """Train, select on validation, score test; returns the metrics dict (also metrics.json).

    Returns ``{"status": "interrupted", ...}`` when training was stopped (SIGTERM or a request);
    re-running the same config resumes. Every rank trains; rank 0 alone evaluates and writes.
    """
    t_start = time.time()
    ident = cfg.identity()
    size = check_prepared(cfg.data)
    info = init_distributed(cfg.device)
    try:
        return _classify(cfg, ident, size, info, t_start)
    finally:
        teardown(info)


def _classify(cfg: ClassifyConfig, ident: dict, size: int, info, t_start: float) -> dict:
    if cfg.force:
        if info.is_main:
            _wipe(cfg.out)
        barrier(info)
    else:
        done = _previous(cfg, ident)
        if done is not None:
            log.info("%s: finished (metrics.json), skipping; use --force to redo", cfg.out)
            return {**done, "skipped": True}
    spec = parse_train_spec(cfg.train_data)
    hint = f"re-prepare the data at one size (brainhpc prepare --size {size})"
    if spec.kind != "real":
        _check_synthetic_size(cfg.synthetic_dir, spec.generator, size)
    train = assemble_training_data(spec, cfg.data, cfg.synthetic_dir, seed=cfg.seed)
    check_size(train.images, size, f"training data {spec}", hint)
    val, test = load_split(cfg.data, "val"), load_split(cfg.data, "test")
    for name, split in (("val", val), ("test", test)):
        check_size(split.images, size, f"{cfg.data}/{name}", hint)
        _two_classes(split, f"{cfg.data}/{name}")
    n_syn = sum(s.startswith("synthetic/") for s in train.sources)  # generate's source ids
    counts = class_counts(train.labels)
    n_train = {"total": len(train), "healthy": int(counts[0]), "tumour": int(counts[1]),
               "synthetic": int(n_syn), "real": int(len(train) - n_syn)}

    weights = None
    if cfg.model == "cnn":
        if cfg.balance == "weighted":
            weights = class_weights(train.labels)
        else:
            class_weights(train.labels)  # still refuses a single-class training set
        task = CNNTask(cfg, size, weights, val)
        dataset = torch.utils.data.TensorDataset(torch.from_numpy(train.images),
                                                 torch.from_numpy(train.labels))
        best_metric, best_mode = f"val_{cfg.criterion}", "max"
    else:
        healthy = healthy_only(train, f"training data {spec}")
        if healthy.brain is None and val.brain is not None:
            raise BrainhpcError(f"training data {spec}: no brain masks, but {cfg.data}/val has "
                                "them: the VAE would train on other inputs than it is scored on")
        std = anomaly.Standardiser.fit(healthy.images, healthy.brain, f"training data {spec}") \
            if cfg.standardise else None
        prep = Detector(torch.nn.Identity(), std)  # the inputs only; the VAE comes later
        task = VAETask(cfg, size, prep.inputs(healthy_only(val, f"{cfg.data}/val")))
        dataset = torch.utils.data.TensorDataset(torch.from_numpy(prep.inputs(healthy)))
        n_train["vae_trained_on"] = len(healthy)
        best_metric, best_mode = "val_loss", "min"
    if len(dataset) < cfg.batch_size:
        raise BrainhpcError(f"training data {spec}: {len(dataset)} usable images are fewer than "
                            f"one batch of {cfg.batch_size}; lower --batch-size")

    fingerprint = {"cell": "classify", "model": cfg.model, "size": size,
                   "config_hash": config_hash(ident)}
    tcfg = TrainConfig(out=cfg.out, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed,
                       checkpoint_every=cfg.checkpoint_every, num_workers=cfg.num_workers,
                       device=cfg.device, progress=cfg.progress, best_metric=best_metric,
                       best_mode=best_mode, precision=cfg.precision, val_every=cfg.val_every)
    if info.is_main:
        write_json(cfg.out / "config.json", {"status": "running", "config": ident,
                                             "brainhpc": __version__})
    trainer = Trainer(task, dataset, tcfg, fingerprint=fingerprint, dist_info=info)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    if result["status"] != "done":
        log.warning("%s: training %s at step %d; re-run to resume", cfg.out, result["status"],
                    result["step"])
        return {"status": result["status"], "step": result["step"], "out": str(cfg.out)}
    if not info.is_main:
        return {"status": "worker", "rank": info.rank}

    device = trainer.device
    model = trainer.raw(cfg.model)
    best = result["best"]
    if trainer.best_path.exists():
        state = torch.load(trainer.best_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["models"][cfg.model])
    else:  # no finite validation value ever: keep the last weights, and say so
        log.warning("%s: no best checkpoint (validation never finite); using the last weights",
                    cfg.out)
    model.eval()
    hparams = {"dropout": cfg.dropout} if cfg.model == "cnn" else vae_hparams(cfg)
    saved = {"format": MODEL_FORMAT, "model": cfg.model, "image_size": size, "hparams": hparams,
             "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
             "train_data": str(spec), "seed": cfg.seed, "config_hash": config_hash(ident),
             "brainhpc": __version__, "development_images": development_fingerprints(cfg.data),
             "data_key": dataset_key(cfg.data)}
    report: dict = {}
    if cfg.model == "cnn":
        val_score = cnn_scores(model, val.images, device)
        threshold, value = best_cut(val_score, val.labels, cfg.criterion)
        saved["threshold"] = threshold
        test_score = cnn_scores(model, test.images, device)  # scored with everything frozen
        test_pred = (test_score > threshold).astype(np.int64)
        report["val"] = classification_metrics(val.labels, val_score > threshold, val_score)
        report["test"] = classification_metrics(test.labels, test_pred, test_score)
        chosen = {"threshold": threshold, "criterion": cfg.criterion,
                  f"val_{cfg.criterion}": value, "balance": cfg.balance,
                  "class_weights": None if weights is None else weights.tolist()}
    else:
        det = Detector(model, std, cfg.residual, cfg.median)
        report = vae_report(cfg, det, val, test, device, spec)
        saved.update(techniques=report.pop("fitted"), residual=cfg.residual, median=cfg.median,
                     standardiser=None if std is None else std.state())
        chosen = report.pop("chosen")
    chosen.update(best_epoch=best.get("epoch"), best_step=best.get("step"),
                  best_metric=best_metric, best_value=best.get("value"))
    ckpt = cfg.out / "model.pt"
    with atomic_path(ckpt) as tmp:
        torch.save(saved, tmp)
    test_block = report.pop("test") if cfg.model == "cnn" else {}
    metrics = {
        "status": "done", "model": cfg.model,
        "techniques": report.pop("techniques", None), "train_data": str(spec),
        "data": str(cfg.data), "image_size": size,
        **test_block, "val": report.pop("val", None), "chosen": chosen, **report,
        "image_statistics_baseline": image_statistics_baseline(cfg.data),
        "split": "test", "n_train": n_train, "seed": cfg.seed, "epochs": cfg.epochs,
        "steps": result["step"], "train_seconds": result["train_seconds"],
        "wall_seconds": round(time.time() - t_start, 3), "resumed": result["resumed"],
        "device": str(device), "world_size": info.world_size,
        "precision": result["precision"], "threads": result["threads"],
        "checkpoint": str(ckpt), "checkpoint_sha256": sha256_file(ckpt),
        "brainhpc": __version__, "config_hash": config_hash(ident), "config": ident,
    }
    write_json(cfg.out / "metrics.json", metrics)  # last: the completion marker
    for line in summary_lines(metrics):
        log.info("%s", line)
    return metrics


def image_statistics_baseline(prepared: Path) -> dict | None:
    """The prepared dataset's "image statistics only" row (its manifest's confound check)."""
    confound = read_manifest(Path(prepared)).get("confound") or {}
    if not confound:
        return None
    return {"cv_auc": confound.get("cv_auc"), **(confound.get("test") or {}),
            "warnings": confound.get("warnings", [])}


def summary_lines(m: dict) -> list[str]:
    """One line per row of the cell's results (the CNN, or each technique and baseline)."""
    def fmt(block: dict, loc: dict | None = None) -> str:
        parts = [f"balanced acc {percent(block.get('balanced_accuracy'))}",
                 f"ROC-AUC {_num(block.get('roc_auc'))}"]
        if loc:
            parts += [f"pixel AUPRC {_num(loc.get('pixel_auprc'))}",
                      f"Dice {_num(loc.get('dice_mean', loc.get('best_dice_mean')))}"]
        if block.get("degenerate"):
            parts.append("DEGENERATE (one class predicted)")
        return ", ".join(parts)

    where = f"{m['model']} on {m['train_data']}, test split"
    if m["model"] == "cnn":
        return [f"{where}: {fmt(m)}"]
    lines = [f"{where}: {name:<14} {fmt(b['test'], b.get('localisation'))}"
             for name, b in m["techniques"].items()]
    if m.get("localisation"):
        loc = m["localisation"]
        lines.append(f"{where}: residual maps   pixel AUPRC {_num(loc.get('pixel_auprc'))}, "
                     f"best Dice {_num(loc.get('best_dice_mean'))} (threshold from val)")
    base = m.get("baselines", {}).get("intensity_threshold")
    if base:
        lines.append(f"{where}: intensity threshold (baseline) "
                     f"{fmt(base['test'], base.get('localisation'))}")
    stats = m.get("image_statistics_baseline")
    if stats:
        lines.append(f"{where}: image statistics only (baseline) balanced acc "
                     f"{percent(stats.get('balanced_accuracy'))}, "
                     f"ROC-AUC {_num(stats.get('roc_auc'))}")
    return lines


def percent(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def vae_report(cfg: ClassifyConfig, det: Detector, val: ShardData, test: ShardData,
               device: torch.device, spec) -> dict:
    """Every technique from one set of residual maps, their localisation, the baselines, and
    error_maps.png; thresholds chosen on validation, then frozen for test."""
    val_in, test_in = det.inputs(val), det.inputs(test)
    val_maps = det.maps(val, device, inputs=val_in)
    test_maps = det.maps(test, device, inputs=test_in)
    val_b = anomaly.brain_masks(val.brain, val.images)
    test_b = anomaly.brain_masks(test.brain, test.images)
    techniques, fitted = {}, {}
    for name in cfg.techniques:
        applied = select_and_apply(cfg.technique_config(name), val_maps, val.labels, test_maps,
                                   test.labels, test.masks)
        fitted[name] = applied.fitted
        techniques[name] = applied.report
    report: dict = {"techniques": techniques,
                    "fitted": {n: f.state() for n, f in fitted.items()},
                    "chosen": {"criterion": cfg.criterion, "residual": cfg.residual,
                               "standardise": cfg.standardise, "vae_arch": cfg.vae_arch,
                               "median": cfg.median or anomaly.median_kernel(val.images.shape[-1])}}
    base, _, _ = anomaly.intensity_baseline(val_in, val.labels, val_b, test_in, test.labels,
                                            test_b, val.masks, test.masks, cfg.criterion)
    report["baselines"] = {"intensity_threshold": base}
    if test.masks is not None and val.masks is not None and (val.masks > 0).any():
        report["localisation"] = anomaly.localisation(val_maps, val.masks, val_b, test_maps,
                                                      test.masks, test_b)
        report["localisation"]["empty_mask_dice"] = 0.0  # predicting nothing on tumour slices
    save_error_maps(cfg.out / "error_maps.png", test, test_in, test_maps, fitted,
                    f"vae ({cfg.vae_arch}) on {spec}, test split")
    return report


# ------------------------------------------------------------------------------ command line

def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "classify", help="train a CNN or VAE classifier on real/synthetic/mixed data and score it",
        description="Train BrainCNN or the BrainCVAE anomaly detector on real, synthetic or mixed "
                    "data; choose thresholds on validation; score the real test split.")
    p.add_argument("--model", required=True, help=" | ".join(MODELS))
    p.add_argument("--train-data", required=True, metavar="SPEC",
                   help="real | synthetic:<gen> | mixed:<gen> | mixed:<gen>:<p>")
    p.add_argument("--technique", action="append", dest="techniques", metavar="NAME",
                   help=f"vae only, repeatable or comma-separated: {' | '.join(TECHNIQUES)} "
                        "(default: all four, scored from one trained VAE)")
    p.add_argument("--data", required=True, type=Path, help="prepared dataset folder")
    p.add_argument("--out", required=True, type=Path, help="output folder of this cell")
    p.add_argument("--synthetic-dir", type=Path,
                   help="folder of the generate cells' outputs, <gen>-<label>/shards/")
    p.add_argument("--epochs", type=int,
                   help=f"training epochs (default: cnn {DEFAULT_EPOCHS['cnn']}, "
                        f"vae {DEFAULT_EPOCHS['vae']})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    p.add_argument("--dropout", type=float, default=0.5, help="cnn dropout")
    p.add_argument("--latent-dim", type=int, default=128, help="vae (paper) latent size")
    p.add_argument("--vae-arch", default="paper",
                   help="vae: paper (BrainCVAE, as specified) | spatial (convolutional latent)")
    p.add_argument("--latent-channels", type=int, default=8,
                   help="vae (spatial): latent channels per grid cell")
    p.add_argument("--residual", default="abs", help="vae: abs | ssim (MONAI SSIM residual)")
    p.add_argument("--no-standardise", action="store_true",
                   help="vae: no intensity standardisation inside the brain mask")
    p.add_argument("--median", type=int, help="vae: median filter side (odd; 1 = off)")
    p.add_argument("--kl-weight", type=float, default=1.0, help="vae KL weight")
    p.add_argument("--no-augment", action="store_true", help="no flips/shifts")
    p.add_argument("--balance", default="weighted", help="cnn: weighted (default) | none")
    p.add_argument("--criterion", default="balanced_accuracy",
                   help=f"{' | '.join(CRITERIA)} (on validation; default balanced_accuracy)")
    p.add_argument("--opt", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="technique option, e.g. --opt eps=3 --opt thresholds=[0.1,0.2] "
                        "(see TechniqueConfig in brainhpc/classify/techniques.py)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto (bf16 where measured faster on this hardware) | bf16 | fp32")
    p.add_argument("--val-every", type=int, default=1, metavar="K",
                   help="validate every K epochs (and after the last)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--force", action="store_true", help="start over, replacing finished outputs")
    p.set_defaults(func=run)


def run(args) -> int:
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in args.opt}  # grids: tuples
    cfg = ClassifyConfig(
        model=args.model, train_data=args.train_data, data=args.data, out=args.out,
        techniques=",".join(args.techniques) if args.techniques else None,
        synthetic_dir=args.synthetic_dir, epochs=args.epochs,
        seed=args.seed, batch_size=args.batch_size, lr=args.lr, dropout=args.dropout,
        latent_dim=args.latent_dim, kl_weight=args.kl_weight, augment=not args.no_augment,
        vae_arch=args.vae_arch, latent_channels=args.latent_channels, residual=args.residual,
        standardise=not args.no_standardise, median=args.median,
        balance=args.balance, criterion=args.criterion, technique_options=options,
        force=args.force, checkpoint_every=args.checkpoint_every, device=args.device,
        precision=args.precision, val_every=args.val_every, num_workers=args.workers,
        progress=not args.no_progress)
    metrics = classify(cfg)  # its summary lines are logged (stderr here, the cell's log in a sweep)
    if metrics.get("status") in ("done", "worker"):
        return 0
    return 3  # interrupted: re-run the same command to resume
