"""The study's classifiers: BrainCNN (supervised), and two healthy-only anomaly models, the
paper's BrainCVAE and a spatial-latent VAE (``SpatialVAE``) with the same interface.

They take 1 x H x W images in [0, 1] at any size divisible by 8 (CNN, SpatialVAE) or 4
(BrainCVAE), so the same code serves 32, 64 and 128 px. ``vae_loss`` is the VAEs' training
objective (``vae_terms`` its parts as tensors, which a training step returns without waiting
for the GPU); ``error_maps`` gives plain |x - x_hat| maps (the classify cell's residuals,
standardised and limited to the brain, come from ``brainhpc.anomaly.residuals``).

The VAE's ``forward`` returns decoder *logits* (``decode`` applies the sigmoid): the loss is
binary cross-entropy with logits, computed in fp32, which stays exact under bf16 autocast where
a bf16 sigmoid followed by BCE on probabilities saturates (p rounds to 1.0, log(1 - p) = -inf).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from brainhpc.errors import BrainhpcError

RECON_LOSSES = ("bce", "mse")


def _check_size(image_size: int, factor: int, model: str) -> None:
    if not isinstance(image_size, int) or image_size < factor or image_size % factor:
        raise BrainhpcError(
            f"{model}: image_size must be a positive multiple of {factor} (e.g. 32, 64, 128), "
            f"got {image_size!r}"
        )


class BrainCNN(nn.Module):
    """Three conv blocks (3x3 stride 1, 32/64/128 filters, batch norm, ReLU, 2x2 max-pool), then
    fully connected 1024 -> 512 -> 128 with ReLU and dropout, then two logits (healthy, tumour)."""

    def __init__(self, image_size: int = 128, dropout: float = 0.5,
                 filters: Sequence[int] = (32, 64, 128), hidden: Sequence[int] = (1024, 512, 128)):
        super().__init__()
        _check_size(image_size, 8, "BrainCNN")
        if not 0.0 <= dropout < 1.0:
            raise BrainhpcError(f"BrainCNN: dropout must be in [0, 1), got {dropout!r}")
        if len(filters) != 3:
            raise BrainhpcError(f"BrainCNN: filters must name 3 conv widths, got {list(filters)}")
        self.image_size = image_size
        blocks, c_in = [], 1
        for c in filters:
            blocks += [nn.Conv2d(c_in, c, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*blocks)
        n_flat = c_in * (image_size // 8) ** 2
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(n_flat, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            n_flat = h
        layers.append(nn.Linear(n_flat, 2))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N x 1 x H x W in [0, 1] -> N x 2 logits."""
        return self.classifier(self.features(x))


class BrainCVAE(nn.Module):
    """Convolutional VAE: two stride-2 conv layers with ReLU, one linear layer to mean and
    log-variance, reparameterisation, a linear layer (ReLU) back to the feature grid, then two
    stride-2 transposed convs (ReLU between) and a sigmoid (``decode``; ``forward`` returns the
    logits before it)."""

    def __init__(self, image_size: int = 128, latent_dim: int = 128,
                 channels: Sequence[int] = (32, 64)):
        super().__init__()
        _check_size(image_size, 4, "BrainCVAE")
        if latent_dim < 1:
            raise BrainhpcError(f"BrainCVAE: latent_dim must be >= 1, got {latent_dim!r}")
        if len(channels) != 2:
            raise BrainhpcError(
                f"BrainCVAE: channels must name 2 conv widths, got {list(channels)}")
        c1, c2 = channels
        self.image_size, self.latent_dim = image_size, latent_dim
        self.grid = (c2, image_size // 4, image_size // 4)
        n_flat = c2 * (image_size // 4) ** 2
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Flatten(),
        )
        self.to_stats = nn.Linear(n_flat, 2 * latent_dim)  # mean and log-variance, split in two
        self.from_latent = nn.Linear(latent_dim, n_flat)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.from_latent(z)).view(-1, *self.grid)
        return self.decoder(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The reconstruction in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z).float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (reconstruction logits, mu, logvar); samples z in training, z = mu in eval."""
        mu, logvar = self.encode(x)
        if self.training:
            z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            z = mu
        return self.decode_logits(z), mu, logvar

    @torch.no_grad()
    def error_maps(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """|x - x_hat| as N x H x W float in [0, 1]; deterministic (decodes the posterior mean),
        so an image always yields the same map and threshold selection is reproducible."""
        was_training = self.training
        self.eval()
        out = []
        try:
            for i in range(0, len(x), batch_size):
                xb = x[i:i + batch_size]
                x_hat = self.decode(self.encode(xb)[0])
                out.append((xb.float() - x_hat).abs()[:, 0].cpu())
        finally:
            self.train(was_training)
        if not out:
            return torch.zeros(0, self.image_size, self.image_size)
        return torch.cat(out).clamp_(0.0, 1.0)


def vae_loss(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             kl_weight: float = 1.0, recon: str = "bce") -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction + kl_weight * KL, both summed over an image and averaged over the batch.

    ``logits`` are BrainCVAE's decoder outputs (its ``forward``'s first value). ``recon`` is
    "bce" (binary cross-entropy of sigmoid(logits) against x, computed as BCE-with-logits, the
    usual choice for images in [0, 1]) or "mse" (sum of squared errors of sigmoid(logits)).
    Everything is computed in fp32. Returns the loss tensor and its parts as floats for the log
    (reading them waits for the device: a training step uses ``vae_terms``).
    """
    loss, rec, kl = vae_terms(logits, x, mu, logvar, kl_weight, recon)
    parts = {"loss": float(loss.detach()), "recon": float(rec), "kl": float(kl)}
    return loss, parts


