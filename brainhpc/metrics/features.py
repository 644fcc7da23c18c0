"""A feature space nobody trained: a fixed, seeded, random convolutional network.

The trained ``realism.FeatureNet`` learns what separates the train split's labels and what
rebuilds its images, so its distances are partly about *that* split. A random network has no such
bias (random convolutional features are a reasonable, if blunt, perceptual space: Naeem et al.
2020 use them to show their metrics do not hinge on ImageNet). Here: three blocks of 3x3
convolution (He-normal weights, small random biases, so brightness is not divided out), ReLU and
2x2 average pooling, widths w, 2w, 4w. Every block is average-pooled to a 4 x 4 grid and scaled
by 1/sqrt(its size), so fine texture (block 1) and layout (block 3) weigh alike; the blocks are
concatenated. No batch norm: the features of an image never depend on the other images.

The network is rebuilt from its seed on the CPU every time (it is a few thousand numbers), then
moved to the scoring device.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

RANDOM_SEED = 0
RANDOM_WIDTH = 16
GRID = 4


class RandomFeatures(nn.Module):
    def __init__(self, width: int = RANDOM_WIDTH, seed: int = RANDOM_SEED):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            blocks, c_in = [], 1
            for c in (width, 2 * width, 4 * width):
                conv = nn.Conv2d(c_in, c, 3, 1, 1)
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.uniform_(conv.bias, -0.1, 0.1)
                blocks.append(nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(2)))
                c_in = c
        self.blocks = nn.ModuleList(blocks)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        for block in self.blocks:
            x = block(x)
            pooled = nn.functional.adaptive_avg_pool2d(x, GRID).flatten(1)
            out.append(pooled / pooled.shape[1] ** 0.5)
        return torch.cat(out, 1)


@torch.no_grad()
def random_features(images: np.ndarray, device: str | torch.device = "cpu",
                    batch: int = 256) -> np.ndarray:
    """(N, 7 * 16 * width) float64 random-network features of uint8 images (N, 1, H, W)."""
    net = RandomFeatures().to(device).eval()
    x = torch.as_tensor(np.asarray(images))
    out = [net(x[lo:lo + batch].to(device).float().div_(255)).double().cpu()
           for lo in range(0, len(x), batch)]
    return torch.cat(out).numpy() if out else np.zeros((0, 7 * GRID * GRID * RANDOM_WIDTH))
