"""Realism and memorisation of synthetic images, each metric beside its real-vs-real floor.

``report`` (layout and reading: docs/realism.md) scores synthetic images of one label against
**held-out** real ones (val + test), split by whole groups into halves A and B: a generator is
synthetic vs B, the floor is A vs B, at one size. It gathers a classifier two-sample test
(``c2st``; control: train-split real vs held-out), precision/recall/density/coverage (``prdc``)
in the trained feature space below and in a fixed random one (``features``), KID with a group
bootstrap interval, FID, a radial power-spectrum distance (``spectrum``) and the memorisation
check. Old keys (``fid``, ``kid``, ``kid_std``, ``fid_train_vs_heldout``) stay for old tables.

Trained feature space (no pretrained downloads are possible, so the project defines its own):
``FeatureNet`` is a small CNN encoder (four stride-2 3x3 conv blocks with batch norm and ReLU,
widths w, 2w, 4w, 4w, adaptive 4x4 average pooling, a linear layer to a ``dim``-d feature,
128 by default) trained on the **real train split** (both labels) of one prepared dataset with
two heads on the feature: tumour/healthy classification (cross-entropy) and reconstruction of
the image at 32 x 32 (MSE) through a small MLP. The label head makes the features care about
what the study cares about (lesions); the reconstruction head keeps global anatomy and texture
in them, so that blur, noise and missing structure move the features. Training is deterministic
(``FeatureConfig.seed``) and the network is fixed per prepared dataset: it is cached under the
key ``config_hash(dataset config hash, FeatureConfig, FEATURE_VERSION)`` in ``$BRAINHPC_CACHE/
quality`` if set, else ``PREPARED/.cache/quality`` if the dataset folder is writable, else
``~/.cache/brainhpc/quality``. Distances are comparable only between runs that share that key
(it is reported with every result). Features are taken in eval mode, images scaled to [0, 1].
Since the net was fitted to the train split, train images are never scored in it as "real".

* ``fid``: Frechet distance between Gaussians fitted to the two feature sets (eigen-decomposition
  matrix square root; no scipy needed).
* ``kid``: unbiased squared MMD with the cubic polynomial kernel ``(x.y/d + 1)^3``, mean and
  standard deviation over random subsets (Binkowski et al. 2018); ``kid_interval``: the same on
  the whole sets with a group-bootstrap interval.
* ``memorisation``: for every synthetic image its nearest real *training* image by normalised
  (Pearson) correlation over pixels; a pair with correlation >= ``NEAR_COPY`` (0.95) counts as a
  near-copy. Correlation ignores brightness and contrast, so re-scaled copies are caught. The
  same statistic for held-out real images against the train split is reported as the baseline:
  genuinely new images should look like held-out ones, not like the train set.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brainhpc.data.prepared import dataset_key
from brainhpc.data.shards import LABELS, ShardData, load_split
from brainhpc.errors import BrainhpcError
from brainhpc.fsio import atomic_path, config_hash
from brainhpc.images import save_grid
from brainhpc.metrics import bootstrap
from brainhpc.metrics.c2st import C2STConfig, c2st
from brainhpc.metrics.features import random_features
from brainhpc.metrics.prdc import prdc
from brainhpc.metrics.spectrum import spectral_distance

log = logging.getLogger(__name__)

FEATURE_VERSION = 2  # 2: initial weights seeded (1 drew them from the global RNG)
NEAR_COPY = 0.95  # normalised correlation at or above which a synthetic image is a near-copy
RECON_SIZE = 32
KID_RESAMPLES = 200  # bootstrap resamples of the KID interval
SPLIT_SEED = 0  # held-out halves, matched subsamples, C2ST partitions
MIN_HALF = 2  # groups per held-out half (and synthetic images) below which nothing is scored


@dataclass
class FeatureConfig:
    steps: int = 600
    batch_size: int = 64
    width: int = 32
    dim: int = 128
    lr: float = 2e-3
    recon_weight: float = 10.0
    seed: int = 0

    def __post_init__(self):
        for key in ("steps", "batch_size", "width", "dim"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise BrainhpcError(f"feature config: {key} must be an integer >= 1, "
                                    f"got {getattr(self, key)!r}")


class FeatureNet(nn.Module):
    def __init__(self, cfg: FeatureConfig):
        super().__init__()
        w = cfg.width
        layers, c_in = [], 1
        for c in (w, 2 * w, 4 * w, 4 * w):
            layers += [nn.Conv2d(c_in, c, 3, 2, 1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True)]
            c_in = c
        self.encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                     nn.Linear(c_in * 16, cfg.dim))
        self.label_head = nn.Linear(cfg.dim, 2)
        self.decoder = nn.Sequential(nn.ReLU(), nn.Linear(cfg.dim, 512), nn.ReLU(),
                                     nn.Linear(512, RECON_SIZE * RECON_SIZE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def cache_dir_for(prepared: str | os.PathLike) -> Path:
    if os.environ.get("BRAINHPC_CACHE"):
        return Path(os.environ["BRAINHPC_CACHE"]) / "quality"
    if os.access(prepared, os.W_OK):
        return Path(prepared) / ".cache" / "quality"
    return Path.home() / ".cache" / "brainhpc" / "quality"


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def feature_net(prepared: str | os.PathLike, cfg: FeatureConfig | None = None,
                cache_dir: str | os.PathLike | None = None,
                device: str | torch.device = "cpu") -> tuple[FeatureNet, str]:
    """The dataset's feature network (trained once, then loaded from cache) and its key.

    It always trains on the CPU, whatever ``device`` scores with: the cache key promises one
    network per key, and the first cell to need it may run on a GPU or a CPU (GPU kernels are not
    bit-identical to CPU ones)."""
    cfg = cfg or FeatureConfig()
    key = config_hash({"data": dataset_key(prepared), "features": asdict(cfg),
                       "version": FEATURE_VERSION})
    folder = Path(cache_dir) if cache_dir else cache_dir_for(prepared)
    path = folder / f"featnet-{key}.pt"
    with torch.random.fork_rng(devices=[]):  # the initial weights too come from the seed
        torch.manual_seed(cfg.seed)
        net = FeatureNet(cfg)
    with _file_lock(folder / f"featnet-{key}.lock"):  # array tasks: one trains, the rest wait
        if path.exists():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                net.load_state_dict(state["model"])
            except Exception as e:
                raise BrainhpcError(f"{path}: corrupt feature-network cache ({e}); delete it "
                                    "to retrain") from e
        else:
            train = load_split(prepared, "train")
            log.info("training the quality feature network on %d train images of %s (%d steps)",
                     len(train), prepared, cfg.steps)
            _train_feature_net(net, train.images, train.labels, cfg, torch.device("cpu"))
            with atomic_path(path) as tmp:
                torch.save({"model": net.state_dict(), "config": asdict(cfg), "key": key,
                            "data": str(prepared)}, tmp)
            log.info("feature network cached at %s", path)
    return net.to(device).eval(), key


def _train_feature_net(net: FeatureNet, images: np.ndarray, labels: np.ndarray,
                       cfg: FeatureConfig, device: torch.device) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        g = torch.Generator().manual_seed(cfg.seed)
        net.to(device).train()
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
        x_all = torch.from_numpy(images)
        y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
        bs = min(cfg.batch_size, len(x_all))
        for _ in range(cfg.steps):
            idx = torch.randint(0, len(x_all), (bs,), generator=g)
            x = x_all[idx].to(device).float().div_(255)
            y = y_all[idx].to(device)
            f = net(x)
            target = F.adaptive_avg_pool2d(x, RECON_SIZE).flatten(1)
            loss = F.cross_entropy(net.label_head(f), y) + cfg.recon_weight * F.mse_loss(
                torch.sigmoid(net.decoder(f)), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()


@torch.no_grad()
def features(net: FeatureNet, images: np.ndarray | torch.Tensor, batch: int = 256) -> np.ndarray:
    """(N, dim) float64 features of uint8 (or [0, 1] float) images (N, 1, H, W)."""
    device = next(net.parameters()).device
    x = torch.as_tensor(images)
    out = []
    for lo in range(0, len(x), batch):
        b = x[lo:lo + batch].to(device)
        b = b.float().div_(255) if b.dtype == torch.uint8 else b.float()
        out.append(net.eval()(b).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, net.encoder[-1].out_features))


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussian fits of feature sets ``a`` and ``b`` (rows = samples)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise BrainhpcError(f"FID needs at least 2 images per set, got {len(a)} and {len(b)}")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r1 = _sqrtm_psd(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    value = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)
    return max(value, 0.0)


def kid(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel inception distance: (mean, std) of unbiased MMD^2 over random subsets."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise BrainhpcError(f"KID needs at least 2 images per set, got {len(a)} and {len(b)}")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
               + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())
        vals.append(mmd)
    return float(np.mean(vals)), float(np.std(vals))


def _normalise(images: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images)).flatten(1).float()
    x = x - x.mean(1, keepdim=True)
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp_min(1e-12), torch.zeros_like(x))


def nearest(query: np.ndarray, reference: np.ndarray, chunk: int = 512) -> tuple[np.ndarray,
                                                                                   np.ndarray]:
    """For each query image: (index of the most correlated reference image, that correlation)."""
    q, r = _normalise(query), _normalise(reference)
    if q.shape[1] != r.shape[1]:
        raise BrainhpcError(f"memorisation: image sizes differ ({tuple(query.shape[1:])} vs "
                            f"{tuple(reference.shape[1:])})")
    idx, val = [], []
    for lo in range(0, len(q), chunk):
        c = q[lo:lo + chunk] @ r.T
        v, i = c.max(1)
        idx.append(i)
        val.append(v)
    return torch.cat(idx).numpy(), torch.cat(val).numpy().astype(np.float64)


def memorisation(synthetic: np.ndarray, train: np.ndarray, threshold: float = NEAR_COPY,
                 top: int = 16, png: str | os.PathLike | None = None,
                 heldout: np.ndarray | None = None) -> dict:
    """Nearest train image per synthetic image; near-copy share; top pairs drawn into ``png``."""
    if len(synthetic) == 0 or len(train) == 0:
        raise BrainhpcError(f"memorisation: need images on both sides, got {len(synthetic)} "
                            f"synthetic and {len(train)} train")
    idx, corr = nearest(synthetic, train)
    order = np.argsort(-corr)[:top]
    res = {
        "threshold": threshold,
        "n_synthetic": int(len(synthetic)),
        "n_train": int(len(train)),
        "near_copies": int((corr >= threshold).sum()),
        "near_copy_share": float((corr >= threshold).mean()),
        "nn_corr_median": float(np.median(corr)),
        "nn_corr_max": float(corr.max()),
        "flagged": [int(i) for i in np.flatnonzero(corr >= threshold)],
        "top_pairs": [{"synthetic": int(i), "train": int(idx[i]), "corr": round(float(corr[i]), 4)}
                      for i in order],
    }
    if heldout is not None and len(heldout):
        _, hcorr = nearest(heldout, train)
        res["baseline_heldout"] = {"n": int(len(heldout)),
                                   "near_copy_share": float((hcorr >= threshold).mean()),
                                   "nn_corr_median": float(np.median(hcorr))}
    if png is not None:
        tiles, caps = [], []
        for i in order:
            tiles += [synthetic[i], train[idx[i]]]
            caps += [f"r={corr[i]:.2f}", f"#{idx[i]}"]  # fits a 64 px tile
        save_grid(np.stack(tiles), png, ncols=8, captions=caps,
                  title=f"synthetic (r) | nearest train image (#); near-copy: r >= {threshold}")
        res["pairs_png"] = str(png)
    return res


def kid_interval(x: np.ndarray, y: np.ndarray, y_groups, resamples: int = KID_RESAMPLES,
                 seed: int = 0) -> dict:
    """Unbiased MMD^2 (the cubic kernel of ``kid``) of ``x`` (independent rows: synthetic
    images) against ``y`` (rows in ``y_groups``: a patient's slices are one draw), with a 95%
    interval from resampling ``y``'s groups and ``x``'s rows. A resampled row never pairs with
    itself, so the first row of weights (all ones) gives exactly the unbiased estimate."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        raise BrainhpcError(f"KID needs at least 2 images per set, got {len(x)} and {len(y)}")
    d = x.shape[1]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    order = {g: i for i, g in enumerate(dict.fromkeys(list(y_groups)))}
    wy = bootstrap.weights(len(order), resamples, seed)[:, [order[g] for g in y_groups]]
    wx = bootstrap.weights(len(x), resamples, seed + 1)

    def within(w: np.ndarray, k: np.ndarray) -> np.ndarray:
        num = ((w @ k) * w).sum(1) - (w ** 2 * np.diag(k)).sum(1)
        den = w.sum(1) ** 2 - (w ** 2).sum(1)
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)

    v = within(wx, kxx) + within(wy, kyy) - 2 * ((wx @ kxy) * wy).sum(1) / (
        wx.sum(1) * wy.sum(1))
    rest = v[1:][np.isfinite(v[1:])]
    lo, hi = np.percentile(rest, [2.5, 97.5]) if len(rest) >= 10 else (None, None)
    return {"value": float(v[0]), "lo": None if lo is None else float(lo),
            "hi": None if hi is None else float(hi),
            "std": float(rest.std()) if len(rest) else None}


