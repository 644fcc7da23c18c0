"""Radially averaged power spectra: the realism check that sees frequencies, not features.

Up-sampling artefacts (transposed-convolution checkerboards) put a peak at high spatial
frequencies; over-smooth generators (VAEs, early diffusion) miss them. Neither needs a feature
network to show up: the 2-D power spectrum, averaged over images and over rings of equal integer
radius, and compared on a log scale, catches both.

Every image is scaled to [0, 1] and its mean subtracted (the DC term would swamp the rest), the
power is averaged over the set, then over rings, then put on log10. The distance between two
sets is the mean absolute difference of their log-spectra over all rings up to the corner
(the Nyquist corner is where a stride-2 checkerboard lives), i.e. the typical factor, in
decades, by which one set's power differs from the other's.
"""

from __future__ import annotations

import numpy as np

from brainhpc.errors import BrainhpcError

EPS = 1e-12  # power floor before the log (an all-constant set has zero power everywhere)


def _rings(h: int, w: int) -> np.ndarray:
    fy = np.fft.fftshift(np.fft.fftfreq(h)) * h
    fx = np.fft.fftshift(np.fft.fftfreq(w)) * w
    return np.rint(np.hypot(*np.meshgrid(fy, fx, indexing="ij"))).astype(np.int64)


def radial_spectrum(images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """log10 of the set's mean power per integer frequency radius (index = radius)."""
    x = np.asarray(images)
    if x.ndim == 4:
        x = x[:, 0]
    if x.ndim != 3 or len(x) == 0:
        raise BrainhpcError(f"spectrum: need N x [1 x] H x W images, got shape {x.shape}")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    power = np.zeros(x.shape[1:])
    for lo in range(0, len(x), chunk):
        b = x[lo:lo + chunk].astype(np.float64) / scale
        b -= b.mean(axis=(1, 2), keepdims=True)
        power += (np.abs(np.fft.fftshift(np.fft.fft2(b), axes=(1, 2))) ** 2).sum(0)
    rings = _rings(*power.shape).ravel()
    per_ring = np.bincount(rings, power.ravel()) / np.bincount(rings)
    return np.log10(per_ring / len(x) + EPS)


def spectral_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean |log10 power difference| over radii 1.. (the DC ring is zero after centring)."""
    if np.shape(a)[-2:] != np.shape(b)[-2:]:
        raise BrainhpcError(f"spectrum: image sizes differ ({np.shape(a)[-2:]} vs "
                            f"{np.shape(b)[-2:]})")
    sa, sb = radial_spectrum(a), radial_spectrum(b)
    return float(np.abs(sa[1:] - sb[1:]).mean())
