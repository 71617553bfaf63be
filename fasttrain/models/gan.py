"""pix2pix networks (Isola et al. 2017), after junyanz/pytorch-CycleGAN-and-pix2pix.

``unet``: the U-Net generator with skip connections and a tanh output (images in -1..1), its depth adapted to
the image size so the bottleneck is 1 x 1 for powers of two (8 levels at 256 px, 6 at 64 px).
``patchgan``: the 70 x 70 PatchGAN discriminator (3 stride-2 layers), which classifies overlapping patches of
the concatenated (input, target-or-output) channels and returns one logit per patch.
Both use BatchNorm and the reference's N(0, 0.02) initialisation.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UnetBlock", "unet_depth", "unet", "patchgan", "init_pix2pix_weights"]

MAX_UNET_DEPTH = 8
MIN_UNET_DEPTH = 4


def init_pix2pix_weights(module: nn.Module, gain: float = 0.02) -> None:
    """Conv weights ~ N(0, gain), BatchNorm weights ~ N(1, gain), biases 0 (the reference's ``init_type=normal``)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)


class UnetBlock(nn.Module):
    """One level: down (LeakyReLU, stride-2 conv, BN), the inner levels, up (ReLU, transposed conv, BN),
    and the skip connection that concatenates this level's input with its output (except the outermost).

    The first LeakyReLU is not in place (the reference's is): ``x`` is also the skip, and an in-place
    activation would silently change what the skip carries.
    """

    def __init__(
        self,
        outer: int,
        inner: int,
        *,
        in_channels: int | None = None,
        sub: nn.Module | None = None,
        outermost: bool = False,
        innermost: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.outermost = outermost
        in_channels = outer if in_channels is None else in_channels
        # As in the reference, only the outermost convs carry biases (BatchNorm's shift replaces the others').
        down_conv = nn.Conv2d(in_channels, inner, 4, stride=2, padding=1, bias=outermost)
        layers: list[nn.Module]
        if outermost:
            assert sub is not None
            up = nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1)
            layers = [down_conv, sub, nn.ReLU(True), up, nn.Tanh()]
        elif innermost:
            up = nn.ConvTranspose2d(inner, outer, 4, stride=2, padding=1, bias=False)
            layers = [nn.LeakyReLU(0.2), down_conv, nn.ReLU(True), up, nn.BatchNorm2d(outer)]
        else:
            assert sub is not None
            up = nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1, bias=False)
            layers = [
                nn.LeakyReLU(0.2),
                down_conv,
                nn.BatchNorm2d(inner),
                sub,
                nn.ReLU(True),
                up,
                nn.BatchNorm2d(outer),
            ]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        return torch.cat([x, self.model(x)], 1)


def unet_depth(image_size: int) -> int:
    """Down-sampling levels: as many halvings as the size allows exactly (at most 8, at least 4)."""
    depth = 0
    while depth < MAX_UNET_DEPTH and image_size % 2 ** (depth + 1) == 0:
        depth += 1
    if depth < MIN_UNET_DEPTH:
        raise ValueError(
            f"data.image_size: the U-Net needs a size divisible by {2**MIN_UNET_DEPTH} "
            f"(64, 128, 256, ...), got {image_size}"
        )
    return depth


def unet(
    *, in_channels: int, num_outputs: int, image_size: int, width: int = 64, dropout: float = 0.0, **_: object
) -> nn.Module:
    """U-Net generator: ``num_outputs`` output channels (tanh), ``width`` filters in the outer layer (ngf).

    ``dropout`` applies in the three innermost 8 * width decoder levels, as pix2pix does with 0.5.
    """
    depth = unet_depth(image_size)
    w = width
    block = UnetBlock(w * 8, w * 8, innermost=True)
    for _level in range(depth - 5):  # the 8 * width levels between the innermost and the widening ones
        block = UnetBlock(w * 8, w * 8, sub=block, dropout=dropout)
    for mult in (4, 2, 1):
        block = UnetBlock(w * mult, w * mult * 2, sub=block)
    net = UnetBlock(num_outputs, w, in_channels=in_channels, sub=block, outermost=True)
    init_pix2pix_weights(net)
    return net


def patchgan(
    *,
    in_channels: int,
    num_outputs: int = 1,
    image_size: int = 256,
    width: int = 64,
    dropout: float = 0.0,
    layers: int = 3,
    **_: object,
) -> nn.Module:
    """PatchGAN discriminator over ``in_channels`` (input + target channels); one logit per 70 x 70 patch.

    ``num_outputs`` and ``dropout`` are ignored (one logit per patch, no dropout), as in the reference.
    """
    seq: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, layers + 1):
        prev, mult = mult, min(2**n, 8)
        stride = 2 if n < layers else 1  # the last one keeps the resolution, as in the reference
        seq += [
            nn.Conv2d(width * prev, width * mult, 4, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width * mult),
            nn.LeakyReLU(0.2, True),
        ]
    seq.append(nn.Conv2d(width * mult, 1, 4, stride=1, padding=1))
    net = nn.Sequential(*seq)
    init_pix2pix_weights(net)
    return net
