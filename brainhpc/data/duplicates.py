"""Exact and near-duplicate images: which images are copies of one another, by two detectors.

Every image is fingerprinted by its 32 x 32 thumbnail (``brainhpc.data.preprocess.thumbnail``:
the padded brain crop before the resize, so the result does not depend on ``--size``). Two
independent near-duplicate detectors read it, each over the 8 flips and quarter-turns of the
query image (Br35H holds many flipped and rotated copies of one scan):

* ``phash``: 64-bit DCT perceptual hash (sign of the 8 x 8 lowest frequencies against their
  median); near when the Hamming distance is at most ``max_bits``;
* ``corr``: Pearson correlation of high-pass thumbnails (thumbnail minus its Gaussian blur,
  sigma 2 px): internal anatomy, not the head's outline, which every axial slice shares; near
  when the correlation is at least ``min_corr``.

Calibration on the shared data (Br35H, whose ``y0``-``y700`` mostly have a resized, shifted,
flipped or rotated twin among ``y701``-``y1499``, and the 5,708 brain-tumor-mri slices): a pair
is near when corr >= 0.88, or when phash <= 6 bits *and* corr >= 0.7 (a hash match alone joins
a few dozen tumour/healthy pairs of brain-tumor-mri, i.e. different patients; confirmed by the
correlation, none). At these thresholds about 98% of the Br35H twins are found and no pair on
either dataset joins a tumour and a healthy scan; at corr >= 0.84 such cross-label pairs appear.
Images joined by a near pair, by identical bytes or by a shared patient id form one group, and
a group never straddles two splits. ``audit`` counts the pairs at looser thresholds (phash <= 8
bits or corr >= 0.80, either detector alone) that still cross splits, with how many of those
join different labels, so a reader can judge what the grouping may have missed.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from brainhpc.data.preprocess import THUMB, phash

NEAR_DUP_BITS = 6  # phash distance that counts when the correlation confirms it
CONFIRM_CORR = 0.7
NEAR_DUP_CORR = 0.88  # correlation that counts on its own
AUDIT_BITS = 8  # looser thresholds, reported (not grouped) in the manifest
AUDIT_CORR = 0.80
HIGH_PASS_SIGMA = 2.0  # pixels of the 32 x 32 thumbnail
BLOCK = 512  # query rows per block (bounds memory: BLOCK x N per orientation)


def orientations(thumbs: np.ndarray) -> list[np.ndarray]:
    """The 8 flips and quarter-turns of N x T x T thumbnails (identity first)."""
    out = []
    for k in range(4):
        r = np.rot90(thumbs, k, axes=(1, 2))
        out += [r, r[:, :, ::-1]]
    return [np.ascontiguousarray(o) for o in out]


def phashes(thumbs: np.ndarray) -> np.ndarray:
    """64-bit perceptual hash of each thumbnail (N uint64; ``preprocess.phash``)."""
    return np.array([phash(t) for t in thumbs], np.uint64)


def descriptors(thumbs: np.ndarray) -> np.ndarray:
    """Zero-mean, unit-norm high-pass thumbnails (N x 1024 float32) to correlate."""
    out = np.empty((len(thumbs), THUMB * THUMB), np.float32)
    for i, t in enumerate(thumbs):
        f = t.astype(np.float32)
        out[i] = (f - cv2.GaussianBlur(f, (0, 0), HIGH_PASS_SIGMA)).ravel()
    out -= out.mean(axis=1, keepdims=True)
    out /= np.linalg.norm(out, axis=1, keepdims=True) + 1e-6
    return out


@dataclass
class Pairs:
    """Near pairs (query index i, base index j) with both detectors' values."""

    i: np.ndarray
    j: np.ndarray
    bits: np.ndarray  # smallest Hamming distance over the 8 orientations
    corr: np.ndarray  # largest correlation over the 8 orientations

    def select(self, keep: np.ndarray) -> Pairs:
        return Pairs(self.i[keep], self.j[keep], self.bits[keep], self.corr[keep])

    def near(self, max_bits: int = NEAR_DUP_BITS, min_corr: float = NEAR_DUP_CORR,
             confirm: float = CONFIRM_CORR) -> np.ndarray:
        """The grouping rule: corr >= min_corr, or bits <= max_bits confirmed by corr."""
        return (self.corr >= min_corr) | ((self.bits <= max_bits) & (self.corr >= confirm))

    def loose(self, max_bits: int = AUDIT_BITS, min_corr: float = AUDIT_CORR) -> np.ndarray:
        """Either detector alone at the audit thresholds."""
        return (self.bits <= max_bits) | (self.corr >= min_corr)

    def __len__(self) -> int:
        return len(self.i)


