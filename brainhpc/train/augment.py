"""Batch augmentation shared by the training stages: flips and small shifts, on any device.

One tensor moves together: a segmenter's image and mask are two channels of one batch, so they
get the same flip and the same shift. Everything is drawn and gathered on the batch's device
(a training step never waits for it); on CPU the draws are the ones of the former per-image loop.
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
    d = torch.randint(-m, m + 1, (len(x), 2), device=x.device)  # (dy, dx) per image
    padded = F.pad(x, (m, m, m, m))
    h, w = x.shape[-2:]
    rows = m + d[:, :1] + torch.arange(h, device=x.device)  # B x h
    cols = m + d[:, 1:] + torch.arange(w, device=x.device)  # B x w
    b = torch.arange(len(x), device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # B x h x w x C
    return out.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)
