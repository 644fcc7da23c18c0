"""Precision, recall, density and coverage of a synthetic feature set (Naeem et al. 2020).

FID and KID fold fidelity and diversity into one number; these four split them. Every real
sample gets a ball whose radius is the distance to its k-th nearest real neighbour (k = 5):

* precision: share of synthetic samples inside at least one real ball (fidelity);
* recall: share of real samples inside at least one *synthetic* ball (radii from the synthetic
  set's own k-NN distances; diversity);
* density: how many real balls hold a synthetic sample, averaged and divided by k (about 1 for
  samples from the real distribution, above 1 when samples crowd dense real regions);
* coverage: share of real balls that hold at least one synthetic sample (diversity, robust to
  outliers among the synthetic samples).

"Inside" is strictly closer than the radius, as in the authors' reference code, so two identical
sets give precision = recall = coverage = density = 1.
"""

from __future__ import annotations

import numpy as np
import torch

from brainhpc.errors import BrainhpcError

K = 5


def _dist(a: np.ndarray, b: np.ndarray) -> torch.Tensor:
    return torch.cdist(torch.as_tensor(a, dtype=torch.float64),
                       torch.as_tensor(b, dtype=torch.float64))


def _radii(x: np.ndarray, k: int) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row (the row itself excluded)."""
    return _dist(x, x).kthvalue(k + 1, dim=1).values  # +1: the zero distance to itself


def prdc(real: np.ndarray, fake: np.ndarray, k: int = K) -> dict:
    """The four numbers for feature rows ``real`` (reference) and ``fake`` (to judge); ``k``
    shrinks to the smaller set's size - 1 when a set is too small for it."""
    k = min(k, len(real) - 1, len(fake) - 1)
    if k < 1:
        raise BrainhpcError(f"precision/recall need at least 2 samples per set, got {len(real)} "
                            f"real and {len(fake)} synthetic")
    r_real, r_fake = _radii(real, k), _radii(fake, k)
    d = _dist(real, fake)  # real x fake
    inside = d < r_real[:, None]  # fake j inside the ball of real i
    return {
        "precision": float(inside.any(0).double().mean()),
        "recall": float((d < r_fake[None, :]).any(1).double().mean()),
        "density": float(inside.double().sum() / (k * len(fake))),
        "coverage": float((d.min(1).values < r_real).double().mean()),
        "k": int(k),
    }
