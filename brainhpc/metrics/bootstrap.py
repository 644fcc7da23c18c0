"""Intervals and paired comparisons over the units that are really independent.

Images of one duplicate group or one patient are not independent draws: resampling images
makes intervals too narrow. Here every statistic is resampled over *groups* (the ``group``
column of ``brainhpc.metrics.predictions``): a resample draws G groups with replacement, and
every image of a drawn group counts as often as its group was drawn. Each statistic is computed
from per-group sums, so 2,000 resamples are a few matrix products, not 2,000 passes.

``estimate`` gives a metric and its 95% percentile interval; ``compare`` gives the difference of
two arms on the groups both scored, from the *same* resamples (a paired bootstrap), and a
verdict: ``better`` when the whole interval of the difference is above 0, ``worse`` when below,
``not resolved`` otherwise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import sparse

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
CLASSIFY_METRICS = ("balanced_accuracy", "roc_auc", "recall_healthy", "recall_tumour")
SEGMENT_METRICS = ("dice_patient", "dice_slice")
VERDICTS = ("better", "worse", "not resolved")


@dataclass(frozen=True)
class Sample:
    """One arm's per-unit values: ``groups`` per row, and the columns the metric reads
    (classification: label, score, decision; segmentation: dice)."""

    groups: np.ndarray  # N group names
    label: np.ndarray | None = None
    score: np.ndarray | None = None
    decision: np.ndarray | None = None
    dice: np.ndarray | None = None

    @classmethod
    def of(cls, rows: list[dict]) -> Sample:
        col = {k: np.array([r[k] for r in rows], float) if rows and k in rows[0] else None
               for k in ("label", "score", "decision", "dice")}
        return cls(np.array([str(r["group"]) for r in rows], dtype=object), **col)

    def within(self, keep: set) -> Sample:
        sel = np.array([g in keep for g in self.groups], bool)
        return Sample(self.groups[sel], *(None if v is None else v[sel] for v in (
            self.label, self.score, self.decision, self.dice)))


@dataclass(frozen=True)
class Estimate:
    value: float | None
    lo: float | None
    hi: float | None
    groups: int
    n: int

    def text(self, scale: float = 100, digits: int = 1) -> str:
        """``86.7 [80.2, 92.1]``; ``-`` when undefined."""
        if self.value is None:
            return "-"
        if self.lo is None:
            return f"{scale * self.value:.{digits}f}"
        return (f"{scale * self.value:.{digits}f} [{scale * self.lo:.{digits}f}, "
                f"{scale * self.hi:.{digits}f}]")


@functools.lru_cache(maxsize=8)
def weights(n_groups: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """resamples x groups draw counts, the first row all ones (the point estimate). Cached
    (read-only): an aggregate draws the same few sizes hundreds of times. Few entries: one is
    16 MB per 1,000 groups."""
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=resamples)
    out = np.vstack([np.ones((1, n_groups)), w]).astype(float)
    out.flags.writeable = False
    return out


def _members(groups: np.ndarray, order: dict) -> sparse.csr_matrix:
    """groups x rows indicator: per-group sums are one product."""
    g = np.array([order[x] for x in groups], np.int64)
    return sparse.csr_matrix((np.ones(len(g)), (g, np.arange(len(g)))),
                             shape=(len(order), len(g)))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _recalls(s: Sample, m, W) -> tuple[np.ndarray, np.ndarray]:
    y, d = s.label == 1, s.decision == 1
    tp, pos = W @ (m @ (y & d)), W @ (m @ y)
    tn, neg = W @ (m @ (~y & ~d)), W @ (m @ ~y)
    return _ratio(tp, pos), _ratio(tn, neg)


def _auc(s: Sample, m, W) -> np.ndarray:
    """Weighted Mann-Whitney ROC-AUC (ties count half), all resamples at once."""
    if s.score is None or np.isnan(s.score).all():
        return np.full(len(W), np.nan)
    values, u = np.unique(s.score, return_inverse=True)
    y = s.label == 1
    out = []
    for which in (y, ~y):  # values x resamples: weighted counts of each score value
        per = sparse.csr_matrix((np.ones(which.sum()), (np.flatnonzero(which), u[which])),
                                shape=(len(y), len(values)))
        out.append(np.asarray(sparse.csr_matrix((m @ per).T) @ W.T))  # sparse x dense
    pos, neg = out
    below = np.cumsum(neg, axis=0) - neg
    return _ratio((pos * (below + 0.5 * neg)).sum(0), pos.sum(0) * neg.sum(0))


def _mean(s: Sample, m, W) -> np.ndarray:
    ok = np.isfinite(s.dice)
    return _ratio(W @ (m @ np.where(ok, s.dice, 0.0)), W @ (m @ ok.astype(float)))


def statistic(metric: str, s: Sample, order: dict, W: np.ndarray) -> np.ndarray:
    """The metric under every row of ``W`` (groups in ``order``); NaN where undefined."""
    m = _members(s.groups, order)
    if metric in ("balanced_accuracy", "recall_tumour", "recall_healthy"):
        tumour, healthy = _recalls(s, m, W)
        return {"recall_tumour": tumour, "recall_healthy": healthy,
                "balanced_accuracy": (tumour + healthy) / 2}[metric]
    if metric == "roc_auc":
        return _auc(s, m, W)
    if metric in SEGMENT_METRICS or metric == "dice":
        return _mean(s, m, W)
    raise ValueError(f"unknown metric {metric!r}")


def _interval(values: np.ndarray) -> tuple[float | None, float | None]:
    rest = values[1:][np.isfinite(values[1:])]
    if len(rest) < 10:
        return None, None
    tail = 100 * (1 - LEVEL) / 2
    lo, hi = np.percentile(rest, [tail, 100 - tail])
    return float(lo), float(hi)


def estimate(metric: str, s: Sample, resamples: int = RESAMPLES, seed: int = SEED) -> Estimate:
    """The metric and its group-bootstrap interval."""
    order = {g: i for i, g in enumerate(dict.fromkeys(s.groups.tolist()))}
    if not order:
        return Estimate(None, None, None, 0, 0)
    v = statistic(metric, s, order, weights(len(order), resamples, seed))
    lo, hi = _interval(v) if len(order) > 1 else (None, None)
    point = float(v[0]) if np.isfinite(v[0]) else None
    return Estimate(point, lo, hi, len(order), len(s.groups))


def verdict(lo: float | None, hi: float | None) -> str:
    if lo is not None and lo > 0:
        return "better"
    if hi is not None and hi < 0:
        return "worse"
    return "not resolved"


def compare(metric: str, a: Sample, b: Sample, resamples: int = RESAMPLES,
            seed: int = SEED, ratio: bool = False) -> tuple[Estimate, str]:
    """Metric of ``a`` minus that of ``b`` on the groups both scored, with its paired interval
    (one set of resamples for both), and the verdict for ``a``. ``ratio``: a / b instead (the
    verdict then says whether the ratio is resolved above or below 1)."""
    common = set(a.groups.tolist()) & set(b.groups.tolist())
    order = {g: i for i, g in enumerate(sorted(common))}
    if len(order) < 2:
        return Estimate(None, None, None, len(order), 0), "not resolved"
    W = weights(len(order), resamples, seed)
    va = statistic(metric, a.within(common), order, W)
    vb = statistic(metric, b.within(common), order, W)
    diff = _ratio(va, vb) if ratio else va - vb
    lo, hi = _interval(diff)
    point = float(diff[0]) if np.isfinite(diff[0]) else None
    shift = 1.0 if ratio else 0.0
    call = verdict(None if lo is None else lo - shift, None if hi is None else hi - shift)
    return Estimate(point, lo, hi, len(order), len(a.within(common).groups)), call
