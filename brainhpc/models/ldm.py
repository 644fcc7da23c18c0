"""Latent diffusion (Rombach et al. 2022; Pinaya et al. 2022 for brain MRI) from MONAI's networks.

* Autoencoder: ``monai.networks.nets.AutoencoderKL`` (2-D, ``ae_channels`` per level, one
  stride-2 step between levels, ``ae_res_blocks`` residual blocks per level, no attention at the
  image-resolution levels, optional non-local attention at the lowest one: ``ae_attention``), to
  ``latent_channels`` x S/4 x S/4 with the default three levels (16 x 16 x 3 at 64 px). The
  decoder output is linear; images and masks live in [-1, 1] for training.
* Patch discriminator: ``monai.networks.nets.PatchDiscriminator`` (``d_layers`` convs,
  ``d_channels`` doubling, GroupNorm rather than BatchNorm, so real and reconstructed images can
  share one forward), least-squares patch loss. It sees image and mask together.
* Denoiser: ``monai.networks.nets.DiffusionModelUNet`` on the latents (``unet_channels`` per
  level, ``unet_res_blocks`` per level, self-attention at the lowest level with
  ``head_channels`` per head).
* Noise: ``monai.networks.schedulers.DDPMScheduler`` (``timesteps``, ``schedule``; the default
  "scaled_linear_beta" 0.0015 .. 0.0195 is the LDM paper's). The UNet predicts the velocity
  (``prediction="v_prediction"``, the default) or the noise (``"epsilon"``), trained with MSE
  weighted by Min-SNR-gamma (``min_snr``, Hang et al. 2023: the low-noise timesteps stop
  dominating the gradient, so global structure is learnt in fewer steps; 0: plain MSE).

Training runs in two phases within one run, chosen by the step (``t.step``):

1. steps < ``ae_steps``: the autoencoder alone, loss = L1 + ``ssim_weight`` x (1 - SSIM) +
   ``kl_weight`` x KL, and from step ``adv_start`` on ``adv_weight`` x the least-squares patch
   loss against the discriminator, which is updated on the same step (real and reconstruction
   in one forward, after the autoencoder's update against the bare discriminator).
2. steps >= ``ae_steps``: the autoencoder is frozen: images are encoded without gradients (a
   posterior sample, what the decoder learnt to decode), scaled by ``scale_factor`` = 1 / std
   of the latents of the first phase-2 batch (measured once, at the switch; averaged over ranks;
   a buffer of the model, so it is in every checkpoint and in sampling), and the UNet learns to
   denoise them. An EMA of the UNet weights (``ema``, warmed up from the switch:
   decay min(ema, (1 + k) / (10 + k)) after k diffusion steps) is kept *inside* the model
   (``unet_ema``, in its checkpoints; the trainer's ``ema_decay`` is empty). The trainer's EMA
   would average the whole model: the autoencoder too, so the sampling decoder would not be the
   encoder's partner the UNet learnt on, and the UNet from its random weights at the decay the
   step count has reached by the switch (0.994 at step 1,500).

Step arithmetic: ``epochs`` sets the total, so the diffusion phase gets epochs x
floor(n_train / batch_size) - ``ae_steps`` steps (a run whose planned total does not exceed
``ae_steps`` is refused at its first step). The defaults are sized for the CPU study at 64 px
(2 cores; fp32, as ``auto`` has no bf16 measurement for "ldm"; <= 40 minutes a cell). Measured
on the development machine (``benchmarks/bench_generate.py``, 2 threads, batch 32, another job
on the cores): an autoencoder step 0.68 s (1.0 s with the patch discriminator), a diffusion step
0.4 s, sampling ~4.7 images/s. So 750 + 750 autoencoder steps ~21 min; Br35H's 1,050 train
images a label make 32 steps an epoch, x 100 epochs = 3,200 steps, 1,700 of them diffusion ~11
min; 1,500 samples ~5.5 min: ~38 min. A label with more images gets more diffusion steps (LGG
healthy, 1,385: 2,800 steps, ~45 min), one with fewer fewer (LGG tumour, 764: 800): set
``epochs`` per dataset. The issue's probe sizes, (32, 64, 64) for the autoencoder and
(64, 128, 128) for the UNet, cost ~3x and ~2.3x these per step.

Sampling: deterministic DDIM (``monai.networks.schedulers.DDIMScheduler``, eta = 0) over
``sample_steps`` timesteps from Gaussian latents drawn from the caller's generator, latents
divided by ``scale_factor`` and decoded, images clamped to [-1, 1] and mapped to [0, 1].

``image_channels=2`` (generate --with-masks): the tumour mask is a second channel of the image
the autoencoder encodes and decodes (and the discriminator judges); the latents carry both.

DDP: every model is called through its wrapper in the phase that trains it; the part a phase does
not train (the UNet in phase 1, the autoencoder in phase 2) gets a zero-weighted term in the loss
whenever the model is in DDP (gpu-check wraps even one rank), so DDP (without
``find_unused_parameters``) sees a gradient for every parameter on every step (without it the
second step fails: "Expected to have finished reduction in the prior iteration").

Why velocity, not noise: an LGG tumour-pair cell with noise prediction (1,500 autoencoder +
1,800 UNet steps) drew texture in 4 samples of 5. Its autoencoder was fine (held-out
reconstructions are blurred heads with lesions); its sampled latents were not: std 4-5 against
the real latents' 1.0. At the first DDIM steps (alpha-bar ~2e-4) the denoised estimate is the
noise error amplified ~70x (x0 = (z - sqrt(1 - a) eps) / sqrt(a)), so it starts 7 std wide and
the UNet, now fed latents unlike any it trained on, never pulls it back. Predicting the velocity
makes the model state x0 directly where the noise dominates: the same frozen autoencoder with a
fresh velocity UNet (1,500 steps) drew a head in every sample, latent std 0.95, mask area 3.9%
of pixels against the real 3.9%.

Earlier probes. Probes on 64 px phantom tumour
slices (1 thread, shared cores): the autoencoder at batch 16, lr 5e-4, patch loss from step 250
reconstructs the head, ventricles and lesions but blurred (held-out L1 0.074 / 0.046 / 0.043 and
SSIM 0.57 / 0.77 / 0.79 after 100 / 300 / 400 steps, still improving); its decoder turns latent
noise of 25% of the latent std into texture, so the UNet must be accurate before the samples look
like heads; 250 UNet steps drew texture. Look at samples.png and the realism card first.

Diffusion models memorise small training sets (Akbar et al.): run the memorisation check in
``brainhpc.metrics.realism`` on every LDM you share.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from monai.networks.nets import AutoencoderKL, DiffusionModelUNet, PatchDiscriminator
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from brainhpc.errors import BrainhpcError
from brainhpc.models import (
    check_generator_size,
    check_image_channels,
    check_positive,
    random_hflip,
    to_signed,
)
from brainhpc.models.ssim import ssim as ssim_index

SCHEDULES = ("scaled_linear_beta", "linear_beta", "cosine")
PREDICTIONS = ("epsilon", "v_prediction")
BETAS = {"beta_start": 0.0015, "beta_end": 0.0195}  # the linear schedules' range (LDM paper)


@dataclass
class Config:
    size: int = 64
    image_channels: int = 1  # 2: image + tumour mask (set by generate --with-masks)
    ae_channels: tuple[int, ...] = (16, 32, 64)  # autoencoder levels: S / 2**(levels-1) latents
    latent_channels: int = 3
    ae_res_blocks: int = 1
    ae_attention: bool = False  # non-local attention at the autoencoder's lowest level
    d_channels: int = 32  # first discriminator conv; doubled per layer
    d_layers: int = 3
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_res_blocks: int = 2
    head_channels: int = 32  # attention head width at the UNet's lowest level
    ae_steps: int = 1500  # phase 1 (autoencoder) steps; the rest of the run is phase 2
    adv_start: int = 750  # first step with the patch loss; >= ae_steps: never
    ae_lr: float = 5e-4
    d_lr: float = 2e-4
    lr: float = 2e-4  # the UNet's
    ssim_weight: float = 0.5
    kl_weight: float = 1e-6
    adv_weight: float = 0.01
    timesteps: int = 1000
    schedule: str = "scaled_linear_beta"
    prediction: str = "v_prediction"  # see the docstring: noise prediction drew texture
    min_snr: float = 5.0  # Min-SNR-gamma loss weighting (Hang et al. 2023); 0: plain MSE
    sample_steps: int = 50
    batch_size: int = 32
    epochs: int = 100
    ema: float = 0.999  # UNet EMA decay (kept in the model); 0 turns it off
    hflip: bool = True

    def __post_init__(self):
        check_generator_size(self.size, "ldm")
        check_image_channels(self)
        self.ae_channels = _ints(self, "ae_channels")
        self.unet_channels = _ints(self, "unet_channels")
        check_positive(self, "latent_channels", "ae_res_blocks", "d_channels", "d_layers",
                       "unet_res_blocks", "head_channels", "ae_lr", "d_lr", "lr",
                       "timesteps", "sample_steps", "batch_size", "epochs")
        self._check_choices()
        for name, low in (("ae_steps", 1), ("adv_start", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise BrainhpcError(f"ldm: option {name} must be an integer >= {low}, "
                                    f"got {value!r}")
        for name in ("ssim_weight", "kl_weight", "adv_weight", "min_snr"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                raise BrainhpcError(f"ldm: option {name} must be >= 0, got "
                                    f"{getattr(self, name)!r}")
        if not 0 <= self.ema < 1:
            raise BrainhpcError(f"ldm: option ema must be in [0, 1), got {self.ema}")
        if self.sample_steps > self.timesteps:
            raise BrainhpcError(f"ldm: option sample_steps {self.sample_steps} > timesteps "
                                f"{self.timesteps}")
        self._check_shapes()

    def _check_choices(self) -> None:
        if self.schedule not in SCHEDULES:
            raise BrainhpcError(f"ldm: option schedule {self.schedule!r} is not one of "
                                f"{', '.join(SCHEDULES)}")
        if self.prediction not in PREDICTIONS:
            raise BrainhpcError(f"ldm: option prediction {self.prediction!r} is not one of "
                                f"{', '.join(PREDICTIONS)}")

    def _check_shapes(self) -> None:
        if len(self.ae_channels) < 2 or self.size % 2 ** (len(self.ae_channels) - 1):
            raise BrainhpcError(f"ldm: option ae_channels needs >= 2 levels whose "
                                f"{len(self.ae_channels) - 1} halvings divide size {self.size}, "
                                f"got {list(self.ae_channels)}")
        if len(self.unet_channels) < 2 or self.latent_size % 2 ** (len(self.unet_channels) - 1):
            raise BrainhpcError(f"ldm: option unet_channels needs >= 2 levels whose "
                                f"{len(self.unet_channels) - 1} halvings divide the "
                                f"{self.latent_size} px latents, got {list(self.unet_channels)}")
        if self.unet_channels[-1] % self.head_channels:
            raise BrainhpcError(f"ldm: option head_channels {self.head_channels} does not divide "
                                f"the UNet's lowest level ({self.unet_channels[-1]} channels)")

    @property
    def latent_size(self) -> int:
        return self.size // 2 ** (len(self.ae_channels) - 1)


def _ints(cfg: Config, name: str) -> tuple[int, ...]:
    value = getattr(cfg, name)
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise BrainhpcError(f"ldm: option {name} must be a list of positive integers, "
                            f"got {value!r}")
    return tuple(value)


def _groups(channels: tuple[int, ...]) -> int:
    """GroupNorm groups that divide every level's channels (at most 32, MONAI's default)."""
    return math.gcd(32, *channels)


class LatentDiffusion(nn.Module):
    """What samples: the autoencoder, the latent UNet, its EMA copy and the latent scale.

    ``forward(x)`` autoencodes (reconstruction, posterior mean, posterior std);
    ``forward(z, timesteps)`` is the UNet's prediction for noisy latents ``z``."""

    def __init__(self, cfg: Config):
        super().__init__()
        c = cfg.image_channels
        levels = len(cfg.ae_channels)
        self.autoencoder = AutoencoderKL(
            spatial_dims=2, in_channels=c, out_channels=c, channels=cfg.ae_channels,
            num_res_blocks=cfg.ae_res_blocks, attention_levels=(False,) * levels,
            latent_channels=cfg.latent_channels, norm_num_groups=_groups(cfg.ae_channels),
            with_encoder_nonlocal_attn=cfg.ae_attention,
            with_decoder_nonlocal_attn=cfg.ae_attention)
        n = len(cfg.unet_channels)
        self.unet = DiffusionModelUNet(
            spatial_dims=2, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels,
            channels=cfg.unet_channels, num_res_blocks=cfg.unet_res_blocks,
            attention_levels=(False,) * (n - 1) + (True,),
            num_head_channels=(0,) * (n - 1) + (cfg.head_channels,),
            norm_num_groups=_groups(cfg.unet_channels))
        self.unet_ema = (copy.deepcopy(self.unet).requires_grad_(False).eval()
                         if cfg.ema > 0 else None)
        self.register_buffer("scale_factor", torch.ones(()))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | None = None):
        if timesteps is None:
            return self.autoencoder(x)
        return self.unet(x, timesteps)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.unet_ema is not None:
            self.unet_ema.eval()
        return self

    def sampler(self) -> nn.Module:
        """The UNet that samples: the EMA copy when there is one."""
        return self.unet if self.unet_ema is None else self.unet_ema


