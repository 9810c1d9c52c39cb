"""A PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial Networks",
§3.2.2), the adversarial part of the autoencoder loss of Esser et al. 2021 (VQGAN) and Rombach et al. 2022 (§3).
Training only: it never ships in a pipeline.

It classifies overlapping patches rather than whole images, so it judges local texture and edges, which an
L1 loss alone leaves blurry. GroupNorm replaces pix2pix's BatchNorm so that a logit does not depend on the other
images in the (per-process) batch: one process and several give the same result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PatchDiscriminatorConfig:
    in_channels: int = 3
    channels: int = 64  # of the first convolution; doubled per layer up to 8×
    layers: int = 3  # stride-2 convolutions: the receptive field is 70 px at 3 layers, 34 px at 2
    norm_groups: int = 16


DISCRIMINATOR_PRESETS = {"tiny": PatchDiscriminatorConfig(channels=8, layers=2, norm_groups=4)}


class PatchDiscriminator(nn.Module):
    """(B, C, H, W) images in [-1, 1] → (B, 1, h, w) real-vs-fake logits, one per patch (h = H/2^layers - 2, so
    H must be at least 2^layers · 3)."""

    def __init__(self, config: PatchDiscriminatorConfig):
        super().__init__()
        self.config = c = config
        widths = [c.channels * min(2 ** i, 8) for i in range(c.layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, c.layers + 1):
            stride = 2 if i < c.layers else 1  # the last layer keeps the resolution (as in pix2pix)
            layers += [nn.Conv2d(widths[i - 1], widths[i], 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(math.gcd(c.norm_groups, widths[i]), widths[i]), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix initialisation: N(0, 0.02) convolutions
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """½ (E[max(0, 1 - D(x))] + E[max(0, 1 + D(x̂))]) (Lim & Ye 2017, Geometric GAN, Eq. 8; as in VQGAN)."""
    return 0.5 * (torch.relu(1 - logits_real).mean() + torch.relu(1 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-E[D(x̂)]: the generator (here the autoencoder's decoder) pushes its reconstructions towards "real"."""
    return -logits_fake.mean()
