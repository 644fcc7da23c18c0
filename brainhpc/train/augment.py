"""Batch augmentation shared by the training stages: flips and small shifts, on any device.

One tensor moves together: a segmenter's image and mask are two channels of one batch, so they
get the same flip and the same shift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment_batch(x: torch.Tensor, shift: bool) -> torch.Tensor:
    """Random left-right flips of half the batch, and (``shift``) integer shifts of up to
    size/16 pixels per image, zero fill (brain slices sit on black)."""
    flip = torch.rand(len(x), device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    m = x.shape[-1] // 16
    if not shift or m < 1:
        return x
    d = torch.randint(-m, m + 1, (len(x), 2)).tolist()
    padded = F.pad(x, (m, m, m, m))
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, m + dy:m + dy + h, m + dx:m + dx + w]
                        for i, (dy, dx) in enumerate(d)])
