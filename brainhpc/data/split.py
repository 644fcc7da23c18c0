"""Train/val/test splits that never cut a group (duplicates, one patient's slices) in two.

``split_groups`` is stratified by label and fixed by the seed; it sees only group ids and labels,
so it does not depend on the image size. ``fold_split`` is grouped K-fold cross-validation: the
groups are dealt into K folds by the same rule, fold i is the test part, and validation is taken
from the other folds' groups, again by the same rule: K disjoint test parts that cover every
group once.
"""

from __future__ import annotations

import numpy as np

from brainhpc.data.shards import LABEL_NAMES, LABELS, SPLITS
from brainhpc.errors import BrainhpcError


def split_groups(group_ids: np.ndarray, labels: np.ndarray, fractions, seed: int) -> np.ndarray:
    """Part index per image (with three fractions: 0 train, 1 val, 2 test): stratified by
    label, groups kept whole.

    Per label, groups are visited largest first (ties in seeded random order) and each goes to the
    split furthest below its target count, so big groups cannot overshoot a small split.
    A group with mixed labels counts under its majority label.
    """
    rng = np.random.default_rng(seed)
    fractions = np.asarray(fractions, float)
    parts = len(fractions)
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
        have = np.zeros(parts)
        for g in gs:
            k = int(np.argmax((target - have) / np.maximum(target, 1e-9)))
            out[members[g]] = k
            have[k] += len(members[g])
    return out


def fold_split(group_ids: np.ndarray, labels: np.ndarray, folds: int, fold: int,
               fractions, seed: int) -> np.ndarray:
    """Split index per image (0 train, 1 val, 2 test) for fold ``fold`` of ``folds``: the test
    part is that fold's groups; val and train share the other folds' groups in the ratio of
    ``fractions``' first two entries (the third, test, is 1/folds here)."""
    if not 0 <= fold < folds:
        raise BrainhpcError(f"fold {fold} is not one of 0..{folds - 1} (--folds {folds})")
    dealt = split_groups(group_ids, labels, [1.0 / folds] * folds, seed)
    out = np.full(len(labels), 2, np.int64)
    rest = np.flatnonzero(dealt != fold)
    train, val = float(fractions[0]), float(fractions[1])
    out[rest] = split_groups(np.asarray(group_ids)[rest], np.asarray(labels)[rest],
                             [train / (train + val), val / (train + val)], seed)
    return out


def group_names(group_ids: np.ndarray, sources: list[str]) -> list[str]:
    """A name per image for its group: the group's first source in sorted order, so the same
    group has the same name in every fold and at every size."""
    first: dict = {}
    for g, s in zip(np.asarray(group_ids).tolist(), sources, strict=True):
        if g not in first or s < first[g]:
            first[g] = s
    return [first[g] for g in np.asarray(group_ids).tolist()]


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
