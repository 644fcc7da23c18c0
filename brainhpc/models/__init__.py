"""Generator architectures, one module each: ``vae``, ``dcgan``, ``wgan_gp``, ``ddpm``, ``ldm``.

Each module defines a ``Config`` dataclass (defaults sane on a GPU, ``ldm``'s sized for the CPU
study at 64 px; every field can be overridden, tests shrink them) and a ``Task`` for
``brainhpc.train.Trainer`` with two extra members used by ``brainhpc.generate``: ``sample_model``
(the name of the model that makes images; its EMA copy is used when there is one; ``ldm`` keeps
its EMA inside that model) and ``sample(module, n, generator) -> (n, C, S, S) float in [0, 1]``.

Training batches are uint8 ``(B, C, S, S)`` tensors (a ``TensorDataset`` over a label's train
split); tasks scale them themselves. ``C`` is the config's ``image_channels``: 1 (the image) or 2
(image and tumour mask, ``generate --with-masks``). Both channels are scaled alike, so the mask
(0/255) lives in the image's training range ([-1, 1] for GANs, DDPM and LDM, [0, 1] for the VAE's
BCE), and every augmentation moves them together. ``image_channels`` is set by
``brainhpc.generate``, not an ``--opt``. Shapes are derived from the image size ``S``, a power of
two from 32 up (32, 64 and 128 px are tested).
"""

from __future__ import annotations

import dataclasses
import importlib

import torch

from brainhpc.errors import BrainhpcError

ARCHS = {"vae": "vae", "dcgan": "dcgan", "wgan-gp": "wgan_gp", "ddpm": "ddpm", "ldm": "ldm"}
FIXED = ("size", "image_channels")  # config fields set from the data, not by options


def check_generator_size(size: int, arch: str) -> int:
    if not isinstance(size, int) or size < 32 or size & (size - 1):
        raise BrainhpcError(f"{arch}: image size {size!r} is not supported; expected a power of "
                            "two >= 32 (32, 64, 128, 256)")
    return size


def module(arch: str):
    """The module of ``arch`` (one of ``ARCHS``)."""
    if arch not in ARCHS:
        raise BrainhpcError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHS)}")
    return importlib.import_module(f"brainhpc.models.{ARCHS[arch]}")


def option_names(arch: str) -> list[str]:
    """The ``--opt`` keys of ``arch``: its config fields except those set from the data."""
    return [f.name for f in dataclasses.fields(module(arch).Config) if f.name not in FIXED]


def make_config(arch: str, size: int, options: dict | None = None, image_channels: int = 1):
    """``Config(size, image_channels, **options)`` of ``arch``; unknown option keys list the
    valid ones."""
    names = option_names(arch)
    bad = sorted(set(options or {}) - set(names))
    if bad:
        raise BrainhpcError(f"{arch}: unknown option(s) {', '.join(bad)}; "
                            f"valid: {', '.join(names)}")
    return module(arch).Config(size=size, image_channels=image_channels, **(options or {}))


def build_task(arch: str, size: int, options: dict | None = None, image_channels: int = 1):
    return module(arch).Task(make_config(arch, size, options, image_channels))


def check_image_channels(cfg) -> None:
    if cfg.image_channels not in (1, 2) or isinstance(cfg.image_channels, bool):
        raise BrainhpcError(f"{type(cfg).__module__.rsplit('.', 1)[-1]}: image_channels must be "
                            f"1 (image) or 2 (image + tumour mask), got {cfg.image_channels!r}")


def to_signed(x: torch.Tensor) -> torch.Tensor:
    """uint8 batch -> float in [-1, 1] (GANs and diffusion work in this range)."""
    return x.float().mul_(2.0 / 255.0).sub_(1.0)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 batch -> float in [0, 1]."""
    return x.float().div_(255.0)


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror a random half of the batch left-right (brain slices are near-symmetric)."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def check_positive(cfg, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise BrainhpcError(f"{type(cfg).__module__.rsplit('.', 1)[-1]}: option {name} must be "
                                f"> 0, got {value!r}")
