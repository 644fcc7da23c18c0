"""The reference study's generative VAE, with shapes derived from the image size.

At 128 px it is the paper's network: an encoder of six stride-2 convs (batch norm, LeakyReLU)
from 128 down to 2 x 2 with 32..1024 channels, linear heads for mean and log-variance of a
512-d latent; a decoder from a linear layer to 1024 x 2 x 2 through six transposed convs (batch
norm, ReLU) back to 128 px with a sigmoid output. At S px there are log2(S/2) layers each way.
Loss per image = reconstruction (binary cross-entropy summed over pixels) + ``kl_weight`` x KL.
The decoder returns logits during training (BCE-with-logits is the numerically safe, autocast-
safe form of the same loss); ``decode`` applies the sigmoid. With ``image_channels=2`` the tumour
mask is a second input and output channel in [0, 1], in the same BCE sum as the image.

Options for sharper samples (issue 22: the study's VAE drew featureless ovals):
* ``recon="l1ssim"``: reconstruction = sum over pixels of |x - x_hat| + P x (1 - SSIM(x, x_hat))
  with P = C x H x W pixels (SSIM: ``brainhpc.models.ssim``, MONAI's numbers: 11 px Gaussian
  window, sigma 1.5, the mean over the image, both channels), i.e. both terms as per-pixel sums
  like the BCE they replace, so the KL term (a sum over latent dimensions) keeps the same
  relative scale and ``kl_weight`` the same meaning. Per pixel the L1 gradient has magnitude 1
  however small the error (BCE's shrinks with it), and SSIM rewards local structure (edges,
  texture) over mean intensity: the decoder is pushed off the blurred average.
* ``kl_warmup``: the KL weight grows linearly from 0 at the first step to ``kl_weight`` at step
  ``kl_warmup`` (0: constant), so the encoder learns to use its latent before the prior pulls
  it in (against posterior collapse, the usual cause of identical blurred samples).
* Recommended for sharper samples (not measured on real data yet): ``recon="l1ssim"``,
  ``kl_weight`` 0.5-1 and ``kl_warmup`` about a third of the run's steps. ``recon="bce"`` with
  ``kl_weight=1`` and no warm-up stays the default: the reference study's VAE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from brainhpc.errors import BrainhpcError
from brainhpc.models import (
    check_generator_size,
    check_image_channels,
    check_positive,
    random_hflip,
    to_unit,
)
from brainhpc.models.ssim import ssim

RECONS = ("bce", "l1ssim")


@dataclass
class Config:
    size: int = 128
    image_channels: int = 1  # 2: image + tumour mask (set by generate --with-masks)
    latent: int = 512
    base: int = 32  # channels of the first conv, doubled per layer up to max_channels
    max_channels: int = 1024
    kl_weight: float = 1.0
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 100
    hflip: bool = True
    recon: str = "bce"  # RECONS: bce (the reference study's) | l1ssim (L1 + 1 - SSIM)
    kl_warmup: int = 0  # steps over which the KL weight grows from 0 to kl_weight; 0: none

    def __post_init__(self):
        check_generator_size(self.size, "vae")
        check_image_channels(self)
        check_positive(self, "latent", "base", "max_channels", "kl_weight", "lr", "batch_size",
                       "epochs")
        if self.recon not in RECONS:
            raise BrainhpcError(f"vae: option recon {self.recon!r} is not one of "
                                f"{', '.join(RECONS)}")
        if (not isinstance(self.kl_warmup, int) or isinstance(self.kl_warmup, bool)
                or self.kl_warmup < 0):
            raise BrainhpcError(f"vae: option kl_warmup must be an integer >= 0 (steps; 0: no "
                                f"warm-up), got {self.kl_warmup!r}")


def channels(cfg: Config) -> list[int]:
    n = int(math.log2(cfg.size // 2))
    return [min(cfg.base * 2**i, cfg.max_channels) for i in range(n)]


class VAE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        ch = channels(cfg)
        layers, c_in = [], cfg.image_channels
        for c in ch:
            layers += [nn.Conv2d(c_in, c, 4, 2, 1, bias=False), nn.BatchNorm2d(c),
                       nn.LeakyReLU(0.2, inplace=True)]
            c_in = c
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.top = ch[-1]
        self.mu = nn.Linear(self.top * 4, cfg.latent)
        self.logvar = nn.Linear(self.top * 4, cfg.latent)
        self.fc = nn.Linear(cfg.latent, self.top * 4)
        layers = [nn.BatchNorm2d(self.top), nn.ReLU(inplace=True)]
        for i in reversed(range(len(ch))):
            c_out = ch[i - 1] if i > 0 else cfg.image_channels
            layers.append(nn.ConvTranspose2d(ch[i], c_out, 4, 2, 1, bias=i == 0))
            if i > 0:
                layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.decoder = nn.Sequential(*layers)
        self.latent = cfg.latent

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mu(h), self.logvar(h).clamp(-30.0, 20.0)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.fc(z).view(len(z), self.top, 2, 2))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor):
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.decode_logits(z), mu, logvar


def kl_factor(step: int, warmup: int) -> float:
    """The share of ``kl_weight`` at 0-based ``step``: step / warmup up to 1 (1 without one)."""
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


def reconstruction(kind: str, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The reconstruction term per image (a per-pixel sum, batch-averaged), in fp32."""
    n = len(x)
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / n
    x_hat = torch.sigmoid(logits)
    pixels = x[0].numel()
    return ((x_hat - x).abs().sum() + pixels * (1.0 - ssim(x_hat, x)).sum()) / n


class Task:
    arch = "vae"
    sample_model = "vae"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.ema_decay: dict[str, float] = {}

    def models(self):
        return {"vae": VAE(self.cfg)}

    def optimizers(self, models):
        return {"vae": torch.optim.Adam(models["vae"].parameters(), lr=self.cfg.lr)}

    def training_step(self, t, batch):
        x = to_unit(batch[0])
        if self.cfg.hflip:
            x = random_hflip(x)
        with t.autocast():
            logits, mu, logvar = t.models["vae"](x)
        logits, mu, logvar = logits.float(), mu.float(), logvar.float()
        recon = reconstruction(self.cfg.recon, logits, x)
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / len(x)
        beta = self.cfg.kl_weight * kl_factor(t.step, self.cfg.kl_warmup)
        loss = recon + beta * kl
        opt = t.optimizers["vae"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach(),
                **({"kl_weight": beta} if self.cfg.kl_warmup else {})}

    @torch.no_grad()
    def sample(self, model: VAE, n: int, generator: torch.Generator) -> torch.Tensor:
        device = next(model.parameters()).device
        z = torch.randn(n, model.latent, generator=generator).to(device)
        return model.eval().decode(z).float().clamp(0, 1)