def discriminator(cfg: Config) -> nn.Module:
    return PatchDiscriminator(spatial_dims=2, channels=cfg.d_channels,
                              in_channels=cfg.image_channels, num_layers_d=cfg.d_layers,
                              norm=("GROUP", {"num_groups": _groups((cfg.d_channels,))}))


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)), summed over a latent, averaged over the batch."""
    kl = mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-12) - 1
    return 0.5 * kl.flatten(1).sum(1).mean()


def _in_ddp(t) -> bool:
    """Whether the trainer wrapped the model in DDP (also with one rank: gpu-check forces it)."""
    return t.models["ldm"] is not t.raw("ldm")


def zero_term(module: nn.Module) -> torch.Tensor:
    """0 x every parameter of ``module``: gives each a (zero) gradient for DDP."""
    return sum(p.sum() for p in module.parameters()) * 0.0


class Task:
    arch = "ldm"
    sample_model = "ldm"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.ema_decay: dict[str, float] = {}  # the UNet's EMA lives in the model (docstring)
        self.sample_ema = cfg.ema > 0  # sample() uses an EMA although the trainer keeps none
        kw = BETAS if cfg.schedule != "cosine" else {}
        self.noise = DDPMScheduler(num_train_timesteps=cfg.timesteps, schedule=cfg.schedule,
                                   prediction_type=cfg.prediction, clip_sample=False, **kw)
        self.ddim = DDIMScheduler(num_train_timesteps=cfg.timesteps, schedule=cfg.schedule,
                                  prediction_type=cfg.prediction, clip_sample=False, **kw)

    def models(self):
        return {"ldm": LatentDiffusion(self.cfg), "discriminator": discriminator(self.cfg)}

    def optimizers(self, models):
        ldm, c = models["ldm"], self.cfg
        return {"autoencoder": torch.optim.Adam(ldm.autoencoder.parameters(), lr=c.ae_lr),
                "unet": torch.optim.AdamW(ldm.unet.parameters(), lr=c.lr, weight_decay=0.0),
                "discriminator": torch.optim.Adam(models["discriminator"].parameters(),
                                                  lr=c.d_lr, betas=(0.5, 0.999))}

    def training_step(self, t, batch):
        planned = t.cfg.epochs * t.steps_per_epoch  # max_steps may cut a run short on purpose
        if t.step == 0 and planned <= self.cfg.ae_steps:
            raise BrainhpcError(
                f"ldm: ae_steps {self.cfg.ae_steps} >= the run's {planned} training steps "
                f"({t.cfg.epochs} epochs of {t.steps_per_epoch}): the diffusion model would "
                "never train; lower ae_steps or raise epochs")
        x = to_signed(batch[0])
        if self.cfg.hflip:
            x = random_hflip(x)
        if t.step < self.cfg.ae_steps:
            return self.autoencoder_step(t, x)
        return self.diffusion_step(t, x)

    # ------------------------------------------------------------------ phase 1
    def autoencoder_step(self, t, x: torch.Tensor) -> dict:
        cfg = self.cfg
        adversarial = t.step >= cfg.adv_start
        with t.autocast():
            recon, mu, sigma = t.models["ldm"](x)
        recon = recon.float()
        l1 = (recon - x).abs().mean()
        ssim = 1.0 - ssim_index(recon, x, data_range=2.0).mean()  # MONAI's SSIMLoss
        kl = kl_loss(mu.float(), sigma.float())
        loss = l1 + cfg.ssim_weight * ssim + cfg.kl_weight * kl
        out = {"l1": l1.detach(), "ssim": 1 - ssim.detach(), "kl": kl.detach()}
        if adversarial:
            g = self._generator_term(t, recon)
            loss = loss + cfg.adv_weight * g
            out["g_loss"] = g.detach()
        if _in_ddp(t):
            loss = loss + zero_term(t.raw("ldm").unet)
        opt = t.optimizers["autoencoder"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if adversarial:
            out["d_loss"] = self._discriminator_step(t, x, recon.detach())
        out["loss"] = loss.detach()
        return out

    def _generator_term(self, t, recon: torch.Tensor) -> torch.Tensor:
        """The least-squares patch loss of the reconstruction against the bare discriminator
        (its weights get no gradient)."""
        d = t.raw("discriminator")
        d.requires_grad_(False)
        try:
            with t.autocast():
                logits = d(recon)[-1].float()
        finally:
            d.requires_grad_(True)
        return (logits - 1).pow(2).mean()

    def _discriminator_step(self, t, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        n = len(real)
        with t.autocast():
            logits = t.models["discriminator"](torch.cat([real, fake]))[-1].float()
        loss = 0.5 * ((logits[:n] - 1).pow(2).mean() + logits[n:].pow(2).mean())
        opt = t.optimizers["discriminator"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    # ------------------------------------------------------------------ phase 2
    @torch.no_grad()
    def encode(self, t, x: torch.Tensor) -> torch.Tensor:
        """Scaled latents of ``x`` (the frozen autoencoder's posterior sample); at the first
        phase-2 step the scale is measured first."""
        ldm = t.raw("ldm")
        with t.autocast():
            mu, sigma = ldm.autoencoder.encode(x)
        z = ldm.autoencoder.sampling(mu.float(), sigma.float())
        if t.step == self.cfg.ae_steps:
            var = z.var()
            if t.world_size > 1:
                dist.all_reduce(var)
                var /= t.world_size
            ldm.scale_factor.copy_(var.clamp_min(1e-12).rsqrt())
        return z * ldm.scale_factor

    def diffusion_step(self, t, x: torch.Tensor) -> dict:
        z = self.encode(t, x)
        noise = torch.randn_like(z)
        ts = torch.randint(0, self.cfg.timesteps, (len(z),), device=z.device)
        zt = self.noise.add_noise(z, noise, ts)
        target = noise if self.cfg.prediction == "epsilon" else \
            self.noise.get_velocity(z, noise, ts)
        with t.autocast():
            pred = t.models["ldm"](zt, ts)
        mse = (pred.float() - target).pow(2).flatten(1).mean(1)
        loss = (self.snr_weight(ts) * mse).mean()
        total = loss + zero_term(t.raw("ldm").autoencoder) if _in_ddp(t) else loss
        opt = t.optimizers["unet"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(t.raw("ldm").unet.parameters(), 1.0)
        opt.step()
        self._update_ema(t)
        return {"loss": loss.detach(), "mse": mse.detach().mean(),
                "scale_factor": t.raw("ldm").scale_factor.detach()}

    def snr_weight(self, ts: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights: min(SNR, gamma) / SNR for noise prediction, / (SNR + 1) for
        velocity (Min-SNR-gamma: the many low-noise timesteps, whose noise is hard to see and
        easy to overfit, stop dominating the gradient; structure is learnt sooner); 1 when off."""
        if not self.cfg.min_snr:
            return torch.ones(len(ts), device=ts.device)
        abar = self.noise.alphas_cumprod.to(ts.device)[ts].float()
        snr = abar / (1 - abar)
        denom = snr if self.cfg.prediction == "epsilon" else snr + 1
        return snr.clamp(max=self.cfg.min_snr) / denom

    @torch.no_grad()
    def _update_ema(self, t) -> None:
        ldm = t.raw("ldm")
        if ldm.unet_ema is None:
            return
        k = t.step - self.cfg.ae_steps
        decay = min(self.cfg.ema, (1 + k) / (10 + k))
        torch._foreach_lerp_([p for p in ldm.unet_ema.parameters()],
                             [p.detach() for p in ldm.unet.parameters()], 1.0 - decay)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, model: LatentDiffusion, n: int, generator: torch.Generator,
               batch: int = 64) -> torch.Tensor:
        model.eval()
        device = model.scale_factor.device
        unet, cfg = model.sampler(), self.cfg
        self.ddim.set_timesteps(cfg.sample_steps)
        out = []
        for lo in range(0, n, batch):
            m = min(batch, n - lo)
            z = torch.randn(m, cfg.latent_channels, cfg.latent_size, cfg.latent_size,
                            generator=generator).to(device)
            for ts in self.ddim.timesteps.tolist():
                pred = unet(z, torch.full((m,), ts, device=device)).float()
                z, _ = self.ddim.step(pred, ts, z)
            x = model.autoencoder.decode(z / model.scale_factor).float()
            out.append(x.clamp(-1, 1).add(1).div(2))
        return torch.cat(out)