def near_pairs(query: np.ndarray, base: np.ndarray | None = None,
               max_bits: int = AUDIT_BITS, min_corr: float = AUDIT_CORR) -> Pairs:
    """Pairs of thumbnails that either detector calls near at the given (loose) thresholds.

    ``base=None`` compares ``query`` with itself (pairs i < j, each pair tried in both
    directions: see below); otherwise every query image against every base image.
    """
    same = base is None
    base = query if same else base
    hq = [phashes(o) for o in orientations(query)]
    dq = [descriptors(o) for o in orientations(query)]
    hb, db = (hq[0], dq[0]) if same else (phashes(base), descriptors(base))
    # the DCT hash does not turn with the image: d(T(a), b) != d(a, T^-1(b)) in general, so
    # both directions count (the correlation is exact under flips and quarter turns)
    hb_turned = hq if same else [phashes(o) for o in orientations(base)]
    hq0 = hq[0]
    parts: list[tuple] = []
    for lo in range(0, len(query), BLOCK):
        hi = min(len(query), lo + BLOCK)
        b0 = lo if same else 0  # with itself: only j >= lo can pair with i in [lo, hi)
        bits = np.full((hi - lo, len(base) - b0), 64, np.int64)
        corr = np.full((hi - lo, len(base) - b0), -1.0, np.float32)
        for h, d, hbt in zip(hq, dq, hb_turned, strict=True):
            np.minimum(bits, np.bitwise_count(h[lo:hi, None] ^ hb[None, b0:]), out=bits)
            np.minimum(bits, np.bitwise_count(hq0[lo:hi, None] ^ hbt[None, b0:]), out=bits)
            np.maximum(corr, d[lo:hi] @ db[b0:].T, out=corr)
        hit = (bits <= max_bits) | (corr >= min_corr)
        if same:
            hit &= np.arange(lo, hi)[:, None] < np.arange(b0, len(base))[None, :]
        ii, jj = np.nonzero(hit)
        parts.append((ii + lo, jj + b0, bits[ii, jj], corr[ii, jj]))
    if not parts:
        empty = np.zeros(0, np.int64)
        return Pairs(empty, empty, empty, np.zeros(0, np.float32))
    i, j, b, c = (np.concatenate(x) for x in zip(*parts, strict=True))
    return Pairs(i, j, b, c)


class _Groups:
    """Union-find over image indices."""

    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def ids(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], np.int64)


