"""Train/val/test splits that never cut a group (duplicates, one patient's slices) in two.

``split_groups`` is stratified by label and fixed by the seed; it sees only group ids and labels,
so it does not depend on the image size.
"""

from __future__ import annotations

import numpy as np

from brainhpc.data.shards import LABEL_NAMES, LABELS, SPLITS
from brainhpc.errors import BrainhpcError


def split_groups(group_ids: np.ndarray, labels: np.ndarray, fractions, seed: int) -> np.ndarray:
    """Split index (0 train, 1 val, 2 test) per image: stratified by label, groups kept whole.

    Per label, groups are visited largest first (ties in seeded random order) and each goes to the
    split furthest below its target count, so big groups cannot overshoot a small split.
    A group with mixed labels counts under its majority label.
    """
    rng = np.random.default_rng(seed)
    fractions = np.asarray(fractions, float)
    out = np.full(len(labels), -1, np.int64)
    uniq, inverse = np.unique(group_ids, return_inverse=True)
    members = [[] for _ in uniq]
    for i, g in enumerate(inverse):
        members[g].append(i)
    group_label = np.array([np.bincount(labels[m], minlength=2).argmax() for m in members])
    for label in np.unique(group_label):
        gs = np.flatnonzero(group_label == label)
        gs = gs[rng.permutation(len(gs))]
        gs = gs[np.argsort([-len(members[g]) for g in gs], kind="stable")]
        total = sum(len(members[g]) for g in gs)
        target = fractions * total
        have = np.zeros(3)
        for g in gs:
            k = int(np.argmax((target - have) / np.maximum(target, 1e-9)))
            out[members[g]] = k
            have[k] += len(members[g])
    return out


def split_counts(labels: np.ndarray, split: np.ndarray) -> dict:
    """split -> {label name: images, "total": images}."""
    counts = {}
    for k, name in enumerate(SPLITS):
        sel = labels[split == k]
        counts[name] = {LABEL_NAMES[v]: int((sel == v).sum()) for v in sorted(LABEL_NAMES)}
        counts[name]["total"] = int(len(sel))
    return counts


def check_splits(labels: np.ndarray, split: np.ndarray, what: str) -> None:
    """Every split needs both labels (thresholds are chosen on val and scored on test); with
    few patients or big duplicate groups a label can end up in one split only."""
    counts = split_counts(labels, split)
    empty = [f"{name} has no {lab} image" for name, c in counts.items()
             for lab in LABELS if c[lab] == 0]
    if empty:
        raise BrainhpcError(
            f"{what}: the leakage-aware split leaves {'; '.join(empty)} "
            f"(counts {counts}); duplicate groups and patients are never split, so this dataset "
            "needs more distinct scans per label (or other --split fractions)")
