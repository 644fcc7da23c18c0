"""From VAE residual maps to tumour predictions: four techniques, the leakage-free threshold
selection that tunes them, and localisation scores where the data has tumour masks.

Every technique turns a residual map (H x W floats in [0, 1]; exact zeros are unscored pixels
outside the brain mask, see ``brainhpc.anomaly.residuals``) into a continuous tumour score (used
for ROC-AUC) and predicts tumour when the score passes a cut. Shares are of the scored pixels
(``scored_area``), so a big brain does not look more anomalous than a small one:

* ``giaem``: score = share of scored pixels whose error exceeds ``anomaly_threshold``; tumour if the
  score > ``tumor_index``. Region: the pixels above the threshold.
* ``dbscan``: scikit-learn DBSCAN (``eps``, ``min_samples``, Euclidean, pixel units) on the
  coordinates of the pixels above ``anomaly_threshold`` (with ``use_error`` also on
  ``error_scale * error``); score = size of the largest cluster / scored area; tumour if the
  score > ``tumor_index``. Only anomalous pixels that can join a cluster are clustered: a grid
  count (two small convolutions for all maps) drops, exactly, the pixels that DBSCAN would call
  noise, and maps left without candidates are skipped; a map with more than
  ``max_points`` is clustered on its ``max_points`` highest-error pixels (counted in the
  ``stats`` of ``predict``); several maps share one DBSCAN call (their rows shifted apart so
  no neighbourhood spans two maps: the same clusters as one call per map), and ``n_jobs`` > 1
  spreads these calls over threads. Region: the largest cluster.
* ``kmeans-single``: per map, KMeans with two centroids on the pixel errors, solved exactly
  (in 1-D the optimal 2-means partition is a cut of the sorted values, found from prefix sums
  for all maps at once: the same objective sklearn's KMeans minimises, at its global optimum).
  The higher-error cluster is the anomalous one when its centroid exceeds ``anomaly_threshold``;
  score = its share of the pixels (0 otherwise); tumour if the score > ``tumor_index``. Region:
  the anomalous cluster.
* ``kmeans-global``: KMeans (``n_clusters``, default 2) over the N x (H*W) matrix of binary
  thresholded maps (1 where error > ``anomaly_threshold``) of the validation split. Cluster to
  label: the cluster whose centroid has the smallest mean (fewest anomalous pixels) is healthy,
  every other cluster is tumour. ``alpha`` limits the tumour side's size: of the fitted maps, at
  most floor(alpha * N) are tumour, namely those assigned to a tumour cluster with the largest
  margin d(x, healthy centroid)^2 - min_j d(x, tumour centroid j)^2; this sets a margin cut
  ``tau`` >= 0. Score = the margin; tumour if margin > ``tau``. At test time the frozen centroids
  and ``tau`` map test maps to labels (the test split is never clustered). Region: the
  thresholded map. (This is our reading of the reference's "alpha limits cluster size"; its
  paper text was not available to check the exact wording.)

Threshold selection (``fit_technique``) is a grid search on the real validation split only:
``anomaly_threshold`` over an explicit grid or, by default, quantiles of the validation pixel
errors (exact zeros, the pixels outside the brain mask, left out); for each, ``tumor_index`` is
the best cut of the validation scores (midpoint between consecutive distinct scores; or an
explicit grid) and ``alpha`` is taken from its grid. The criterion is balanced accuracy (default;
F1 on a tumour-heavy split rewards "all tumour") or F1 on the validation labels; ties go to the
higher anomaly_threshold (fewer anomalous pixels, less work for dbscan), the smaller alpha and the
cut with fewer positives. Every score is "higher = more anomalous"; no direction is ever chosen
on validation. DBSCAN's ``eps`` and ``min_samples`` are given for 64 px images and scale with the
image side (``eps`` linearly, ``min_samples`` with the area), see ``scaled_dbscan``. The result is
a frozen
``FittedTechnique``; ``select_and_apply`` fits on validation and only then touches the test split.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch
from sklearn.cluster import DBSCAN, KMeans
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_limits

from brainhpc.anomaly import TECHNIQUES
from brainhpc.errors import BrainhpcError
from brainhpc.metrics.classification import classification_metrics

log = logging.getLogger(__name__)

CRITERIA = ("balanced_accuracy", "f1")
DEFAULT_QUANTILES = (0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999)
DEFAULT_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
QUANTILE_SAMPLE = 1 << 22  # pixels that place the default threshold grid (strided, deterministic)
ROW_CHUNK = 64  # maps per vectorised block (bounds memory at 128 px)


@dataclass
class TechniqueConfig:
    """One technique and the grid its thresholds are chosen from (on validation data only)."""

    technique: str = "giaem"
    criterion: str = "balanced_accuracy"
    thresholds: tuple[float, ...] | None = None  # anomaly_threshold grid; None: val quantiles
    threshold_quantiles: tuple[float, ...] = DEFAULT_QUANTILES
    tumor_indices: tuple[float, ...] | None = None  # None: exact best cut of the val scores
    alphas: tuple[float, ...] = DEFAULT_ALPHAS  # kmeans-global only
    eps: float = 2.0  # dbscan, pixels at DBSCAN_REFERENCE_SIDE (scaled with the image side)
    min_samples: int = 5  # dbscan, at DBSCAN_REFERENCE_SIDE (scaled with the image area)
    use_error: bool = False  # dbscan: cluster (row, col, error_scale * error)
    error_scale: float = 10.0  # dbscan
    max_points: int = 4096  # dbscan: cap per map at DBSCAN_REFERENCE_SIDE (scaled with area)
    n_clusters: int = 2  # kmeans-global
    n_init: int = 3  # kmeans-global
    seed: int = 0
    n_jobs: int = 1  # dbscan worker threads

    def __post_init__(self):
        if self.technique not in TECHNIQUES:
            raise BrainhpcError(
                f"technique {self.technique!r}: expected one of {', '.join(TECHNIQUES)}")
        if self.criterion not in CRITERIA:
            raise BrainhpcError(
                f"criterion {self.criterion!r}: expected one of {', '.join(CRITERIA)}")
        for key in ("thresholds", "threshold_quantiles", "tumor_indices", "alphas"):
            val = getattr(self, key)
            if val is None:
                continue
            val = tuple(float(v) for v in val)
            setattr(self, key, val)
            if not val or not all(np.isfinite(v) for v in val):
                raise BrainhpcError(f"technique config: {key} must be non-empty finite numbers")
        for key in ("threshold_quantiles", "alphas"):
            if not all(0.0 < v <= 1.0 for v in getattr(self, key)):
                raise BrainhpcError(f"technique config: {key} must lie in (0, 1], "
                                    f"got {list(getattr(self, key))}")
        if self.thresholds is not None and not all(0.0 <= v < 1.0 for v in self.thresholds):
            raise BrainhpcError(
                f"technique config: thresholds must lie in [0, 1), got {list(self.thresholds)}")
        if self.eps <= 0 or self.min_samples < 1 or self.max_points < self.min_samples:
            raise BrainhpcError(
                f"technique config: need eps > 0, min_samples >= 1, max_points >= min_samples; "
                f"got eps={self.eps}, min_samples={self.min_samples}, max_points={self.max_points}")
        if self.n_clusters < 2 or self.n_init < 1 or self.n_jobs < 1:
            raise BrainhpcError(
                f"technique config: need n_clusters >= 2, n_init >= 1, n_jobs >= 1; got "
                f"{self.n_clusters}, {self.n_init}, {self.n_jobs}")


def as_maps(maps) -> np.ndarray:
    """Error maps as N x H x W float32 in [0, 1] (accepts N x 1 x H x W and torch tensors)."""
    if isinstance(maps, torch.Tensor):
        maps = maps.detach().cpu().float().numpy()
    a = np.asarray(maps, dtype=np.float32)
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3:
        raise BrainhpcError(f"error maps must be N x H x W (or N x 1 x H x W), got shape {a.shape}")
    if a.size and not (a.min() >= 0.0 and a.max() <= 1.0):  # NaN fails both comparisons
        raise BrainhpcError("error maps must be finite and within [0, 1] (|x - x_hat| of images "
                            "in [0, 1])")
    return a


def _as_labels(labels, n: int, what: str) -> np.ndarray:
    y = np.asarray(labels).astype(np.int64).ravel()
    if len(y) != n:
        raise BrainhpcError(f"{what}: {n} error maps but {len(y)} labels")
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise BrainhpcError(f"{what}: labels must be 0 (healthy) or 1 (tumour)")
    return y


# ---------------------------------------------------------------------------------------- giaem

def scored_area(maps: np.ndarray) -> np.ndarray:
    """Pixels each map scores: its non-zero ones (exact zeros lie outside the brain mask;
    anomaly.residual_maps keeps every scored pixel above zero), so
    image scores are shares of the brain and a big brain does not look more anomalous."""
    flat = maps.reshape(len(maps), -1)
    return np.maximum(np.count_nonzero(flat, axis=1), 1).astype(np.float64)


def giaem_scores(maps: np.ndarray, anomaly_threshold: float) -> np.ndarray:
    """Share of each map's scored pixels whose error exceeds ``anomaly_threshold``."""
    n = len(maps)
    flat = maps.reshape(n, -1)
    out = np.empty(n)
    for a in range(0, n, ROW_CHUNK):  # blocks that stay in cache beat one N x H x W temporary
        out[a:a + ROW_CHUNK] = np.count_nonzero(flat[a:a + ROW_CHUNK] > anomaly_threshold, axis=1)
    return out / scored_area(maps)


