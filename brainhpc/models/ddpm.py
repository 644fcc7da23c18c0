"""DDPM (Ho et al. 2020) with a small U-Net denoiser and DDIM sampling (Song et al. 2021).

* U-Net: 3x3 conv in; per resolution level ``res_blocks`` residual blocks (GroupNorm, SiLU, time
  embedding added) and a stride-2 conv down; a middle of two residual blocks around one
  self-attention layer at the lowest resolution (8 x 8); the mirror path up with skip
  connections (nearest upsampling + conv). Levels are derived from the size so the lowest
  resolution is 8 x 8: channel multipliers (1, 2, 2) at 32 px, (1, 2, 2, 2) at 64 px,
  (1, 1, 2, 2, 4) at 128 px (``mults`` overrides).
* Noise schedule: ``cosine`` (Nichol & Dhariwal 2021, gentler at low noise, better for small
  images) or ``linear`` (1e-4 .. 0.02), ``timesteps`` steps; the network predicts the noise and
  is trained with MSE on uniformly drawn timesteps.
* Sampling: deterministic DDIM (eta = 0) over ``sample_steps`` evenly spaced timesteps, with the
  predicted clean image clipped to [-1, 1] at every step; images are mapped to [0, 1].
* EMA of the denoiser weights (``ema``) is used for sampling.
* ``image_channels=2`` (generate --with-masks): the tumour mask is a second channel in [-1, 1],
  noised and denoised jointly with the image (one U-Net in and out, one noise MSE).

Diffusion models memorise small training sets (Akbar et al.): run the memorisation check in
``brainhpc.metrics.realism`` on every DDPM you share.
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

SCHEDULES = ("cosine", "linear")


@dataclass
class Config:
    size: int = 128
    image_channels: int = 1  # 2: image + tumour mask (set by generate --with-masks)
    channels: int = 64  # U-Net width at full resolution
    mults: tuple[int, ...] | None = None  # None: derived from size (see module docstring)
    res_blocks: int = 2
    attention: bool = True
    dropout: float = 0.1
    timesteps: int = 1000
    schedule: str = "cosine"
    sample_steps: int = 50
    lr: float = 2e-4
    batch_size: int = 64
    epochs: int = 500
    ema: float = 0.999
    hflip: bool = True

    def __post_init__(self):
        check_generator_size(self.size, "ddpm")
        check_image_channels(self)
        check_positive(self, "channels", "res_blocks", "timesteps", "sample_steps", "lr",
                       "batch_size", "epochs")
        if self.schedule not in SCHEDULES:
            raise BrainhpcError(f"ddpm: option schedule {self.schedule!r} is not one of "
                                f"{', '.join(SCHEDULES)}")
        if self.sample_steps > self.timesteps:
            raise BrainhpcError(f"ddpm: sample_steps {self.sample_steps} > timesteps "
                                f"{self.timesteps}")
        if not 0 <= self.ema < 1 or not 0 <= self.dropout < 1:
            raise BrainhpcError(f"ddpm: options ema and dropout must be in [0, 1), got "
                                f"{self.ema}, {self.dropout}")
        if self.mults is None:
            levels = int(math.log2(self.size // 8)) + 1
            self.mults = {3: (1, 2, 2), 4: (1, 2, 2, 2)}.get(levels, (1, 1, 2, 2, 4, 4, 4)[:levels])
        self.mults = tuple(int(m) for m in self.mults)
        if self.size % 2 ** (len(self.mults) - 1):
            raise BrainhpcError(f"ddpm: {len(self.mults)} levels do not divide size {self.size}")


def _groups(c: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0 and c // g >= 2 or g == 1)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.temb = nn.Linear(t_dim, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return h + self.skip(x)


class Attention(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(c), c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        ch, t_dim = cfg.channels, cfg.channels * 4
        self.ch = ch
        self.t_mlp = nn.Sequential(nn.Linear(ch, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.inc = nn.Conv2d(cfg.image_channels, ch, 3, 1, 1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        widths, c = [], ch
        for i, m in enumerate(cfg.mults):
            blocks = nn.ModuleList()
            for _ in range(cfg.res_blocks):
                blocks.append(ResBlock(c, ch * m, t_dim, cfg.dropout))
                c = ch * m
            self.down.append(blocks)
            widths.append(c)
            last = i == len(cfg.mults) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(c, c, 3, 2, 1))
        self.mid1 = ResBlock(c, c, t_dim, cfg.dropout)
        self.attn = Attention(c) if cfg.attention else nn.Identity()
        self.mid2 = ResBlock(c, c, t_dim, cfg.dropout)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, m in reversed(list(enumerate(cfg.mults))):
            blocks = nn.ModuleList()
            for j in range(cfg.res_blocks):
                blocks.append(ResBlock(c + (widths[i] if j == 0 else 0), ch * m, t_dim,
                                       cfg.dropout))
                c = ch * m
            self.up.append(blocks)
            self.upsample.append(nn.Identity() if i == 0 else nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, 1, 1)))
        self.out = nn.Sequential(nn.GroupNorm(_groups(c), c), nn.SiLU(),
                                 nn.Conv2d(c, cfg.image_channels, 3, 1, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.t_mlp(timestep_embedding(t, self.ch))
        h = self.inc(x)
        skips = []
        for blocks, down in zip(self.down, self.downsample, strict=True):
            for b in blocks:
                h = b(h, temb)
            skips.append(h)
            h = down(h)
        h = self.mid2(self.attn(self.mid1(h, temb)), temb)
        for blocks, up in zip(self.up, self.upsample, strict=True):
            h = torch.cat([h, skips.pop()], dim=1)
            for b in blocks:
                h = b(h, temb)
            h = up(h)
        return self.out(h)


def alphas_cumprod(schedule: str, timesteps: int) -> torch.Tensor:
    """Cumulative signal fraction alpha_bar_t for t = 0 .. T-1 (float64)."""
    if schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64)
        return torch.cumprod(1 - betas, 0)
    s = 0.008
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0)


class Task:
    arch = "ddpm"
    sample_model = "unet"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.ema_decay = {"unet": cfg.ema} if cfg.ema > 0 else {}
        self.abar = alphas_cumprod(cfg.schedule, cfg.timesteps).float()
        self._abar_on = self.abar  # the copy on the training device (made once, not per step)

    def models(self):
        return {"unet": UNet(self.cfg)}

    def optimizers(self, models):
        return {"unet": torch.optim.AdamW(models["unet"].parameters(), lr=self.cfg.lr,
                                          weight_decay=0.0)}

    def training_step(self, t, batch):
        x0 = to_signed(batch[0])
        if self.cfg.hflip:
            x0 = random_hflip(x0)
        n = len(x0)
        if self._abar_on.device != x0.device:
            self._abar_on = self.abar.to(x0.device)
        abar = self._abar_on
        ts = torch.randint(0, self.cfg.timesteps, (n,), device=x0.device)
        noise = torch.randn_like(x0)
        a = abar[ts][:, None, None, None]
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with t.autocast():
            pred = t.models["unet"](xt, ts)
        loss = F.mse_loss(pred.float(), noise)
        opt = t.optimizers["unet"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(t.raw("unet").parameters(), 1.0)
        opt.step()
        return {"loss": loss.detach()}

    @torch.no_grad()
    def sample(self, model: UNet, n: int, generator: torch.Generator,
               batch: int = 64) -> torch.Tensor:
        model.eval()
        device = next(model.parameters()).device
        abar = self.abar.to(device)
        steps = torch.linspace(self.cfg.timesteps - 1, 0, self.cfg.sample_steps).round().long()
        out = []
        for lo in range(0, n, batch):
            m = min(batch, n - lo)
            x = torch.randn(m, self.cfg.image_channels, self.cfg.size, self.cfg.size,
                            generator=generator).to(device)
            for k, ts in enumerate(steps.tolist()):
                a = abar[ts]
                a_prev = abar[steps[k + 1]] if k + 1 < len(steps) else torch.ones((), device=device)
                eps = model(x, torch.full((m,), ts, device=device)).float()
                x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
                eps = (x - a.sqrt() * x0) / (1 - a).sqrt()  # consistent with the clipped x0
                x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
            out.append(x.add(1).div(2).clamp(0, 1))
        return torch.cat(out)
