"""The reference study's generative VAE, with shapes derived from the image size.

At 128 px it is the paper's network: an encoder of six stride-2 convs (batch norm, LeakyReLU)
from 128 down to 2 x 2 with 32..1024 channels, linear heads for mean and log-variance of a
512-d latent; a decoder from a linear layer to 1024 x 2 x 2 through six transposed convs (batch
norm, ReLU) back to 128 px with a sigmoid output. At S px there are log2(S/2) layers each way.
Loss per image = reconstruction (binary cross-entropy summed over pixels) + ``kl_weight`` x KL.
The decoder returns logits during training (BCE-with-logits is the numerically safe, autocast-
safe form of the same loss); ``decode`` applies the sigmoid. With ``image_channels=2`` the tumour
mask is a second input and output channel in [0, 1], in the same BCE sum as the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from brainhpc.models import (
    check_generator_size,
    check_image_channels,
    check_positive,
    random_hflip,
    to_unit,
)


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

    def __post_init__(self):
        check_generator_size(self.size, "vae")
        check_image_channels(self)
        check_positive(self, "latent", "base", "max_channels", "kl_weight", "lr", "batch_size",
                       "epochs")


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
        n = len(x)
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / n
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / n
        loss = recon + self.cfg.kl_weight * kl
        opt = t.optimizers["vae"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), "recon": recon.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def sample(self, model: VAE, n: int, generator: torch.Generator) -> torch.Tensor:
        device = next(model.parameters()).device
        z = torch.randn(n, model.latent, generator=generator).to(device)
        return model.eval().decode(z).float().clamp(0, 1)