def vae_terms(logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
              kl_weight: float = 1.0, recon: str = "bce"
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``vae_loss`` as tensors: (loss, reconstruction detached, KL detached)."""
    if recon not in RECON_LOSSES:
        raise BrainhpcError(
            f"vae_loss: recon must be one of {', '.join(RECON_LOSSES)}, got {recon!r}")
    if kl_weight < 0:
        raise BrainhpcError(f"vae_loss: kl_weight must be >= 0, got {kl_weight!r}")
    n = x.shape[0]
    logits, x, mu, logvar = logits.float(), x.float(), mu.float(), logvar.float()
    if recon == "bce":
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / n
    else:
        rec = F.mse_loss(torch.sigmoid(logits), x, reduction="sum") / n
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / n
    loss = rec + kl_weight * kl
    return loss, rec.detach(), kl.detach()


class SpatialVAE(nn.Module):
    """A VAE with a fully convolutional bottleneck, the detector with capacity beside the
    paper's BrainCVAE (whose one linear bottleneck reconstructs every brain as a blur).

    Encoder: three stride-2 4x4 convs (32, 64, 128 channels; batch norm, LeakyReLU) to a grid of
    size/8 x size/8, then a 1x1 conv to the mean and log-variance of ``latent_channels`` per grid
    cell (a spatial latent: each cell describes its neighbourhood, so anatomy is kept in place).
    Decoder: the mirror (transposed convs, batch norm, ReLU) to one channel of logits. The
    bottleneck (size/8)^2 x ``latent_channels`` (2,048 numbers at 128 px) is small enough that a
    lesion unseen in healthy training slices is not copied through. Same interface as BrainCVAE:
    ``forward`` -> (logits, mu, logvar), ``encode``, ``decode``, ``error_maps``.
    """

    def __init__(self, image_size: int = 128, latent_channels: int = 8,
                 channels: Sequence[int] = (32, 64, 128)):
        super().__init__()
        _check_size(image_size, 8, "SpatialVAE")
        if latent_channels < 1:
            raise BrainhpcError(f"SpatialVAE: latent_channels must be >= 1, got "
                                f"{latent_channels!r}")
        self.image_size, self.latent_dim = image_size, latent_channels
        layers, c_in = [], 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 4, 2, 1, bias=False), nn.BatchNorm2d(c),
                       nn.LeakyReLU(0.2, inplace=True)]
            c_in = c
        self.encoder = nn.Sequential(*layers)
        self.to_stats = nn.Conv2d(c_in, 2 * latent_channels, 1)
        layers = [nn.Conv2d(latent_channels, c_in, 1), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)]
        for c in reversed((1, *channels[:-1])):
            last = c == 1
            layers.append(nn.ConvTranspose2d(c_in, c, 4, 2, 1, bias=last))
            if not last:
                layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.decoder = nn.Sequential(*layers)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.to_stats(self.encoder(x)).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The reconstruction in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z).float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction logits, mu, logvar); z sampled in training, z = mu in eval."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decode_logits(z), mu, logvar

    error_maps = BrainCVAE.error_maps


CLASSIFIERS = ("cnn", "vae")
VAE_ARCHS = ("paper", "spatial")  # BrainCVAE as specified | SpatialVAE


def build_classifier(kind: str, size: int, hparams: dict) -> nn.Module:
    """The network a classify cell trains, from what its model.pt stores (``hparams``)."""
    if kind == "cnn":
        return BrainCNN(size, dropout=float(hparams.get("dropout", 0.5)))
    if hparams.get("vae_arch", "paper") == "spatial":
        return SpatialVAE(size, latent_channels=int(hparams["latent_channels"]))
    return BrainCVAE(size, latent_dim=int(hparams["latent_dim"]))