# --------------------------------------------------------------------------------------- dbscan

DBSCAN_BATCH_POINTS = 100_000  # points per DBSCAN call (several maps share one call)
DBSCAN_REFERENCE_SIDE = 64  # the image side TechniqueConfig's eps/min_samples/max_points mean


def scaled_dbscan(config: TechniqueConfig, side: int) -> tuple[float, int, int]:
    """(eps, min_samples, max_points) for images of ``side`` px: a lesion of a given anatomical
    size covers (side/64)^2 times the pixels at ``side`` px as at 64 px, so a neighbourhood that
    finds it must grow with the side and the density it needs with the area."""
    f = side / DBSCAN_REFERENCE_SIDE
    ms = max(1, int(round(config.min_samples * f * f)))
    return config.eps * f, ms, max(ms, int(round(config.max_points * f * f)))


def _disk(eps: float) -> np.ndarray:
    """Grid offsets within distance eps (slightly generous: only ever used as an upper bound)."""
    r = int(np.floor(eps + 1e-9))
    dy, dx = np.mgrid[-r:r + 1, -r:r + 1]
    return (dy * dy + dx * dx <= eps * eps + 1e-6).astype(np.float32)


def _grid_count(mask: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Per pixel, how many True pixels of ``mask`` (N x H x W) lie within the kernel's disk."""
    out = np.empty(mask.shape, np.float32)
    for i in range(len(mask)):
        out[i] = cv2.filter2D(mask[i].astype(np.float32), -1, kernel,
                              borderType=cv2.BORDER_CONSTANT)
    return out


def dbscan_candidates(maps: np.ndarray, anomaly_threshold: float, eps: float,
                      min_samples: int) -> np.ndarray:
    """The anomalous pixels DBSCAN can put in a cluster: those within eps (on the pixel grid) of a
    pixel having >= min_samples anomalous pixels within eps. Every other anomalous pixel is noise
    whatever DBSCAN does (it neighbours no core point, and counts towards no core point), so
    dropping it changes no cluster; with ``use_error`` the true neighbourhoods are subsets of
    these grid ones, so the filter stays exact."""
    mask = maps > anomaly_threshold
    if not mask.any():
        return mask
    kernel = _disk(eps)
    core = mask & (_grid_count(mask, kernel) >= min_samples - 0.5)
    return mask & (_grid_count(core, kernel) > 0.5)


def _dbscan_batch(rc: np.ndarray, err: np.ndarray, owner: np.ndarray, n_local: int,
                  stride: int, eps: float, min_samples: int, use_error: bool,
                  error_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """One sklearn DBSCAN call for several maps: (largest cluster size per map, membership of
    each point in its map's largest cluster).

    Map k's rows are shifted by k * stride (stride > H + eps), so no eps-neighbourhood spans two
    maps and the result equals one call per map (cluster discovery and border assignment follow
    point order, which is kept). Ties between equal largest clusters go to the first found.
    """
    x = np.empty((len(rc), 3 if use_error else 2))
    x[:, 0] = rc[:, 0] + owner * stride
    x[:, 1] = rc[:, 1]
    if use_error:
        x[:, 2] = error_scale * err
    labels = DBSCAN(eps=eps, min_samples=min_samples, algorithm="ball_tree").fit(x).labels_
    sizes = np.zeros(n_local, np.int64)
    ok = labels >= 0
    if not ok.any():
        return sizes, ok
    size_of = np.bincount(labels[ok])
    owner_of = np.zeros(len(size_of), np.int64)
    owner_of[labels[ok]] = owner[ok]
    order = np.lexsort((np.arange(len(size_of)), -size_of, owner_of))
    first = order[np.concatenate([[True], owner_of[order][1:] != owner_of[order][:-1]])]
    sizes[owner_of[first]] = size_of[first]
    best = np.full(n_local, -1)
    best[owner_of[first]] = first
    return sizes, ok & (labels == best[owner])


def _dbscan_batches(batches: list, params: dict) -> list:
    return [_dbscan_batch(*b, **params) for b in batches]


def _cap(img, rc, errs, counts, max_points: int):
    """Pathological maps keep only their ``max_points`` most anomalous pixels; returns the
    points, the new counts and which maps were capped."""
    capped = np.flatnonzero(counts > max_points)
    if len(capped):
        keep = np.ones(len(img), bool)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for i in capped:
            lo, hi = offsets[i], offsets[i + 1]
            drop = np.argsort(-errs[lo:hi], kind="stable")[max_points:]
            keep[lo + drop] = False
        img, rc, errs = img[keep], rc[keep], errs[keep]
        counts = np.minimum(counts, max_points)
    return img, rc, errs, counts, capped


def _map_groups(todo: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    """Whole maps grouped into batches of about DBSCAN_BATCH_POINTS points each."""
    map_groups, group, n_points = [], [], 0
    for i in todo:
        group.append(i)
        n_points += counts[i]
        if n_points >= DBSCAN_BATCH_POINTS:
            map_groups.append(np.array(group))
            group, n_points = [], 0
    if group:
        map_groups.append(np.array(group))
    return map_groups


def _run_batches(batches: list, params: dict, n_jobs: int) -> list:
    if n_jobs > 1 and len(batches) > 1:
        from joblib import Parallel, delayed

        # threads: sklearn's neighbour search releases the GIL, and threads cost no start-up or
        # pickling (process workers were slower than one process in the bench)
        parts = Parallel(n_jobs=min(n_jobs, len(batches)), prefer="threads")(
            delayed(_dbscan_batches)(batches[j::n_jobs], params) for j in range(n_jobs))
        results = [None] * len(batches)
        for j, part in enumerate(parts):
            results[j::n_jobs] = part
        return results
    return _dbscan_batches(batches, params)


def dbscan_scores(maps: np.ndarray, anomaly_threshold: float, eps: float = 2.0,
                  min_samples: int = 5, use_error: bool = False, error_scale: float = 10.0,
                  max_points: int = 4096, n_jobs: int = 1, return_regions: bool = False,
                  stats: dict | None = None, prefilter: bool = True):
    """Largest-cluster size / image area per map (and, with ``return_regions``, its pixels).

    ``prefilter=False`` hands DBSCAN every anomalous pixel (same result, slower; for tests).
    """
    n, h, w = maps.shape
    if prefilter:
        mask = dbscan_candidates(maps, anomaly_threshold, eps, min_samples)
    else:
        mask = maps > anomaly_threshold
    counts = mask.reshape(n, -1).sum(axis=1)
    img, rows, cols = np.nonzero(mask)  # sorted by map, so each map's pixels are contiguous
    errs = maps[img, rows, cols].astype(np.float64)
    rc = np.column_stack([rows, cols]).astype(np.int64)
    img, rc, errs, counts, capped = _cap(img, rc, errs, counts, max_points)
    todo = np.flatnonzero(counts >= min_samples)  # fewer points than min_samples: no core point
    sel = np.isin(img, todo)
    img, rc, errs = img[sel], rc[sel], errs[sel]
    map_groups = _map_groups(todo, counts)
    stride = h + int(np.ceil(eps)) + 2
    batches = []
    for group in map_groups:
        lo, hi = np.searchsorted(img, group[0], "left"), np.searchsorted(img, group[-1], "right")
        owner = np.searchsorted(group, img[lo:hi])
        batches.append((rc[lo:hi], errs[lo:hi], owner, len(group), stride))
    params = dict(eps=eps, min_samples=min_samples, use_error=use_error, error_scale=error_scale)
    results = _run_batches(batches, params, n_jobs)
    sizes = np.zeros(n, np.int64)
    region = np.zeros((n, h, w), bool) if return_regions else None
    for group, batch, (local_sizes, member) in zip(map_groups, batches, results, strict=True):
        sizes[group] = local_sizes
        if return_regions:
            owner = batch[2]
            region[group[owner[member]], batch[0][member, 0], batch[0][member, 1]] = True
    if stats is not None:
        stats["dbscan_capped_maps"] = stats.get("dbscan_capped_maps", 0) + len(capped)
        stats["dbscan_clustered_maps"] = stats.get("dbscan_clustered_maps", 0) + len(todo)
    scores = sizes / scored_area(maps)
    return (scores, region) if return_regions else scores


# -------------------------------------------------------------------------------- kmeans-single

def two_means_1d(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact 2-means of each row of ``values`` (N x P): (cut, size of the high cluster, its mean).

    The optimal partition is a cut between two consecutive distinct sorted values maximising the
    between-cluster sum of squares k (P - k) / P (mean_high - mean_low)^2, which is the same as
    minimising KMeans' within-cluster sum of squares. A row of equal values has no split: high
    size 0, cut = that value.
    """
    values = np.asarray(values)
    n, p = values.shape
    cut = np.empty(n)
    size = np.zeros(n, np.int64)
    mean = np.zeros(n)
    if p < 2:
        cut[:] = values[:, 0] if p else 0.0
        return cut, size, mean
    k = np.arange(1, p, dtype=np.float64)  # size of the low cluster
    for a in range(0, n, ROW_CHUNK):
        s = np.sort(values[a:a + ROW_CHUNK], axis=1).astype(np.float64)
        cs = np.cumsum(s, axis=1)
        left, total = cs[:, :-1], cs[:, -1:]
        m_low, m_high = left / k, (total - left) / (p - k)
        between = k * (p - k) / p * (m_high - m_low) ** 2
        between[s[:, 1:] <= s[:, :-1]] = -1.0  # a cut inside a run of equal values is no partition
        j = np.argmax(between, axis=1)  # cut after sorted position j
        rows = np.arange(len(s))
        ok = between[rows, j] >= 0
        cut[a:a + len(s)] = np.where(ok, (s[rows, j] + s[rows, j + 1]) / 2, s[:, 0])
        size[a:a + len(s)] = np.where(ok, p - (j + 1), 0)
        mean[a:a + len(s)] = np.where(ok, m_high[rows, j], 0.0)
    return cut, size, mean


def kmeans_single_scores(maps: np.ndarray, anomaly_threshold: float,
                         return_regions: bool = False):
    """Share of pixels in each map's high-error 2-means cluster, 0 when its centroid is not above
    ``anomaly_threshold`` (then the map has no anomalous cluster).

    Exact zeros are pixels that were not scored (outside the brain mask): the 2 means are taken
    over each map's other pixels, so the clusters split brain tissue, not brain from background.
    """
    n = len(maps)
    flat = maps.reshape(n, -1)
    if n and (flat == 0).any():
        cut, size, mean = np.zeros(n), np.zeros(n, np.int64), np.zeros(n)
        for i in range(n):
            scored = flat[i][flat[i] != 0]
            if scored.size:
                c, k, m = two_means_1d(scored[None])
                cut[i], size[i], mean[i] = c[0], k[0], m[0]
    else:
        cut, size, mean = two_means_1d(flat)
    anomalous = (size > 0) & (mean > anomaly_threshold)
    scores = np.where(anomalous, size / scored_area(maps), 0.0)
    if not return_regions:
        return scores
    return scores, (maps > cut[:, None, None]) & anomalous[:, None, None]


# -------------------------------------------------------------------------------- kmeans-global

def _binary(maps: np.ndarray, anomaly_threshold: float) -> np.ndarray:
    return (maps.reshape(len(maps), -1) > anomaly_threshold).astype(np.float32)


def global_kmeans_fit(maps: np.ndarray, anomaly_threshold: float, n_clusters: int = 2,
                      seed: int = 0, n_init: int = 3) -> tuple[np.ndarray, int]:
    """KMeans centroids over the thresholded maps and the index of the healthy cluster (the
    centroid with the smallest mean, i.e. the fewest anomalous pixels)."""
    x = _binary(maps, anomaly_threshold)
    if len(x) < n_clusters:
        raise BrainhpcError(f"kmeans-global: {len(x)} maps cannot form {n_clusters} clusters")
    # one OpenMP thread: measured 10-20x faster than two on a shared 2-core machine (threads
    # spin against other jobs), and these fits are small (< 1 s for 1,000 maps at 128 px)
    with threadpool_limits(limits=1), warnings.catch_warnings():
        # a threshold above every error leaves identical rows: one distinct cluster, all
        # margins 0, no tumour predictions; that candidate simply loses the grid search
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit(x)
    centers = km.cluster_centers_.astype(np.float64)
    return centers, int(np.argmin(centers.mean(axis=1)))


def global_kmeans_margin(maps: np.ndarray, anomaly_threshold: float, centers: np.ndarray,
                         healthy: int) -> np.ndarray:
    """d(x, healthy)^2 - min_j d(x, tumour_j)^2 (> 0: the map is nearer a tumour centroid)."""
    sq = (centers ** 2).sum(axis=1)
    others = [j for j in range(len(centers)) if j != healthy]
    out = np.empty(len(maps))
    for a in range(0, len(maps), ROW_CHUNK):
        block = maps[a:a + ROW_CHUNK]
        x = (block.reshape(len(block), -1) > anomaly_threshold).astype(np.float64)
        with threadpool_limits(limits=1):
            dots = x @ centers.T
        # ||x||^2 cancels: d_h - d_j = 2 x.(c_j - c_h) + |c_h|^2 - |c_j|^2
        diff = 2 * (dots[:, others] - dots[:, [healthy]]) + sq[healthy] - sq[others]
        out[a:a + len(x)] = diff.max(axis=1)
    return out


def alpha_cut(margin: np.ndarray, alpha: float) -> float:
    """The margin cut tau >= 0 that labels at most floor(alpha * N) of the fitted maps tumour
    (the largest margins among those assigned to a tumour cluster)."""
    m = int(min(np.sum(margin > 0), np.floor(alpha * len(margin) + 1e-9)))
    desc = np.sort(margin)[::-1]
    if m == 0:
        return float(max(desc[0], 0.0)) if len(desc) else 0.0
    return float(max(desc[m], 0.0)) if m < len(desc) else 0.0


# ------------------------------------------------------------------------------------ selection

def _criterion(tp, fp, fn, tn, name: str) -> np.ndarray:
    tp, fp, fn, tn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, fn, tn))
    if name == "f1":
        den = 2 * tp + fp + fn
        return np.divide(2 * tp, den, out=np.zeros_like(den), where=den > 0)
    return 0.5 * (tp / np.maximum(tp + fn, 1) + tn / np.maximum(tn + fp, 1))


def best_cut(scores: np.ndarray, labels: np.ndarray,
             criterion: str = "balanced_accuracy") -> tuple[float, float]:
    """The cut t (predict tumour where score > t) maximising ``criterion``: (t, value).

    Candidates are every partition of the sorted scores (t halfway between consecutive distinct
    scores, above the maximum for "none", just below the minimum for "all"); ties go to the
    cut with fewer positives.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    order = np.argsort(-s, kind="stable")
    ss, yy = s[order], y[order]
    ends = np.concatenate([np.flatnonzero(np.diff(ss) != 0), [len(ss) - 1]])
    tp = np.concatenate([[0], np.cumsum(yy)[ends]])
    fp = np.concatenate([[0], np.cumsum(1 - yy)[ends]])
    pos = int(y.sum())
    neg = len(y) - pos
    values = _criterion(tp, fp, pos - tp, neg - fp, criterion)
    k = int(np.argmax(values))
    if k == 0:
        t = float(ss[0])
    else:
        e = ends[k - 1]
        if e + 1 < len(ss):
            t = float((ss[e] + ss[e + 1]) / 2)
        else:
            t = float(np.nextafter(ss[e], -np.inf))
    return t, float(values[k])


def _grid_cut(scores: np.ndarray, labels: np.ndarray, cuts: tuple[float, ...],
              criterion: str) -> tuple[float, float]:
    c = np.asarray(cuts, dtype=np.float64)
    pred = scores[None, :] > c[:, None]
    y = labels[None, :].astype(bool)
    tp, fp = (pred & y).sum(1), (pred & ~y).sum(1)
    fn, tn = (~pred & y).sum(1), (~pred & ~y).sum(1)
    values = _criterion(tp, fp, fn, tn, criterion)
    k = int(np.argmax(values))
    return float(c[k]), float(values[k])


def threshold_grid(config: TechniqueConfig, val_maps: np.ndarray) -> list[float]:
    """The anomaly_threshold candidates: explicit, or quantiles of the validation pixel errors."""
    if config.thresholds is not None:
        return sorted(set(config.thresholds))
    flat = val_maps.reshape(-1)
    if (flat != 0).any():
        flat = flat[flat != 0]  # exact zeros were not scored (outside the brain mask)
    step = max(1, flat.size // QUANTILE_SAMPLE)
    q = np.quantile(flat[::step], config.threshold_quantiles)
    return sorted({float(v) for v in q if v < 1.0})


@dataclass
class FittedTechnique:
    """A technique with its chosen (frozen) values; ``predict`` never changes them."""

    config: TechniqueConfig
    params: dict  # anomaly_threshold, and tumor_index or alpha + tau
    val_value: float  # the criterion reached on validation
    centers: np.ndarray | None = None  # kmeans-global
    healthy: int | None = None  # kmeans-global

    @property
    def technique(self) -> str:
        return self.config.technique

    def scores(self, maps, return_regions: bool = False, stats: dict | None = None):
        maps = as_maps(maps)
        thr, c = self.params["anomaly_threshold"], self.config
        if c.technique == "giaem":
            s = giaem_scores(maps, thr)
            return (s, maps > thr) if return_regions else s
        if c.technique == "dbscan":
            eps, min_samples, max_points = scaled_dbscan(c, maps.shape[-1])
            return dbscan_scores(maps, thr, eps, min_samples, c.use_error, c.error_scale,
                                 max_points, c.n_jobs, return_regions, stats)
        if c.technique == "kmeans-single":
            return kmeans_single_scores(maps, thr, return_regions)
        s = global_kmeans_margin(maps, thr, self.centers, self.healthy)
        return (s, maps > thr) if return_regions else s

    def _cut(self) -> float:
        key = "tau" if self.technique == "kmeans-global" else "tumor_index"
        return self.params[key]

    def predict(self, maps, stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(predictions 0/1, continuous tumour scores) with the frozen values; ``stats`` (a dict)
        collects counters such as dbscan's capped maps."""
        s = self.scores(maps, stats=stats)
        return (s > self._cut()).astype(np.int64), s

    def regions(self, maps) -> np.ndarray:
        """Detected anomalous pixels (N x H x W bool), empty for maps predicted healthy."""
        s, region = self.scores(maps, return_regions=True)
        return region & (s > self._cut())[:, None, None]

    def chosen(self) -> dict:
        """JSON-ready record of the chosen values and how they were chosen."""
        c = self.config
        grid = {k: v for k, v in asdict(c).items() if k not in ("technique", "criterion")}
        return {"technique": c.technique, "criterion": c.criterion, **self.params,
                f"val_{c.criterion}": self.val_value, "config": grid}

    def state(self) -> dict:
        """Everything needed to rebuild this object (tensors and plain values: safe for
        torch.save and torch.load(weights_only=True))."""
        return {"config": asdict(self.config), "params": dict(self.params),
                "val_value": self.val_value, "healthy": self.healthy,
                "centers": None if self.centers is None else torch.from_numpy(self.centers)}

    @classmethod
    def from_state(cls, state: dict) -> FittedTechnique:
        centers = state.get("centers")
        return cls(TechniqueConfig(**state["config"]), dict(state["params"]),
                   float(state["val_value"]),
                   None if centers is None else torch.as_tensor(centers).double().numpy(),
                   state.get("healthy"))


def fit_technique(config: TechniqueConfig, val_maps, val_labels) -> FittedTechnique:
    """Choose the technique's thresholds on the validation split (and only there)."""
    maps = as_maps(val_maps)
    y = _as_labels(val_labels, len(maps), "validation")
    if len(np.unique(y)) < 2:
        raise BrainhpcError("threshold selection needs healthy and tumour images in the "
                            f"validation split, got {len(y)} of one class")
    c = config
    best: tuple | None = None
    for thr in threshold_grid(c, maps):
        if c.technique == "kmeans-global":
            centers, healthy = global_kmeans_fit(maps, thr, c.n_clusters, c.seed, c.n_init)
            margin = global_kmeans_margin(maps, thr, centers, healthy)
            for alpha in sorted(c.alphas, reverse=True):  # ties: the smaller alpha
                tau = alpha_cut(margin, alpha)
                value = float(_criterion(*_counts(margin > tau, y), c.criterion))
                if best is None or value >= best[0]:
                    best = (value, {"anomaly_threshold": thr, "alpha": alpha, "tau": tau},
                            centers, healthy)
            continue
        probe = FittedTechnique(c, {"anomaly_threshold": thr, "tumor_index": 0.0}, 0.0)
        s = probe.scores(maps)
        if c.tumor_indices is None:
            cut, value = best_cut(s, y, c.criterion)
        else:
            cut, value = _grid_cut(s, y, c.tumor_indices, c.criterion)
        if best is None or value >= best[0]:
            best = (value, {"anomaly_threshold": thr, "tumor_index": cut}, None, None)
    if best is None:
        raise BrainhpcError("threshold selection: the anomaly_threshold grid is empty")
    value, params, centers, healthy = best
    fitted = FittedTechnique(c, params, value, centers, healthy)
    log.info("%s: chose %s (val %s %.4f)", c.technique, params, c.criterion, value)
    return fitted


def _counts(pred: np.ndarray, y: np.ndarray):
    p, t = pred.astype(bool), y.astype(bool)
    return (p & t).sum(), (p & ~t).sum(), (~p & t).sum(), (~p & ~t).sum()


# --------------------------------------------------------------------------------- localisation

def localisation(regions: np.ndarray, masks: np.ndarray) -> dict:
    """Dice and IoU between detected regions and ground-truth tumour masks, over the maps whose
    mask is non-empty: per-map means and pooled over all their pixels."""
    r = np.asarray(regions).astype(bool)
    m = np.asarray(masks)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    m = m > 0
    if r.shape != m.shape:
        raise BrainhpcError(f"localisation: regions {r.shape} and masks {m.shape} differ in shape")
    has = m.reshape(len(m), -1).any(axis=1)
    if not has.any():
        return {"n": 0, "dice_mean": None, "iou_mean": None, "dice_pooled": None,
                "iou_pooled": None}
    r, m = r[has].reshape(int(has.sum()), -1), m[has].reshape(int(has.sum()), -1)
    inter = (r & m).sum(1).astype(np.float64)
    a, b = r.sum(1).astype(np.float64), m.sum(1).astype(np.float64)
    union = a + b - inter
    return {
        "n": int(has.sum()),
        "dice_mean": float(np.mean(2 * inter / (a + b))),
        "iou_mean": float(np.mean(inter / union)),
        "dice_pooled": float(2 * inter.sum() / (a.sum() + b.sum())),
        "iou_pooled": float(inter.sum() / union.sum()),
    }


@dataclass
class Applied:
    """What ``select_and_apply`` hands the classify cell."""

    report: dict  # JSON-ready: chosen values, val and test metrics, localisation
    fitted: FittedTechnique
    pred: np.ndarray  # test predictions
    score: np.ndarray  # test scores


def select_and_apply(config: TechniqueConfig, val_maps, val_labels, test_maps, test_labels,
                     test_masks=None) -> Applied:
    """Fit on validation, freeze, then predict the test split; test labels are read only after
    the predictions exist (for metrics), so they cannot influence any chosen value."""
    fitted = fit_technique(config, val_maps, val_labels)
    val_pred, val_score = fitted.predict(val_maps)
    stats: dict = {}
    pred, score = fitted.predict(test_maps, stats=stats)
    y_test = _as_labels(test_labels, len(pred), "test")
    report = {
        "chosen": fitted.chosen(),
        "val": classification_metrics(val_labels, val_pred, val_score),
        "test": classification_metrics(y_test, pred, score),
    }
    if test_masks is not None:
        report["localisation"] = localisation(fitted.regions(test_maps), test_masks)
    if stats:
        report["test_stats"] = stats
    return Applied(report, fitted, pred, score)
