"""SSIM as a loss, forward + backward: ``brainhpc.models.ssim`` (two products with a banded
Gaussian matrix) against MONAI's ``compute_ssim_and_cs`` (a depthwise 11 x 11 convolution), side
by side in one run, at the shapes the generators train on (batch 64; 1 channel, and 2 for
image + mask pairs; 64 and 128 px). One thread unless ``--threads``. Prints ms per call, the
ratio, and the largest difference of the SSIM values (the two must agree to ~1e-5).

    .venv/bin/python benchmarks/bench_ssim.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from monai.metrics.regression import compute_ssim_and_cs

from brainhpc.models.ssim import ssim_map


def monai_map(a, b):
    return compute_ssim_and_cs(a, b, spatial_dims=2, kernel_size=(11, 11),
                               kernel_sigma=(1.5, 1.5), data_range=1.0)[0]


def timed(fn, a: torch.Tensor, b: torch.Tensor, repeats: int) -> float:
    """Median ms of fn(a, b).mean() forward and backward."""
    times = []
    for k in range(repeats + 1):
        x = a.clone().requires_grad_(True)
        t = time.perf_counter()
        fn(x, b).mean().backward()
        if k:  # the first call builds kernels
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, load {os.getloadavg()[0]:.2f}")
    print(f"{'shape':>18} {'monai ms':>9} {'ours ms':>8} {'ratio':>6} {'max diff':>9}")
    g = torch.Generator().manual_seed(0)
    for channels, size in ((1, 64), (2, 64), (1, 128)):
        b = torch.rand(64, channels, size, size, generator=g)
        a = (b + 0.1 * torch.randn(b.shape, generator=g)).clamp(0, 1)
        ms_monai = timed(monai_map, a, b, args.repeats)
        ms_ours = timed(ssim_map, a, b, args.repeats)
        diff = (monai_map(a, b) - ssim_map(a, b)).abs().max().item()
        print(f"{str((64, channels, size, size)):>18} {ms_monai:9.1f} {ms_ours:8.1f} "
              f"{ms_monai / ms_ours:6.1f} {diff:9.1e}")


if __name__ == "__main__":
    main()
