"""Generator architectures, one module each: ``vae``, ``dcgan``, ``wgan_gp``, ``ddpm``.

Each module defines a ``Config`` dataclass (defaults sane on a GPU; every field can be overridden,
tests shrink them) and a ``Task`` for ``brainhpc.train.Trainer`` with two extra members used by
``brainhpc.generate``: ``sample_model`` (the name of the model that makes images; its EMA copy is
used when there is one) and ``sample(module, n, generator) -> (n, 1, S, S) float in [0, 1]``.

Training batches are uint8 ``(B, 1, S, S)`` tensors (a ``TensorDataset`` over a label's train
split); tasks scale them themselves. Shapes are derived from the image size ``S``, a power of two
from 32 up (32, 64 and 128 px are tested).
"""

from __future__ import annotations

import dataclasses
import importlib

import torch

from brainhpc.errors import BrainhpcError

ARCHS = {"vae": "vae", "dcgan": "dcgan", "wgan-gp": "wgan_gp", "ddpm": "ddpm"}


def check_size(size: int, arch: str) -> int:
    if not isinstance(size, int) or size < 32 or size & (size - 1):
        raise BrainhpcError(f"{arch}: image size {size!r} is not supported; expected a power of "
                            "two >= 32 (32, 64, 128, 256)")
    return size


def module(arch: str):
    """The module of ``arch`` (one of ``ARCHS``)."""
    if arch not in ARCHS:
        raise BrainhpcError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHS)}")
    return importlib.import_module(f"brainhpc.models.{ARCHS[arch]}")


def make_config(arch: str, size: int, options: dict | None = None):
    """``Config(size=size, **options)`` of ``arch``; unknown option keys list the valid ones."""
    cls = module(arch).Config
    names = [f.name for f in dataclasses.fields(cls) if f.name != "size"]
    bad = sorted(set(options or {}) - set(names))
    if bad:
        raise BrainhpcError(f"{arch}: unknown option(s) {', '.join(bad)}; "
                            f"valid: {', '.join(names)}")
    return cls(size=size, **(options or {}))


def build_task(arch: str, size: int, options: dict | None = None):
    return module(arch).Task(make_config(arch, size, options))


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