@dataclass
class Heldout:
    """Held-out real images of one label (val + test) with their groups."""

    images: np.ndarray
    groups: np.ndarray  # object array of group names, one per image
    splits: list[str]


def heldout_real(prepared: str | os.PathLike, lab: int) -> Heldout | None:
    """The val and test images of label ``lab`` (whichever splits exist), or None if none."""
    parts, splits = [], []
    for split in ("val", "test"):
        try:
            data = load_split(prepared, split, label=lab)
        except BrainhpcError:
            continue
        if len(data):
            parts.append(data)
            splits.append(split)
    if not parts:
        return None
    return Heldout(np.concatenate([p.images for p in parts]),
                   np.array([g for p in parts for g in p.group_ids()], dtype=object), splits)


def halves(groups: np.ndarray, seed: int = SPLIT_SEED) -> np.ndarray:
    """Mask of half A: whole groups, dealt in a seeded random order to whichever half holds
    fewer images so far (so the halves match in size even when groups differ in size)."""
    names, counts = np.unique(np.asarray(groups, dtype=str), return_counts=True)
    in_a, na, nb = set(), 0, 0
    for i in np.random.default_rng(seed).permutation(len(names)):
        if na <= nb:
            in_a.add(names[i])
            na += counts[i]
        else:
            nb += counts[i]
    return np.array([g in in_a for g in np.asarray(groups, dtype=str)], bool)