def duplicate_groups(sha: list[str], thumbs: np.ndarray, labels: np.ndarray,
                     patients: list[str] | None = None, max_bits: int = NEAR_DUP_BITS,
                     min_corr: float = NEAR_DUP_CORR) -> tuple[np.ndarray, dict, Pairs]:
    """Group id per image (identical bytes, near-duplicates and shared patients joined), the
    counts for the manifest, and the loose (audit-threshold) pairs for ``audit``.

    With patient ids, a near pair of two *different* patients is counted but joins nothing:
    the patient is the unit of the split, and two patients' near-identical slices (the top of
    the skull, say) are similar anatomy, not one image filed twice.
    """
    n = len(sha)
    copies = _Groups(n)
    exact: dict[str, list[int]] = {}
    for i, digest in enumerate(sha):
        exact.setdefault(digest, []).append(i)
    exact_groups = [m for m in exact.values() if len(m) > 1]
    for m in exact_groups:
        for k in m[1:]:
            copies.union(m[0], k)
    pairs = near_pairs(thumbs, max_bits=max(max_bits, AUDIT_BITS),
                       min_corr=min(min_corr, AUDIT_CORR))
    near = pairs.near(max_bits, min_corr)
    other_patient = np.zeros(len(pairs), bool)
    if patients is not None:
        pid = np.array(patients, dtype=object)
        other_patient = pid[pairs.i] != pid[pairs.j]
    for i, j in zip(pairs.i[near & ~other_patient].tolist(),
                    pairs.j[near & ~other_patient].tolist(), strict=True):
        copies.union(i, j)
    copy_ids = copies.ids()
    conflicts = sum(len(set(labels[copy_ids == g].tolist())) > 1
                    for g in np.unique(copy_ids) if (copy_ids == g).sum() > 1)
    groups = copies  # from here on the same union-find also joins each patient's slices
    if patients is not None:
        first: dict[str, int] = {}
        for i, p in enumerate(patients):
            groups.union(first.setdefault(p, i), i)
    ids = groups.ids()
    _, inverse, sizes = np.unique(ids, return_inverse=True, return_counts=True)
    member_sizes = sizes[inverse]
    by_hash = pairs.bits <= max_bits
    by_corr = pairs.corr >= min_corr
    stats = {
        "near_dup_rule": f"corr >= {min_corr} or (phash <= {max_bits} bits and corr >= "
                         f"{CONFIRM_CORR}), over 8 flips/rotations",
        "exact_groups": len(exact_groups),
        "exact_files": int(sum(len(m) for m in exact_groups)),
        "near_pairs": int(near.sum()),
        "near_pairs_phash": int(by_hash.sum()),  # what each detector alone would call near
        "near_pairs_corr": int(by_corr.sum()),
        "near_pairs_corr_only": int((by_corr & ~by_hash).sum()),
        "near_pairs_phash_only": int((by_hash & ~by_corr).sum()),
        "near_pairs_other_patient": int((near & other_patient).sum()),  # counted, not joined
        "label_conflicts": int(conflicts),  # copy groups holding both labels
        "groups": int((sizes > 1).sum()),  # duplicate groups and multi-image patients
        "grouped_files": int((member_sizes > 1).sum()),
        "largest_group": int(sizes.max()) if n else 0,
        "distinct_groups": int(len(sizes)),
    }
    return ids, stats, pairs


def audit(pairs: Pairs, split: np.ndarray, labels: np.ndarray,
          patients: list[str] | None = None, max_bits: int = AUDIT_BITS,
          min_corr: float = AUDIT_CORR, rule_bits: int = NEAR_DUP_BITS,
          rule_corr: float = NEAR_DUP_CORR) -> dict:
    """Pairs that cross splits: at the grouping rule (0 unless grouping failed, or pairs of two
    different patients) and at the looser audit thresholds; cross-label pairs estimate how
    many of the loose ones are different scans."""
    cross = split[pairs.i] != split[pairs.j]
    diff_label = labels[pairs.i] != labels[pairs.j]
    loose = pairs.loose(max_bits, min_corr)
    strict = pairs.near(rule_bits, rule_corr)
    out = {
        "cross_split_near_pairs": int((cross & strict).sum()),
        "audit_threshold_bits": max_bits,
        "audit_threshold_corr": min_corr,
        "cross_split_audit_pairs": int((cross & loose).sum()),
        "cross_split_audit_pairs_cross_label": int((cross & loose & diff_label).sum()),
    }
    if patients is not None:
        pid = np.array(patients, dtype=object)
        out["cross_split_near_pairs_other_patient"] = int(
            (cross & strict & (pid[pairs.i] != pid[pairs.j])).sum())
    return out


def copies_of(query_sha: list[str], query_thumbs: np.ndarray, base_sha: list[str],
              base_thumbs: np.ndarray, max_bits: int = NEAR_DUP_BITS,
              min_corr: float = NEAR_DUP_CORR) -> tuple[np.ndarray, np.ndarray]:
    """Which query images are byte-identical to (exact) or near-duplicates of (near) any base
    image: two boolean arrays over the query (external evaluation drops both)."""
    known = set(base_sha)
    exact = np.array([s in known for s in query_sha], bool)
    near = np.zeros(len(query_sha), bool)
    if len(query_thumbs) and len(base_thumbs):
        pairs = near_pairs(query_thumbs, base_thumbs, max_bits, min_corr)
        near[pairs.i[pairs.near(max_bits, min_corr)]] = True  # the grouping rule, confirmed
    return exact, near & ~exact
