"""The segmenter's network: MONAI's 2D U-Net, one input channel, one logit channel.

``init_prior`` starts it at the training masks' tumour share instead of p = 0.5 everywhere;
``check_divisible`` refuses image sizes the strides cannot halve.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.networks.nets import UNet
from torch import nn

from brainhpc.errors import BrainhpcError


def build_unet(hparams: dict) -> UNet:
    """The U-Net of ``hparams`` (channels, strides, res_units, dropout: what model.pt stores)."""
    return UNet(spatial_dims=2, in_channels=1, out_channels=1,
                channels=tuple(hparams["channels"]), strides=tuple(hparams["strides"]),
                num_res_units=int(hparams["res_units"]), dropout=float(hparams["dropout"]))


def init_prior(model: UNet, prior: float) -> float:
    """Set the output bias to logit(prior), the training masks' tumour-pixel share: a U-Net that
    starts at p = 0.5 everywhere needs over a thousand Adam steps just to learn that tumour is
    rare (measured on the phantoms), and the slow, DiceCE-dominated start often ends predicting
    everything. The same prior-probability start as Lin et al.'s focal-loss detector."""
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    last = convs[-1]  # MONAI builds the top up-block last: the layer that emits the logit
    if last.out_channels != 1 or last.bias is None:
        raise BrainhpcError(f"U-Net output layer {last} is not a one-channel conv with a bias")
    p = float(np.clip(prior, 1e-4, 0.5))
    with torch.no_grad():
        last.bias.fill_(math.log(p / (1 - p)))
    return math.log(p / (1 - p))


def check_divisible(size: int, strides, what: str) -> None:
    """MONAI's U-Net needs the image size divisible by the product of its strides."""
    f = int(np.prod(strides))
    if size % f:
        raise BrainhpcError(f"{what}: {size} px images cannot pass a U-Net with strides "
                            f"{tuple(strides)} (size must be divisible by {f}); use fewer or "
                            f"smaller strides, or re-prepare at a size divisible by {f}")
