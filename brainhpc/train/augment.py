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


def intensity_batch(x: torch.Tensor, gamma: float = 0.4, contrast: float = 0.25,
                    sharpen: tuple[float, float] = (-0.5, 1.5), noise: float = 0.03
                    ) -> torch.Tensor:
    """Per-image random appearance of images in [0, 1] (B x C x H x W, every channel an image,
    so pass the image channels only, never a mask): gamma exp(U(-gamma, gamma)), contrast about
    the image mean by exp(U(-contrast, contrast)), an unsharp mask of random amount in
    ``sharpen`` (negative blurs), Gaussian noise of sd U(0, noise); black background stays black.

    Why: a segmenter trained on synthetic images (smoother and more uniform than real ones: on
    LGG the LDM's slices have 3/4 of real's pixel gradient and half its spread of brain
    intensity) otherwise learns their look and not the lesion; this widens the look it sees."""
    b, dev = len(x), x.device
    u = lambda lo, hi: torch.empty(b, 1, 1, 1, device=dev).uniform_(lo, hi)  # noqa: E731
    inside = x > 0
    x = x.clamp_min(0).pow(u(-gamma, gamma).exp())
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(-contrast, contrast).exp() + mean
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], device=dev) / 16.0
    k2 = (kernel[:, None] * kernel[None, :]).expand(x.shape[1], 1, 5, 5)
    blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k2, groups=x.shape[1])
    x = x + u(*sharpen) * (x - blurred)
    x = x + u(0.0, noise) * torch.randn_like(x)
    return torch.where(inside, x.clamp(0.0, 1.0), torch.zeros_like(x))