def _too_few(held: Heldout | None, synthetic: np.ndarray, label: str) -> str | None:
    if held is None:
        return f"no held-out {label} images (val/test): realism metrics skipped"
    n_groups = len(set(held.groups.tolist()))
    if n_groups < 2 * MIN_HALF or len(synthetic) < MIN_HALF:
        return (f"too few held-out {label} images for two halves ({len(held.images)} images in "
                f"{n_groups} groups; {2 * MIN_HALF} groups and {MIN_HALF} synthetic images "
                f"needed): realism metrics skipped")
    return None


def _sig(value, digits: int = 5):
    """Round every float in a nested result to ``digits`` significant digits (JSON-friendly)."""
    if isinstance(value, dict):
        return {k: _sig(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sig(v, digits) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(f"{float(value):.{digits}g}") if np.isfinite(value) else None
    return value


def _matched(held: Heldout, synthetic: np.ndarray, seed: int) -> dict:
    """Half A, half B (the reference) and synthetic images, A and synthetic cut to one size."""
    a = halves(held.groups, seed)
    rng = np.random.default_rng(seed)
    n = int(min(a.sum(), len(synthetic)))
    ia = np.flatnonzero(a)[np.sort(rng.choice(a.sum(), n, replace=False))]
    isyn = np.sort(rng.choice(len(synthetic), n, replace=False))
    return {"A": held.images[ia], "B": held.images[~a], "S": synthetic[isyn],
            "groups_B": held.groups[~a], "n": n}


def _distances(sets: dict, net: FeatureNet, train: np.ndarray, held: Heldout,
               device, seed: int) -> dict:
    """PRDC in two feature spaces, KID with its interval, FID, spectra: synthetic vs half B and
    the floor, half A vs half B, at one size."""
    trained = {k: features(net, sets[k]) for k in ("A", "B", "S")}
    rand = {k: random_features(sets[k], device) for k in ("A", "B", "S")}
    k_syn = kid_interval(trained["S"], trained["B"], sets["groups_B"], seed=seed)
    ft, fh = features(net, train), features(net, held.images)
    return {
        "prdc": {"trained": prdc(trained["B"], trained["S"]),
                 "random": prdc(rand["B"], rand["S"]),
                 "floor_trained": prdc(trained["B"], trained["A"]),
                 "floor_random": prdc(rand["B"], rand["A"])},
        "kid": k_syn["value"], "kid_lo": k_syn["lo"], "kid_hi": k_syn["hi"],
        "kid_std": k_syn["std"],
        "kid_floor": kid_interval(trained["A"], trained["B"], sets["groups_B"],
                                  resamples=0)["value"],
        "fid": fid(trained["S"], trained["B"]), "fid_floor": fid(trained["A"], trained["B"]),
        # kept for old tables: biased low, the feature net was trained on these train images
        "fid_train_vs_heldout": fid(ft, fh),
        "spectral": spectral_distance(sets["S"], sets["B"]),
        "spectral_floor": spectral_distance(sets["A"], sets["B"]),
    }


def _c2st_pair(held: Heldout, train: ShardData, synthetic: np.ndarray,
               cfg: C2STConfig) -> dict:
    """C2ST of synthetic vs all held-out real, and the control: train-split real of the label
    (groups disjoint from held-out) vs the same held-out images, at one size (the control's
    is smaller only when the train split holds fewer images of the label)."""
    rng = np.random.default_rng(cfg.seed)
    n = int(min(len(held.images), len(synthetic)))
    isyn = np.sort(rng.choice(len(synthetic), n, replace=False))
    itr = np.sort(rng.choice(len(train), min(n, len(train)), replace=False))
    tgroups = np.array(train.group_ids(), dtype=object)
    res: dict = {}
    for name, other, groups in (("", synthetic[isyn], None),
                                ("control_", train.images[itr], tgroups[itr])):
        try:
            out = c2st(held.images, held.groups, other, groups, cfg)
        except BrainhpcError as e:
            res[f"{name}note"] = str(e)
            continue
        res.update({f"{name}{k}": v for k, v in out.items()
                    if not (name and k in ("n_fit", "n_score"))})
    return res


def report(prepared: str | os.PathLike, label: str, synthetic: np.ndarray,
           out_dir: str | os.PathLike, feature_cfg: FeatureConfig | None = None,
           threshold: float = NEAR_COPY, cache_dir: str | os.PathLike | None = None,
           device: str | torch.device = "cpu", c2st_cfg: C2STConfig | None = None,
           seed: int = SPLIT_SEED) -> dict:
    """Realism of ``synthetic`` (uint8 N x 1 x H x W) against held-out real images of ``label``,
    each metric next to its real-vs-real floor, plus the memorisation check (docs/realism.md)."""
    lab = LABELS[label]
    train = load_split(prepared, "train", label=lab)
    held = heldout_real(prepared, lab)
    res: dict = {"label": label, "n_synthetic": int(len(synthetic)),
                 "n_real": 0 if held is None else int(len(held.images)),
                 "heldout_split": None if held is None else "+".join(held.splits),
                 "heldout_groups": 0 if held is None else len(set(held.groups.tolist()))}
    note = _too_few(held, synthetic, label)
    if note:
        res.update({k: None for k in ("fid", "fid_floor", "kid", "kid_floor", "spectral",
                                      "spectral_floor", "c2st", "prdc")}, note=note)
    else:
        if np.shape(synthetic)[1:] != held.images.shape[1:]:
            raise BrainhpcError(f"realism: synthetic images {np.shape(synthetic)[1:]} differ "
                                f"from real ones {held.images.shape[1:]}")
        net, key = feature_net(prepared, feature_cfg, cache_dir, device)
        sets = _matched(held, synthetic, seed)
        res.update(feature_key=key, n_reference=int(len(sets["B"])), n_matched=sets["n"],
                   **_sig(_distances(sets, net, train.images, held, device, seed)),
                   c2st=_sig(_c2st_pair(held, train, synthetic, c2st_cfg or C2STConfig(
                       seed=seed)), 4))
    res["memorisation"] = memorisation(
        synthetic, train.images, threshold, png=Path(out_dir) / "memorisation.png",
        heldout=None if held is None else held.images)
    return res
