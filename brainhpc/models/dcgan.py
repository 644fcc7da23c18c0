"""DCGAN, plus the pieces the GAN family shares (generator, discriminator, DiffAugment).

Generator: latent 100 -> linear to ``g_channels`` x 8 x 8 (128 x 8 x 8 by default) -> log2(S/8)
transposed convs (x2 each, batch norm, ReLU; channels halve down to ``min_channels``) -> 3x3 conv
to ``image_channels`` (1, or 2 with the tumour mask) -> **tanh**: images live in [-1, 1] during
training (data is scaled to match) and are mapped back to [0, 1] by ``sample``. Discriminator:
four stride-2 convs with LeakyReLU(0.2) (``d_channels`` doubling per layer, no normalisation),
then a linear layer to one logit; it sees image and mask together, so it judges the pair.

Small-data aids (the issue's ~1,500 images per label):
* ``diffaugment`` (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN
  Training"): random translation (1/8 of the size) and cutout (half the size) applied to *both*
  real and generated images before every discriminator call, in the D and in the G step, so the
  discriminator cannot memorise the few real images while gradients still reach the generator;
  one shift and one cutout per sample, applied to all its channels (image and mask move together);
* ``ema``: an exponential moving average of generator weights, used for sampling;
* ``hflip``: left-right mirroring of real images.

Stability aids (issue 22: slim DCGANs drew texture, not anatomy, within a CPU study's steps):
* ``spectral_norm`` (Miyato et al. 2018): every discriminator conv and its linear layer are
  divided by their largest singular value (one power iteration per forward,
  ``torch.nn.utils.parametrizations.spectral_norm``), so the discriminator is 1-Lipschitz per
  layer and cannot out-run the generator with exploding logits. On by default here; WGAN-GP
  keeps its gradient penalty instead (see there). Its state-dict keys are the parametrized
  ones (``...parametrizations.weight.original``, ``..._u``, ``..._v``): a checkpoint resumes
  under the same setting only, which the run's fingerprint (the model config) enforces;
* ``lr_schedule``: "constant", or "cosine" / "linear" decay from ``lr`` at the first step to
  ``LR_FLOOR`` x ``lr`` at the run's last (``Trainer.total_steps``), for both optimisers. It
  is a pure function of the step, set at the start of each step, so a resumed run continues
  the same curve with no scheduler state (a run resumed with more epochs stretches the curve).

Real and fake go through the discriminator in one concatenated forward (one DDP all-reduce per
step). The generator runs once per step: its output (detached) feeds the discriminator update,
and the same output (with its graph) the generator update, against the bare, just-updated
discriminator with its gradients switched off.
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
    to_signed,
)

AUGMENTS = ("translation", "cutout")
LR_SCHEDULES = ("constant", "cosine", "linear")
LR_FLOOR = 0.1  # the fraction of lr that the decaying schedules end at


@dataclass
class Config:
    size: int = 128
    image_channels: int = 1  # 2: image + tumour mask (set by generate --with-masks)
    latent: int = 100
    g_channels: int = 128  # channels at 8 x 8
    min_channels: int = 32  # generator channels stop halving here
    d_channels: int = 64  # first discriminator conv; doubled per layer
    lr: float = 2e-4
    beta1: float = 0.5
    batch_size: int = 64
    epochs: int = 200
    diffaugment: str = "translation,cutout"  # comma list from AUGMENTS; "" turns it off
    ema: float = 0.999  # generator EMA decay; 0 turns it off
    hflip: bool = True
    spectral_norm: bool = True  # on the discriminator's convs and linear layer
    lr_schedule: str = "constant"  # LR_SCHEDULES: constant | cosine | linear (to LR_FLOOR x lr)

    def __post_init__(self):
        check_generator_size(self.size, type(self).__module__.rsplit(".", 1)[-1])
        check_image_channels(self)
        check_positive(self, "latent", "g_channels", "min_channels", "d_channels", "lr",
                       "batch_size", "epochs")
        bad = [a for a in self.augments if a not in AUGMENTS]
        if bad:
            raise BrainhpcError(f"option diffaugment: unknown augmentation(s) {', '.join(bad)}; "
                                f"valid: {', '.join(AUGMENTS)} (comma-separated, or empty)")
        if not 0 <= self.ema < 1:
            raise BrainhpcError(f"option ema must be in [0, 1), got {self.ema}")
        if not isinstance(self.spectral_norm, bool):
            raise BrainhpcError(f"option spectral_norm must be true or false, got "
                                f"{self.spectral_norm!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise BrainhpcError(f"option lr_schedule {self.lr_schedule!r} is not one of "
                                f"{', '.join(LR_SCHEDULES)}")

    @property
    def augments(self) -> list[str]:
        return [a.strip() for a in self.diffaugment.split(",") if a.strip()]


class Generator(nn.Module):
    def __init__(self, size: int, latent: int, g_channels: int, min_channels: int,
                 image_channels: int = 1):
        super().__init__()
        self.latent, self.c0 = latent, g_channels
        self.fc = nn.Linear(latent, g_channels * 64, bias=False)
        layers, c = [nn.BatchNorm2d(g_channels), nn.ReLU(inplace=True)], g_channels
        for _ in range(int(math.log2(size // 8))):
            c_out = max(c // 2, min_channels)
            layers += [nn.ConvTranspose2d(c, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            c = c_out
        layers += [nn.Conv2d(c, image_channels, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).view(len(z), self.c0, 8, 8))


class Discriminator(nn.Module):
    """Four stride-2 convs with LeakyReLU, linear to one logit/score (no batch normalisation;
    with ``spectral_norm`` every conv and the linear layer are spectrally normalised)."""

    def __init__(self, size: int, d_channels: int, image_channels: int = 1,
                 spectral_norm: bool = False):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm if spectral_norm else (lambda m: m)
        layers, c_in = [], image_channels
        for i in range(4):
            c = d_channels * 2**i
            layers += [sn(nn.Conv2d(c_in, c, 4, 2, 1)), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c
        self.net = nn.Sequential(*layers, nn.Flatten())
        self.fc = sn(nn.Linear(c_in * (size // 16) ** 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.net(x)).squeeze(1)


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The fraction of the base lr for 0-based ``step`` of a ``total``-step run: 1 at the first
    step, ``LR_FLOOR`` at the last (cosine or linear in between); 1 throughout for "constant".
    A function of the step only, so resumes need no scheduler state."""
    if schedule == "constant" or total <= 1:
        return 1.0
    p = min(max(step / (total - 1), 0.0), 1.0)
    if schedule == "cosine":
        return LR_FLOOR + (1.0 - LR_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0 - (1.0 - LR_FLOOR) * p


def diff_augment(x: torch.Tensor, augments: list[str]) -> torch.Tensor:
    """DiffAugment on images in [-1, 1]; the background (-1) fills shifted-in and cut-out areas."""
    if not augments:
        return x
    x = x + 1.0  # background -> 0, so zero fill is background
    b, _, h, w = x.shape
    dev = x.device
    if "translation" in augments:
        sh, sw = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)
        tx = torch.randint(-sh, sh + 1, (b, 1, 1), device=dev)
        ty = torch.randint(-sw, sw + 1, (b, 1, 1), device=dev)
        gb, gx, gy = torch.meshgrid(torch.arange(b, device=dev), torch.arange(h, device=dev),
                                    torch.arange(w, device=dev), indexing="ij")
        gx = torch.clamp(gx + tx + 1, 0, h + 1)
        gy = torch.clamp(gy + ty + 1, 0, w + 1)
        pad = F.pad(x, [1, 1, 1, 1])
        x = pad.permute(0, 2, 3, 1)[gb, gx, gy].permute(0, 3, 1, 2)
    if "cutout" in augments:
        ch, cw = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)
        ox = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=dev)
        oy = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=dev)
        gb, gx, gy = torch.meshgrid(torch.arange(b, device=dev), torch.arange(ch, device=dev),
                                    torch.arange(cw, device=dev), indexing="ij")
        gx = torch.clamp(gx + ox - ch // 2, 0, h - 1)
        gy = torch.clamp(gy + oy - cw // 2, 0, w - 1)
        mask = torch.ones(b, h, w, dtype=x.dtype, device=dev)
        mask[gb, gx, gy] = 0
        x = x * mask.unsqueeze(1)
    return x - 1.0


class GANTask:
    """Shared by DCGAN and WGAN-GP: models, optimisers, real-batch preparation, sampling."""

    sample_model = "generator"
    betas: tuple[float, float]

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.ema_decay = {"generator": cfg.ema} if cfg.ema > 0 else {}

    def models(self):
        c = self.cfg
        return {"generator": Generator(c.size, c.latent, c.g_channels, c.min_channels,
                                       c.image_channels),
                "critic": Discriminator(c.size, c.d_channels, c.image_channels,
                                        spectral_norm=c.spectral_norm)}

    def optimizers(self, models):
        betas = getattr(self, "betas", (self.cfg.beta1, 0.999))
        return {k: torch.optim.Adam(m.parameters(), lr=self.cfg.lr, betas=betas)
                for k, m in models.items()}

    def schedule_lr(self, t) -> None:
        """Both optimisers at this step's learning rate (``lr_schedule``); a host float, so
        setting it never waits for the device."""
        lr = self.cfg.lr * lr_factor(self.cfg.lr_schedule, t.step, t.total_steps)
        for opt in t.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = lr

    def real(self, batch) -> torch.Tensor:
        x = to_signed(batch[0])
        return random_hflip(x) if self.cfg.hflip else x

    def noise(self, n: int, device) -> torch.Tensor:
        return torch.randn(n, self.cfg.latent, device=device)

    def generator_step(self, t, fake: torch.Tensor) -> torch.Tensor:
        """One generator update of ``fake`` (this step's generator output, with its graph)
        against the bare critic (its weights frozen); returns G loss."""
        critic = t.raw("critic")
        critic.requires_grad_(False)
        try:
            with t.autocast():
                score = critic(diff_augment(fake.float(), self.cfg.augments)).float()
            loss = self.generator_loss(score)
            opt = t.optimizers["generator"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finally:
            critic.requires_grad_(True)
        return loss.detach()

    @torch.no_grad()
    def sample(self, model: Generator, n: int, generator: torch.Generator) -> torch.Tensor:
        device = next(model.parameters()).device
        z = torch.randn(n, model.latent, generator=generator).to(device)
        return model.eval()(z).float().add(1).div(2).clamp(0, 1)


class Task(GANTask):
    """Non-saturating GAN loss; one D and one G update per batch."""

    arch = "dcgan"

    def generator_loss(self, score):
        return F.softplus(-score).mean()

    def training_step(self, t, batch):
        self.schedule_lr(t)
        real = self.real(batch)
        n = len(real)
        aug = self.cfg.augments
        with t.autocast():
            fake = t.models["generator"](self.noise(n, t.device))
            score = t.models["critic"](torch.cat([diff_augment(real, aug),
                                                  diff_augment(fake.detach().float(), aug)])
                                       ).float()
        d_real, d_fake = score[:n], score[n:]
        d_loss = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        opt = t.optimizers["critic"]
        opt.zero_grad(set_to_none=True)
        d_loss.backward()
        opt.step()
        g_loss = self.generator_step(t, fake)
        return {"d_loss": d_loss.detach(), "g_loss": g_loss,
                "d_real": d_real.detach().mean(), "d_fake": d_fake.detach().mean()}
